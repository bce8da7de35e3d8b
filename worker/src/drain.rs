//! Draining: closing every client in staggered batches so they reconnect elsewhere without a
//! herd. [`Plan`] is the pure schedule; [`drain`] carries it out on the live connections.

use crate::server::Shared;
use std::time::{Duration, Instant};

/// Close `batch` connections every `interval`, which keeps the configured rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Connections closed per batch (at least 1).
    pub batch: usize,
    /// Time between batches.
    pub interval: Duration,
}

impl Plan {
    /// A plan closing `rate_per_s` connections a second in batches of `batch`.
    pub fn new(rate_per_s: u32, batch: u32) -> Plan {
        let rate = rate_per_s.max(1) as f64;
        let batch = batch.clamp(1, rate_per_s.max(1));
        Plan {
            batch: batch as usize,
            interval: Duration::from_secs_f64(batch as f64 / rate),
        }
    }

    /// When batch `i` (0-based) is due, from the start of the drain.
    pub fn due(&self, i: usize) -> Duration {
        self.interval * i as u32
    }

    /// How long closing `n` connections takes.
    pub fn duration(&self, n: usize) -> Duration {
        self.due(n.div_ceil(self.batch).saturating_sub(1))
    }
}

/// Asks every connection to close with `code`, batch by batch, then waits until they are gone
/// or `timeout` passes. Returns how many were still open at the end.
pub async fn drain(shared: &Shared, code: u16, plan: Plan, timeout: Duration) -> usize {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut ids: Vec<u64> = shared.connections.lock().keys().copied().collect();
    ids.sort_unstable();
    tracing::info!(
        connections = ids.len(),
        code,
        batch = plan.batch,
        interval = ?plan.interval,
        expected = ?plan.duration(ids.len()),
        "draining clients"
    );
    for (i, batch) in ids.chunks(plan.batch).enumerate() {
        let due = start + plan.due(i);
        if due > deadline {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        let conns = shared.connections.lock();
        for id in batch {
            if let Some(sub) = conns.get(id) {
                sub.outbox.request_close(code);
            }
        }
    }
    // Whatever is left at the deadline (including connections that slipped in) closes at once.
    loop {
        let open = shared.connections.lock().len();
        if open == 0 {
            tracing::info!(took = ?start.elapsed(), "drain complete");
            return 0;
        }
        if Instant::now() >= deadline {
            for sub in shared.connections.lock().values() {
                sub.outbox.request_close(code);
            }
            tracing::warn!(open, "drain timeout reached; closing the rest at once");
            return open;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_keep_the_rate() {
        let p = Plan::new(500, 50);
        assert_eq!(p.batch, 50);
        assert_eq!(p.interval, Duration::from_millis(100));
        assert_eq!(p.duration(5000), Duration::from_millis(9900));
        assert_eq!(p.duration(0), Duration::ZERO);
        assert_eq!(p.duration(1), Duration::ZERO);
        assert_eq!(p.duration(51), Duration::from_millis(100));
    }

    #[test]
    fn degenerate_settings_stay_sane() {
        let p = Plan::new(0, 0);
        assert_eq!(p.batch, 1);
        assert_eq!(p.interval, Duration::from_secs(1));
        let p = Plan::new(10, 1000);
        assert_eq!(p.batch, 10, "a batch never exceeds one second's worth");
        assert_eq!(p.interval, Duration::from_secs(1));
    }
}
