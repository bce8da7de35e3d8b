//! Watching herald's routing table: a long poll (`GET /v1/table?generation=G&after=V&wait=..`)
//! that answers as soon as the table changes, so a change reaches this proxy within one report
//! interval. Every table received goes to the [`Placer`]; when herald is away the placer keeps
//! the last table (and ages it), and this loop retries with full-jitter exponential backoff.
//! Herald being away never stops placement.

use crate::place::Placer;
use bytes::Bytes;
use http_body_util::Full;
use parking_lot::Mutex;
use protocol::routing::RoutingTable;
use rand::Rng;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Largest table body read (a table of thousands of workers fits easily).
const MAX_TABLE_BYTES: usize = 16 << 20;

/// How to watch herald.
#[derive(Debug, Clone)]
pub struct WatchSettings {
    /// Herald's `host:port` (from `--herald http://host:port`).
    pub authority: String,
    /// How long one long poll may wait for a change (herald caps it at 60 s).
    pub wait: Duration,
    /// First retry delay after a failure; doubles up to `backoff_max`, with full jitter.
    pub backoff_min: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
}

impl WatchSettings {
    /// Settings for herald at `authority` with a 30 s long poll and 200 ms..5 s backoff.
    pub fn new(authority: impl Into<String>) -> Self {
        WatchSettings {
            authority: authority.into(),
            wait: Duration::from_secs(30),
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// What the watcher knows, for metrics and logs (read from any task).
#[derive(Debug, Default)]
pub struct WatchStatus {
    version: AtomicU64,
    generation: AtomicU64,
    failures: AtomicU64,
    last_table: Mutex<Option<Instant>>,
}

impl WatchStatus {
    /// Version of the last table received (0: none yet).
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Relaxed)
    }

    /// Generation (herald process) of the last table received.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Time since the last table was received, if one was.
    pub fn last_table_age(&self) -> Option<Duration> {
        self.last_table.lock().map(|t| t.elapsed())
    }

    /// Failed polls since start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

/// Watches herald until `stop`, handing every table to `placer`.
pub async fn run(
    settings: WatchSettings,
    placer: Arc<Mutex<Placer>>,
    status: Arc<WatchStatus>,
    stop: CancellationToken,
) {
    let mut known: Option<(u64, u64)> = None;
    let mut streak = 0u32;
    loop {
        let path = match known {
            Some((generation, version)) => format!(
                "/v1/table?generation={generation}&after={version}&wait={}ms",
                settings.wait.as_millis()
            ),
            None => "/v1/table".to_string(),
        };
        // Herald answers a long poll within `wait`; allow for the network on top.
        let limit = settings.wait + Duration::from_secs(5);
        let result = tokio::select! {
            r = tokio::time::timeout(limit, fetch(&settings.authority, &path)) => {
                r.unwrap_or_else(|_| Err(format!("no answer within {limit:?}")))
            }
            _ = stop.cancelled() => return,
        };
        match result {
            Ok(table) => {
                if streak > 0 {
                    tracing::info!(herald = %settings.authority, failures = streak,
                        "herald reachable again");
                }
                streak = 0;
                let (generation, version) = (table.generation, table.version);
                if known != Some((generation, version)) {
                    tracing::debug!(
                        generation,
                        version,
                        workers = table.workers.len(),
                        "routing table"
                    );
                }
                known = Some((generation, version));
                let now = Instant::now();
                status.version.store(version, Ordering::Relaxed);
                status.generation.store(generation, Ordering::Relaxed);
                *status.last_table.lock() = Some(now);
                placer.lock().update(Arc::new(table), now);
            }
            Err(e) => {
                status.failures.fetch_add(1, Ordering::Relaxed);
                if streak == 0 {
                    tracing::warn!(herald = %settings.authority, error = %e,
                        "cannot get the routing table; placing with the last one known");
                }
                streak = streak.saturating_add(1);
                // A restarted herald has a new generation: ask for its table at once.
                known = None;
                let delay = backoff(&settings, streak, &mut rand::rng());
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    }
}

/// Full-jitter exponential backoff: uniform in `0..=min(max, min_delay × 2^(streak-1))`.
fn backoff(settings: &WatchSettings, streak: u32, rng: &mut impl Rng) -> Duration {
    let exp = settings
        .backoff_min
        .saturating_mul(1u32 << streak.saturating_sub(1).min(16));
    let cap = exp.min(settings.backoff_max);
    cap.mul_f64(rng.random::<f64>())
}

async fn fetch(authority: &str, path: &str) -> Result<RoutingTable, String> {
    let request = hyper::Request::get(path)
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let (status, body) = protocol::process::http_call(authority, request, MAX_TABLE_BYTES).await?;
    if status != hyper::StatusCode::OK {
        let text = String::from_utf8_lossy(&body);
        return Err(format!("herald answered {status}: {}", text.trim()));
    }
    RoutingTable::decode(&body).map_err(|e| format!("herald's table is not readable: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let s = WatchSettings::new("127.0.0.1:1");
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for streak in 1..40 {
            let cap = (s.backoff_min * 2u32.pow((streak - 1).min(16))).min(s.backoff_max);
            for _ in 0..50 {
                assert!(backoff(&s, streak, &mut rng) <= cap);
            }
        }
        let draws: Vec<Duration> = (0..20).map(|_| backoff(&s, 10, &mut rng)).collect();
        assert!(draws.iter().any(|d| *d != draws[0]), "jittered");
    }
}
