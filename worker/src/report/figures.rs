//! The figures of a load report, from readings taken by the caller (pure: no clock, no I/O).
//!
//! Rates are deltas of [`Counters`] between two successive reports over the time between
//! them; [`Gauges`] are taken as read. [`Composer`] numbers the reports and fills in what does not
//! change for the life of the process.

use protocol::load::{
    ConnectionCost, LoadReport, ReportError, WorkerIdentity, WorkerState, REPORT_VERSION,
};
use std::time::{Duration, Instant};

/// A latency histogram as Prometheus keeps it: cumulative counts per finite upper bound.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Latency {
    /// `(upper bound in seconds, observations at or below it)`, bounds ascending.
    pub buckets: Vec<(f64, u64)>,
    /// All observations, the `+Inf` bucket included.
    pub count: u64,
}

/// Counters read from the process and the metrics: rates are their deltas between reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Counters {
    /// When they were read.
    pub at: Instant,
    /// Deliveries to clients so far.
    pub deliveries: u64,
    /// Bytes written to clients so far.
    pub bytes_out: u64,
    /// Process CPU time (user + system) so far, seconds; `None` when unreadable.
    pub cpu_seconds: Option<f64>,
    /// Publish-to-socket latencies so far.
    pub latency: Latency,
}

/// Figures reported as read when the report is built.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Gauges {
    /// Client connections now.
    pub connections: u64,
    /// Subscriptions now.
    pub subscriptions: u64,
    /// Resident set size now, bytes (0 when unreadable).
    pub rss_bytes: u64,
    /// Bytes queued for clients now.
    pub queue_bytes: u64,
    /// Worst event-loop lateness since the previous report.
    pub loop_lag: Duration,
}

/// Per-second figures over one interval.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    /// Deliveries per second.
    pub deliveries_per_s: f64,
    /// Bytes written per second.
    pub bytes_out_per_s: f64,
    /// CPU time over wall time over `cores`, 0..=1.
    pub cpu_ratio: f64,
    /// 99th percentile publish-to-socket latency, seconds (0 without observations).
    pub publish_to_socket_p99_seconds: f64,
}

/// The rates between two readings; all 0 when no time passed.
pub fn rates(prev: &Counters, now: &Counters, cores: usize) -> Rates {
    let elapsed_s = now.at.saturating_duration_since(prev.at).as_secs_f64();
    if elapsed_s <= 0.0 {
        return Rates::default();
    }
    let per_s = |a: u64, b: u64| b.saturating_sub(a) as f64 / elapsed_s;
    let cpu_ratio = match (prev.cpu_seconds, now.cpu_seconds) {
        // CPU time is counted in 10 ms ticks, so a short interval can round past 1.
        (Some(a), Some(b)) => ((b - a).max(0.0) / elapsed_s / cores.max(1) as f64).min(1.0),
        _ => 0.0,
    };
    Rates {
        deliveries_per_s: per_s(prev.deliveries, now.deliveries),
        bytes_out_per_s: per_s(prev.bytes_out, now.bytes_out),
        cpu_ratio,
        publish_to_socket_p99_seconds: quantile(0.99, &prev.latency, &now.latency),
    }
}

/// The `q` quantile of the observations made between two histogram readings, interpolated
/// linearly within its bucket as Prometheus' `histogram_quantile` does; the highest finite
/// bound when it falls in the `+Inf` bucket; 0 without observations.
pub fn quantile(q: f64, prev: &Latency, now: &Latency) -> f64 {
    let total = now.count.saturating_sub(prev.count);
    if total == 0 {
        return 0.0;
    }
    let rank = q * total as f64;
    let before = |bound: f64| {
        prev.buckets
            .iter()
            .find(|(b, _)| *b == bound)
            .map_or(0, |(_, c)| *c)
    };
    let (mut lower_bound, mut lower_count) = (0.0, 0u64);
    for &(bound, cumulative) in &now.buckets {
        let count = cumulative.saturating_sub(before(bound));
        if count as f64 >= rank {
            let in_bucket = count.saturating_sub(lower_count);
            if in_bucket == 0 {
                return bound;
            }
            let share = (rank - lower_count as f64) / in_bucket as f64;
            return lower_bound + (bound - lower_bound) * share.clamp(0.0, 1.0);
        }
        (lower_bound, lower_count) = (bound, count);
    }
    lower_bound
}

