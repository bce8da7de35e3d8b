//! HAProxy for tests and benchmarks: one frontend on a free loopback port in front of one
//! backend, run as a child process and read through its admin socket.
//!
//! ```text
//!  client ──▶ frontend 127.0.0.1:<free> ──▶ backend (balance) ──▶ server … [check] [agent-check]
//!  test ──"show servers state" / "show stat"──▶ admin socket ──▶ ServerState / ServerStat rows
//! ```
//!
//! [`Backend`] describes the servers (address, weight, optional health check and agent check)
//! and the balance algorithm; [`Haproxy::start`] writes the configuration into a fresh temporary
//! directory, runs `haproxy -f <cfg> -db` (foreground, log to a file there) and waits, with a
//! deadline, until the admin socket answers. Dropping the [`Haproxy`] kills it and removes the
//! directory.
//!
//! What the rows mean (HAProxy 2.6):
//! - `show servers state`: `srv_uweight` is the current weight (an agent's `<n>%` sets it to
//!   `n`% of `srv_iweight`, the configured one); `srv_admin_state` carries [`FORCED_DRAIN`]
//!   while an agent's `drain` (or the CLI's `state drain`) holds; `srv_op_state` [`RUNNING`] is up.
//! - `show stat`: `status` (`UP`, `DOWN`, `DRAIN`, `MAINT`, `no check`), the health check's and
//!   the agent check's last result and message, sessions.
//!
//! Needs the `haproxy` binary (env `HAPROXY`, else `PATH`, `/usr/sbin` or `/usr/local/sbin`);
//! `bash tests/run.sh` installs it (Debian package `haproxy`).

use anyhow::{bail, ensure, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::fmt::{Debug, Write as _};
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::Instant;

/// Longest wait for HAProxy to start, to answer a command, or to show a condition.
pub const DEADLINE: Duration = Duration::from_secs(20);
/// Pause between two looks at HAProxy's state while waiting for a condition.
const POLL: Duration = Duration::from_millis(50);
/// Starts tried before giving up: the frontend port is picked free, then released, so
/// another process may take it before HAProxy binds it.
const START_ATTEMPTS: usize = 3;
/// `SRV_ADMF_FDRAIN` in `srv_admin_state`: drained by an agent check or the CLI.
pub const FORCED_DRAIN: u32 = 0x08;
/// `SRV_ST_RUNNING` in `srv_op_state`.
pub const RUNNING: u32 = 2;

/// How the backend picks a server for a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// `roundrobin`: in turn, in proportion to weights (changes apply at run time).
    RoundRobin,
    /// `leastconn`: fewest connections per unit of weight.
    LeastConn,
}

impl Balance {
    fn keyword(self) -> &'static str {
        match self {
            Balance::RoundRobin => "roundrobin",
            Balance::LeastConn => "leastconn",
        }
    }
}

/// HAProxy's own health check of a server: a TCP connect every `inter`.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    /// Interval between checks (three failures mark the server down, two successes up).
    pub inter: Duration,
    /// Port to connect to instead of the server's (e.g. a worker's admin port).
    pub port: Option<u16>,
}

/// An agent check: HAProxy connects to `addr` every `inter`, sends `send` and applies the
/// one-line reply (`ready`, `drain`, `<n>%`, …).
#[derive(Debug, Clone)]
pub struct AgentCheck {
    /// Where the agent listens.
    pub addr: SocketAddr,
    /// What to send, newline included (e.g. `"w1\n"`); written as a quoted, escaped string.
    pub send: String,
    /// Interval between checks; also HAProxy's timeout for the reply.
    pub inter: Duration,
}

/// One `server` line.
#[derive(Debug, Clone)]
pub struct Server {
    name: String,
    addr: SocketAddr,
    weight: u32,
    check: Option<HealthCheck>,
    agent: Option<AgentCheck>,
}

