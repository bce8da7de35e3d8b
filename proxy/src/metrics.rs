//! The proxy's Prometheus metrics, one registry per proxy (tests run several in a process).
//! Counts line up so operators can compare stages: accepted → refused (by reason) or placed
//! (by worker and mode) → relays ended (by how).

use crate::place::{Mode, Placer};
use crate::relay::Counters;
use crate::watch::WatchStatus;
use prometheus::{
    Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use std::time::Instant;

/// Every placement mode, for the mode gauge.
const MODES: [Mode; 4] = [Mode::Fresh, Mode::Stale, Mode::Fallback, Mode::Static];

/// The metric label of a placement mode.
pub fn mode_label(mode: Mode) -> &'static str {
    match mode {
        Mode::Fresh => "fresh",
        Mode::Stale => "stale",
        Mode::Fallback => "fallback",
        Mode::Static => "static",
    }
}

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
    /// Client connections accepted (before admission).
    pub accepted: IntCounter,
    /// Client connections holding an admission slot (set when rendered).
    pub active: IntGauge,
    /// Client connections refused, by reason.
    pub refused: IntCounterVec,
    /// Connections placed on a worker, by worker and placement mode.
    pub placements: IntCounterVec,
    /// Plain GETs answered with one of the proxy's own pages (`--demo-page`).
    pub pages_served: IntCounter,
    /// Workers tried for a connection after the first (one per retry).
    pub connect_retries: IntCounter,
    /// Failed connections to workers (refused, timed out), by worker.
    pub connect_failures: IntCounterVec,
    /// Bytes relayed, by direction.
    pub relay_bytes: Counters,
    /// Relays ended, by how.
    pub relays_ended: IntCounterVec,
    /// Time to choose a worker (lock and choice), seconds.
    pub choice_seconds: Histogram,
    /// Failed polls of herald's routing table (copied from the watcher when rendered).
    pub herald_failures: IntCounter,
    /// Version of the routing table in use (0: none).
    pub table_version: IntGauge,
    /// Generation of the routing table in use, as a signed 64-bit number (0: none).
    pub table_generation: IntGauge,
    /// Seconds since the routing table in use arrived (-1: none yet).
    pub table_age: Gauge,
    /// 1 for the mode the next choice would use, 0 for the others.
    pub placement_mode: IntGaugeVec,
    /// 1 while draining (SIGTERM received).
    pub draining: IntGauge,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let register = |m: Box<dyn prometheus::core::Collector>| {
            registry.register(m).expect("unique metric");
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid counter");
            register(Box::new(c.clone()));
            c
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter");
            register(Box::new(c.clone()));
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid gauge");
            register(Box::new(g.clone()));
            g
        };
        let relay_bytes = counter_vec(
            "proxy_relay_bytes_total",
            "Bytes relayed, by direction (to_worker, to_client); to_worker includes the request head and any PROXY header",
            &["direction"],
        );
        let choice_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "proxy_choice_seconds",
                "Time to choose a worker for a connection (placer lock and choice)",
            )
            .buckets(vec![
                1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2,
            ]),
        )
        .expect("valid histogram");
        register(Box::new(choice_seconds.clone()));
        let table_age = Gauge::new(
            "proxy_table_age_seconds",
            "Seconds since the routing table in use arrived from herald (-1: none yet)",
        )
        .expect("valid gauge");
        register(Box::new(table_age.clone()));
        let placement_mode = IntGaugeVec::new(
            Opts::new(
                "proxy_placement_mode",
                "1 for the way the next connection would be placed (fresh, stale, fallback, static)",
            ),
            &["mode"],
        )
        .expect("valid gauge");
        register(Box::new(placement_mode.clone()));
        let refused = counter_vec(
            "proxy_refused_total",
            "Client connections refused, by reason (rate, connections, tls_handshake, bad_request, request_too_large, handshake_timeout, no_worker, upstream_failed)",
            &["reason"],
        );
        protocol::process::preset(
            &refused,
            &[
                "rate",
                "connections",
                "tls_handshake",
                "bad_request",
                "request_too_large",
                "handshake_timeout",
                "no_worker",
                "upstream_failed",
            ],
        );
        let relays_ended = counter_vec(
            "proxy_relays_ended_total",
            "Relayed connections ended, by how (closed, failed, idle_timeout, drain_timeout)",
            &["end"],
        );
        protocol::process::preset(
            &relays_ended,
            &["closed", "failed", "idle_timeout", "drain_timeout"],
        );
        Metrics {
            accepted: counter(
                "proxy_connections_accepted_total",
                "Client connections accepted, before admission",
            ),
            active: gauge(
                "proxy_connections_active",
                "Client connections open and admitted (in handshake, connecting or relayed)",
            ),
            refused,
            pages_served: counter(
                "proxy_pages_served_total",
                "Plain GETs answered with the proxy's own pages (--demo-page: demo page, JavaScript client)",
            ),
            placements: counter_vec(
                "proxy_placements_total",
                "Connections placed on a worker, by worker and placement mode",
                &["worker", "mode"],
            ),
            connect_retries: counter(
                "proxy_connect_retries_total",
                "Workers tried for a connection after the first failed",
            ),
            connect_failures: counter_vec(
                "proxy_connect_failures_total",
                "Connections to a worker refused or timed out, by worker",
                &["worker"],
            ),
            relay_bytes: Counters {
                to_worker: relay_bytes.with_label_values(&["to_worker"]),
                to_client: relay_bytes.with_label_values(&["to_client"]),
            },
            relays_ended,
            choice_seconds,
            herald_failures: counter(
                "proxy_herald_failures_total",
                "Failed polls of herald's routing table (the last table stays in use)",
            ),
            table_version: gauge(
                "proxy_table_version",
                "Version of the routing table in use (0: none yet)",
            ),
            table_generation: gauge(
                "proxy_table_generation",
                "Generation of the routing table in use, as a signed 64-bit number (0: none yet)",
            ),
            table_age,
            placement_mode,
            draining: gauge("proxy_draining", "1 while draining (SIGTERM received)"),
            registry,
        }
    }

    /// Refreshes what is read from elsewhere (admission, the herald watcher, the placer) and
    /// renders the text exposition.
    pub fn render(
        &self,
        placer: &parking_lot::Mutex<Placer>,
        watch: Option<&WatchStatus>,
        open: usize,
        now: Instant,
    ) -> String {
        self.active.set(open as i64);
        // Held while refreshing so that concurrent scrapes copy the failure count once.
        let placer = placer.lock();
        if let Some(status) = watch {
            self.table_version.set(status.version() as i64);
            self.table_generation.set(status.generation() as i64);
            let age = status.last_table_age().map_or(-1.0, |a| a.as_secs_f64());
            self.table_age.set(age);
            let failures = status.failures();
            self.herald_failures
                .inc_by(failures.saturating_sub(self.herald_failures.get()));
        } else {
            self.table_age.set(-1.0);
        }
        let current = placer.mode(now);
        for mode in MODES {
            let on = i64::from(mode == current);
            self.placement_mode
                .with_label_values(&[mode_label(mode)])
                .set(on);
        }
        drop(placer);
        protocol::process::render_metrics(&self.registry)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
