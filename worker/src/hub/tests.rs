use super::*;
use bytes::Bytes;
use std::collections::VecDeque;

fn hub_with(rules: &[&str]) -> Hub {
    let metrics = Arc::new(Metrics::new("t"));
    let streams = Streams::new(
        crate::history::Settings {
            rules: rules.iter().map(|r| r.parse().unwrap()).collect(),
            max_total_bytes: 1 << 30,
            max_replay: 100,
            repair_timeout: Duration::from_secs(1),
            max_held: 100,
            has_peers: false,
        },
        metrics.clone(),
    );
    Hub::new(
        metrics,
        Compression {
            min_bytes: 0,
            level: 6,
        },
        streams,
        Peers::new(Vec::new(), Duration::from_secs(1), 256),
        Duration::from_secs(1),
    )
}

fn hub() -> Hub {
    hub_with(&[])
}

fn msg(topic: &str, offset: Option<u64>) -> Inbound {
    Inbound::Message(Published {
        topic: Bytes::copy_from_slice(topic.as_bytes()),
        position: offset.map(|offset| Position { epoch: 1, offset }),
        published_at_us: None,
        payload: Bytes::from(format!("{{\"x\":{}}}", offset.unwrap_or(0))),
    })
}

fn sub(id: u64, enc: Encoding) -> Arc<Subscriber> {
    Arc::new(Subscriber::new(id, enc, 1 << 20))
}

fn subscribe(h: &mut Hub, s: &Arc<Subscriber>, filter: Filter, history: Option<HistoryRequest>) {
    let command = Command::Subscribe {
        sub: s.clone(),
        id: None,
        filter,
        history,
    };
    h.command(command, Instant::now());
}

/// The JSON of every frame queued to `s` (plain frames only).
fn drain_json(s: &Subscriber) -> Vec<serde_json::Value> {
    let mut q = VecDeque::new();
    s.outbox.take(&mut q);
    q.iter()
        .map(|o| {
            let f = &o.frame;
            let start = if f[1] & 0x7f == 126 { 4 } else { 2 };
            serde_json::from_slice(&f[start..]).unwrap()
        })
        .collect()
}

fn drain(s: &Subscriber) -> usize {
    let mut q = VecDeque::new();
    s.outbox.take(&mut q);
    q.len()
}

#[test]
fn exact_and_prefix_filters_match_and_overlap_delivers_once() {
    let mut h = hub();
    let a = sub(1, Encoding::Plain);
    let b = sub(2, Encoding::Plain);
    subscribe(&mut h, &a, Filter::Topic("m.1".into()), None);
    subscribe(&mut h, &a, Filter::Prefix("m.".into()), None);
    subscribe(&mut h, &b, Filter::Prefix("m.1".into()), None);
    assert_eq!(drain(&a), 2, "two acks");
    assert_eq!(drain(&b), 1);
    let now = Instant::now();
    h.inbound(msg("m.1", None), now);
    assert_eq!(drain(&a), 1, "two matching filters, one delivery");
    assert_eq!(drain(&b), 1);
    h.inbound(msg("m.10", None), now);
    assert_eq!((drain(&a), drain(&b)), (1, 1));
    h.inbound(msg("n.1", None), now);
    assert_eq!((drain(&a), drain(&b)), (0, 0));
    let unsub = Command::Unsubscribe {
        sub: b.clone(),
        id: Some(4),
        filter: Filter::Prefix("m.1".into()),
    };
    h.command(unsub, now);
    assert_eq!(drain_json(&b)[0]["op"], "unsubscribe");
    h.inbound(msg("m.10", None), now);
    assert_eq!((drain(&a), drain(&b)), (1, 0));
}

