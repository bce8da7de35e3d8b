//! History, catch-up and resume across real workers: resume on another worker after one dies,
//! a late worker filling its history from a peer, a publisher restart, and a message lost
//! between the publisher and one worker repaired from a peer.

use anyhow::{ensure, Result};
use harness::{eventually, Publisher, TestWorker, WsClient};
use protocol::Position;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(20);

/// A worker keeping history per `rule`, subscribed to `publisher`, fetching from `peers`.
async fn history_worker(publisher: &str, rule: &str, peers: &[&TestWorker]) -> Result<TestWorker> {
    let peers: Vec<String> = peers
        .iter()
        .map(|w| w.worker.admin_addr.to_string())
        .collect();
    TestWorker::start(|c| {
        c.publishers = vec![publisher.to_string()];
        c.history = vec![rule.parse().expect("valid rule")];
        c.peers = peers;
        c.repair_timeout = Duration::from_secs(2);
    })
    .await
}

/// Publishes on `topic` until every worker has received something from the publisher
/// (ZeroMQ's slow joiner: subscriptions take a moment to reach it).
async fn until_connected(p: &mut Publisher, workers: &[&TestWorker], topic: &str) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        p.publish(topic, b"{}").await?;
        if workers
            .iter()
            .all(|w| w.metric("worker_upstream_messages_total") > 0.0)
        {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "workers never heard the publisher"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the worker's history holds at least `n` messages in all.
async fn until_history(w: &TestWorker, n: f64) -> Result<()> {
    eventually(WAIT, "history filled", || async {
        w.metric("worker_history_messages") >= n
    })
    .await
}

fn offset(m: &Value) -> u64 {
    m["position"]["offset"]
        .as_u64()
        .expect("positioned message")
}

fn offsets(ms: &[Value]) -> Vec<u64> {
    ms.iter().map(offset).collect()
}

/// Reads messages on `topic` until one at `last` (inclusive); returns their offsets and any
/// notices (gap, reset) seen on the way.
async fn read_through(c: &mut WsClient, topic: &str, last: u64) -> Result<(Vec<u64>, Vec<Value>)> {
    let mut got = Vec::new();
    let mut notices = Vec::new();
    loop {
        let m = c.recv_json().await?;
        if m["topic"] != topic {
            continue;
        }
        match m["type"].as_str() {
            Some("message") => {
                got.push(offset(&m));
                if offset(&m) >= last {
                    return Ok((got, notices));
                }
            }
            _ => notices.push(m),
        }
    }
}

fn epoch_hex(epoch: u64) -> String {
    Position { epoch, offset: 0 }.epoch_hex().to_string()
}

#[tokio::test]
async fn resume_on_another_worker_gets_exactly_the_missed_messages() -> Result<()> {
    let mut p = Publisher::bind().await?;
    let a = history_worker(&p.endpoint, "m.*,messages=50", &[]).await?;
    let b = history_worker(&p.endpoint, "m.*,messages=50", &[&a]).await?;
    until_connected(&mut p, &[&a, &b], "m.warm").await?;

    let mut c = a.client(true).await?;
    let (ack, _) = c
        .subscribe_history(json!({"op":"subscribe","id":1,"topic":"m.1","last":0}))
        .await?;
    assert_eq!(ack["history"]["replayed"], 0);
    for i in 0..20 {
        p.publish("m.1", format!("{{\"n\":{i}}}").as_bytes())
            .await?;
    }
    let (got, _) = read_through(&mut c, "m.1", 19).await?;
    assert_eq!(got, (0..20).collect::<Vec<_>>());

    // Worker A goes away; messages keep coming while the client is disconnected.
    a.shutdown.cancel();
    assert_eq!(c.expect_close().await?, 1012);
    for i in 20..30 {
        p.publish("m.1", format!("{{\"n\":{i}}}").as_bytes())
            .await?;
    }
    until_history(&b, 30.0).await?;

    let mut c = b.client(false).await?;
    let since = json!({"epoch": epoch_hex(p.epoch), "offset": 19});
    let (ack, replayed) = c
        .subscribe_history(json!({"op":"subscribe","id":2,"topic":"m.1","since":since}))
        .await?;
    assert_eq!(ack["history"]["recovered"], true, "{ack}");
    assert_eq!(offsets(&replayed), (20..30).collect::<Vec<_>>());
    assert_eq!(ack["history"]["position"]["offset"], 29);
    p.publish("m.1", b"{\"n\":30}").await?;
    let (live, _) = read_through(&mut c, "m.1", 30).await?;
    assert_eq!(live, vec![30], "live continues right after the replay");

    // A position older than B's history (50 messages): not recovered, with the tail instead.
    for i in 31..100 {
        p.publish("m.1", format!("{{\"n\":{i}}}").as_bytes())
            .await?;
    }
    read_through(&mut c, "m.1", 99).await?;
    let mut late = b.client(false).await?;
    let since = json!({"epoch": epoch_hex(p.epoch), "offset": 19});
    let (ack, replayed) = late
        .subscribe_history(json!({"op":"subscribe","topic":"m.1","since":since,"last":5}))
        .await?;
    assert_eq!(ack["history"]["recovered"], false);
    assert_eq!(ack["history"]["reason"], "too_old");
    assert_eq!(offsets(&replayed), vec![95, 96, 97, 98, 99]);
    assert!(b.metric("worker_history_requests_total{outcome=\"too_old\"") >= 1.0);
    Ok(())
}

#[tokio::test]
async fn a_late_worker_serves_full_history_after_filling_from_a_peer() -> Result<()> {
    let mut p = Publisher::bind().await?;
    let a = history_worker(&p.endpoint, "m.*,messages=2000", &[]).await?;
    until_connected(&mut p, &[&a], "m.warm").await?;
    for i in 0..1000 {
        p.publish("m.1", format!("{{\"n\":{i}}}").as_bytes())
            .await?;
    }
    until_history(&a, 1001.0).await?;

    // C starts after the 1,000 messages; the topic is quiet now.
    let c_worker = history_worker(&p.endpoint, "m.*,messages=2000", &[&a]).await?;
    let mut c = c_worker.client(true).await?;
    let (ack, replayed) = c
        .subscribe_history(json!({"op":"subscribe","id":1,"topic":"m.1","last":1000}))
        .await?;
    assert_eq!(ack["history"]["replayed"], 1000, "{ack}");
    assert_eq!(offsets(&replayed), (0..1000).collect::<Vec<_>>());
    assert_eq!(replayed[999]["payload"]["n"], 999);
    assert!(c_worker.metric("worker_peer_fetches_total{result=\"ok\"") >= 1.0);
    assert!(a.metric("worker_peer_history_served_total{result=\"ok\"") >= 1.0);

    // The peer endpoint explains bad requests.
    let (status, body) = a.admin("GET", "/history?limit=5").await?;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("topic"), "{body}");
    let (status, _) = a.admin("GET", "/history?topic=m.unknown").await?;
    assert_eq!(status, 404);
    Ok(())
}