/// What one more connection costs: each resource over `connections`, memory counted above
/// `idle_rss_bytes` (the worker's RSS before it held anyone). All 0 without connections.
pub fn cost_per_connection(
    rates: &Rates,
    connections: u64,
    rss_bytes: u64,
    idle_rss_bytes: u64,
) -> ConnectionCost {
    if connections == 0 {
        return ConnectionCost::default();
    }
    let n = connections as f64;
    ConnectionCost {
        cpu_ratio: rates.cpu_ratio / n,
        memory_bytes: rss_bytes.saturating_sub(idle_rss_bytes) as f64 / n,
        bytes_out_per_s: rates.bytes_out_per_s / n,
        deliveries_per_s: rates.deliveries_per_s / n,
    }
}

/// What stays the same in every report of this process.
#[derive(Debug, Clone)]
pub struct Fixed {
    /// Who is reporting.
    pub identity: WorkerIdentity,
    /// The report interval.
    pub interval: Duration,
    /// `--max-connections`.
    pub max_connections: u64,
    /// `--memory-budget`, resolved.
    pub memory_budget_bytes: u64,
    /// Cores the process may use.
    pub cores: usize,
    /// RSS when the worker started, before it held any connection.
    pub idle_rss_bytes: u64,
}

impl Fixed {
    /// Whether herald would accept reports with these fields (checked before serving).
    pub fn check(&self) -> Result<(), ReportError> {
        let report = compose(
            self,
            1,
            WorkerState::Ready,
            &Gauges::default(),
            Rates::default(),
        );
        report.check()
    }
}

/// Builds successive reports: numbers them and measures each over the time since the previous.
pub struct Composer {
    fixed: Fixed,
    prev: Counters,
    seq: u64,
}

impl Composer {
    /// Starts measuring from `first`.
    pub fn new(fixed: Fixed, first: Counters) -> Self {
        Composer {
            fixed,
            prev: first,
            seq: 0,
        }
    }

    /// The next report, its rates measured from the previous counters to `now`.
    pub fn next(&mut self, state: WorkerState, now: Counters, gauges: &Gauges) -> LoadReport {
        self.seq += 1;
        let rates = rates(&self.prev, &now, self.fixed.cores);
        self.prev = now;
        compose(&self.fixed, self.seq, state, gauges, rates)
    }
}

fn compose(f: &Fixed, seq: u64, state: WorkerState, g: &Gauges, rates: Rates) -> LoadReport {
    LoadReport {
        version: REPORT_VERSION,
        worker: f.identity.clone(),
        state,
        seq,
        interval_ms: f.interval.as_millis() as u64,
        connections: g.connections,
        max_connections: f.max_connections,
        subscriptions: g.subscriptions,
        deliveries_per_s: rates.deliveries_per_s,
        bytes_out_per_s: rates.bytes_out_per_s,
        cpu_ratio: rates.cpu_ratio,
        rss_bytes: g.rss_bytes,
        memory_budget_bytes: f.memory_budget_bytes,
        loop_lag_seconds: g.loop_lag.as_secs_f64(),
        queue_bytes: g.queue_bytes,
        publish_to_socket_p99_seconds: rates.publish_to_socket_p99_seconds,
        cost_per_connection: cost_per_connection(
            &rates,
            g.connections,
            g.rss_bytes,
            f.idle_rss_bytes,
        ),
    }
}

/// The wait before the next report: `interval` times `0.8 + 0.4 × unit`, `unit` uniform in
/// [0, 1), so a fleet's reports drift apart instead of arriving together.
pub fn jittered(interval: Duration, unit: f64) -> Duration {
    interval.mul_f64(0.8 + 0.4 * unit.clamp(0.0, 1.0))
}

