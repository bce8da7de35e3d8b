//! 10,000 subscribe-with-history requests racing a publisher at 5,000 messages/s over 50
//! topics: every reply must be the topic's history followed by live messages, contiguous from
//! the first history item, with no gap and no duplicate.

use anyhow::{ensure, Context, Result};
use harness::{Publisher, TestWorker, WsClient};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TOPICS: usize = 50;
const CLIENTS: usize = 100;
const REQUESTS_PER_CLIENT: usize = 100;
/// Messages per second over all topics.
const RATE: u64 = 5_000;
/// Live messages each subscription must see after its history.
const LIVE_PER_REQUEST: usize = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_requests_racing_a_fast_publisher_never_gap_or_repeat() -> Result<()> {
    let mut p = Publisher::bind().await?;
    let w = TestWorker::start(|c| {
        c.publishers = vec![p.endpoint.clone()];
        c.history = vec!["s.*,messages=200".parse().expect("rule")];
        c.max_replay = 200;
    })
    .await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while w.metric("worker_upstream_messages_total") == 0.0 {
        p.publish("s.warm", b"{}").await?;
        ensure!(
            Instant::now() < deadline,
            "worker never heard the publisher"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The publisher: RATE messages/s round-robin over the topics, until the clients are done.
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let publishing = tokio::spawn({
        let (stop, published) = (stop.clone(), published.clone());
        async move {
            let start = Instant::now();
            let mut n = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(2));
            while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(180) {
                tick.tick().await;
                // A publisher that fell behind (a busy machine) does not try to catch up more
                // than 100 ms at once, and stops as soon as it is asked to.
                let due =
                    (start.elapsed().as_micros() as u64 * RATE / 1_000_000).min(n + RATE / 10);
                while n < due && !stop.load(Ordering::Relaxed) {
                    let topic = format!("s.{}", n as usize % TOPICS);
                    p.publish(&topic, format!("{{\"n\":{n}}}").as_bytes())
                        .await?;
                    n += 1;
                }
                published.store(n, Ordering::Relaxed);
            }
            anyhow::Ok(start.elapsed())
        }
    });

    // Whatever happens below, the publisher stops when this test ends.
    let _stop_publisher = StopOnDrop(stop.clone());
    let started = Instant::now();
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let mut c = w.client(i % 2 == 0).await?;
        c.read_timeout = Duration::from_secs(30); // generous: the machine may be busy
        clients.push(tokio::spawn(run_client(c, i)));
    }
    let mut requests = 0;
    let mut replayed = 0;
    let all_done = Instant::now() + Duration::from_secs(240);
    for c in clients {
        let left = all_done.saturating_duration_since(Instant::now());
        let result = tokio::time::timeout(left, c)
            .await
            .context("clients did not finish within 240 s")
            .and_then(|joined| joined?);
        let (r, h) = match result {
            Ok(done) => done,
            Err(e) => {
                let m = w.worker.metrics.render();
                let interesting = m.lines().filter(|l| {
                    !l.starts_with('#')
                        && [
                            "upstream",
                            "stream_",
                            "dropped",
                            "slow",
                            "connections_closed",
                            "fanout",
                        ]
                        .iter()
                        .any(|k| l.contains(k))
                });
                eprintln!(
                    "worker metrics at the failure:\n{}",
                    interesting.collect::<Vec<_>>().join("\n")
                );
                eprintln!("published so far: {}", published.load(Ordering::Relaxed));
                return Err(e);
            }
        };
        requests += r;
        replayed += h;
    }
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let publish_time = publishing.await??;
    let sent = published.load(Ordering::Relaxed);
    eprintln!(
        "{requests} history requests ({replayed} messages replayed) in {took:.1?} while {sent} \
         messages were published ({:.0}/s)",
        sent as f64 / publish_time.as_secs_f64()
    );
    assert_eq!(requests, CLIENTS * REQUESTS_PER_CLIENT);
    assert_eq!(w.metric("worker_stream_lost_messages_total"), 0.0);
    Ok(())
}

/// Subscribes with history to one topic after another; checks each reply. Returns the
/// requests made and the messages replayed.
async fn run_client(mut c: WsClient, i: usize) -> Result<(usize, usize)> {
    let mut previous: Option<String> = None;
    let mut replayed_total = 0;
    for j in 0..REQUESTS_PER_CLIENT {
        let topic = format!("s.{}", (i * 7 + j * 13) % TOPICS);
        let last = ((i + j) % 30) as u64 + 1;
        if let Some(old) = previous.take() {
            c.send_json(json!({"op":"unsubscribe","topic":old})).await?;
        }
        c.send_json(json!({"op":"subscribe","id":j,"topic":topic,"last":last}))
            .await?;
        let mut ack: Option<Value> = None;
        let mut offsets: Vec<u64> = Vec::new();
        let mut epoch: Option<Value> = None;
        let mut history_left = 0;
        let mut live = 0;
        while live < LIVE_PER_REQUEST {
            let m = c.recv_json().await.with_context(|| {
                format!(
                    "client {i} request {j} topic {topic}: ack {}, {} messages, {live} live",
                    ack.is_some(),
                    offsets.len()
                )
            })?;
            if m["topic"] != topic.as_str() {
                continue; // the previous topic's tail, or its unsubscribe ack
            }
            match m["type"].as_str() {
                Some("ack") => {
                    ensure!(ack.is_none(), "two acks for {topic}: {m}");
                    history_left = m["history"]["replayed"].as_u64().context("replayed")?;
                    ensure!(history_left <= last, "replayed more than asked: {m}");
                    replayed_total += history_left as usize;
                    ack = Some(m);
                }
                Some("message") => {
                    let a = ack.as_ref().context("a message before the ack")?;
                    let o = m["position"]["offset"].as_u64().context("offset")?;
                    if let Some(e) = &epoch {
                        ensure!(*e == m["position"]["epoch"], "epoch changed");
                    }
                    epoch = Some(m["position"]["epoch"].clone());
                    if let Some(&prev) = offsets.last() {
                        ensure!(
                            o == prev + 1,
                            "client {i} topic {topic}: offset {o} after {prev} (history {}, ack {a})",
                            a["history"]["replayed"]
                        );
                    }
                    if history_left > 0 {
                        history_left -= 1;
                        if history_left == 0 {
                            // History ends at the tail the ack announced.
                            ensure!(a["history"]["position"]["offset"].as_u64() == Some(o));
                        }
                    } else {
                        if offsets.is_empty() {
                            // No history: the first live message follows the announced tail.
                            if let Some(tail) = a["history"]["position"]["offset"].as_u64() {
                                ensure!(o == tail + 1, "first live {o} after tail {tail}");
                            }
                        }
                        live += 1;
                    }
                    offsets.push(o);
                }
                _ => anyhow::bail!("unexpected {m}"),
            }
        }
        previous = Some(topic);
    }
    Ok((REQUESTS_PER_CLIENT, replayed_total))
}

/// Sets the flag when dropped (the test's early returns included).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}