impl Server {
    /// A server at `addr` with weight 100 and no checks.
    pub fn new(name: impl Into<String>, addr: SocketAddr) -> Self {
        Server {
            name: name.into(),
            addr,
            weight: 100,
            check: None,
            agent: None,
        }
    }

    /// The configured weight (1..=256); agent percentages apply to it.
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// Adds HAProxy's own health check.
    pub fn check(mut self, check: HealthCheck) -> Self {
        self.check = Some(check);
        self
    }

    /// Adds an agent check.
    pub fn agent(mut self, agent: AgentCheck) -> Self {
        self.agent = Some(agent);
        self
    }

    fn line(&self) -> Result<String> {
        let mut line = format!(
            "    server {} {} weight {}",
            self.name, self.addr, self.weight
        );
        if let Some(check) = &self.check {
            write!(line, " check inter {}ms", check.inter.as_millis())?;
            if let Some(port) = check.port {
                write!(line, " port {port}")?;
            }
        }
        if let Some(agent) = &self.agent {
            write!(
                line,
                " agent-check agent-addr {} agent-port {} agent-send {} agent-inter {}ms",
                agent.addr.ip(),
                agent.addr.port(),
                quoted(&agent.send)?,
                agent.inter.as_millis()
            )?;
        }
        Ok(line)
    }
}

/// A backend of servers behind one frontend.
#[derive(Debug, Clone)]
pub struct Backend {
    name: String,
    balance: Balance,
    idle_timeout: Duration,
    servers: Vec<Server>,
}

impl Backend {
    /// A `roundrobin` backend with no servers and a 10 s idle timeout.
    pub fn new(name: impl Into<String>) -> Self {
        Backend {
            name: name.into(),
            balance: Balance::RoundRobin,
            idle_timeout: Duration::from_secs(10),
            servers: Vec::new(),
        }
    }

    /// The balance algorithm.
    pub fn balance(mut self, balance: Balance) -> Self {
        self.balance = balance;
        self
    }

    /// How long a connection may stay silent both ways before HAProxy closes it (client and
    /// server timeouts); long-lived WebSockets need this longer than their ping interval.
    pub fn idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = idle;
        self
    }

    /// Adds a server.
    pub fn server(mut self, server: Server) -> Self {
        self.servers.push(server);
        self
    }

    /// The whole configuration file: admin socket in `dir`, TCP frontend on `frontend`.
    fn config(&self, dir: &Path, frontend: SocketAddr) -> Result<String> {
        let idle = self.idle_timeout.as_millis();
        let mut cfg = format!(
            "global\n\
             \x20   stats socket {}/admin.sock level admin\n\
             defaults\n\
             \x20   mode tcp\n\
             \x20   timeout connect 1s\n\
             \x20   timeout client {idle}ms\n\
             \x20   timeout server {idle}ms\n\
             frontend fe\n\
             \x20   bind {frontend}\n\
             \x20   default_backend {}\n\
             backend {}\n\
             \x20   balance {}\n",
            dir.display(),
            self.name,
            self.name,
            self.balance.keyword()
        );
        for server in &self.servers {
            cfg += &server.line()?;
            cfg.push('\n');
        }
        Ok(cfg)
    }
}

/// `text` as a double-quoted configuration word. Refuses `$` (HAProxy expands environment
/// variables in double quotes) and control characters other than CR, LF and tab.
fn quoted(text: &str) -> Result<String> {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '\n' => out += "\\n",
            '\r' => out += "\\r",
            '\t' => out += "\\t",
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '$' => bail!("cannot quote {text:?} for HAProxy: it would expand `$`"),
            c if c.is_control() => bail!("cannot quote {text:?} for HAProxy: control character"),
            c => out.push(c),
        }
    }
    out.push('"');
    Ok(out)
}

