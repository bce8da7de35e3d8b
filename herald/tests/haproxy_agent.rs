//! Herald's agent-check answers drive a real HAProxy: weights follow the table, a drain is set
//! and undone, workers herald does not know (or herald being away) keep full capacity, bad
//! requests change nothing.
//!
//! Each test starts herald's agent on loopback port 0 with a table it controls, plain TCP
//! stand-ins for workers (each writes its name to every connection), and HAProxy as a child
//! process, then reads HAProxy's view through its admin socket:
//! - `show servers state`: `srv_uweight` is the weight the agent's `<n>%` set (of the configured
//!   `srv_iweight`); `srv_admin_state` carries `0x08` (forced drain) while the agent's `drain`
//!   holds; `srv_op_state` 2 is running.
//! - `show stat`: `last_agt` is the agent check's last message, `agent_status` its result.
//!
//! Needs the `haproxy` binary (env `HAPROXY`, else `PATH` or `/usr/sbin`); `bash tests/run.sh`
//! installs it (Debian package `haproxy`).

use std::collections::HashMap;
use std::fmt::Debug;
use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use herald::agent;
use herald::metrics::Metrics;
use protocol::routing::{RoutedWorker, RoutingTable, TABLE_VERSION};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long any condition may take to show in HAProxy (agent checks run every 200 ms).
const DEADLINE: Duration = Duration::from_secs(10);
/// Pause between two looks at HAProxy's state while waiting for a condition.
const POLL: Duration = Duration::from_millis(50);
/// `SRV_ADMF_FDRAIN` in `srv_admin_state`: drained by the agent or the CLI.
const FORCED_DRAIN: u32 = 0x08;
/// `SRV_ST_RUNNING` in `srv_op_state`.
const RUNNING: u32 = 2;

/// Herald's agent-check listener, answering from a table the test publishes.
struct Agent {
    port: u16,
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
    async fn start(workers: &[Routed<'_>]) -> Agent {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = watch::channel(table(workers));
        let metrics = Arc::new(Metrics::new());
        let stop = CancellationToken::new();
        let served = tokio::spawn(agent::serve(listener, rx, metrics.clone(), stop.clone()));
        Agent {
            port,
            table: tx,
            metrics,
            stop,
            served,
        }
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

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(DEADLINE, self.served)
            .await
            .expect("the agent stops in time")
            .unwrap();
    }
}

/// A stand-in worker: a loopback listener that writes `name` to every connection and closes it.
async fn stand_in(name: &'static str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            // Health checks close at once; a failed write is theirs.
            let _ = stream.write_all(name.as_bytes()).await;
        }
    });
    port
}

/// One `server` line: name, port of its stand-in, what `agent-send` sends.
struct Server<'a> {
    name: &'a str,
    port: u16,
    agent_send: String,
}

impl<'a> Server<'a> {
    /// A server whose agent check asks about the worker of the same name.
    fn named(name: &'a str, port: u16) -> Self {
        Server {
            name,
            port,
            agent_send: format!("{name}\\n"),
        }
    }
}

/// HAProxy's view of one server, from `show servers state`.
#[derive(Debug, Clone, PartialEq)]
struct ServerState {
    op_state: u32,
    admin_state: u32,
    uweight: u32,
}

impl ServerState {
    fn drained(&self) -> bool {
        self.admin_state & FORCED_DRAIN != 0
    }

    /// Running, not drained, at `uweight`.
    fn ready_at(&self, uweight: u32) -> bool {
        self.op_state == RUNNING && !self.drained() && self.uweight == uweight
    }
}

/// HAProxy running in the foreground with a backend `be` of the given servers; killed on drop.
struct Haproxy {
    child: Child,
    dir: PathBuf,
    frontend: u16,
}

fn haproxy_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("HAPROXY") {
        return path.into();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|dir| dir.join("haproxy"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "haproxy not found (set HAPROXY or put it on PATH); \
                 `bash tests/run.sh` installs it (Debian package haproxy)"
            )
        })
}

/// A loopback port free a moment ago (HAProxy cannot bind port 0 and report it).
fn free_port() -> u16 {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap().port()
}

