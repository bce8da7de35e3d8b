//! End to end with HAProxy in front: real workers report to a real herald, and a real HAProxy
//! balances clients over the workers with weights and drains set by herald's agent check.
//!
//! ```text
//!  clients ──▶ HAProxy ──▶ workers' client ports        workers ──reports──▶ herald
//!                 └── agent check "w1\n" ──▶ herald's agent ──▶ "ready 47%" / "drain"
//! ```
//!
//! - a worker with half its connection slots taken gets about half the weight in HAProxy,
//!   exactly the weight in herald's table;
//! - a worker that drains itself is drained in HAProxy: new clients reach the others;
//! - a worker killed outright leaves herald's table, the agent stops having an opinion
//!   (`ready 100% herald:not-in-table`), and it is HAProxy's own health check that takes the
//!   server out — herald never drains or downs a server it does not know.
//!
//! Herald counts connection slots only (CPU, memory, loop lag and latency capacities off) with
//! no smoothing and no slow start, so weights depend on the clients the test connects and not
//! on how busy the machine is.

use anyhow::{ensure, Context, Result};
use harness::fleet::{KillableWorker, TestHerald};
use harness::haproxy::{AgentCheck, Backend, Balance, Haproxy, HealthCheck, Server};
use harness::{eventually, TestWorker, WsClient};
use herald::agent::weight_percent;
use std::net::SocketAddr;
use std::time::Duration;

/// Workers' report interval, herald's tick, and HAProxy's health and agent check interval.
const INTERVAL: Duration = Duration::from_millis(200);
/// Longest wait for herald's table to show something.
const WAIT: Duration = Duration::from_secs(20);
/// Connection slots of the busy worker, and the clients that take half of them: utilisation
/// 5 / 10 / 0.95 (herald's default `capacity_connections`) ≈ 0.53, weight ≈ 47%.
const SLOTS: usize = 10;
const BUSY_CLIENTS: usize = 5;
/// Percent points HAProxy's weight may differ from the table's (rounding).
const TOLERANCE: u32 = 1;

/// Herald with its agent on, judging workers by connection slots only.
async fn start_herald() -> Result<(TestHerald, SocketAddr)> {
    let h = TestHerald::start(|c| {
        c.report_interval = INTERVAL;
        c.slow_start = Duration::ZERO;
        c.smoothing = Duration::ZERO;
        c.capacity_cpu = 0.0;
        c.capacity_memory = 0.0;
        c.capacity_loop_lag = Duration::ZERO;
        c.capacity_latency = Duration::ZERO;
    })
    .await?;
    let agent = h
        .herald
        .agent_addr
        .context("herald's agent is on in tests")?;
    Ok((h, agent))
}

/// A worker reporting to `h` every [`INTERVAL`] with `max_connections` slots.
async fn start_worker(h: &TestHerald, id: &str, max_connections: usize) -> Result<TestWorker> {
    TestWorker::start(|c| {
        c.id = Some(id.into());
        c.herald = Some(h.url());
        c.report_interval = INTERVAL;
        c.max_connections = max_connections;
    })
    .await
}

/// A worker as HAProxy sees it: id, client address, admin address.
type Target = (String, SocketAddr, SocketAddr);

fn target(id: &str, w: &TestWorker) -> Target {
    (id.to_string(), w.addr(), w.worker.admin_addr)
}

/// HAProxy balancing `leastconn` over `workers`' client ports, each `weight 100` with an agent
/// check asking herald about its id. The health check connects to the worker's admin port:
/// it stays open through a drain (the client port closes once a worker drains, which would
/// show as DOWN rather than DRAIN) and closes when the worker dies.
async fn haproxy_for(agent: SocketAddr, workers: &[Target]) -> Result<Haproxy> {
    let mut backend = Backend::new("workers").balance(Balance::LeastConn);
    for (id, client, admin) in workers {
        let server = Server::new(id, *client)
            .weight(100)
            .check(HealthCheck {
                inter: INTERVAL,
                port: Some(admin.port()),
            })
            .agent(AgentCheck {
                addr: agent,
                send: format!("{id}\n"),
                inter: INTERVAL,
            });
        backend = backend.server(server);
    }
    Haproxy::start(&backend).await
}

/// Waits until herald's table lists exactly `ids` (in order).
async fn table_lists(h: &TestHerald, ids: &[&str]) -> Result<()> {
    eventually(WAIT, &format!("herald's table lists {ids:?}"), || async {
        h.table().await.is_ok_and(|t| {
            t.workers
                .iter()
                .map(|w| w.id.as_str())
                .eq(ids.iter().copied())
        })
    })
    .await
}