/// The `haproxy` binary: env `HAPROXY`, else the first on `PATH` or in the usual sbin folders.
pub fn binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("HAPROXY") {
        return Ok(path.into());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|dir| dir.join("haproxy"))
        .find(|candidate| candidate.is_file())
        .context(
            "haproxy not found (set HAPROXY or put it on PATH); \
             `bash tests/run.sh` installs it (Debian package haproxy)",
        )
}

/// A loopback address whose port was free a moment ago (HAProxy cannot bind port 0 and tell
/// which port it got).
pub fn free_loopback_addr() -> Result<SocketAddr> {
    let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(probe.local_addr()?)
}

/// HAProxy's view of one server, from `show servers state`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerState {
    /// `srv_op_state`: 0 stopped, 1 starting, 2 running, 3 stopping.
    pub op_state: u32,
    /// `srv_admin_state`: bit field (maintenance and drain, forced or inherited).
    pub admin_state: u32,
    /// `srv_uweight`: the current weight.
    pub uweight: u32,
    /// `srv_iweight`: the configured weight.
    pub iweight: u32,
}

impl ServerState {
    /// Drained by an agent check or the CLI.
    pub fn drained(&self) -> bool {
        self.admin_state & FORCED_DRAIN != 0
    }

    /// Up.
    pub fn running(&self) -> bool {
        self.op_state == RUNNING
    }

    /// Up, not drained, at `uweight`.
    pub fn ready_at(&self, uweight: u32) -> bool {
        self.running() && !self.drained() && self.uweight == uweight
    }
}

/// One server's row of `show stat`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerStat {
    /// `status`: `UP`, `DOWN`, `DRAIN`, `MAINT`, `no check`, possibly with `n/m` while changing.
    pub status: String,
    /// `weight`: the current effective weight.
    pub weight: u32,
    /// `check_status`: the health check's last result (`L4OK`, `L4CON`, …), empty without one.
    pub check_status: String,
    /// `agent_status`: the agent check's last result: `CHECKED` once a reply was read (even
    /// one with words HAProxy does not know), `L4CON` when refused; empty without one.
    pub agent_status: String,
    /// `last_agt`: the agent check's last message, e.g. `agent reports an error : <word>`.
    pub last_agent_check: String,
    /// `scur`: connections open now.
    pub current_sessions: u64,
    /// `stot`: connections ever sent to it.
    pub total_sessions: u64,
}

/// Parses `show servers state <backend>` (a version line, a `#` header, a row per server)
/// into rows by server name.
pub fn parse_servers_state(text: &str) -> Result<BTreeMap<String, ServerState>> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty()).skip(1);
    let header: Vec<&str> = lines
        .next()
        .with_context(|| format!("no header in {text:?}"))?
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
            let column = |name: &str| -> Result<&str> {
                row.get(name)
                    .copied()
                    .with_context(|| format!("no {name} in {line:?}"))
            };
            let number = |name: &str| -> Result<u32> {
                let value = column(name)?;
                value
                    .parse()
                    .with_context(|| format!("{name} {value:?} in {line:?}"))
            };
            let state = ServerState {
                op_state: number("srv_op_state")?,
                admin_state: number("srv_admin_state")?,
                uweight: number("srv_uweight")?,
                iweight: number("srv_iweight")?,
            };
            Ok((column("srv_name")?.to_string(), state))
        })
        .collect()
}

/// Parses `show stat` (CSV with a `# ` header) into the server rows of `backend` by name.
pub fn parse_stat(text: &str, backend: &str) -> Result<BTreeMap<String, ServerStat>> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines
        .next()
        .with_context(|| format!("no header in {text:?}"))?
        .trim_start_matches("# ")
        .split(',')
        .collect();
    let mut rows = BTreeMap::new();
    for line in lines {
        let row: HashMap<&str, &str> = header.iter().copied().zip(line.split(',')).collect();
        let column = |name: &str| -> Result<String> {
            row.get(name)
                .map(|v| v.to_string())
                .with_context(|| format!("no {name} in {line:?}"))
        };
        let number = |name: &str| -> Result<u64> {
            let value = column(name)?;
            value
                .parse()
                .with_context(|| format!("{name} {value:?} in {line:?}"))
        };
        let server = column("svname")?;
        if column("pxname")? != backend || server == "BACKEND" {
            continue;
        }
        let stat = ServerStat {
            status: column("status")?,
            weight: u32::try_from(number("weight")?)?,
            check_status: column("check_status")?,
            agent_status: column("agent_status")?,
            last_agent_check: column("last_agt")?,
            current_sessions: number("scur")?,
            total_sessions: number("stot")?,
        };
        rows.insert(server, stat);
    }
    Ok(rows)
}

