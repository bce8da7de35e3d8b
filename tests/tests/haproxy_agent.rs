//! Herald's agent-check answers drive a real HAProxy: weights follow the table, a drain is set
//! and undone, workers herald does not know (or herald being away) keep full capacity, bad
//! requests change nothing.
//!
//! Each test starts herald's agent on loopback port 0 with a table it controls, plain TCP
//! stand-ins for workers (each writes its name to every connection), and HAProxy (see
//! [`harness::haproxy`]) with a health check and an agent check per stand-in, then reads
//! HAProxy's view through its admin socket.

use anyhow::{Context, Result};
use harness::haproxy::{AgentCheck, Backend, Haproxy, HealthCheck, Server, RUNNING};
use herald::agent;
use herald::metrics::Metrics;
use protocol::routing::{RoutedWorker, RoutingTable, TABLE_VERSION};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// HAProxy's health and agent check interval.
const INTER: Duration = Duration::from_millis(200);
/// Longest wait for the agent to stop or a connection through HAProxy to end.
const WAIT: Duration = Duration::from_secs(10);

/// Herald's agent-check listener, answering from a table the test publishes.
struct Agent {
    addr: SocketAddr,
    table: watch::Sender<Arc<RoutingTable>>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    served: JoinHandle<()>,
}

/// A worker in a published table: id, weight, draining.
type Routed<'a> = (&'a str, f64, bool);

fn table(workers: &[Routed]) -> Arc<RoutingTable> {
    static VERSION: AtomicUsize = AtomicUsize::new(1);
    let mut workers: Vec<_> = workers
        .iter()
        .map(|&(id, weight, draining)| RoutedWorker {
            id: id.into(),
            address: "127.0.0.1:1".into(),
            instance_id: None,
            utilisation: 1.0 - weight,
            cost_per_connection: 0.001,
            connections: 0,
            report_seq: 1,
            report_age_ms: 0,
            slow_start: 1.0,
            weight,
            draining,
        })
        .collect();
    workers.sort_by(|a, b| a.id.cmp(&b.id));
    Arc::new(RoutingTable {
        format: TABLE_VERSION,
        generation: 7,
        version: VERSION.fetch_add(1, Ordering::Relaxed) as u64,
        built_at_ms: 0,
        report_interval_ms: 1000,
        workers,
    })
}

impl Agent {
    async fn start(workers: &[Routed<'_>]) -> Result<Agent> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = watch::channel(table(workers));
        let metrics = Arc::new(Metrics::new());
        let stop = CancellationToken::new();
        let served = tokio::spawn(agent::serve(listener, rx, metrics.clone(), stop.clone()));
        Ok(Agent {
            addr,
            table: tx,
            metrics,
            stop,
            served,
        })
    }

    fn publish(&self, workers: &[Routed<'_>]) {
        self.table.send_replace(table(workers));
    }

    /// `herald_agent_answers_total{answer}`.
    fn answers(&self, answer: &str) -> u64 {
        self.metrics
            .agent_answers
            .with_label_values(&[answer])
            .get()
    }

    async fn stop(self) -> Result<()> {
        self.stop.cancel();
        tokio::time::timeout(WAIT, self.served)
            .await
            .context("the agent stops in time")??;
        Ok(())
    }

    /// A server for stand-in `name`: health-checked, its agent check asking about `agent_send`.
    async fn server(&self, name: &'static str, agent_send: String) -> Result<Server> {
        Ok(Server::new(name, stand_in(name).await?)
            .check(HealthCheck {
                inter: INTER,
                port: None,
            })
            .agent(AgentCheck {
                addr: self.addr,
                send: agent_send,
                inter: INTER,
            }))
    }

    /// A server whose agent check asks about the worker of the same name.
    async fn named(&self, name: &'static str) -> Result<Server> {
        self.server(name, format!("{name}\n")).await
    }
}

/// A stand-in worker: a loopback listener that writes `name` to every connection and closes it.
async fn stand_in(name: &'static str) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            // Health checks close at once; a failed write is theirs.
            let _ = stream.write_all(name.as_bytes()).await;
        }
    });
    Ok(addr)
}

/// HAProxy in front of `servers`, balancing round robin.
async fn haproxy(servers: Vec<Server>) -> Result<Haproxy> {
    let backend = servers
        .into_iter()
        .fold(Backend::new("be"), Backend::server);
    Haproxy::start(&backend).await
}

/// The name of the stand-in one new connection through HAProxy reached.
async fn connect_through(haproxy: &Haproxy) -> Result<String> {
    let mut client = TcpStream::connect(haproxy.frontend).await?;
    let mut name = String::new();
    tokio::time::timeout(WAIT, client.read_to_string(&mut name))
        .await
        .context("the connection ends in time")??;
    Ok(name)
}

#[tokio::test]
async fn haproxy_weights_follow_the_table() -> Result<()> {
    let agent = Agent::start(&[("w1", 0.25, false), ("w2", 1.0, false)]).await?;
    let haproxy = haproxy(vec![
        agent.named("w1").await?,
        agent.named("w2").await?,
        agent.named("w3").await?,
    ])
    .await?;

    haproxy
        .eventually(
            "w1 at 25, w2 at 100",
            async || haproxy.servers().await,
            |s| s["w1"].ready_at(25) && s["w2"].ready_at(100),
        )
        .await?;
    // w3 is not in the table: full weight, and the reason shows in HAProxy's stats.
    let stats = haproxy
        .eventually(
            "w3's agent check answered as not in the table",
            async || haproxy.stats().await,
            |s| s["w3"].last_agent_check.contains("herald:not-in-table"),
        )
        .await?;
    assert_eq!(
        stats["w3"].last_agent_check,
        "agent reports an error : herald:not-in-table"
    );
    assert!(haproxy.servers().await?["w3"].ready_at(100));

    // A worker with no headroom left keeps the 1% floor: never 0, which HAProxy shows as DRAIN.
    agent.publish(&[("w1", 0.0, false), ("w2", 0.57, false), ("w3", 0.8, false)]);
    let servers = haproxy
        .eventually(
            "w1 at 1, w2 at 57, w3 at 80",
            async || haproxy.servers().await,
            |s| s["w1"].ready_at(1) && s["w2"].ready_at(57) && s["w3"].ready_at(80),
        )
        .await?;
    assert!(!servers["w1"].drained());
    assert_eq!(haproxy.stats().await?["w1"].status, "UP");
    assert!(agent.answers("weight") >= 3);
    Ok(())
}

