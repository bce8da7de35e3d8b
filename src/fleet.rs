//! The local fleet launcher (`cargo run --release` at the root): starts herald, the workers,
//! the demo publisher and the proxy as child processes of this same binary (each runs its
//! role's `run` through a subcommand, with the configuration in `ops/local`), prefixes their
//! logs with their names, prints where to look once all are up, restarts one that dies, and
//! stops them all on Ctrl-C.
//!
//! ```text
//!  start, in order ─▶ herald ─▶ worker-1..N ─▶ publisher ─▶ proxy   (each: announce file = up)
//!  serve           ─▶ a child exits ─▶ logged, restarted after --restart-after
//!  Ctrl-C/SIGTERM  ─▶ SIGTERM to all ─▶ wait --stop-timeout ─▶ SIGKILL what is left
//! ```
//!
//! Children run in their own process group, so a terminal's Ctrl-C reaches the launcher only
//! and it stops them in its own time; on Linux they also get SIGTERM if the launcher dies.

pub mod plan;

use clap::Parser;
use plan::{Addresses, Process, Shape};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Run the whole pushfleet platform on this machine: herald, a proxy serving a live demo page,
/// workers, and a demo publisher of simulated football matches, all on 127.0.0.1.
#[derive(Debug, Clone, Parser)]
#[command(name = "pushfleet", version)]
#[command(
    after_help = "Each role also runs alone: pushfleet worker|herald|proxy|demo-publisher [--help]"
)]
pub struct FleetConfig {
    /// Workers to run (clients on ports 8081…, admin on 9091…).
    #[arg(long, default_value_t = 3)]
    pub workers: u16,

    /// Matches the demo publisher plays at once (topics match.1 … match.N).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub matches: u32,

    /// Real time one simulated match minute takes.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    pub minute: Duration,

    /// Added to every port (proxy 8000, herald 7070, workers 8081…, publisher 5556, …), to run
    /// beside something that holds them.
    #[arg(long, default_value_t = 0)]
    pub port_offset: u16,

    /// Directory with herald.toml, worker.toml and proxy.toml (default: ops/local of this
    /// repository).
    #[arg(long, value_name = "DIR")]
    pub ops_dir: Option<PathBuf>,

    /// Write the fleet's addresses and process ids as JSON to this file once everything is up
    /// (rewritten when a process restarts).
    #[arg(long, value_name = "FILE")]
    pub announce_file: Option<PathBuf>,

    /// Restart a process that exits this long after it did (0s: never).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    pub restart_after: Duration,

    /// Time each process has to come up (bind its ports) at start.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub start_timeout: Duration,

    /// Time the processes have to stop after SIGTERM before they are killed.
    #[arg(long, value_name = "DURATION", default_value = "20s", value_parser = humantime::parse_duration)]
    pub stop_timeout: Duration,
}

/// Runs the fleet until Ctrl-C (or SIGTERM); success when every process stopped cleanly.
pub fn main(config: FleetConfig) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            say(&format!("cannot start the runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    // One thread spawns every child: on Linux a child's parent-death signal follows the
    // thread that spawned it, so the spawning thread must live as long as the launcher.
    match runtime.block_on(supervise(config)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            say(&format!("error: {e}"));
            ExitCode::from(2)
        }
    }
}

/// The launcher's own lines, aligned with its children's.
fn say(text: &str) {
    log_line("fleet", text);
}

/// One line on stderr as `name | text`; a closed stderr is ignored (never a panic).
fn log_line(name: &str, text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{name:>10} | {text}");
}

/// A process of the fleet and its current incarnation.
struct Child {
    process: Process,
    /// While running.
    pid: Option<u32>,
    /// Bumped at each start: exits of an older incarnation are ignored.
    generation: u64,
    /// When a stopped process is to start again.
    restart_at: Option<Instant>,
    /// How its last incarnation ended.
    last_status: Option<ExitStatus>,
}

/// A child process ended.
struct Exit {
    index: usize,
    generation: u64,
    status: io::Result<ExitStatus>,
}

