//! The proxy with herald and three real workers: new connections follow reported load, and
//! neither herald nor a worker going away fails a client.

use anyhow::{Context, Result};
use harness::fleet::{KillableWorker, TestHerald, TestProxy};
use harness::{eventually, WsClient};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

const INTERVAL: Duration = Duration::from_millis(200);

/// Connects through the proxy; returns the client and the worker that welcomed it.
async fn connect(proxy: SocketAddr) -> Result<(WsClient, String)> {
    let mut c = WsClient::connect(proxy, "/ws", false, &[]).await?;
    let welcome = c.recv_json().await?;
    let worker = welcome["worker"]
        .as_str()
        .with_context(|| format!("welcome names its worker: {welcome}"))?
        .to_string();
    Ok((c, worker))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_follow_load_and_survive_herald_and_worker_loss() -> Result<()> {
    let h = TestHerald::start_slots_only(INTERVAL).await?;
    let url = h.url();
    // Worker "hot" has 20 connection slots and gets 10 clients directly: utilisation ≈ 0.53.
    let mut hot = KillableWorker::start("hot", &url, INTERVAL, |c| c.max_connections = 20)?;
    let mut cool = KillableWorker::start("cool-1", &url, INTERVAL, |_| {})?;
    let _cool2 = KillableWorker::start("cool-2", &url, INTERVAL, |_| {})?;
    let mut direct = Vec::new();
    for _ in 0..10 {
        let mut c = WsClient::connect(hot.ws_addr, "/ws", false, &[]).await?;
        c.recv_json().await?;
        direct.push(c);
    }
    eventually(
        Duration::from_secs(20),
        "herald sees the hot worker's load",
        || async {
            h.table().await.is_ok_and(|t| {
                t.eligible().count() == 3
                    && t.worker("hot")
                        .is_some_and(|w| w.connections == 10 && w.utilisation > 0.4)
            })
        },
    )
    .await?;
    let p = TestProxy::following(&url).await?;
    eventually(
        Duration::from_secs(20),
        "the proxy has herald's table",
        || async { p.knows_eligible(3) },
    )
    .await?;

    // 1. Skewed load: new connections go to the cooler workers.
    let mut placed: HashMap<String, usize> = HashMap::new();
    let mut clients = Vec::new();
    for i in 0..60 {
        let (c, worker) = connect(p.addr())
            .await
            .with_context(|| format!("connection {i}: {placed:?}"))?;
        *placed.entry(worker).or_default() += 1;
        clients.push(c);
    }
    println!("placements with one hot worker: {placed:?}");
    let on_hot = placed.get("hot").copied().unwrap_or(0);
    assert!(on_hot <= 6, "at most 10% on the hot worker: {placed:?}");
    assert!(
        placed.get("cool-1").copied().unwrap_or(0) >= 15,
        "{placed:?}"
    );
    assert!(
        placed.get("cool-2").copied().unwrap_or(0) >= 15,
        "{placed:?}"
    );

    // 2. Herald goes away: not one connection fails.
    h.shutdown.cancel();
    for _ in 0..30 {
        let (c, _) = connect(p.addr())
            .await
            .context("a connection with herald gone")?;
        clients.push(c);
    }

    // 3. A worker dies (hard): clients are placed on the others.
    cool.kill();
    hot.kill();
    drop(direct);
    let mut after: HashMap<String, usize> = HashMap::new();
    for _ in 0..30 {
        let (c, worker) = connect(p.addr())
            .await
            .context("a connection with two workers dead")?;
        *after.entry(worker).or_default() += 1;
        clients.push(c);
    }
    assert_eq!(after.keys().collect::<Vec<_>>(), ["cool-2"], "{after:?}");
    Ok(())
}