/// Connects a WebSocket client to `addr` and returns the id of the worker that welcomed it.
async fn welcomed_by(addr: SocketAddr) -> Result<(WsClient, String)> {
    let mut c = WsClient::connect(addr, "/ws", false, &[]).await?;
    let welcome = c.recv_json().await?;
    ensure!(
        welcome["type"] == "welcome",
        "expected welcome, got {welcome}"
    );
    let worker = welcome["worker"].as_str().context("worker in welcome")?;
    Ok((c, worker.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_weights_follow_the_table_herald_builds() -> Result<()> {
    let (h, agent) = start_herald().await?;
    let mut workers = Vec::new();
    for id in ["w1", "w2", "w3"] {
        let slots = if id == "w2" { SLOTS } else { 1000 };
        workers.push(start_worker(&h, id, slots).await?);
    }
    let targets: Vec<Target> = ["w1", "w2", "w3"]
        .iter()
        .zip(&workers)
        .map(|(id, w)| target(id, w))
        .collect();
    let haproxy = haproxy_for(agent, &targets).await?;
    table_lists(&h, &["w1", "w2", "w3"]).await?;

    let mut clients = Vec::new();
    for _ in 0..BUSY_CLIENTS {
        clients.push(workers[1].client(false).await?);
    }
    // HAProxy lags herald by up to one agent interval, and herald lags the worker by one
    // report: poll both views until they agree on a table that counts the clients.
    let (table, servers) = haproxy
        .eventually(
            "agent weights equal to herald's table with w2's clients counted",
            async || Ok((h.table().await?, haproxy.servers().await?)),
            |(table, servers)| {
                table.worker("w2").map(|w| w.connections) == Some(BUSY_CLIENTS as u64)
                    && ["w1", "w2", "w3"].iter().all(|id| {
                        table.worker(id).is_some_and(|row| {
                            let percent = u32::from(weight_percent(row.weight));
                            servers[*id].running()
                                && !servers[*id].drained()
                                && servers[*id].uweight.abs_diff(percent) <= TOLERANCE
                        })
                    })
            },
        )
        .await?;
    let w2 = table.worker("w2").context("w2 in the table")?;
    assert!(
        (46..=48).contains(&servers["w2"].uweight),
        "half the slots taken ≈ 47%: {servers:?}, utilisation {}",
        w2.utilisation
    );
    for idle in ["w1", "w3"] {
        assert_eq!(servers[idle].uweight, 100, "{idle} idle: {servers:?}");
    }
    let stats = haproxy.stats().await?;
    assert_eq!(stats["w2"].weight, servers["w2"].uweight);
    assert!(stats.values().all(|s| s.status == "UP"), "{stats:?}");
    drop(clients);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_draining_itself_is_drained_in_haproxy() -> Result<()> {
    let (h, agent) = start_herald().await?;
    let w1 = start_worker(&h, "w1", 1000).await?;
    let w2 = start_worker(&h, "w2", 1000).await?;
    let haproxy = haproxy_for(agent, &[target("w1", &w1), target("w2", &w2)]).await?;
    table_lists(&h, &["w1", "w2"]).await?;
    haproxy
        .eventually(
            "both answered by herald at full weight",
            async || haproxy.stats().await,
            // `CHECKED` with no message: the agent's last reply was a plain `ready 100%`, not
            // `herald:not-in-table`.
            |s| {
                s.values().all(|s| {
                    s.agent_status == "CHECKED"
                        && s.last_agent_check.is_empty()
                        && s.status == "UP"
                        && s.weight == 100
                })
            },
        )
        .await?;

    let (status, body) = w2.admin("POST", "/drain").await?;
    assert_eq!(status, 202, "{body}");
    let (table, servers) = haproxy
        .eventually(
            "w2 flagged draining by herald and drained in HAProxy",
            async || Ok((h.table().await?, haproxy.servers().await?)),
            |(t, s)| {
                t.worker("w2").is_some_and(|w| w.draining) && s["w2"].drained() && s["w2"].running()
            },
        )
        .await?;
    assert!(!table.worker("w1").context("w1")?.draining);
    assert!(servers["w1"].ready_at(100), "{servers:?}");
    // HAProxy names who drained it.
    assert_eq!(haproxy.stats().await?["w2"].status, "DRAIN (agent)");
    // New clients all go to w1.
    for _ in 0..4 {
        let (_client, worker) = welcomed_by(haproxy.frontend).await?;
        assert_eq!(
            worker, "w1",
            "a client through HAProxy reached a drained worker"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_is_left_to_haproxy_health_check() -> Result<()> {
    let (h, agent) = start_herald().await?;
    let w1 = KillableWorker::start("w1", &h.url(), INTERVAL, |_| {})?;
    let mut w2 = KillableWorker::start("w2", &h.url(), INTERVAL, |c| c.max_connections = SLOTS)?;
    let targets: Vec<Target> = [&w1, &w2]
        .iter()
        .map(|w| (w.id.clone(), w.ws_addr, w.admin_addr))
        .collect();
    let haproxy = haproxy_for(agent, &targets).await?;
    table_lists(&h, &["w1", "w2"]).await?;
    // w2 busy, so its weight is herald's (below 100) rather than a default.
    let mut clients = Vec::new();
    for _ in 0..BUSY_CLIENTS {
        clients.push(welcomed_by(w2.ws_addr).await?);
    }
    haproxy
        .eventually(
            "w2 weighed down by herald",
            async || haproxy.servers().await,
            |s| s["w2"].running() && s["w2"].uweight < 100 && s["w1"].ready_at(100),
        )
        .await?;

    w2.kill();
    table_lists(&h, &["w1"]).await?;
    // Herald no longer knows w2: its agent answers "not in table" with full weight and no
    // drain. HAProxy's own health check (the admin port is closed now) is what marks w2 DOWN.
    let (servers, stats) = haproxy
        .eventually(
            "w2 down by its health check, answered as not in the table",
            async || Ok((haproxy.servers().await?, haproxy.stats().await?)),
            |(servers, stats)| {
                stats["w2"].last_agent_check.contains("herald:not-in-table")
                    && stats["w2"].status.starts_with("DOWN")
                    && servers["w2"].uweight == 100
            },
        )
        .await?;
    assert!(
        !servers["w2"].drained(),
        "herald drains nothing it does not know: {servers:?}"
    );
    assert_eq!(stats["w2"].check_status, "L4CON", "{stats:?}");
    assert!(servers["w1"].ready_at(100), "{servers:?}");
    assert_eq!(stats["w1"].status, "UP");
    // Clients through HAProxy reach the survivor.
    let (_client, worker) = welcomed_by(haproxy.frontend).await?;
    assert_eq!(worker, "w1");
    Ok(())
}
