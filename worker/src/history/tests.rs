use super::*;
use proptest::prelude::*;
use protocol::client::{HistoryReply, HistoryRequest};
use protocol::publish::Published;

const E1: u64 = 0xe1;
const E2: u64 = 0xe2;

fn settings(has_peers: bool) -> Settings {
    Settings {
        rules: vec!["m.*,messages=100".parse().unwrap()],
        max_total_bytes: 1 << 30,
        max_replay: 50,
        repair_timeout: Duration::from_secs(2),
        max_held: 1000,
        has_peers,
    }
}

fn streams(has_peers: bool) -> Streams {
    Streams::new(settings(has_peers), Arc::new(Metrics::new("t")))
}

fn entry(topic: &str, epoch: u64, offset: u64, live: bool, at: Instant) -> Entry {
    let p = Published {
        topic: Bytes::copy_from_slice(topic.as_bytes()),
        position: Some(Position { epoch, offset }),
        published_at_us: None,
        payload: Bytes::from(format!("{offset}")),
    };
    Entry {
        message: Arc::new(Broadcast::new(topic, &p)),
        payload: p.payload,
        received_at: at,
        live,
    }
}

/// Offsets delivered, and everything else that happened, in order.
#[derive(Debug, Default, PartialEq)]
struct Seen {
    delivered: Vec<u64>,
    gaps: Vec<(u64, u64)>,
    resets: Vec<u64>,
    fetches: Vec<FetchRequest>,
    settled: usize,
}

fn seen(out: Vec<Effect>) -> Seen {
    let mut s = Seen::default();
    for e in out {
        match e {
            Effect::Deliver(m) => s.delivered.push(m.position.unwrap().offset),
            Effect::Gap { from, to, .. } => s.gaps.push((from, to)),
            Effect::Reset { epoch, .. } => s.resets.push(epoch),
            Effect::Fetch(f) => s.fetches.push(f),
            Effect::Settled(_) => s.settled += 1,
        }
    }
    s
}

fn offer(s: &mut Streams, epoch: u64, offset: u64, now: Instant) -> Seen {
    let mut out = Vec::new();
    s.offer(
        "m.1",
        s.rule_for("m.1").unwrap(),
        entry("m.1", epoch, offset, true, now),
        now,
        &mut out,
    );
    seen(out)
}

fn history(s: &mut Streams, last: u32) -> Vec<u64> {
    let req = HistoryRequest {
        since: None,
        last: Some(last),
    };
    match s.replay("m.1", req, true, Instant::now(), &mut Vec::new()) {
        Replay::Ready { messages, .. } => messages
            .iter()
            .map(|m| m.position.unwrap().offset)
            .collect(),
        Replay::Wait => panic!("last chance never waits"),
    }
}

fn peer_entries(range: std::ops::Range<u64>, epoch: u64, now: Instant) -> Vec<Entry> {
    range.map(|o| entry("m.1", epoch, o, false, now)).collect()
}

#[test]
fn in_order_messages_are_delivered_and_duplicates_and_stale_epochs_dropped() {
    let now = Instant::now();
    let mut s = streams(true);
    for o in 0..3 {
        assert_eq!(offer(&mut s, E1, o, now).delivered, vec![o]);
    }
    assert_eq!(offer(&mut s, E1, 1, now), Seen::default(), "duplicate");
    assert_eq!(offer(&mut s, E2, 0, now).resets, vec![E2]);
    assert_eq!(
        offer(&mut s, E1, 3, now),
        Seen::default(),
        "late message of a finished epoch"
    );
    assert_eq!(history(&mut s, 10), vec![0], "history restarted with E2");
    let m = &s.metrics;
    assert_eq!(m.stream_events.with_label_values(&["duplicate"]).get(), 1);
    assert_eq!(m.stream_events.with_label_values(&["stale_epoch"]).get(), 1);
    assert_eq!(m.stream_events.with_label_values(&["reset"]).get(), 1);
}

