//! Load reports: every `report_interval` (±20% at random) the worker tells herald how loaded it
//! is, and does what herald's reply asks: drain, and fetch history from the peers it names.
//!
//! ```text
//!  metrics counters, /proc, loop-lag probe ──▶ figures::Composer ──▶ LoadReport
//!      ──POST /v1/reports──▶ herald ──ReportReply──▶ drain_requested, Peers::learn
//! ```
//!
//! A report that gets no answer (or a refusal) is retried sooner, with full-jitter exponential
//! backoff from 100 ms up to the interval; each try is a new report with fresh figures. Clients
//! are served all the same. Reports go on while the worker drains, so herald sees the state
//! change and the connections fall, and end when the worker stops.
//!
//! Modules: [`figures`] (pure: rates, p99, cost per connection, numbering, waits), [`probe`]
//! (`/proc`, memory budget, loop lag), [`herald`] (the HTTP exchange).

pub mod figures;
pub mod herald;
pub mod probe;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::peers::Peers;
use crate::server::{Shared, WorkerError};
use figures::{Composer, Counters, Fixed, Gauges, Latency};
use herald::SendError;
use probe::LoopLag;
use prometheus::core::Metric;
use protocol::load::{ReportError, ReportReply, WorkerIdentity, WorkerState};
use rand::Rng;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// First retry delay after a failed report (doubles up to the report interval, full jitter).
const FIRST_RETRY: Duration = Duration::from_millis(100);

/// Longest wait for herald's answer (shorter when the report interval is).
const MAX_ANSWER_WAIT: Duration = Duration::from_secs(2);

/// Distinct refusal reasons remembered so each is logged once; past it the memory starts over.
const MAX_REASONS_REMEMBERED: usize = 16;

/// What reporting needs, checked before the worker serves anyone.
pub struct Setup {
    /// Herald's `host:port`.
    authority: String,
    fixed: Fixed,
    /// This worker's own admin addresses (left out of herald's peer list).
    own: Vec<String>,
    max_peers: usize,
}

/// Prepares reporting to `url` for a worker bound at `ws_addr` and `admin_addr`: the settings
/// must make reports herald accepts.
pub fn setup(
    config: &Config,
    url: &str,
    worker_id: &str,
    ws_addr: SocketAddr,
    admin_addr: SocketAddr,
) -> Result<Setup, WorkerError> {
    let authority = herald::parse_url(url).map_err(|why| WorkerError::HeraldUrl {
        url: url.to_string(),
        why,
    })?;
    let identity = WorkerIdentity {
        id: worker_id.to_string(),
        address: (config.advertise_address.clone()).unwrap_or_else(|| ws_addr.to_string()),
        admin_address: (config.advertise_admin_address.clone())
            .unwrap_or_else(|| admin_addr.to_string()),
        instance_id: config.instance_id.clone(),
        boot: rand::random(),
    };
    let own = vec![identity.admin_address.clone(), admin_addr.to_string()];
    let fixed = Fixed {
        identity,
        interval: config.report_interval,
        max_connections: config.max_connections as u64,
        memory_budget_bytes: (config.memory_budget.map(|b| b as u64))
            .unwrap_or_else(probe::memory_budget_bytes),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        idle_rss_bytes: probe::rss_bytes().unwrap_or(0),
    };
    fixed.check().map_err(|error| WorkerError::Report {
        setting: setting_of(&error),
        error,
    })?;
    Ok(Setup {
        authority,
        fixed,
        own,
        max_peers: config.max_peers,
    })
}

/// The flag behind a report field herald would refuse.
fn setting_of(error: &ReportError) -> &'static str {
    match error {
        ReportError::Invalid { field, .. } => match *field {
            "worker.id" => "--id",
            "worker.address" => "--advertise-address",
            "worker.admin_address" => "--advertise-admin-address",
            "worker.instance_id" => "--instance-id",
            "interval_ms" => "--report-interval",
            "max_connections" => "--max-connections",
            "memory_budget_bytes" => "--memory-budget",
            _ => "settings",
        },
        _ => "settings",
    }
}

