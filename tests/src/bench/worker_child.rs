//! The release `worker` binary as a child process: started on loopback port 0 (optionally
//! pinned to CPUs with `taskset -c`), found through its announce file, and killed when the
//! [`WorkerChild`] is dropped — on errors and Ctrl-C too.

use anyhow::{bail, ensure, Context, Result};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The worker binary: `explicit`, or `worker` next to the running executable (i.e.
/// target/release/worker for a release bench).
pub fn worker_bin(explicit: Option<&Path>) -> Result<PathBuf> {
    let bin = match explicit {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()?
            .parent()
            .context("current exe has no directory")?
            .join("worker"),
    };
    ensure!(
        bin.is_file(),
        "worker binary {} not found; build it with `cargo build --release -p pushfleet-worker \
         --bin worker` or pass --worker-bin",
        bin.display()
    );
    Ok(bin)
}

/// A running worker process with its log and announce file in a temporary directory.
pub struct WorkerChild {
    child: Option<Child>,
    /// The worker's process id (of `taskset`'s exec, so the worker itself).
    pub pid: u32,
    dir: PathBuf,
    announce: PathBuf,
    /// The worker's stderr (its log).
    pub log_path: PathBuf,
    keep_dir: bool,
}

impl WorkerChild {
    /// Starts `bin` listening on 127.0.0.1 port 0 (client and admin ports), announcing them
    /// in a file, with `args` added (publisher, limits, ...). `cpus` pins it with
    /// `taskset -c`. Its files go to a temp directory named after `bench` and `label`.
    pub fn start(
        bin: &Path,
        cpus: Option<&str>,
        bench: &str,
        label: &str,
        args: &[String],
    ) -> Result<WorkerChild> {
        let dir = std::env::temp_dir().join(format!(
            "{bench}-{}-{label}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let announce = dir.join("announce.json");
        let log_path = dir.join("worker.log");
        let log = std::fs::File::create(&log_path)?;
        let mut cmd = match cpus {
            Some(cpus) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(cpus).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--admin-listen")
            .arg("127.0.0.1:0")
            .arg("--announce-file")
            .arg(&announce)
            .args(args);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(WorkerChild {
            pid: child.id(),
            child: Some(child),
            dir,
            announce,
            log_path,
            keep_dir: true,
        })
    }

    /// Starts the worker as [`WorkerChild::start`] does, waits (15 s at most) for its ports and
    /// says on stderr where it runs; returns it with its WebSocket and admin addresses.
    pub async fn launch(
        bin: &Path,
        cpus: Option<&str>,
        bench: &str,
        label: &str,
        args: &[String],
    ) -> Result<(WorkerChild, SocketAddr, SocketAddr)> {
        let worker = WorkerChild::start(bin, cpus, bench, label, args)?;
        let (ws_addr, admin) = worker
            .wait_announce(Duration::from_secs(15))
            .await
            .with_context(|| worker.log_hint())?;
        eprintln!(
            "[{label}] worker pid {} ws {ws_addr} admin {admin} CPUs {} log {}",
            worker.pid,
            super::procfs::cpus_allowed(&worker.pid.to_string()).unwrap_or_else(|| "?".into()),
            worker.log_path.display()
        );
        Ok((worker, ws_addr, admin))
    }

    /// Waits for the announce file; returns the WebSocket and admin addresses.
    pub async fn wait_announce(&self, within: Duration) -> Result<(SocketAddr, SocketAddr)> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(text) = std::fs::read_to_string(&self.announce) {
                let v: serde_json::Value = serde_json::from_str(&text)
                    .with_context(|| format!("bad announce file: {text}"))?;
                let addr = |k: &str| -> Result<SocketAddr> {
                    v[k].as_str()
                        .with_context(|| format!("announce file has no {k:?}: {text}"))?
                        .parse()
                        .with_context(|| format!("bad {k:?} address in {text}"))
                };
                return Ok((addr("ws")?, addr("admin")?));
            }
            if self.exited() {
                bail!("worker exited before announcing its ports");
            }
            if Instant::now() >= deadline {
                bail!("worker did not write its announce file within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the process is gone (or a zombie).
    pub fn exited(&self) -> bool {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) else {
            return true;
        };
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X'))
    }

    /// Where the log is, and its last lines (for error messages).
    pub fn log_hint(&self) -> String {
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "worker log {} (kept); last lines:\n{}",
            self.log_path.display(),
            tail.join("\n")
        )
    }

    /// Kills the worker now (the drain would take minutes with thousands of clients) and
    /// removes its files unless `keep_dir`. Dropped without this (errors), the files stay.
    pub fn stop(mut self, keep_dir: bool) {
        self.keep_dir = keep_dir;
    }
}

impl Drop for WorkerChild {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.keep_dir {
            eprintln!("worker files kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