#[test]
fn a_hole_is_fetched_and_merged_in_order() {
    let now = Instant::now();
    let mut s = streams(true);
    offer(&mut s, E1, 0, now);
    let seen3 = offer(&mut s, E1, 3, now);
    assert!(seen3.delivered.is_empty(), "held until the hole is filled");
    let f = &seen3.fetches[0];
    assert_eq!((f.epoch, f.from, f.limit), (Some(E1), Some(1), 2));
    assert!(offer(&mut s, E1, 4, now).delivered.is_empty());
    let mut out = Vec::new();
    s.fetched("m.1", f.id, peer_entries(1..3, E1, now), now, &mut out);
    let seen = seen(out);
    assert_eq!(seen.delivered, vec![1, 2, 3, 4]);
    assert_eq!(seen.settled, 1);
    assert_eq!(history(&mut s, 10), vec![0, 1, 2, 3, 4]);
    assert_eq!(s.metrics.stream_repairs.with_label_values(&["ok"]).get(), 1);
    assert_eq!(s.metrics.stream_repaired_messages.get(), 2);
}

#[test]
fn a_late_message_closes_its_hole_and_the_fetch_answer_is_ignored() {
    let now = Instant::now();
    let mut s = streams(true);
    offer(&mut s, E1, 0, now);
    let id = offer(&mut s, E1, 2, now).fetches[0].id;
    let late = offer(&mut s, E1, 1, now);
    assert_eq!(late.delivered, vec![1, 2]);
    assert_eq!(late.settled, 1);
    let mut out = Vec::new();
    s.fetched("m.1", id, peer_entries(1..2, E1, now), now, &mut out);
    assert_eq!(seen(out), Seen::default());
}

#[test]
fn a_hole_nobody_has_becomes_a_gap_after_every_attempt() {
    let t0 = Instant::now();
    let mut s = streams(true);
    offer(&mut s, E1, 0, t0);
    let mut fetch = offer(&mut s, E1, 5, t0).fetches.remove(0);
    for attempt in 2..=FETCH_ATTEMPTS {
        let mut out = Vec::new();
        s.fetched("m.1", fetch.id, Vec::new(), t0, &mut out);
        let mut seen = seen(out);
        assert!(seen.delivered.is_empty(), "attempt {attempt} still holds");
        fetch = seen.fetches.remove(0);
        assert!(fetch.delay > Duration::ZERO, "later attempts wait a little");
    }
    // The last attempt times out.
    let mut out = Vec::new();
    s.tick(t0 + Duration::from_secs(10), &mut out);
    let seen = seen(out);
    assert_eq!(seen.gaps, vec![(1, 4)]);
    assert_eq!(seen.delivered, vec![5]);
    assert_eq!(history(&mut s, 10), vec![5], "history restarts after a gap");
    assert_eq!(
        s.metrics
            .stream_repairs
            .with_label_values(&["failed"])
            .get(),
        1
    );
    assert_eq!(s.metrics.stream_lost_messages.get(), 4);
}

#[test]
fn without_peers_a_hole_is_a_gap_at_once() {
    let now = Instant::now();
    let mut s = streams(false);
    offer(&mut s, E1, 0, now);
    let seen = offer(&mut s, E1, 3, now);
    assert_eq!(seen.gaps, vec![(1, 2)]);
    assert_eq!(seen.delivered, vec![3]);
    assert!(seen.fetches.is_empty());
}

#[test]
fn a_position_check_finds_a_lost_last_message() {
    let now = Instant::now();
    let mut s = streams(true);
    offer(&mut s, E1, 0, now);
    let mut out = Vec::new();
    s.check(
        "m.1",
        Position {
            epoch: E1,
            offset: 0,
        },
        now,
        &mut out,
    );
    assert!(out.is_empty(), "in sync");
    s.check(
        "m.1",
        Position {
            epoch: E1,
            offset: 2,
        },
        now,
        &mut out,
    );
    let f = seen(out).fetches.remove(0);
    assert_eq!((f.from, f.limit), (Some(1), 2));
    let mut out = Vec::new();
    s.fetched("m.1", f.id, peer_entries(0..3, E1, now), now, &mut out);
    assert_eq!(seen(out).delivered, vec![1, 2]);
}