fn config(dir: &std::path::Path, frontend: u16, agent_port: u16, servers: &[Server]) -> String {
    let mut cfg = format!(
        "global\n\
         \x20   stats socket {}/admin.sock level admin\n\
         defaults\n\
         \x20   mode tcp\n\
         \x20   timeout connect 1s\n\
         \x20   timeout client 10s\n\
         \x20   timeout server 10s\n\
         frontend fe\n\
         \x20   bind 127.0.0.1:{frontend}\n\
         \x20   default_backend be\n\
         backend be\n\
         \x20   balance roundrobin\n",
        dir.display()
    );
    for s in servers {
        cfg += &format!(
            "    server {} 127.0.0.1:{} weight 100 check inter 200ms agent-check \
             agent-addr 127.0.0.1 agent-port {agent_port} agent-send \"{}\" agent-inter 200ms\n",
            s.name, s.port, s.agent_send
        );
    }
    cfg
}

impl Haproxy {
    /// Starts HAProxy and waits until its admin socket answers. The frontend port is picked
    /// free and released first, so a lost race is retried with another port.
    async fn start(agent_port: u16, servers: &[Server<'_>]) -> Haproxy {
        static DIRS: AtomicUsize = AtomicUsize::new(0);
        let binary = haproxy_binary();
        let mut last_log = String::new();
        for _attempt in 0..3 {
            let dir = std::env::temp_dir().join(format!(
                "herald-haproxy-{}-{}",
                std::process::id(),
                DIRS.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir_all(&dir).unwrap();
            let frontend = free_port();
            let cfg = dir.join("haproxy.cfg");
            fs::write(&cfg, config(&dir, frontend, agent_port, servers)).unwrap();
            let log = fs::File::create(dir.join("haproxy.log")).unwrap();
            let child = Command::new(&binary)
                .arg("-f")
                .arg(&cfg)
                .arg("-db")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
            let mut haproxy = Haproxy {
                child,
                dir,
                frontend,
            };
            if haproxy.admin_socket_answers().await {
                return haproxy;
            }
            last_log = haproxy.log();
        }
        panic!("haproxy exited at start three times; last log:\n{last_log}");
    }

    /// True once the admin socket answers, false if HAProxy exited first.
    async fn admin_socket_answers(&mut self) -> bool {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if self.child.try_wait().unwrap().is_some() {
                return false;
            }
            if self.try_command("show info").await.is_ok() {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "haproxy's admin socket did not open in time; log:\n{}",
                self.log()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("haproxy.log")).unwrap_or_default()
    }

    async fn try_command(&self, command: &str) -> std::io::Result<String> {
        let mut socket = UnixStream::connect(self.dir.join("admin.sock")).await?;
        socket.write_all(format!("{command}\n").as_bytes()).await?;
        let mut out = String::new();
        tokio::time::timeout(DEADLINE, socket.read_to_string(&mut out)).await??;
        Ok(out)
    }

    async fn command(&self, command: &str) -> String {
        self.try_command(command)
            .await
            .unwrap_or_else(|e| panic!("admin command {command:?} failed: {e}"))
    }

    /// `show servers state be`, by server name.
    async fn servers(&self) -> HashMap<String, ServerState> {
        let out = self.command("show servers state be").await;
        let mut lines = out.lines().filter(|l| !l.trim().is_empty()).skip(1);
        let header: Vec<&str> = lines
            .next()
            .unwrap_or_else(|| panic!("no header in {out:?}"))
            .trim_start_matches('#')
            .split_whitespace()
            .collect();
        lines
            .map(|line| {
                let row: HashMap<&str, &str> = header
                    .iter()
                    .copied()
                    .zip(line.split_whitespace())
                    .collect();
                let number = |column: &str| -> u32 {
                    row[column]
                        .parse()
                        .unwrap_or_else(|_| panic!("{column} in {line:?}"))
                };
                let state = ServerState {
                    op_state: number("srv_op_state"),
                    admin_state: number("srv_admin_state"),
                    uweight: number("srv_uweight"),
                };
                (row["srv_name"].to_string(), state)
            })
            .collect()
    }

    /// `show stat` for backend `be`: each server's columns by name.
    async fn stats(&self) -> HashMap<String, HashMap<String, String>> {
        let out = self.command("show stat").await;
        let mut lines = out.lines().filter(|l| !l.trim().is_empty());
        let header: Vec<String> = lines
            .next()
            .unwrap_or_else(|| panic!("no header in {out:?}"))
            .trim_start_matches("# ")
            .split(',')
            .map(str::to_string)
            .collect();
        lines
            .map(|line| {
                header
                    .iter()
                    .cloned()
                    .zip(line.split(',').map(str::to_string))
                    .collect::<HashMap<_, _>>()
            })
            .filter(|row| row["pxname"] == "be")
            .map(|row| (row["svname"].clone(), row))
            .collect()
    }

    /// Waits until `probe` gives something `ok` accepts; panics with the last value and
    /// HAProxy's log at the deadline.
    async fn eventually<T: Debug>(
        &self,
        what: &str,
        mut probe: impl AsyncFnMut() -> T,
        ok: impl Fn(&T) -> bool,
    ) -> T {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let seen = probe().await;
            if ok(&seen) {
                return seen;
            }
            assert!(
                Instant::now() < deadline,
                "HAProxy never showed {what}; last seen: {seen:#?}\nhaproxy log:\n{}",
                self.log()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// The name of the stand-in one new connection through HAProxy reached.
    async fn connect_through(&self) -> String {
        let mut client = TcpStream::connect(("127.0.0.1", self.frontend))
            .await
            .unwrap();
        let mut name = String::new();
        tokio::time::timeout(DEADLINE, client.read_to_string(&mut name))
            .await
            .expect("the connection ends in time")
            .expect("read through HAProxy");
        name
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn last_agent_check(stats: &HashMap<String, HashMap<String, String>>, server: &str) -> String {
    stats[server]["last_agt"].clone()
}

#[tokio::test]
async fn haproxy_weights_follow_the_table() {
    let agent = Agent::start(&[("w1", 0.25, false), ("w2", 1.0, false)]).await;
    let servers = [
        Server::named("w1", stand_in("w1").await),
        Server::named("w2", stand_in("w2").await),
        Server::named("w3", stand_in("w3").await),
    ];
    let haproxy = Haproxy::start(agent.port, &servers).await;

    haproxy
        .eventually(
            "w1 at 25, w2 at 100",
            async || haproxy.servers().await,
            |s| s["w1"].ready_at(25) && s["w2"].ready_at(100),
        )
        .await;
    // w3 is not in the table: full weight, and the reason shows in HAProxy's stats.
    let stats = haproxy
        .eventually(
            "w3's agent check answered as not in the table",
            async || haproxy.stats().await,
            |s| last_agent_check(s, "w3").contains("herald:not-in-table"),
        )
        .await;
    assert_eq!(
        last_agent_check(&stats, "w3"),
        "agent reports an error : herald:not-in-table"
    );
    assert!(haproxy.servers().await["w3"].ready_at(100));

    // A worker with no headroom left keeps the 1% floor: never 0, which HAProxy shows as DRAIN.
    agent.publish(&[("w1", 0.0, false), ("w2", 0.57, false), ("w3", 0.8, false)]);
    let servers = haproxy
        .eventually(
            "w1 at 1, w2 at 57, w3 at 80",
            async || haproxy.servers().await,
            |s| s["w1"].ready_at(1) && s["w2"].ready_at(57) && s["w3"].ready_at(80),
        )
        .await;
    assert!(!servers["w1"].drained());
    let stats = haproxy.stats().await;
    assert_eq!(stats["w1"]["status"], "UP");
    assert!(agent.answers("weight") >= 3);
}

#[tokio::test]
async fn haproxy_drains_and_undrains_a_worker() {
    let agent = Agent::start(&[("w1", 1.0, false), ("w2", 1.0, false)]).await;
    let servers = [
        Server::named("w1", stand_in("w1").await),
        Server::named("w2", stand_in("w2").await),
    ];
    let haproxy = Haproxy::start(agent.port, &servers).await;
    haproxy
        .eventually(
            "both servers answered by the agent",
            async || (agent.answers("weight"), haproxy.servers().await),
            |(answers, s)| *answers >= 2 && s["w1"].ready_at(100) && s["w2"].ready_at(100),
        )
        .await;

    agent.publish(&[("w1", 1.0, false), ("w2", 1.0, true)]);
    haproxy
        .eventually(
            "w2 drained",
            async || haproxy.servers().await,
            |s| s["w2"].drained() && s["w2"].op_state == RUNNING && !s["w1"].drained(),
        )
        .await;
    assert!(haproxy.stats().await["w2"]["status"].starts_with("DRAIN"));
    for _ in 0..6 {
        assert_eq!(
            haproxy.connect_through().await,
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
        .await;
    let mut reached = Vec::new();
    for _ in 0..6 {
        reached.push(haproxy.connect_through().await);
    }
    assert!(
        reached.iter().any(|name| name == "w2"),
        "w2 takes connections again: {reached:?}"
    );
}

#[tokio::test]
async fn herald_restarting_or_away_never_takes_capacity_away() {
    let agent = Agent::start(&[("w1", 0.6, true), ("w2", 0.3, false)]).await;
    let servers = [
        Server::named("w1", stand_in("w1").await),
        Server::named("w2", stand_in("w2").await),
    ];
    let haproxy = Haproxy::start(agent.port, &servers).await;
    haproxy
        .eventually(
            "w1 drained, w2 at 30",
            async || haproxy.servers().await,
            |s| s["w1"].drained() && s["w2"].ready_at(30),
        )
        .await;

    // Herald restarted: its table is empty until workers report again.
    agent.publish(&[]);
    haproxy
        .eventually(
            "both ready at full weight",
            async || haproxy.servers().await,
            |s| s["w1"].ready_at(100) && s["w2"].ready_at(100),
        )
        .await;

    // Herald away altogether: HAProxy's agent checks are refused and nothing changes.
    agent.publish(&[("w1", 0.4, false), ("w2", 1.0, false)]);
    haproxy
        .eventually(
            "w1 at 40",
            async || haproxy.servers().await,
            |s| s["w1"].ready_at(40),
        )
        .await;
    agent.stop().await;
    haproxy
        .eventually(
            "agent checks refused",
            async || haproxy.stats().await,
            |s| {
                s["w1"]["agent_status"].contains("L4CON")
                    && s["w2"]["agent_status"].contains("L4CON")
            },
        )
        .await;
    let servers = haproxy.servers().await;
    assert!(servers["w1"].ready_at(40), "{servers:?}");
    assert!(servers["w2"].ready_at(100), "{servers:?}");
    let stats = haproxy.stats().await;
    assert_eq!(
        (&*stats["w1"]["status"], &*stats["w2"]["status"]),
        ("UP", "UP")
    );
}

#[tokio::test]
async fn haproxy_keeps_its_state_on_a_bad_request() {
    let agent = Agent::start(&[("w1", 0.5, false)]).await;
    let oversized = Server {
        name: "w1",
        port: stand_in("w1").await,
        agent_send: format!("{}\\n", "x".repeat(300)),
    };
    let haproxy = Haproxy::start(agent.port, &[oversized]).await;
    haproxy
        .eventually(
            "a bad request answered",
            async || agent.answers("bad_request"),
            |n| *n >= 1,
        )
        .await;

    // An operator's settings, which herald's reply to a bad request must leave alone.
    haproxy.command("set weight be/w1 40").await;
    haproxy.command("set server be/w1 state drain").await;
    let before = agent.answers("bad_request");
    // HAProxy runs one check of a server at a time: once the agent has answered the second
    // check after the change, HAProxy has applied the first.
    haproxy
        .eventually(
            "two more bad requests answered",
            async || agent.answers("bad_request"),
            |n| *n >= before + 2,
        )
        .await;
    let servers = haproxy.servers().await;
    assert_eq!(servers["w1"].uweight, 40, "{servers:?}");
    assert!(servers["w1"].drained(), "{servers:?}");
    assert_eq!(
        last_agent_check(&haproxy.stats().await, "w1"),
        "agent reports an error : herald:bad-request:too-long"
    );
    assert_eq!(agent.answers("weight") + agent.answers("unknown"), 0);
}
