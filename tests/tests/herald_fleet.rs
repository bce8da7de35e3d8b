//! Herald with real workers reporting to it: the table follows the fleet, a killed worker
//! expires, proxies' long polls wake on changes, and a scale-in drains the emptiest worker
//! end to end (herald's reply → the worker's staggered closes → drained → removed).

use anyhow::{ensure, Context, Result};
use harness::fleet::{KillableWorker, TestHerald};
use harness::{eventually, TestWorker};
use protocol::routing::RoutingTable;
use std::time::{Duration, Instant};

const INTERVAL: Duration = Duration::from_millis(200);

fn fast(c: &mut herald::Config) {
    c.report_interval = INTERVAL;
}

async fn table_ids(h: &TestHerald) -> Vec<String> {
    match h.table().await {
        Ok(t) => t.workers.iter().map(|w| w.id.clone()).collect(),
        Err(_) => Vec::new(),
    }
}

/// POSTs `body` to herald's report endpoint; returns (status, body).
async fn post_report(h: &TestHerald, body: &[u8]) -> Result<(u16, String)> {
    harness::http_request_with_body(h.herald.http_addr, "POST", "/v1/reports", body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_expires_and_leaves_the_table() -> Result<()> {
    let h = TestHerald::start(fast).await?;
    let mut workers = Vec::new();
    for id in ["w1", "w2", "w3"] {
        workers.push(KillableWorker::start(id, &h.url(), INTERVAL, |_| {})?);
    }
    eventually(
        Duration::from_secs(20),
        "all three workers in the table",
        || async { table_ids(&h).await == ["w1", "w2", "w3"] },
    )
    .await?;
    let table = h.table().await?;
    for (w, row) in workers.iter().zip(&table.workers) {
        assert_eq!(
            row.address,
            w.ws_addr.to_string(),
            "proxies dial the client port"
        );
        assert!(!row.draining);
        assert!(row.weight > 0.0);
    }

    workers[1].kill();
    let killed = Instant::now();
    eventually(
        Duration::from_secs(20),
        "w2 gone from the table",
        || async { table_ids(&h).await == ["w1", "w3"] },
    )
    .await?;
    let took = killed.elapsed();
    println!(
        "killed worker left the table after {took:?} (3 intervals = {:?})",
        INTERVAL * 3
    );
    assert_eq!(h.metric("herald_workers_expired_total"), 1.0);
    let (status, body) = harness::http_request(h.herald.http_addr, "GET", "/v1/status").await?;
    assert_eq!(status, 200);
    let status: serde_json::Value = serde_json::from_str(&body)?;
    let expired = status["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["action"] == "expired")
        .context("an expiry decision")?;
    assert_eq!(expired["worker"], "w2");
    assert!(
        expired["reason"].as_str().unwrap().contains("3 intervals"),
        "{expired}"
    );
    // The survivors keep reporting and stay.
    tokio::time::sleep(INTERVAL * 5).await;
    assert_eq!(table_ids(&h).await, ["w1", "w3"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_wakes_when_the_table_changes() -> Result<()> {
    let h = TestHerald::start(fast).await?;
    let first = h.table().await?;
    assert!(first.workers.is_empty());
    let addr = h.herald.http_addr;
    let path = format!(
        "/v1/table?generation={}&after={}&wait=30s",
        first.generation, first.version
    );
    let started = Instant::now();
    let poll = tokio::spawn(async move { harness::http_request(addr, "GET", &path).await });
    let _w = KillableWorker::start("w1", &h.url(), INTERVAL, |_| {})?;
    let (status, body) = tokio::time::timeout(Duration::from_secs(25), poll).await???;
    assert_eq!(status, 200);
    let next = RoutingTable::decode(body.as_bytes())?;
    assert_eq!(next.generation, first.generation);
    assert!(next.version > first.version);
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "woke before the wait ran out"
    );
    // A caller whose table is old gets the current one at once; bad queries are refused.
    let stale = format!("/v1/table?generation={}&after=0&wait=30s", first.generation);
    let t0 = Instant::now();
    let (status, _) = harness::http_request(addr, "GET", &stale).await?;
    assert_eq!(status, 200);
    assert!(t0.elapsed() < Duration::from_secs(10));
    let (status, body) = harness::http_request(addr, "GET", "/v1/table?wait=5m").await?;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("limit"), "{body}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_reports_are_refused_with_the_reason() -> Result<()> {
    let h = TestHerald::start(fast).await?;
    let (status, body) = post_report(&h, b"{\"version\":1}").await?;
    assert_eq!(status, 400);
    assert!(body.contains("not a valid load report"), "{body}");
    let (status, body) = post_report(&h, b"{\"version\":7}").await?;
    assert_eq!(status, 400);
    assert!(body.contains("version 7"), "{body}");
    let (status, body) = post_report(&h, &vec![b' '; 20_000]).await?;
    assert_eq!(status, 413, "{body}");
    let (status, _) = harness::http_request(h.herald.http_addr, "GET", "/v1/reports").await?;
    assert_eq!(status, 405);
    assert_eq!(h.metric("herald_reports_total{result=\"refused\""), 3.0);
    ensure!(h.table().await?.workers.is_empty());
    Ok(())
}

/// Three idle workers, a minimum of two: herald drains the one with the fewest connections,
/// its client is closed with 1012 (reconnect elsewhere), and once it is empty herald records
/// it drained and the actuator (a command, here) is told to remove it; the others keep their
/// clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_in_drains_the_emptiest_worker_end_to_end() -> Result<()> {
    let calls = std::env::temp_dir().join(format!(
        "herald-exec-{}-{:08x}.log",
        std::process::id(),
        rand::random::<u32>()
    ));
    let script = format!(
        "echo \"$PUSHFLEET_EVENT $PUSHFLEET_WORKER_ID $PUSHFLEET_DESIRED\" >> '{}'",
        calls.display()
    );
    let h = TestHerald::start(|c| {
        fast(c);
        c.actuator = herald::config::ActuatorKind::Exec;
        c.exec = vec!["/bin/sh".into(), "-c".into(), script];
        c.startup_grace = Duration::from_secs(3);
        c.scale_in_window = Duration::from_secs(1);
        c.scale_in_cooldown = Duration::ZERO;
        c.warmup = Duration::ZERO;
        c.slow_start = Duration::ZERO;
        c.min_workers = 2;
    })
    .await?;
    let url = h.url();
    let start = |id: &'static str| {
        let url = url.clone();
        TestWorker::start(move |c| {
            c.id = Some(id.into());
            c.herald = Some(url);
            c.report_interval = INTERVAL;
        })
    };
    let (a, b, c) = (start("a").await?, start("b").await?, start("c").await?);
    let mut clients = Vec::new();
    for (w, n) in [(&a, 2), (&b, 1), (&c, 3)] {
        for _ in 0..n {
            clients.push(w.client(false).await?);
        }
    }
    let mut b_client = clients.remove(2);
    let code = tokio::time::timeout(Duration::from_secs(30), b_client.expect_close()).await??;
    assert_eq!(
        code, 1012,
        "the drained worker's client is told to reconnect elsewhere"
    );
    eventually(
        Duration::from_secs(20),
        "herald records b drained",
        || async {
            let (_, body) = harness::http_request(h.herald.http_addr, "GET", "/v1/status")
                .await
                .unwrap_or_default();
            body.contains("\"drained\"") && body.contains("\"worker\": \"b\"")
        },
    )
    .await?;
    let table = h.table().await?;
    assert!(table.worker("b").context("b still reports")?.draining);
    assert_eq!(table.eligible().count(), 2);
    let (_, body) = harness::http_request(h.herald.http_addr, "GET", "/v1/status").await?;
    let status: serde_json::Value = serde_json::from_str(&body)?;
    let scale_ins: Vec<_> = status["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["action"] == "scale_in")
        .collect();
    assert_eq!(
        scale_ins.len(),
        1,
        "one at a time, and never below the minimum"
    );
    assert_eq!(scale_ins[0]["worker"], "b");
    assert_eq!(a.metric("worker_connections"), 2.0);
    assert_eq!(c.metric("worker_connections"), 3.0);
    let log = std::fs::read_to_string(&calls).context("the actuator command ran")?;
    let _ = std::fs::remove_file(&calls);
    let events: Vec<&str> = log
        .lines()
        .filter(|l| !l.starts_with("drain_progress"))
        .collect();
    assert_eq!(events, ["drain_started b 2", "drained b "], "{log}");
    Ok(())
}