#[test]
fn a_late_starter_fills_history_from_a_peer_and_delivers_only_live_messages() {
    let now = Instant::now();
    let mut s = streams(true);
    let first = offer(&mut s, E1, 40, now);
    assert!(first.delivered.is_empty());
    let f = &first.fetches[0];
    assert_eq!((f.epoch, f.from, f.limit), (Some(E1), None, 100));
    offer(&mut s, E1, 41, now);
    let mut out = Vec::new();
    s.fetched("m.1", f.id, peer_entries(10..41, E1, now), now, &mut out);
    let seen = seen(out);
    assert_eq!(seen.delivered, vec![40, 41], "old ones are history only");
    assert_eq!(history(&mut s, 100), (10..42).collect::<Vec<_>>());
}

#[test]
fn a_stream_that_starts_at_zero_needs_no_fill() {
    let now = Instant::now();
    let mut s = streams(true);
    let seen = offer(&mut s, E1, 0, now);
    assert_eq!(seen.delivered, vec![0]);
    assert!(seen.fetches.is_empty());
}

fn ask(s: &mut Streams, since: Option<(u64, u64)>, last: Option<u32>, last_chance: bool) -> Replay {
    let req = HistoryRequest {
        since: since.map(|(epoch, offset)| Position { epoch, offset }),
        last,
    };
    s.replay("m.1", req, last_chance, Instant::now(), &mut Vec::new())
}

fn ready(r: Replay) -> (HistoryReply, Vec<u64>) {
    match r {
        Replay::Ready { reply, messages } => (
            reply,
            messages
                .iter()
                .map(|m| m.position.unwrap().offset)
                .collect(),
        ),
        Replay::Wait => panic!("expected an answer"),
    }
}

#[test]
fn resume_recovers_exactly_what_was_missed_or_says_why_not() {
    let now = Instant::now();
    let mut s = streams(false);
    for o in 0..120 {
        offer(&mut s, E1, o, now);
    }
    // History keeps 100 (20..=119); max_replay is 50.
    let (r, got) = ready(ask(&mut s, Some((E1, 99)), None, false));
    assert_eq!(r.recovered, Some(true));
    assert_eq!(got, (100..120).collect::<Vec<_>>());
    assert_eq!(
        r.position,
        Some(
            Position {
                epoch: E1,
                offset: 119
            }
            .into()
        )
    );
    let (r, got) = ready(ask(&mut s, Some((E1, 119)), None, false));
    assert_eq!((r.recovered, got.len()), (Some(true), 0), "up to date");
    let reason = |r: HistoryReply| (r.recovered, r.reason.unwrap());
    let (r, _) = ready(ask(&mut s, Some((E1, 10)), None, false));
    assert_eq!(reason(r), (Some(false), "too_old".into()));
    let (r, _) = ready(ask(&mut s, Some((E1, 60)), None, false));
    assert_eq!(reason(r), (Some(false), "too_many_missed".into()));
    let (r, got) = ready(ask(&mut s, Some((E2, 5)), Some(3), false));
    assert_eq!(reason(r.clone()), (Some(false), "epoch_changed".into()));
    assert_eq!(got, vec![117, 118, 119], "the current tail instead");
    assert_eq!(r.replayed, 3);
    assert!(matches!(
        ask(&mut s, Some((E1, 130)), None, false),
        Replay::Wait
    ));
    let (r, _) = ready(ask(&mut s, Some((E1, 130)), None, true));
    assert_eq!(reason(r), (Some(false), "position_ahead".into()));
    let (r, got) = ready(ask(&mut s, None, Some(500), false));
    assert_eq!(
        (r.recovered, got.len()),
        (None, 50),
        "last is capped at max_replay"
    );
}