/// HAProxy running in the foreground as a child of the test; killed on drop.
pub struct Haproxy {
    /// Where clients connect.
    pub frontend: SocketAddr,
    backend: String,
    dir: PathBuf,
    child: Child,
}

impl Haproxy {
    /// Starts HAProxy in front of `backend` and waits until its admin socket answers. A
    /// start that exits at once (the released frontend port taken meanwhile) is retried on
    /// another port.
    pub async fn start(backend: &Backend) -> Result<Haproxy> {
        static DIRS: AtomicUsize = AtomicUsize::new(0);
        let binary = binary()?;
        let mut last_log = String::new();
        for _attempt in 0..START_ATTEMPTS {
            let dir = std::env::temp_dir().join(format!(
                "pushfleet-haproxy-{}-{}",
                std::process::id(),
                DIRS.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir_all(&dir)?;
            let frontend = free_loopback_addr()?;
            let cfg = dir.join("haproxy.cfg");
            fs::write(&cfg, backend.config(&dir, frontend)?)?;
            let log = fs::File::create(dir.join("haproxy.log"))?;
            let child = Command::new(&binary)
                .arg("-f")
                .arg(&cfg)
                .arg("-db")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("cannot run {}", binary.display()))?;
            let mut haproxy = Haproxy {
                frontend,
                backend: backend.name.clone(),
                dir,
                child,
            };
            if haproxy.admin_socket_answers().await? {
                return Ok(haproxy);
            }
            last_log = haproxy.log();
        }
        bail!("haproxy exited at start {START_ATTEMPTS} times; last log:\n{last_log}")
    }

    /// True once the admin socket answers, false if HAProxy exited first.
    async fn admin_socket_answers(&mut self) -> Result<bool> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if self.child.try_wait()?.is_some() {
                return Ok(false);
            }
            if self.command("show info").await.is_ok() {
                return Ok(true);
            }
            ensure!(
                Instant::now() < deadline,
                "haproxy's admin socket did not open within {DEADLINE:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// What HAProxy wrote to stdout and stderr so far (alerts, warnings, server changes).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("haproxy.log")).unwrap_or_default()
    }

    /// Runs one admin command and returns its whole answer.
    pub async fn command(&self, command: &str) -> Result<String> {
        let io = async {
            let mut socket = UnixStream::connect(self.dir.join("admin.sock")).await?;
            socket.write_all(format!("{command}\n").as_bytes()).await?;
            let mut out = String::new();
            socket.read_to_string(&mut out).await?;
            anyhow::Ok(out)
        };
        tokio::time::timeout(DEADLINE, io)
            .await
            .with_context(|| format!("admin command {command:?} timed out"))?
            .with_context(|| format!("admin command {command:?}"))
    }

    /// `show servers state` of the backend, by server name.
    pub async fn servers(&self) -> Result<BTreeMap<String, ServerState>> {
        let out = self
            .command(&format!("show servers state {}", self.backend))
            .await?;
        parse_servers_state(&out)
    }

    /// `show stat` of the backend's servers, by name.
    pub async fn stats(&self) -> Result<BTreeMap<String, ServerStat>> {
        parse_stat(&self.command("show stat").await?, &self.backend)
    }

    /// Polls `probe` until `ok` accepts what it gives; fails at [`DEADLINE`] with the last
    /// value seen and HAProxy's log.
    pub async fn eventually<T: Debug>(
        &self,
        what: &str,
        mut probe: impl AsyncFnMut() -> Result<T>,
        ok: impl Fn(&T) -> bool,
    ) -> Result<T> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let seen = probe().await?;
            if ok(&seen) {
                return Ok(seen);
            }
            ensure!(
                Instant::now() < deadline,
                "HAProxy never showed {what} within {DEADLINE:?}; last seen: {seen:#?}\n\
                 haproxy log:\n{}",
                self.log()
            );
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_names_every_setting() {
        let agent = AgentCheck {
            addr: "127.0.0.1:9103".parse().unwrap(),
            send: "w1\n".into(),
            inter: Duration::from_millis(200),
        };
        let backend = Backend::new("pushfleet")
            .balance(Balance::LeastConn)
            .server(Server::new("w1", "127.0.0.1:8080".parse().unwrap()).agent(agent))
            .server(
                Server::new("w2", "127.0.0.1:8081".parse().unwrap())
                    .weight(50)
                    .check(HealthCheck {
                        inter: Duration::from_secs(1),
                        port: Some(9000),
                    }),
            );
        let cfg = backend
            .config(Path::new("/run/x"), "127.0.0.1:7000".parse().unwrap())
            .unwrap();
        for line in [
            "    stats socket /run/x/admin.sock level admin",
            "    bind 127.0.0.1:7000",
            "    default_backend pushfleet",
            "    balance leastconn",
            "    server w1 127.0.0.1:8080 weight 100 agent-check agent-addr 127.0.0.1 \
             agent-port 9103 agent-send \"w1\\n\" agent-inter 200ms",
            "    server w2 127.0.0.1:8081 weight 50 check inter 1000ms port 9000",
        ] {
            assert!(cfg.lines().any(|l| l == line), "{line:?} not in\n{cfg}");
        }
    }

    #[test]
    fn agent_send_strings_are_escaped_or_refused() {
        assert_eq!(quoted("a\"b\\c\r\n").unwrap(), r#""a\"b\\c\r\n""#);
        assert!(quoted("${HOME}").is_err());
        assert!(quoted("a\0").is_err());
    }

    /// As HAProxy 2.6 prints them (columns trimmed; parsing goes by header name).
    const SERVERS_STATE: &str = "1\n\
        # be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight \
        srv_iweight srv_time_since_last_change\n\
        3 be 1 w1 127.0.0.1 0 8 100 100 1\n\
        3 be 2 w2 127.0.0.1 2 0 47 100 1\n\n";
    const STAT: &str = "# pxname,svname,scur,stot,status,weight,check_status,last_agt,\
        agent_status,\n\
        fe,FRONTEND,0,0,OPEN,,,,,\n\
        be,w1,0,3,DOWN,100,L4CON,agent reports an error : herald:not-in-table,CHECKED,\n\
        be,w2,2,5,no check,47,,,,\n\
        be,BACKEND,2,8,UP,147,,,,\n";

    #[test]
    fn admin_answers_parse_into_rows() {
        let servers = parse_servers_state(SERVERS_STATE).unwrap();
        assert!(servers["w1"].drained() && !servers["w1"].running());
        assert!(servers["w2"].ready_at(47));
        assert_eq!(servers["w2"].iweight, 100);
        let stats = parse_stat(STAT, "be").unwrap();
        assert_eq!(stats.keys().collect::<Vec<_>>(), ["w1", "w2"]);
        assert_eq!(stats["w1"].status, "DOWN");
        assert_eq!(
            stats["w1"].last_agent_check,
            "agent reports an error : herald:not-in-table"
        );
        assert_eq!(stats["w2"].weight, 47);
        assert_eq!(
            (stats["w2"].current_sessions, stats["w2"].total_sessions),
            (2, 5)
        );
        assert!(parse_servers_state("1\n").is_err());
    }
}