#[test]
fn wanted_set_follows_subscribers_and_keeps_history_topics_for_good() {
    let mut h = hub_with(&["h.*"]);
    let w = h.wanted();
    assert_eq!(w.borrow().iter().collect::<Vec<_>>(), vec!["h."]);
    let (a, b) = (sub(1, Encoding::Plain), sub(2, Encoding::Plain));
    let t = Filter::Topic("x".into());
    subscribe(&mut h, &a, t.clone(), None);
    subscribe(&mut h, &b, t.clone(), None);
    assert_eq!(w.borrow().iter().collect::<Vec<_>>(), vec!["h.", "x"]);
    let covered = sub(3, Encoding::Plain);
    subscribe(&mut h, &covered, Filter::Topic("h.1".into()), None);
    subscribe(&mut h, &covered, Filter::Prefix("h".into()), None);
    assert_eq!(
        w.borrow().iter().collect::<Vec<_>>(),
        vec!["h", "h.", "x"],
        "h.1 comes through h. already; h does not"
    );
    h.command(
        Command::Disconnected {
            sub_id: 3,
            filters: vec![Filter::Topic("h.1".into()), Filter::Prefix("h".into())],
        },
        Instant::now(),
    );
    assert_eq!(w.borrow().iter().collect::<Vec<_>>(), vec!["h.", "x"]);
    let now = Instant::now();
    h.command(
        Command::Disconnected {
            sub_id: 1,
            filters: vec![t.clone()],
        },
        now,
    );
    assert_eq!(w.borrow().len(), 2, "one subscriber left");
    h.command(
        Command::Disconnected {
            sub_id: 2,
            filters: vec![t],
        },
        now,
    );
    assert_eq!(w.borrow().iter().collect::<Vec<_>>(), vec!["h."]);
}

#[test]
fn compresses_once_whatever_the_subscriber_count() {
    let mut h = hub();
    let subs: Vec<_> = (0..500).map(|i| sub(i, Encoding::deflate(15))).collect();
    for s in &subs {
        subscribe(&mut h, s, Filter::Topic("hot".into()), None);
    }
    let plain = sub(999, Encoding::Plain);
    subscribe(&mut h, &plain, Filter::Topic("hot".into()), None);
    for _ in 0..3 {
        h.inbound(msg("hot", None), Instant::now());
    }
    assert_eq!(
        h.metrics.deflate_operations.get(),
        3,
        "one deflate per message"
    );
    assert_eq!(h.metrics.fanout_deliveries.get(), 1503);
}

#[test]
fn a_full_outbox_is_overflowed_and_others_still_get_messages() {
    let mut h = hub();
    let tiny = Arc::new(Subscriber::new(1, Encoding::Plain, 80));
    let fine = sub(2, Encoding::Plain);
    for s in [&tiny, &fine] {
        subscribe(&mut h, s, Filter::Topic("t".into()), None);
    }
    drain(&fine);
    for _ in 0..5 {
        h.inbound(msg("t", None), Instant::now());
    }
    let mut q = VecDeque::new();
    assert!(tiny.outbox.take(&mut q).overflowed);
    assert_eq!(drain(&fine), 5);
    assert!(
        h.metrics
            .dropped
            .with_label_values(&["slow_consumer"])
            .get()
            >= 1
    );
}