#[tokio::test]
async fn a_publisher_restart_resets_clients_and_never_replays_the_old_epoch() -> Result<()> {
    let mut p = Publisher::bind().await?;
    let w = history_worker(&p.endpoint, "m.*", &[]).await?;
    until_connected(&mut p, &[&w], "m.warm").await?;
    let mut c = w.client(false).await?;
    c.subscribe_history(json!({"op":"subscribe","topic":"m.1","last":0}))
        .await?;
    for _ in 0..5 {
        p.publish("m.1", b"{\"old\":true}").await?;
    }
    read_through(&mut c, "m.1", 4).await?;
    let old_epoch = p.epoch;

    p.restart(old_epoch ^ 0xffff);
    for _ in 0..3 {
        p.publish("m.1", b"{\"new\":true}").await?;
    }
    let (got, notices) = read_through(&mut c, "m.1", 2).await?;
    assert_eq!(got, vec![0, 1, 2]);
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert_eq!(notices[0]["type"], "reset");
    assert_eq!(notices[0]["epoch"], epoch_hex(p.epoch));

    let mut r = w.client(false).await?;
    let since = json!({"epoch": epoch_hex(old_epoch), "offset": 4});
    let (ack, replayed) = r
        .subscribe_history(json!({"op":"subscribe","topic":"m.1","since":since,"last":100}))
        .await?;
    assert_eq!(ack["history"]["recovered"], false);
    assert_eq!(ack["history"]["reason"], "epoch_changed");
    assert_eq!(offsets(&replayed), vec![0, 1, 2]);
    assert!(replayed
        .iter()
        .all(|m| m["position"]["epoch"] == epoch_hex(p.epoch)));
    Ok(())
}

#[tokio::test]
async fn messages_lost_on_the_way_to_one_worker_are_repaired_from_a_peer() -> Result<()> {
    // Two PUB sockets with one stream: A hears everything, B misses some offsets.
    let mut full = Publisher::bind().await?;
    let mut lossy = Publisher::bind().await?;
    let a = history_worker(&full.endpoint, "m.*", &[]).await?;
    let b = history_worker(&lossy.endpoint, "m.*", &[&a]).await?;
    until_connected(&mut full, &[&a], "m.warm").await?;
    until_connected(&mut lossy, &[&b], "m.warm").await?;

    let mut c = b.client(true).await?;
    c.subscribe_history(json!({"op":"subscribe","topic":"m.1","last":0}))
        .await?;
    let epoch = full.epoch;
    let dropped = [3u64, 4, 10, 17, 29];
    for o in 0..30u64 {
        let pos = Position { epoch, offset: o };
        let payload = format!("{{\"n\":{o}}}");
        full.publish_at("m.1", pos, payload.as_bytes()).await?;
        if !dropped.contains(&o) {
            lossy.publish_at("m.1", pos, payload.as_bytes()).await?;
        }
    }
    // 29, the last one, is lost too: only the publisher's position check reveals it.
    until_history(&a, 31.0).await?;
    lossy
        .check_at("m.1", Position { epoch, offset: 29 })
        .await?;
    let (got, notices) = read_through(&mut c, "m.1", 29).await?;
    assert_eq!(
        got,
        (0..30).collect::<Vec<_>>(),
        "in order, nothing missing"
    );
    assert!(notices.is_empty(), "no gap notice: {notices:?}");
    // The subscribe before any message asked the peer about the unknown topic once, not
    // again and again while it waited.
    assert_eq!(
        b.metric("worker_peer_fetches_total{result=\"not_found\""),
        1.0
    );
    assert!(b.metric("worker_stream_repairs_total{result=\"ok\"") >= 1.0);
    assert_eq!(b.metric("worker_stream_repaired_messages_total"), 5.0);
    assert_eq!(b.metric("worker_stream_lost_messages_total"), 0.0);
    Ok(())
}