#[tokio::test]
async fn haproxy_drains_and_undrains_a_worker() -> Result<()> {
    let agent = Agent::start(&[("w1", 1.0, false), ("w2", 1.0, false)]).await?;
    let haproxy = haproxy(vec![agent.named("w1").await?, agent.named("w2").await?]).await?;
    haproxy
        .eventually(
            "both servers answered by the agent",
            async || Ok((agent.answers("weight"), haproxy.servers().await?)),
            |(answers, s)| *answers >= 2 && s["w1"].ready_at(100) && s["w2"].ready_at(100),
        )
        .await?;

    agent.publish(&[("w1", 1.0, false), ("w2", 1.0, true)]);
    haproxy
        .eventually(
            "w2 drained",
            async || haproxy.servers().await,
            |s| s["w2"].drained() && s["w2"].op_state == RUNNING && !s["w1"].drained(),
        )
        .await?;
    assert!(haproxy.stats().await?["w2"].status.starts_with("DRAIN"));
    for _ in 0..6 {
        assert_eq!(
            connect_through(&haproxy).await?,
            "w1",
            "w2 takes no new connections"
        );
    }

    agent.publish(&[("w1", 1.0, false), ("w2", 0.5, false)]);
    haproxy
        .eventually(
            "w2 ready at 50",
            async || haproxy.servers().await,
            |s| s["w2"].ready_at(50),
        )
        .await?;
    let mut reached = Vec::new();
    for _ in 0..6 {
        reached.push(connect_through(&haproxy).await?);
    }
    assert!(
        reached.iter().any(|name| name == "w2"),
        "w2 takes connections again: {reached:?}"
    );
    Ok(())
}

#[tokio::test]
async fn herald_restarting_or_away_never_takes_capacity_away() -> Result<()> {
    let agent = Agent::start(&[("w1", 0.6, true), ("w2", 0.3, false)]).await?;
    let haproxy = haproxy(vec![agent.named("w1").await?, agent.named("w2").await?]).await?;
    haproxy
        .eventually(
            "w1 drained, w2 at 30",
            async || haproxy.servers().await,
            |s| s["w1"].drained() && s["w2"].ready_at(30),
        )
        .await?;

    // Herald restarted: its table is empty until workers report again.
    agent.publish(&[]);
    haproxy
        .eventually(
            "both ready at full weight",
            async || haproxy.servers().await,
            |s| s["w1"].ready_at(100) && s["w2"].ready_at(100),
        )
        .await?;

    // Herald away altogether: HAProxy's agent checks are refused and nothing changes.
    agent.publish(&[("w1", 0.4, false), ("w2", 1.0, false)]);
    haproxy
        .eventually(
            "w1 at 40",
            async || haproxy.servers().await,
            |s| s["w1"].ready_at(40),
        )
        .await?;
    agent.stop().await?;
    haproxy
        .eventually(
            "agent checks refused",
            async || haproxy.stats().await,
            |s| s["w1"].agent_status.contains("L4CON") && s["w2"].agent_status.contains("L4CON"),
        )
        .await?;
    let servers = haproxy.servers().await?;
    assert!(servers["w1"].ready_at(40), "{servers:?}");
    assert!(servers["w2"].ready_at(100), "{servers:?}");
    let stats = haproxy.stats().await?;
    assert_eq!((&*stats["w1"].status, &*stats["w2"].status), ("UP", "UP"));
    Ok(())
}

#[tokio::test]
async fn haproxy_keeps_its_state_on_a_bad_request() -> Result<()> {
    let agent = Agent::start(&[("w1", 0.5, false)]).await?;
    let oversized = agent.server("w1", format!("{}\n", "x".repeat(300))).await?;
    let haproxy = haproxy(vec![oversized]).await?;
    haproxy
        .eventually(
            "a bad request answered",
            async || Ok(agent.answers("bad_request")),
            |n| *n >= 1,
        )
        .await?;

    // An operator's settings, which herald's reply to a bad request must leave alone.
    haproxy.command("set weight be/w1 40").await?;
    haproxy.command("set server be/w1 state drain").await?;
    let before = agent.answers("bad_request");
    // HAProxy runs one check of a server at a time: once the agent has answered the second
    // check after the change, HAProxy has applied the first.
    haproxy
        .eventually(
            "two more bad requests answered",
            async || Ok(agent.answers("bad_request")),
            |n| *n >= before + 2,
        )
        .await?;
    let servers = haproxy.servers().await?;
    assert_eq!(servers["w1"].uweight, 40, "{servers:?}");
    assert!(servers["w1"].drained(), "{servers:?}");
    assert_eq!(
        haproxy.stats().await?["w1"].last_agent_check,
        "agent reports an error : herald:bad-request:too-long"
    );
    assert_eq!(agent.answers("weight") + agent.answers("unknown"), 0);
    Ok(())
}