#[test]
fn history_then_live_in_order_with_nothing_twice() {
    let mut h = hub_with(&["m.*"]);
    let now = Instant::now();
    for o in 0..10 {
        h.inbound(msg("m.1", Some(o)), now);
    }
    let s = sub(1, Encoding::Plain);
    let last = HistoryRequest {
        since: None,
        last: Some(4),
    };
    subscribe(&mut h, &s, Filter::Topic("m.1".into()), Some(last));
    h.inbound(msg("m.1", Some(10)), now);
    h.inbound(msg("m.1", Some(9)), now); // a duplicate from a second publisher path
    let got = drain_json(&s);
    assert_eq!(got[0]["type"], "ack");
    assert_eq!(got[0]["history"]["replayed"], 4);
    assert_eq!(got[0]["history"]["position"]["offset"], 9);
    let offsets: Vec<u64> = got[1..]
        .iter()
        .map(|m| m["position"]["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, vec![6, 7, 8, 9, 10]);
    // Resume from 7 on a new connection.
    let r = sub(2, Encoding::Plain);
    let since = HistoryRequest {
        since: Some(Position {
            epoch: 1,
            offset: 7,
        }),
        last: None,
    };
    subscribe(&mut h, &r, Filter::Topic("m.1".into()), Some(since));
    let got = drain_json(&r);
    assert_eq!(got[0]["history"]["recovered"], true);
    assert_eq!(got.len(), 1 + 3);
    assert_eq!(
        h.metrics
            .history_requests
            .with_label_values(&["recovered"])
            .get(),
        1
    );
}

#[test]
fn a_new_epoch_resets_subscribers_and_a_lost_range_is_announced() {
    let mut h = hub_with(&["m.*"]);
    let now = Instant::now();
    let s = sub(1, Encoding::Plain);
    subscribe(&mut h, &s, Filter::Topic("m.1".into()), None);
    h.inbound(msg("m.1", Some(0)), now);
    h.inbound(msg("m.1", Some(3)), now); // no peers: a gap at once
    let got = drain_json(&s);
    let types: Vec<&str> = got.iter().map(|m| m["type"].as_str().unwrap()).collect();
    assert_eq!(types, vec!["ack", "message", "gap", "message"]);
    assert_eq!(
        (got[2]["from"].as_u64(), got[2]["to"].as_u64()),
        (Some(1), Some(2))
    );
    let restart = Inbound::Message(Published {
        topic: Bytes::from_static(b"m.1"),
        position: Some(Position {
            epoch: 2,
            offset: 0,
        }),
        published_at_us: None,
        payload: Bytes::from_static(b"1"),
    });
    h.inbound(restart, now);
    let got = drain_json(&s);
    assert_eq!(got[0]["type"], "reset");
    assert_eq!(got[0]["epoch"], "0000000000000002");
    assert_eq!(got[1]["position"]["epoch"], "0000000000000002");
}

#[test]
fn a_replay_never_overflows_the_connections_queue() {
    let mut h = hub_with(&["m.*"]);
    let now = Instant::now();
    for o in 0..100 {
        h.inbound(msg("m.1", Some(o)), now);
    }
    // Frames are ~80 bytes; half of a 2,000-byte queue holds ~12 of them.
    let small = Arc::new(Subscriber::new(1, Encoding::Plain, 2_000));
    let last = HistoryRequest {
        since: None,
        last: Some(100),
    };
    subscribe(&mut h, &small, Filter::Topic("m.1".into()), Some(last));
    let got = drain_json(&small);
    let replayed = got[0]["history"]["replayed"].as_u64().unwrap() as usize;
    assert!(replayed > 0 && replayed < 100, "{}", got[0]);
    assert_eq!(got.len(), 1 + replayed, "not closed as a slow consumer");
    assert_eq!(
        got.last().unwrap()["position"]["offset"],
        99,
        "the newest kept"
    );
    // A resume that does not fit is not recovered, rather than partly replayed.
    let resumer = Arc::new(Subscriber::new(2, Encoding::Plain, 2_000));
    let since = HistoryRequest {
        since: Some(Position {
            epoch: 1,
            offset: 9,
        }),
        last: None,
    };
    subscribe(&mut h, &resumer, Filter::Topic("m.1".into()), Some(since));
    let got = drain_json(&resumer);
    assert_eq!(got[0]["history"]["recovered"], false);
    assert_eq!(got[0]["history"]["reason"], "too_many_missed");
    assert_eq!(got.len(), 1);
}

#[tokio::test]
async fn peers_named_later_are_asked_about_topics_unknown_here() {
    let mut h = hub_with(&["m.*"]);
    let last = HistoryRequest {
        since: None,
        last: Some(5),
    };
    let s = sub(1, Encoding::Plain);
    subscribe(&mut h, &s, Filter::Topic("m.1".into()), Some(last));
    let ack = &drain_json(&s)[0];
    assert_eq!(ack["history"]["replayed"], 0, "no peers: answered at once");
    assert_eq!(h.metrics.peers.get(), 0);

    assert!(h.peers.learn(&["127.0.0.1:1".into()], &[], 10));
    h.peers_changed();
    assert_eq!(h.metrics.peers.get(), 1);
    subscribe(&mut h, &s, Filter::Topic("m.2".into()), Some(last));
    assert_eq!(drain(&s), 0, "waits for what the peer has");
    assert_eq!(h.parked.len(), 1);
}
