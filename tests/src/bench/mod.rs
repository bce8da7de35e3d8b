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
pub mod procfs;
pub mod scrape;
pub mod wire;
pub mod worker_child;

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