/// SIGINT and SIGTERM, whichever comes.
struct Signals {
    int: Signal,
    term: Signal,
}

impl Signals {
    fn new() -> io::Result<Signals> {
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! { _ = self.int.recv() => {}, _ = self.term.recv() => {} }
    }
}

/// The running fleet.
struct Fleet {
    exe: PathBuf,
    children: Vec<Child>,
    exits_tx: mpsc::UnboundedSender<Exit>,
    exits: mpsc::UnboundedReceiver<Exit>,
    addresses: Addresses,
    announce_file: Option<PathBuf>,
}

async fn supervise(config: FleetConfig) -> Result<bool, String> {
    let ops_dir = ops_dir(config.ops_dir.as_deref())?;
    let run_dir = std::env::temp_dir().join(format!("pushfleet-fleet-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir)
        .map_err(|e| format!("cannot create {}: {e}", run_dir.display()))?;
    let _cleanup = RemoveOnDrop(run_dir.clone());
    let minute = humantime::format_duration(config.minute).to_string();
    let shape = Shape {
        workers: config.workers,
        matches: config.matches,
        minute,
        port_offset: config.port_offset,
        ops_dir: &ops_dir,
        run_dir: &run_dir,
    };
    shape.validate()?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let mut signals = Signals::new().map_err(|e| format!("cannot handle signals: {e}"))?;
    let (exits_tx, exits) = mpsc::unbounded_channel();
    let mut fleet = Fleet {
        exe,
        children: Vec::new(),
        exits_tx,
        exits,
        addresses: shape.addresses(),
        announce_file: config.announce_file.clone(),
    };
    say(&format!(
        "starting herald, {} workers, a demo publisher of {} matches and a proxy (configuration: {})",
        config.workers,
        config.matches,
        ops_dir.display()
    ));

    // Start, in order, each one up before the next.
    for process in shape.processes() {
        let index = fleet.children.len();
        fleet.children.push(Child {
            process,
            pid: None,
            generation: 0,
            restart_at: None,
            last_status: None,
        });
        let started = async {
            fleet.start(index)?;
            fleet.wait_up(index, config.start_timeout).await
        };
        let outcome = tokio::select! {
            r = started => r,
            _ = signals.recv() => Err("interrupted while starting".to_string()),
        };
        if let Err(why) = outcome {
            say(&format!("{why}; stopping what started"));
            fleet.stop(&mut signals, config.stop_timeout).await;
            return Err(why);
        }
    }
    fleet.announce()?;
    print_banner(&fleet.addresses, config.workers, config.matches);

    // Serve: restart what dies, until a signal.
    loop {
        let next_restart = fleet.children.iter().filter_map(|c| c.restart_at).min();
        tokio::select! {
            _ = signals.recv() => break,
            Some(exit) = fleet.exits.recv() => {
                if let Some(child) = fleet.exited(exit) {
                    if !config.restart_after.is_zero() {
                        child.restart_at = Some(Instant::now() + config.restart_after);
                        say(&format!(
                            "{} restarts in {}",
                            child.process.name,
                            humantime::format_duration(config.restart_after)
                        ));
                    }
                }
            }
            _ = sleep_until(next_restart) => {
                let now = Instant::now();
                for index in 0..fleet.children.len() {
                    if fleet.children[index].restart_at.is_some_and(|at| at <= now) {
                        fleet.children[index].restart_at = None;
                        if let Err(e) = fleet.start(index) {
                            say(&format!("{e}; trying again later"));
                            fleet.children[index].restart_at = Some(now + config.restart_after);
                        }
                    }
                }
                fleet.announce()?;
            }
        }
    }
    say("stopping every process (Ctrl-C again to kill them now)");
    Ok(fleet.stop(&mut signals, config.stop_timeout).await)
}

/// `--ops-dir`, or this repository's `ops/local` from the current directory, or from where
/// the launcher was built; it must hold the three role files.
fn ops_dir(given: Option<&Path>) -> Result<PathBuf, String> {
    let candidates: Vec<PathBuf> = match given {
        Some(dir) => vec![dir.to_path_buf()],
        None => vec![
            PathBuf::from("ops/local"),
            Path::new(env!("CARGO_MANIFEST_DIR")).join("ops/local"),
        ],
    };
    let files = ["herald.toml", "worker.toml", "proxy.toml"];
    for dir in &candidates {
        if files.iter().all(|f| dir.join(f).is_file()) {
            return Ok(dir.clone());
        }
    }
    let dir = &candidates[0];
    let missing: Vec<&str> = files
        .into_iter()
        .filter(|f| !dir.join(f).is_file())
        .collect();
    Err(format!(
        "{} lacks {} (--ops-dir names the directory with herald.toml, worker.toml and proxy.toml)",
        dir.display(),
        missing.join(", ")
    ))
}

impl Fleet {
    /// Starts the process at `index` (a new incarnation).
    fn start(&mut self, index: usize) -> Result<(), String> {
        let child = &mut self.children[index];
        let p = &child.process;
        if let Some(file) = &p.announce_file {
            let _ = std::fs::remove_file(file);
        }
        let mut command = tokio::process::Command::new(&self.exe);
        command
            .arg(p.role.subcommand())
            .args(&p.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        #[cfg(target_os = "linux")]
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut process = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", p.name))?;
        let pid = process.id().unwrap_or_default();
        child.generation += 1;
        child.pid = Some(pid);
        let name = p.name.clone();
        if let Some(out) = process.stdout.take() {
            tokio::spawn(forward_lines(out, name.clone()));
        }
        if let Some(err) = process.stderr.take() {
            tokio::spawn(forward_lines(err, name.clone()));
        }
        let generation = child.generation;
        let exits = self.exits_tx.clone();
        tokio::spawn(async move {
            let status = process.wait().await;
            let _ = exits.send(Exit {
                index,
                generation,
                status,
            });
        });
        say(&format!("started {name} (pid {pid})"));
        Ok(())
    }

    /// Waits until the process at `index` has written its announce file (its ports are bound),
    /// failing if any process exits meanwhile or `limit` passes.
    async fn wait_up(&mut self, index: usize, limit: Duration) -> Result<(), String> {
        let Some(file) = self.children[index].process.announce_file.clone() else {
            return Ok(());
        };
        let deadline = Instant::now() + limit;
        let name = self.children[index].process.name.clone();
        loop {
            if std::fs::metadata(&file).is_ok_and(|m| m.len() > 0) {
                return Ok(());
            }
            tokio::select! {
                Some(exit) = self.exits.recv() => {
                    if let Some(child) = self.exited(exit) {
                        return Err(format!(
                            "{} exited while {name} was starting (its log is above; --port-offset moves every port if one is taken)",
                            child.process.name
                        ));
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(format!("{name} did not come up within --start-timeout ({})",
                        humantime::format_duration(limit)));
                }
            }
        }
    }

    /// Notes an exit; the child when it is its current incarnation's (not a stale one).
    fn exited(&mut self, exit: Exit) -> Option<&mut Child> {
        let child = &mut self.children[exit.index];
        if child.generation != exit.generation || child.pid.is_none() {
            return None;
        }
        child.pid = None;
        let how = match &exit.status {
            Ok(status) => {
                child.last_status = Some(*status);
                describe(*status)
            }
            Err(e) => format!("could not be waited for: {e}"),
        };
        say(&format!("{} {how}", child.process.name));
        Some(child)
    }

    /// SIGTERM to every running process, then SIGKILL to what is left after `limit` (or at a
    /// second signal). True when every process that was running stopped by itself with
    /// success.
    async fn stop(&mut self, signals: &mut Signals, limit: Duration) -> bool {
        let mut stopping = Vec::new();
        for (index, child) in self.children.iter_mut().enumerate() {
            child.restart_at = None;
            child.last_status = None;
            if let Some(pid) = child.pid {
                send_signal(pid, libc::SIGTERM);
                stopping.push(index);
            }
        }
        let deadline = Instant::now() + limit;
        let mut killed = false;
        while self.children.iter().any(|c| c.pid.is_some()) {
            tokio::select! {
                Some(exit) = self.exits.recv() => { self.exited(exit); }
                _ = signals.recv(), if !killed => {
                    say("killing every process now");
                    self.kill_all();
                    killed = true;
                }
                _ = tokio::time::sleep_until(deadline), if !killed => {
                    say(&format!("still running after --stop-timeout ({}): killing",
                        humantime::format_duration(limit)));
                    self.kill_all();
                    killed = true;
                }
                _ = tokio::time::sleep_until(deadline + Duration::from_secs(5)) => {
                    say("some processes did not exit even when killed; giving up on them");
                    return false;
                }
            }
        }
        let clean = !killed
            && stopping
                .iter()
                .all(|&i| self.children[i].last_status.is_some_and(|s| s.success()));
        if clean {
            say("every process stopped cleanly");
        }
        clean
    }

    fn kill_all(&self) {
        for pid in self.children.iter().filter_map(|c| c.pid) {
            send_signal(pid, libc::SIGKILL);
        }
    }

    /// Writes `--announce-file`: addresses and current process ids.
    fn announce(&self) -> Result<(), String> {
        let Some(path) = &self.announce_file else {
            return Ok(());
        };
        let a = &self.addresses;
        let pid = |name: &str| {
            self.children
                .iter()
                .find(|c| c.process.name == name)
                .and_then(|c| c.pid)
        };
        let workers: Vec<serde_json::Value> = a
            .workers
            .iter()
            .map(|(id, ws, admin)| {
                serde_json::json!({"id": id, "pid": pid(id), "ws": ws, "admin": admin})
            })
            .collect();
        let text = serde_json::json!({
            "demo": format!("http://{}/", a.proxy),
            "ws": format!("ws://{}/ws", a.proxy),
            "herald": format!("http://{}/", a.herald),
            "proxy_admin": a.proxy_admin,
            "publisher": a.publisher,
            "pids": {
                "herald": pid("herald"),
                "proxy": pid("proxy"),
                "publisher": pid("publisher"),
            },
            "workers": workers,
        });
        protocol::process::write_atomically(path, &text.to_string())
            .map_err(|e| format!("cannot write --announce-file {}: {e}", path.display()))
    }
}

fn print_banner(a: &Addresses, workers: u16, matches: u32) {
    let mut text = format!(
        "\npushfleet is running: herald, {workers} workers, a demo publisher of {matches} matches, a proxy\n\
         \x20 demo page       http://{proxy}/\n\
         \x20 herald status   http://{herald}/\n\
         \x20 clients         ws://{proxy}/ws  (subprotocol pushfleet.v1)\n\
         \x20 metrics         http://{proxy_admin}/metrics  proxy\n\
         \x20                 http://{herald}/metrics  herald\n",
        proxy = a.proxy,
        herald = a.herald,
        proxy_admin = a.proxy_admin,
    );
    for (id, _, admin) in &a.workers {
        text.push_str(&format!("                  http://{admin}/metrics  {id}\n"));
    }
    text.push_str(&format!(
        "  publisher       {} (ZeroMQ, topics match.1 … match.{matches})\n\
         \x20 HAProxy agent   {}\n\
         Ctrl-C stops everything.\n",
        a.publisher, a.herald_agent
    ));
    println!("{text}");
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(0), _) => "exited cleanly".into(),
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        (None, None) => "ended".into(),
    }
}

fn send_signal(pid: u32, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) with a pid this launcher started and has not yet reaped.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Copies a child's output to stderr line by line, each prefixed with its name.
async fn forward_lines(out: impl AsyncRead + Unpin, name: String) {
    let mut lines = BufReader::new(out).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        log_line(&name, &line);
    }
}

/// Removes the run directory (announce files) when the launcher ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
