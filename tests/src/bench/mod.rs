//! What the benchmark binaries (`fanout_bench`, `catchup_bench`) share: a release worker run
//! as a child process, an in-process ZeroMQ feed on its own thread, a client-side reader of
//! the worker's frames that stays cheap per delivery, and the worker's CPU, memory and metrics
//! as the operating system and its admin port report them.
//!
//! ```text
//! feed (PubThread) ──ZeroMQ──▶ worker child ──WebSocket──▶ bench clients (wire)
//!                               │   ▲
//!            procfs (CPU, RSS) ─┘   └─ scrape (admin /metrics)
//! ```
//!
//! - [`worker_child`]: start the worker binary (pinned with `taskset`), wait for its announce
//!   file, kill it on drop.
//! - [`feed`]: publish realistic ~N-byte JSON at a paced rate, round-robin over topics.
//! - [`wire`]: find frames in a read buffer and read a message's offset without a full parse;
//!   compressed payloads are inflated once per distinct payload (compress-once on the worker
//!   means every client gets the same bytes).
//! - [`procfs`]: CPU ticks and memory of a process, and of the whole machine.
//! - [`scrape`]: the worker's Prometheus metrics.
//!
//! Benchmarks are not tests: they print figures. Every wait here still has a deadline and only
//! 127.0.0.1 is used.

pub mod feed;
pub mod hist;
pub mod procfs;
pub mod scrape;
pub mod wire;
pub mod worker_child;

/// Fails unless this process may open enough files for `n` sockets (`what`, e.g. "clients")
/// plus a margin.
pub fn ensure_open_files(n: usize, what: &str) -> anyhow::Result<()> {
    let need = n as u64 + 256;
    if let Some(limit) = procfs::open_files_limit() {
        anyhow::ensure!(
            limit >= need,
            "open files limit is {limit}, need about {need} for {n} {what}: raise `ulimit -n` \
             or use fewer {what}"
        );
    }
    Ok(())
}

/// Runs `bench` on a multi-threaded runtime until it ends or Ctrl-C; tasks still holding
/// sockets are dropped with the runtime.
pub fn block_on<T>(
    bench: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        tokio::select! {
            r = bench => r,
            _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted; worker stopped"),
        }
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    result
}

/// Prints what the bench runs on (`name`'s setup line, and a note when the worker shares the
/// bench's CPUs); returns the clock ticks per second used for CPU figures.
pub fn print_setup(name: &str, worker: &std::path::Path, worker_cpu: Option<&str>) -> f64 {
    let clk_tck = procfs::clock_ticks_per_second();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!(
        "{name}: worker {}, bench CPUs {} ({threads} runtime threads), worker CPUs {}, \
         CLK_TCK {clk_tck}",
        worker.display(),
        procfs::cpus_allowed("self").unwrap_or_else(|| "?".into()),
        worker_cpu.unwrap_or("inherited"),
    );
    if worker_cpu.is_none() {
        eprintln!(
            "{name}: note: without --worker-cpu the worker shares the bench's CPUs; results \
             then mix client and worker load"
        );
    }
    clk_tck
}

/// How the bench's clients are doing while they connect.
pub struct Connecting<'a> {
    /// Clients connected so far.
    pub connected: &'a std::sync::atomic::AtomicUsize,
    /// Clients that failed.
    pub errors: &'a std::sync::atomic::AtomicU64,
    /// The first failure, for the error message.
    pub first_error: &'a dyn Fn() -> Option<String>,
}

/// Waits until `n` clients (`what`, e.g. "subscribers") are connected, with progress on stderr
/// every second; fails on the first client error or when `timeout` has passed since `started`.
pub async fn wait_connected(
    c: Connecting<'_>,
    n: usize,
    what: &str,
    started: std::time::Instant,
    timeout: std::time::Duration,
    label: &str,
) -> anyhow::Result<()> {
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};
    let deadline = started + timeout;
    let mut next_report = Instant::now() + Duration::from_secs(1);
    loop {
        let connected = c.connected.load(Ordering::Acquire);
        let failed = c.errors.load(Ordering::Acquire);
        if failed > 0 {
            anyhow::bail!(
                "[{label}] {failed} {what} failed while connecting ({connected}/{n} connected); \
                 first error: {}",
                (c.first_error)().unwrap_or_default()
            );
        }
        if connected == n {
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "[{label}] only {connected}/{n} {what} connected within {}s",
                timeout.as_secs()
            );
        }
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(1);
            eprintln!(
                "[{label}] connecting: {connected}/{n} ({:.0}/s)",
                connected as f64 / started.elapsed().as_secs_f64()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `1234567` as `1,234,567`.
pub fn thousands(v: u64) -> String {
    let digits = v.to_string().into_bytes();
    let groups: Vec<&str> = digits
        .rchunks(3)
        .rev()
        .map(|g| std::str::from_utf8(g).expect("ASCII digits"))
        .collect();
    groups.join(",")
}

/// Microseconds as milliseconds with two decimals, e.g. `12.35 ms`.
pub fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_thousands() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
