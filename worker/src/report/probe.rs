//! What the process reads about itself for load reports: CPU time and RSS from `/proc`, the
//! memory budget from `/proc/meminfo` and cgroup v2, and the event loop's lateness. The parsers
//! are pure; the readers return `None` where the files do not exist (not Linux).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

/// Clock ticks per second of `/proc/<pid>/stat` times (`USER_HZ`, 100 on every Linux port
/// that matters).
const TICKS_PER_S: f64 = 100.0;

/// Memory budget when neither `/proc/meminfo` nor the cgroup can be read.
pub const FALLBACK_MEMORY_BUDGET_BYTES: u64 = 1 << 30;

/// How often the loop-lag probe asks to be woken.
pub const LAG_TICK: Duration = Duration::from_millis(100);

/// User plus system CPU time from the text of `/proc/<pid>/stat`, seconds.
pub fn parse_cpu_seconds(stat: &str) -> Option<f64> {
    // The command name (field 2) may hold spaces and parentheses: fields count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After the name: state is field 3, utime field 14, stime field 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / TICKS_PER_S)
}

/// `VmRSS` from the text of `/proc/<pid>/status`, bytes.
pub fn parse_rss_bytes(status: &str) -> Option<u64> {
    kib_field(status, "VmRSS:")
}

/// `MemTotal` from the text of `/proc/meminfo`, bytes.
pub fn parse_mem_total_bytes(meminfo: &str) -> Option<u64> {
    kib_field(meminfo, "MemTotal:")
}

fn kib_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kib: u64 = line[name.len()..].split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

/// A cgroup v2 `memory.max`: bytes, or `None` for `max` (no limit) or nonsense.
pub fn parse_cgroup_max(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// The memory budget: the machine's memory, or the cgroup limit when lower.
pub fn pick_memory_budget(mem_total: Option<u64>, cgroup_max: Option<u64>) -> u64 {
    match (mem_total, cgroup_max) {
        (Some(m), Some(c)) => m.min(c),
        (Some(b), None) | (None, Some(b)) => b,
        (None, None) => FALLBACK_MEMORY_BUDGET_BYTES,
    }
    .max(1)
}

/// This process's CPU time so far, seconds.
pub fn cpu_seconds() -> Option<f64> {
    parse_cpu_seconds(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

/// This process's resident set size, bytes.
pub fn rss_bytes() -> Option<u64> {
    parse_rss_bytes(&std::fs::read_to_string("/proc/self/status").ok()?)
}

/// The default memory budget (see [`pick_memory_budget`]).
pub fn memory_budget_bytes() -> u64 {
    let read = |p: &Path| std::fs::read_to_string(p).ok();
    let mem_total = read(Path::new("/proc/meminfo")).and_then(|t| parse_mem_total_bytes(&t));
    // The process's own cgroup (`0::/path` in /proc/self/cgroup), else the mount's root, which
    // is the container's cgroup under a cgroup namespace.
    let own = read(Path::new("/proc/self/cgroup"))
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        })
        .map(|p| Path::new("/sys/fs/cgroup").join(p.trim_start_matches('/')));
    let cgroup_max = [own, Some("/sys/fs/cgroup".into())]
        .into_iter()
        .flatten()
        .find_map(|dir| read(&dir.join("memory.max")))
        .and_then(|t| parse_cgroup_max(&t));
    pick_memory_budget(mem_total, cgroup_max)
}

/// The worst lateness of the event loop since it was last taken.
#[derive(Default)]
pub struct LoopLag {
    worst_us: AtomicU64,
}

impl LoopLag {
    /// Wakes every [`LAG_TICK`] until `stop`, recording how late each wake-up was.
    pub async fn run(&self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(LAG_TICK);
        // After a stall, measure from the late tick instead of firing a burst of catch-ups.
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let due = tokio::select! {
                due = tick.tick() => due,
                _ = stop.cancelled() => return,
            };
            let late = tokio::time::Instant::now().saturating_duration_since(due);
            self.worst_us
                .fetch_max(late.as_micros() as u64, Ordering::Relaxed);
        }
    }

    /// The worst lateness since the previous call.
    pub fn take(&self) -> Duration {
        Duration::from_micros(self.worst_us.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_counts_from_the_last_parenthesis() {
        let stat = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 500 0 0 0 250 125 0 0 20 0 9 0 100 1000 50";
        assert_eq!(parse_cpu_seconds(stat), Some(3.75));
        assert_eq!(parse_cpu_seconds("garbage"), None);
        assert_eq!(parse_cpu_seconds("1 (x) S 1 2"), None);
    }

    #[test]
    fn memory_fields_are_read_in_kib() {
        let status = "Name:\tworker\nVmPeak:\t  999 kB\nVmRSS:\t   2048 kB\nThreads: 3\n";
        assert_eq!(parse_rss_bytes(status), Some(2 << 20));
        assert_eq!(
            parse_mem_total_bytes("MemTotal:       16384 kB\nMemFree: 1 kB\n"),
            Some(16 << 20)
        );
        assert_eq!(parse_rss_bytes("Name: x\n"), None);
    }

    #[test]
    fn the_budget_is_the_lower_of_machine_and_cgroup_with_a_fallback() {
        assert_eq!(parse_cgroup_max("max\n"), None);
        assert_eq!(parse_cgroup_max("1073741824\n"), Some(1 << 30));
        assert_eq!(pick_memory_budget(Some(8 << 30), Some(2 << 30)), 2 << 30);
        assert_eq!(pick_memory_budget(Some(8 << 30), None), 8 << 30);
        assert_eq!(pick_memory_budget(Some(1 << 30), Some(4 << 30)), 1 << 30);
        assert_eq!(pick_memory_budget(None, None), FALLBACK_MEMORY_BUDGET_BYTES);
    }

    /// The test runtime has one thread, so blocking it stalls the probe as a busy loop would.
    #[tokio::test]
    async fn loop_lag_reports_a_stall_once() {
        let lag = std::sync::Arc::new(LoopLag::default());
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (lag, stop) = (lag.clone(), stop.clone());
            async move { lag.run(stop).await }
        });
        // Let the probe take its first (immediate) tick, then stall past its next one.
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        std::thread::sleep(Duration::from_millis(350));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let worst = loop {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let worst = lag.take();
            if worst > Duration::ZERO || std::time::Instant::now() > deadline {
                break worst;
            }
        };
        assert!(worst >= Duration::from_millis(150), "{worst:?}");
        assert!(lag.take() < worst, "taken once, then reset");
        stop.cancel();
        task.await.unwrap();
    }
}