/// Full-jitter exponential backoff after `failures` failed reports in a row (1 for the first):
/// `unit` (uniform in [0, 1)) times `min(cap, first × 2^(failures-1))`.
pub fn backoff(failures: u32, first: Duration, cap: Duration, unit: f64) -> Duration {
    let ceiling = first
        .saturating_mul(1u32 << failures.saturating_sub(1).min(20))
        .min(cap);
    ceiling.mul_f64(unit.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn latency(buckets: &[(f64, u64)], count: u64) -> Latency {
        Latency {
            buckets: buckets.to_vec(),
            count,
        }
    }

    fn counters(at: Instant) -> Counters {
        Counters {
            at,
            deliveries: 0,
            bytes_out: 0,
            cpu_seconds: Some(0.0),
            latency: latency(&[(0.01, 0), (0.1, 0), (1.0, 0)], 0),
        }
    }

    fn identity() -> WorkerIdentity {
        WorkerIdentity {
            id: "w1".into(),
            address: "10.0.0.5:8080".into(),
            admin_address: "10.0.0.5:9090".into(),
            instance_id: None,
            boot: 42,
        }
    }

    fn fixed() -> Fixed {
        Fixed {
            identity: identity(),
            interval: Duration::from_secs(2),
            max_connections: 1000,
            memory_budget_bytes: 1 << 30,
            cores: 2,
            idle_rss_bytes: 100 << 20,
        }
    }

    #[test]
    fn rates_are_counter_deltas_over_the_real_elapsed_time() {
        let t0 = Instant::now();
        let a = counters(t0);
        let mut b = counters(t0 + Duration::from_millis(2500));
        b.deliveries = 5000;
        b.bytes_out = 1_000_000;
        b.cpu_seconds = Some(1.25);
        let r = rates(&a, &b, 2);
        assert_eq!(r.deliveries_per_s, 2000.0);
        assert_eq!(r.bytes_out_per_s, 400_000.0);
        assert_eq!(r.cpu_ratio, 0.25, "1.25 s of CPU in 2.5 s on 2 cores");
        assert_eq!(r.publish_to_socket_p99_seconds, 0.0, "nothing observed");
    }

    #[test]
    fn rates_survive_no_elapsed_time_tick_rounding_and_missing_cpu() {
        let t0 = Instant::now();
        let mut b = counters(t0);
        b.deliveries = 10;
        assert_eq!(rates(&counters(t0), &b, 1), Rates::default());
        let mut c = counters(t0 + Duration::from_millis(100));
        c.cpu_seconds = Some(0.11);
        assert_eq!(rates(&counters(t0), &c, 1).cpu_ratio, 1.0);
        c.cpu_seconds = None;
        assert_eq!(rates(&counters(t0), &c, 1).cpu_ratio, 0.0);
    }

    #[test]
    fn p99_comes_from_this_interval_only() {
        // Before: 1000 slow observations (1 s bucket). This interval: 100 fast ones.
        let prev = latency(&[(0.01, 0), (0.1, 0), (1.0, 1000)], 1000);
        let now = latency(&[(0.01, 100), (0.1, 100), (1.0, 1100)], 1100);
        let p99 = quantile(0.99, &prev, &now);
        assert!(p99 > 0.0 && p99 <= 0.01, "{p99}");
    }

    #[test]
    fn p99_interpolates_within_its_bucket_and_caps_at_the_last_bound() {
        let zero = latency(&[(0.01, 0), (0.1, 0), (1.0, 0)], 0);
        // 90 fast, 10 between 10 and 100 ms: rank 99 is 9/10 into the second bucket.
        let now = latency(&[(0.01, 90), (0.1, 100), (1.0, 100)], 100);
        let p99 = quantile(0.99, &zero, &now);
        assert!((p99 - 0.091).abs() < 1e-9, "{p99}");
        // Everything slower than the last finite bound.
        let slow = latency(&[(0.01, 0), (0.1, 0), (1.0, 0)], 50);
        assert_eq!(quantile(0.99, &zero, &slow), 1.0);
        assert_eq!(quantile(0.99, &now, &now), 0.0);
    }

    #[test]
    fn cost_per_connection_divides_by_connections_and_counts_memory_above_idle() {
        let r = Rates {
            deliveries_per_s: 400.0,
            bytes_out_per_s: 8000.0,
            cpu_ratio: 0.2,
            publish_to_socket_p99_seconds: 0.0,
        };
        let c = cost_per_connection(&r, 4, 104 << 20, 100 << 20);
        assert_eq!(c.deliveries_per_s, 100.0);
        assert_eq!(c.bytes_out_per_s, 2000.0);
        assert_eq!(c.cpu_ratio, 0.05);
        assert_eq!(c.memory_bytes, (1 << 20) as f64);
        assert_eq!(
            cost_per_connection(&r, 0, 200 << 20, 100 << 20),
            ConnectionCost::default()
        );
        assert_eq!(cost_per_connection(&r, 1, 50, 100).memory_bytes, 0.0);
    }

    #[test]
    fn reports_are_numbered_and_each_measures_its_own_interval() {
        let t0 = Instant::now();
        assert!(fixed().check().is_ok());
        let mut composer = Composer::new(fixed(), counters(t0));
        let mut a = counters(t0 + Duration::from_secs(1));
        a.deliveries = 100;
        let gauges = Gauges {
            connections: 2,
            subscriptions: 6,
            rss_bytes: 102 << 20,
            queue_bytes: 10,
            loop_lag: Duration::from_millis(3),
        };
        let r1 = composer.next(WorkerState::Ready, a.clone(), &gauges);
        assert_eq!((r1.seq, r1.state), (1, WorkerState::Ready));
        assert_eq!(r1.deliveries_per_s, 100.0);
        assert_eq!(
            (r1.connections, r1.subscriptions, r1.queue_bytes),
            (2, 6, 10)
        );
        assert_eq!(r1.cost_per_connection.memory_bytes, (1 << 20) as f64);
        assert_eq!(r1.cost_per_connection.deliveries_per_s, 50.0);
        assert_eq!(r1.loop_lag_seconds, 0.003);
        assert_eq!(r1.interval_ms, 2000);
        assert_eq!(r1.worker, identity());
        assert!(r1.check().is_ok());
        let mut b = a;
        b.at += Duration::from_secs(2);
        b.deliveries = 300;
        let r2 = composer.next(WorkerState::Draining, b, &Gauges::default());
        assert_eq!((r2.seq, r2.state), (2, WorkerState::Draining));
        assert_eq!(r2.deliveries_per_s, 100.0);
        assert_eq!(r2.cost_per_connection, ConnectionCost::default());
    }

    #[test]
    fn settings_herald_would_refuse_are_caught_before_any_report() {
        let mut f = fixed();
        f.interval = Duration::from_millis(50);
        assert!(matches!(
            f.check(),
            Err(ReportError::Invalid {
                field: "interval_ms",
                ..
            })
        ));
        let mut f = fixed();
        f.identity.address = "0.0.0.0".into();
        assert!(matches!(
            f.check(),
            Err(ReportError::Invalid {
                field: "worker.address",
                ..
            })
        ));
    }

    #[test]
    fn waits_stay_within_their_bounds() {
        let i = Duration::from_secs(2);
        assert_eq!(jittered(i, 0.0), Duration::from_millis(1600));
        assert_eq!(jittered(i, 1.0), Duration::from_millis(2400));
        assert_eq!(jittered(i, 0.5), i);
        let first = Duration::from_millis(100);
        assert_eq!(backoff(1, first, i, 1.0), first);
        assert_eq!(backoff(3, first, i, 1.0), Duration::from_millis(400));
        assert_eq!(backoff(50, first, i, 1.0), i, "capped at the interval");
        assert_eq!(backoff(50, first, i, 0.0), Duration::ZERO);
        assert_eq!(backoff(0, first, i, 1.0), first);
    }
}