/// Reports to herald until `stop`, following its replies.
pub async fn run(setup: Setup, shared: Arc<Shared>, peers: Peers, stop: CancellationToken) {
    let metrics = &shared.metrics;
    for result in ["ok", "failed", "refused"] {
        metrics.reports.with_label_values(&[result]);
    }
    let lag = Arc::new(LoopLag::default());
    tokio::spawn({
        let (lag, stop) = (lag.clone(), stop.clone());
        async move { lag.run(stop).await }
    });
    let interval = setup.fixed.interval;
    let answer_wait = interval.min(MAX_ANSWER_WAIT);
    tracing::info!(herald = %setup.authority, ?interval, identity = ?setup.fixed.identity, "reporting load to herald");
    let mut composer = Composer::new(setup.fixed, counters(metrics));
    let own: Vec<&str> = setup.own.iter().map(String::as_str).collect();
    let mut health = Health::default();
    let mut wait = figures::jittered(interval, rand::rng().random());
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return,
        }
        let state = match shared.draining.load(Ordering::Relaxed) {
            true => WorkerState::Draining,
            false => WorkerState::Ready,
        };
        let report = composer.next(state, counters(metrics), &gauges(&shared, &lag));
        let result = tokio::select! {
            r = herald::post(&setup.authority, &report, answer_wait) => r,
            _ = stop.cancelled() => return,
        };
        health.record(&result, &setup.authority, metrics);
        wait = match result {
            Ok(reply) => {
                follow(&reply, &shared, &peers, &own, setup.max_peers);
                figures::jittered(interval, rand::rng().random())
            }
            Err(_) => {
                figures::backoff(health.failures, FIRST_RETRY, interval, rand::rng().random())
            }
        };
    }
}

/// Does what a reply asks. Replies are level-triggered, so repeating one changes nothing.
fn follow(reply: &ReportReply, shared: &Shared, peers: &Peers, own: &[&str], max_peers: usize) {
    if reply.drain && !shared.drain_requested.is_cancelled() {
        tracing::info!("herald asked this worker to drain");
        shared.drain_requested.cancel();
    }
    if peers.learn(&reply.peers, own, max_peers) {
        tracing::info!(peers = ?peers.current(), "history peers changed");
    }
}

/// Whether herald answers: counts results, and logs the first failure, each distinct refusal
/// and the recovery, rather than every failure.
#[derive(Default)]
struct Health {
    /// Reports in a row without an accepted answer (refusals included).
    failures: u32,
    /// When the first of them was sent.
    since: Option<Instant>,
    /// Whether a failure to get an answer was logged since the last accepted report.
    failure_logged: bool,
    reasons_logged: Vec<String>,
}

impl Health {
    fn record(&mut self, result: &Result<ReportReply, SendError>, herald: &str, m: &Metrics) {
        let label = match result {
            Ok(_) => "ok",
            Err(SendError::Refused(_)) => "refused",
            Err(_) => "failed",
        };
        m.reports.with_label_values(&[label]).inc();
        m.herald_reachable.set(i64::from(label != "failed"));
        let e = match result {
            Ok(_) => {
                if let Some(since) = self.since.take() {
                    tracing::info!(%herald, reports = self.failures, after = ?since.elapsed(), "herald accepts load reports again");
                }
                self.failures = 0;
                self.failure_logged = false;
                return;
            }
            Err(e) => e,
        };
        self.failures = self.failures.saturating_add(1);
        self.since.get_or_insert_with(Instant::now);
        match e {
            SendError::Refused(reason) if !self.reasons_logged.contains(reason) => {
                if self.reasons_logged.len() == MAX_REASONS_REMEMBERED {
                    self.reasons_logged.clear();
                }
                self.reasons_logged.push(reason.clone());
                tracing::warn!(%herald, %reason, "herald refused a load report (each reason is logged once)");
            }
            SendError::Refused(_) => {}
            _ if !self.failure_logged => {
                self.failure_logged = true;
                tracing::warn!(%herald, error = %e, "load report to herald failed; retrying (not logged again until herald answers)");
            }
            _ => {}
        }
    }
}

/// The counters reports measure rates from, read now.
fn counters(m: &Metrics) -> Counters {
    let h = m.publish_to_socket.metric();
    let h = h.get_histogram();
    Counters {
        at: Instant::now(),
        deliveries: m.fanout_deliveries.get(),
        bytes_out: m.bytes_written.get(),
        cpu_seconds: probe::cpu_seconds(),
        latency: Latency {
            buckets: (h.get_bucket().iter())
                .map(|b| (b.upper_bound(), b.cumulative_count()))
                .collect(),
            count: h.get_sample_count(),
        },
    }
}

/// The gauges, read now. Queue bytes are summed here, once per report, rather than kept as a
/// running total on the fan-out path.
fn gauges(shared: &Shared, lag: &LoopLag) -> Gauges {
    let queue_bytes = (shared.connections.lock().values())
        .map(|s| s.outbox.pending_bytes() as u64)
        .sum();
    let m = &shared.metrics;
    Gauges {
        connections: m.connections.get().max(0) as u64,
        subscriptions: m.subscriptions.get().max(0) as u64,
        rss_bytes: probe::rss_bytes().unwrap_or(0),
        queue_bytes,
        loop_lag: lag.take(),
    }
}
