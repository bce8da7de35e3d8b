//! Herald's Prometheus metrics, one registry per herald (tests run several in a process).

use prometheus::{GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// Every metric herald exports.
pub struct Metrics {
    registry: Registry,
    /// Reports received, by result (`accepted`, `refused`).
    pub reports: IntCounterVec,
    /// Workers known, by state (`warming`: fewer than the minimum reports; `slow_start`,
    /// `ready`, `draining`).
    pub workers: IntGaugeVec,
    /// Workers expired for missing reports.
    pub workers_expired: IntCounter,
    /// Smoothed utilisation per worker.
    pub worker_utilisation: GaugeVec,
    /// Routing weight per worker (0..1).
    pub worker_weight: GaugeVec,
    /// Age of each worker's last report, seconds.
    pub worker_report_age: GaugeVec,
    /// Connections per worker at its last report.
    pub worker_connections: IntGaugeVec,
    /// The fleet size herald wants.
    pub desired_workers: IntGauge,
    /// Scale decisions, by action and reason.
    pub decisions: IntCounterVec,
    /// Actuator calls, by action and result.
    pub actuator_calls: IntCounterVec,
    /// Version of the routing table.
    pub table_version: IntGauge,
    /// Proxies waiting on a table long poll now.
    pub table_watchers: IntGauge,
    /// HAProxy agent-check answers, by answer (`weight`, `drain`, `unknown`, `bad_request`,
    /// `refused`: over the connection limit).
    pub agent_answers: IntCounterVec,
}

impl Metrics {
    /// A fresh registry with every metric at zero.
    pub fn new() -> Self {
        let registry = Registry::new();
        fn register<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
            r.register(Box::new(m.clone()))
                .expect("metric names are unique");
            m
        }
        let counters = |name: &str, help: &str, labels: &[&str]| {
            register(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid"),
            )
        };
        let int_gauges = |name: &str, help: &str, labels: &[&str]| {
            register(
                &registry,
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid"),
            )
        };
        let gauges = |name: &str, help: &str, labels: &[&str]| {
            register(
                &registry,
                GaugeVec::new(Opts::new(name, help), labels).expect("valid"),
            )
        };
        let m = Metrics {
            reports: counters(
                "herald_reports_total",
                "Load reports received, by result",
                &["result"],
            ),
            workers: int_gauges("herald_workers", "Workers known, by state", &["state"]),
            workers_expired: register(
                &registry,
                IntCounter::new(
                    "herald_workers_expired_total",
                    "Workers expired for missing reports",
                )
                .expect("valid"),
            ),
            worker_utilisation: gauges(
                "herald_worker_utilisation_ratio",
                "Smoothed utilisation per worker (most used resource over its capacity)",
                &["worker"],
            ),
            worker_weight: gauges(
                "herald_worker_weight_ratio",
                "Routing weight per worker",
                &["worker"],
            ),
            worker_report_age: gauges(
                "herald_worker_report_age_seconds",
                "Age of each worker's last report",
                &["worker"],
            ),
            worker_connections: int_gauges(
                "herald_worker_connections",
                "Connections per worker at its last report",
                &["worker"],
            ),
            desired_workers: register(
                &registry,
                IntGauge::new(
                    "herald_desired_workers",
                    "The fleet size herald wants (0 until its startup grace has passed)",
                )
                .expect("valid"),
            ),
            decisions: counters(
                "herald_decisions_total",
                "Scale decisions, by action and reason",
                &["action", "reason"],
            ),
            actuator_calls: counters(
                "herald_actuator_calls_total",
                "Actuator calls, by action and result",
                &["action", "result"],
            ),
            table_version: register(
                &registry,
                IntGauge::new("herald_table_version", "Version of the routing table")
                    .expect("valid"),
            ),
            table_watchers: register(
                &registry,
                IntGauge::new(
                    "herald_table_watchers",
                    "Proxies waiting on a table long poll",
                )
                .expect("valid"),
            ),
            agent_answers: counters(
                "herald_agent_answers_total",
                "HAProxy agent-check answers, by answer",
                &["answer"],
            ),
            registry,
        };
        // Every known label value exists at 0 from the start, so a rate sees the first
        // increment and every dashboard panel and alert has a series to evaluate.
        protocol::process::preset(&m.reports, &["accepted", "refused"]);
        protocol::process::preset(
            &m.agent_answers,
            &["weight", "drain", "unknown", "bad_request", "refused"],
        );
        for action in ["scale_out", "scale_in", "expired", "drained"] {
            m.decisions
                .with_label_values(&[action, crate::server::reason_label(action)]);
        }
        for action in ["set_desired", "drain_started", "drain_progress", "drained"] {
            for result in ["ok", "failed"] {
                m.actuator_calls.with_label_values(&[action, result]);
            }
        }
        m
    }

    /// Forgets a worker's per-worker series (after it expired).
    pub fn forget_worker(&self, id: &str) {
        let _ = self.worker_utilisation.remove_label_values(&[id]);
        let _ = self.worker_weight.remove_label_values(&[id]);
        let _ = self.worker_report_age.remove_label_values(&[id]);
        let _ = self.worker_connections.remove_label_values(&[id]);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        protocol::process::render_metrics(&self.registry)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
