//! CPU time and memory from `/proc`: of the worker child, of the bench itself (`self`) and of
//! the whole machine (to tell when other processes disturbed a measurement).

use anyhow::{ensure, Context, Result};
use std::process::Command;
use std::time::Duration;

/// Clock ticks per second of `/proc` CPU figures (`getconf CLK_TCK`, usually 100).
pub fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|&t| t > 0.0)
        .unwrap_or(100.0)
}

/// utime + stime in clock ticks of `/proc/<pid>/stat` (`pid` may be `self`).
pub fn proc_cpu_ticks(pid: &str) -> Result<u64> {
    let (user, system) = proc_cpu_split(pid)?;
    Ok(user + system)
}

/// (utime, stime) in clock ticks of `/proc/<pid>/stat`.
pub fn proc_cpu_split(pid: &str) -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let (_, rest) = stat.rsplit_once(") ").context("bad /proc stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    ensure!(f.len() > 13, "short /proc/{pid}/stat");
    Ok((f[11].parse()?, f[12].parse()?))
}

/// A numeric field of `/proc/<pid>/status` (kB for memory fields such as `VmRSS`, `VmHWM`).
pub fn proc_status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// Busy (non-idle, non-iowait) clock ticks of all CPUs, from `/proc/stat`.
pub fn machine_busy_ticks() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    ensure!(f.len() >= 5, "short /proc/stat");
    Ok(f.iter().sum::<u64>() - f[3] - f[4])
}

/// CPUs of the machine (per-CPU lines of `/proc/stat`; 0 if unreadable).
pub fn machine_cpus() -> usize {
    std::fs::read_to_string("/proc/stat")
        .map(|s| {
            s.lines()
                .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
                .count()
        })
        .unwrap_or(0)
}

/// The CPUs a process may run on (`Cpus_allowed_list`), e.g. `0` or `0-1`.
pub fn cpus_allowed(pid: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|s| s.trim().to_string())
}

/// This process's soft limit on open files.
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// CPU counters of the worker, the bench and the machine taken at one moment; two of them
/// give the CPU each used in between ([`CpuSample::since`]).
#[derive(Debug, Clone, Copy)]
pub struct CpuSample {
    worker_user: u64,
    worker_system: u64,
    bench: u64,
    machine: u64,
}

/// CPU time used between two [`CpuSample`]s.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuUse {
    /// The worker, user plus kernel.
    pub worker: Duration,
    /// The user-space part of `worker` (the rest is kernel time).
    pub worker_user: Duration,
    /// This process (the client side).
    pub bench: Duration,
    /// All processes on all CPUs.
    pub machine: Duration,
}

impl CpuSample {
    /// Reads the counters of `worker_pid`, of this process and of the machine.
    pub fn take(worker_pid: u32) -> Result<CpuSample> {
        let (worker_user, worker_system) = proc_cpu_split(&worker_pid.to_string())?;
        Ok(CpuSample {
            worker_user,
            worker_system,
            bench: proc_cpu_ticks("self")?,
            machine: machine_busy_ticks()?,
        })
    }

    /// The worker's ticks (user plus kernel).
    pub fn worker_ticks(&self) -> u64 {
        self.worker_user + self.worker_system
    }

    /// CPU used from `earlier` to this sample, with `clk_tck` ticks per second.
    pub fn since(&self, earlier: &CpuSample, clk_tck: f64) -> CpuUse {
        let d = |a: u64, b: u64| Duration::from_secs_f64(a.saturating_sub(b) as f64 / clk_tck);
        CpuUse {
            worker: d(self.worker_ticks(), earlier.worker_ticks()),
            worker_user: d(self.worker_user, earlier.worker_user),
            bench: d(self.bench, earlier.bench),
            machine: d(self.machine, earlier.machine),
        }
    }
}

impl CpuUse {
    /// CPU used by processes other than the worker and the bench.
    pub fn other(&self) -> Duration {
        self.machine.saturating_sub(self.worker + self.bench)
    }
}