#[test]
fn history_requests_wait_while_a_topic_catches_up_and_unknown_topics_are_asked_of_peers() {
    let now = Instant::now();
    let mut s = streams(true);
    let mut out = Vec::new();
    let r = s.replay(
        "m.9",
        HistoryRequest {
            since: None,
            last: Some(5),
        },
        false,
        now,
        &mut out,
    );
    assert!(matches!(r, Replay::Wait));
    let f = seen(out).fetches.remove(0);
    assert_eq!((&*f.topic, f.epoch, f.from), ("m.9", None, None));
    let mut out = Vec::new();
    let other: Vec<Entry> = (0..3).map(|o| entry("m.9", E2, o, false, now)).collect();
    s.fetched("m.9", f.id, other, now, &mut out);
    assert_eq!(seen(out).settled, 1);
    let r = s.replay(
        "m.9",
        HistoryRequest {
            since: None,
            last: Some(5),
        },
        false,
        now,
        &mut Vec::new(),
    );
    let (reply, _) = ready(r);
    assert_eq!(reply.replayed, 3);
    assert_eq!(
        reply.position,
        Some(
            Position {
                epoch: E2,
                offset: 2
            }
            .into()
        )
    );
    // Nobody knows a topic: answered with nothing, and forgotten.
    let mut out = Vec::new();
    let _ = s.replay(
        "m.none",
        HistoryRequest {
            since: Some(Position::default()),
            last: None,
        },
        false,
        now,
        &mut out,
    );
    let f = seen(out).fetches.remove(0);
    let mut out = Vec::new();
    s.fetched("m.none", f.id, Vec::new(), now, &mut out);
    let r = s.replay(
        "m.none",
        HistoryRequest {
            since: Some(Position::default()),
            last: None,
        },
        true,
        now,
        &mut Vec::new(),
    );
    assert_eq!(ready(r).0.reason.as_deref(), Some("no_history"));
    // Topics without a rule have no history.
    let r = s.replay(
        "x",
        HistoryRequest {
            since: None,
            last: Some(1),
        },
        false,
        now,
        &mut Vec::new(),
    );
    assert_eq!(ready(r).0.replayed, 0);
}

#[test]
fn limits_trim_history_by_count_bytes_age_and_the_memory_cap() {
    let t0 = Instant::now();
    let mut set = settings(false);
    set.rules = vec![
        "m.*,messages=5,age=10s".parse().unwrap(),
        "n.*,bytes=300".parse().unwrap(),
    ];
    let mut s = Streams::new(set, Arc::new(Metrics::new("t")));
    let mut out = Vec::new();
    for o in 0..8 {
        s.offer(
            "m.1",
            s.rule_for("m.1").unwrap(),
            entry("m.1", E1, o, true, t0),
            t0,
            &mut out,
        );
        s.offer(
            "n.1",
            s.rule_for("n.1").unwrap(),
            entry("n.1", E1, o, true, t0),
            t0,
            &mut out,
        );
    }
    assert_eq!(history(&mut s, 100), vec![3, 4, 5, 6, 7]);
    let kept_n = s.topics["n.1"].entries.len();
    assert!(kept_n < 8 && s.topics["n.1"].bytes <= 300, "bytes limit");
    s.tick(t0 + Duration::from_secs(11), &mut out);
    assert!(history(&mut s, 100).is_empty(), "aged out");
    // The memory cap evicts the oldest across topics first.
    let mut set = settings(false);
    set.rules = vec!["*".parse().unwrap()];
    let size = entry("a", E1, 0, true, t0).bytes();
    set.max_total_bytes = size * 10;
    let mut s = Streams::new(set, Arc::new(Metrics::new("t")));
    for o in 0..6 {
        s.offer(
            "a",
            s.rule_for("a").unwrap(),
            entry("a", E1, o, true, t0 + Duration::from_millis(o)),
            t0,
            &mut out,
        );
    }
    for o in 0..6 {
        s.offer(
            "b",
            s.rule_for("b").unwrap(),
            entry("b", E1, o, true, t0 + Duration::from_millis(10 + o)),
            t0,
            &mut out,
        );
    }
    assert!(s.totals.bytes <= size * 10);
    assert!(s.topics["a"].entries.len() < 6, "a's messages are older");
    assert_eq!(s.topics["b"].entries.len(), 6);
    assert!(
        s.metrics
            .history_evicted
            .with_label_values(&["memory_cap"])
            .get()
            >= 2
    );
}

