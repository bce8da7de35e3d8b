//! A real worker, a real ZeroMQ publisher, raw WebSocket clients: delivery, compression,
//! slow consumers and draining, as a client would see them.

use anyhow::Result;
use harness::{eventually, Publisher, TestWorker, WsClient};
use protocol::client::close;
use serde_json::json;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(15);

/// Publishes one message and waits until every client has it: everything published before
/// has then been dispatched. Returns its offset.
async fn barrier(p: &mut Publisher, clients: &mut [WsClient], topic: &str) -> Result<u64> {
    let offset = p.publish(topic, br#"{"barrier":true}"#).await?.offset;
    for c in clients.iter_mut() {
        c.read_until(offset).await?;
    }
    Ok(offset)
}

#[tokio::test]
async fn each_message_reaches_each_subscriber_once_in_order() -> Result<()> {
    let (mut p, w) = TestWorker::with_publisher(|_| {}).await?;
    let mut clients = Vec::new();
    for i in 0..5 {
        let mut c = w.client(i % 2 == 0).await?;
        c.subscribe("match.1").await?;
        clients.push(c);
    }
    let mut first = 0;
    for c in clients.iter_mut() {
        first = first.max(p.prime(c, "match.1").await?);
    }
    // Everything after the last prime arrives once, in order, to everyone.
    let start = p.publish("match.1", br#"{"n":0}"#).await?.offset;
    for n in 1..50 {
        p.publish("match.1", format!(r#"{{"n":{n}}}"#).as_bytes())
            .await?;
    }
    for c in clients.iter_mut() {
        let m = c.read_until(start).await?;
        assert_eq!(m["payload"]["n"], 0);
        for n in 1..50u64 {
            let m = c.recv_json().await?;
            assert_eq!(
                m["position"]["offset"].as_u64(),
                Some(start + n),
                "no gap, no dup"
            );
            assert_eq!(m["payload"]["n"], n);
            assert!(m["ts"].as_u64().is_some());
        }
    }
    assert!(first <= start);
    Ok(())
}

#[tokio::test]
async fn one_deflate_per_message_whatever_the_subscriber_count() -> Result<()> {
    let (mut p, w) = TestWorker::with_publisher(|c| {
        c.compression_min_bytes = 64;
    })
    .await?;
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut c = w.client(true).await?;
        assert!(c.deflate, "permessage-deflate negotiated: {}", c.response);
        assert!(c.response.contains("server_no_context_takeover"));
        assert!(c.response.contains("client_no_context_takeover"));
        c.subscribe("big").await?;
        clients.push(c);
    }
    p.prime(&mut clients[0], "big").await?;
    barrier(&mut p, &mut clients, "big").await?;
    let before = w.metric("worker_deflate_operations_total");
    let body = json!({"event": "goal", "text": "a long commentary line ".repeat(20)}).to_string();
    let start = p.publish("big", body.as_bytes()).await?.offset;
    for _ in 1..10 {
        p.publish("big", body.as_bytes()).await?;
    }
    for c in clients.iter_mut() {
        // The client inflated it: the payload round-trips.
        let m = c.read_until(start).await?;
        assert_eq!(m["payload"]["event"], "goal");
        for _ in 1..10 {
            let f = c.recv_frame().await?;
            assert!(f.compressed, "large messages go compressed");
        }
    }
    let ops = w.metric("worker_deflate_operations_total") - before;
    assert_eq!(ops, 10.0, "10 messages x 20 subscribers = 10 deflates");
    Ok(())
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_with_4001_and_others_continue() -> Result<()> {
    let (mut p, w) = TestWorker::with_publisher(|c| {
        c.outbound_queue_bytes = 64 * 1024;
        c.close_timeout = Duration::from_secs(10);
    })
    .await?;
    let mut slow = w.client(false).await?;
    slow.subscribe("t").await?;
    let mut fine = w.client(false).await?;
    fine.subscribe("t").await?;
    p.prime(&mut slow, "t").await?;
    p.prime(&mut fine, "t").await?;
    // `slow` now reads nothing; the kernel buffers fill, then its outbox passes 64 KiB.
    let payload = json!({"blob": "x".repeat(4000)}).to_string();
    let mut sent = 0u64;
    let overflowed = eventually(WAIT, "slow client closed", || {
        let closes = w.metric("worker_slow_client_closes_total");
        async move { closes >= 1.0 }
    });
    tokio::pin!(overflowed);
    let mut last = 0;
    loop {
        tokio::select! {
            r = &mut overflowed => { r?; break; }
            r = p.publish("t", payload.as_bytes()) => { last = r?.offset; sent += 1; }
        }
        // Keep `fine` reading so only `slow` falls behind.
        while let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(1), fine.recv_frame()).await
        {}
        anyhow::ensure!(sent < 100_000, "slow client never overflowed");
    }
    // The healthy client still gets new messages.
    let next = p.publish("t", b"{\"after\":true}").await?.offset;
    assert!(next > last);
    let m = fine.read_until(next).await?;
    assert_eq!(m["payload"]["after"], true);
    // The slow client, reading at last, finds the close code after what was already in flight.
    assert_eq!(slow.expect_close().await?, close::SLOW_CONSUMER);
    eventually(WAIT, "closed connection counted", || {
        let n = w.metric("worker_connections_closed_total{code=\"4001\"");
        async move { n == 1.0 }
    })
    .await
}

#[tokio::test]
async fn drain_closes_clients_with_1012_in_staggered_batches() -> Result<()> {
    let w = TestWorker::start(|c| {
        c.drain_rate = 20;
        c.drain_batch = 5;
    })
    .await?;
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(w.client(false).await?);
    }
    assert_eq!(w.admin("GET", "/readyz").await?.0, 200);
    let started = Instant::now();
    let (status, body) = w.admin("POST", "/drain").await?;
    assert_eq!(status, 202);
    assert!(body.contains("\"connections\":20"), "{body}");
    let mut closed_at = Vec::new();
    for c in clients.iter_mut() {
        assert_eq!(c.expect_close().await?, close::SERVICE_RESTART);
        closed_at.push(started.elapsed());
    }
    // 20 clients, 5 per batch at 20/s: the last batch is due 750 ms after the first.
    let spread = closed_at
        .iter()
        .max()
        .unwrap()
        .saturating_sub(*closed_at.iter().min().unwrap());
    assert!(
        spread >= Duration::from_millis(700),
        "closes were not staggered: {spread:?}"
    );
    assert_eq!(w.admin("GET", "/readyz").await?.0, 503);
    // New clients are turned away (the listener is closed, or 503 while it closes).
    assert!(WsClient::connect(w.addr(), "/ws", false, &[])
        .await
        .is_err());
    Ok(())
}

#[tokio::test]
async fn shutdown_closes_clients_with_1012_and_stops() -> Result<()> {
    let w = TestWorker::start(|_| {}).await?;
    let mut c = w.client(false).await?;
    w.shutdown.cancel();
    assert_eq!(c.expect_close().await?, close::SERVICE_RESTART);
    tokio::time::timeout(WAIT, w.worker.wait()).await?;
    Ok(())
}