#[test]
fn snapshots_for_peers_follow_from_limit_and_epoch() {
    let now = Instant::now();
    let mut s = streams(false);
    for o in 0..10 {
        offer(&mut s, E1, o, now);
    }
    let offsets = |body: Vec<u8>| -> Vec<u64> {
        protocol::backfill::decode(Bytes::from(body), 64)
            .unwrap()
            .iter()
            .map(|p| p.position.unwrap().offset)
            .collect()
    };
    let mut body = Vec::new();
    protocol::backfill::begin(&mut body);
    assert_eq!(s.snapshot("m.1", Some(E1), Some(4), 3, &mut body), Ok(3));
    assert_eq!(offsets(body), vec![4, 5, 6]);
    let mut body = Vec::new();
    protocol::backfill::begin(&mut body);
    s.snapshot("m.1", None, None, 2, &mut body).unwrap();
    assert_eq!(offsets(body), vec![8, 9]);
    assert_eq!(
        s.snapshot("m.1", Some(E2), None, 2, &mut Vec::new()),
        Err(SnapshotError::OtherEpoch(E1))
    );
    assert_eq!(
        s.snapshot("m.2", None, None, 2, &mut Vec::new()),
        Err(SnapshotError::UnknownTopic)
    );
}

proptest! {
    /// Live messages 0..n reach the worker with some lost, some twice and some out of order,
    /// with position checks now and then; a peer has everything. Whatever happens, what is
    /// delivered is 0..n in order, once each, and history is its tail.
    #[test]
    fn delivery_is_contiguous_and_unique_whatever_the_arrival_order(
        n in 1u64..80,
        lost in proptest::collection::btree_set(0u64..80, 0..15),
        dup in proptest::collection::vec(0u64..80, 0..10),
        swaps in proptest::collection::vec((0usize..100, 0usize..100), 0..10),
        checks in proptest::collection::btree_set(0usize..100, 0..5),
    ) {
        let now = Instant::now();
        let mut s = streams(true);
        let mut arrivals: Vec<u64> = (0..n).filter(|o| !lost.contains(o)).collect();
        arrivals.extend(dup.iter().map(|d| d % n));
        for (a, b) in swaps {
            let len = arrivals.len();
            if len > 1 { arrivals.swap(a % len, b % len); }
        }
        let mut delivered = Vec::new();
        let mut pending: Vec<FetchRequest> = Vec::new();
        let serve = |s: &mut Streams, f: FetchRequest, delivered: &mut Vec<u64>, pending: &mut Vec<FetchRequest>| {
            let range = match f.from {
                Some(from) => from..(from + f.limit as u64).min(n),
                None => n.saturating_sub(f.limit as u64)..n,
            };
            let mut out = Vec::new();
            s.fetched("m.1", f.id, peer_entries(range, E1, now), now, &mut out);
            let seen = seen(out);
            delivered.extend(seen.delivered);
            pending.extend(seen.fetches);
        };
        for (i, o) in arrivals.iter().enumerate() {
            let seen = offer(&mut s, E1, *o, now);
            delivered.extend(seen.delivered);
            pending.extend(seen.fetches);
            if checks.contains(&i) {
                let mut out = Vec::new();
                s.check("m.1", Position { epoch: E1, offset: n - 1 }, now, &mut out);
                pending.extend(seen_fetches(out));
            }
            // Peers answer at arbitrary moments: here, every other arrival.
            if i % 2 == 1 {
                for f in std::mem::take(&mut pending) {
                    serve(&mut s, f, &mut delivered, &mut pending);
                }
            }
        }
        // The publisher's final position check, then every fetch is answered.
        let mut out = Vec::new();
        s.check("m.1", Position { epoch: E1, offset: n - 1 }, now, &mut out);
        pending.extend(seen_fetches(out));
        let mut rounds = 0;
        while !pending.is_empty() && rounds < 20 {
            for f in std::mem::take(&mut pending) {
                serve(&mut s, f, &mut delivered, &mut pending);
            }
            rounds += 1;
        }
        // Deliveries start where the stream started on this worker (a fill starts at the
        // first live message; older ones are history only) and run to the end without holes.
        let first = delivered.first().copied().unwrap_or(n);
        prop_assert_eq!(&delivered, &(first..n).collect::<Vec<_>>());
        let h = history(&mut s, 1000);
        prop_assert_eq!(h.last().copied(), Some(n - 1));
        prop_assert_eq!(&h, &(h[0]..n).collect::<Vec<_>>());
        prop_assert_eq!(s.metrics.stream_lost_messages.get(), 0);
    }
}

fn seen_fetches(out: Vec<Effect>) -> Vec<FetchRequest> {
    seen(out).fetches
}
