//! Scoring: one utilisation figure per report, the most used resource over its capacity, and
//! what one more connection adds to it. Pure: no clock, no I/O.
//!
//! Connections are not equal work (a dashboard on ten busy topics costs more than a fan on
//! one quiet topic), so the figure is not connections over a maximum but the worst of every
//! resource a worker can run out of: CPU, memory, connection slots, bytes and messages out,
//! event-loop lag, queued bytes and publish-to-socket latency.

use protocol::load::LoadReport;
use serde::Serialize;

/// What counts as "full" for each resource. A capacity of 0 leaves that resource out.
#[derive(Debug, Clone, PartialEq)]
pub struct Capacities {
    /// CPU ratio (process CPU over the cores it may use) at which a worker is full.
    pub cpu_ratio: f64,
    /// Share of the memory budget at which a worker is full.
    pub memory_ratio: f64,
    /// Share of `max_connections` at which a worker is full.
    pub connections_ratio: f64,
    /// Bytes out per second at which a worker is full (its network share).
    pub bytes_out_per_s: f64,
    /// Deliveries per second at which a worker is full.
    pub deliveries_per_s: f64,
    /// Event-loop lag at which a worker is full, seconds.
    pub loop_lag_seconds: f64,
    /// Bytes queued for clients at which a worker is full.
    pub queue_bytes: f64,
    /// p99 publish-to-socket latency at which a worker is full, seconds.
    pub publish_to_socket_p99_seconds: f64,
}

impl Default for Capacities {
    fn default() -> Self {
        Capacities {
            cpu_ratio: 0.85,
            memory_ratio: 0.85,
            connections_ratio: 0.95,
            bytes_out_per_s: 0.0,
            deliveries_per_s: 0.0,
            loop_lag_seconds: 0.5,
            queue_bytes: 0.0,
            publish_to_socket_p99_seconds: 2.0,
        }
    }
}

/// A resource a worker can run out of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Resource {
    /// Process CPU.
    Cpu,
    /// Resident memory against the budget.
    Memory,
    /// Connection slots.
    Connections,
    /// Bytes written to clients per second.
    BytesOut,
    /// Messages delivered per second.
    Deliveries,
    /// Event-loop lag.
    LoopLag,
    /// Bytes queued for clients.
    QueueBytes,
    /// p99 publish-to-socket latency.
    Latency,
}

impl Resource {
    /// The name used in logs, metrics and the status API.
    pub fn name(self) -> &'static str {
        match self {
            Resource::Cpu => "cpu",
            Resource::Memory => "memory",
            Resource::Connections => "connections",
            Resource::BytesOut => "bytes_out",
            Resource::Deliveries => "deliveries",
            Resource::LoopLag => "loop_lag",
            Resource::QueueBytes => "queue_bytes",
            Resource::Latency => "latency",
        }
    }
}

/// What one more connection costs a worker: the work a connection does (its own measurement,
/// or the fleet's typical one) or its connection slot, whichever is more.
pub fn connection_cost(score: &Score, typical: Option<f64>) -> f64 {
    score
        .measured_cost
        .or(typical)
        .unwrap_or(0.0)
        .max(score.slot_cost)
}

/// One report's score.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Score {
    /// The most used resource over its capacity (1.0 = full).
    pub utilisation: f64,
    /// Which resource that is.
    pub dominant: Resource,
    /// Every resource's use over capacity (resources without a capacity left out).
    pub resources: Vec<(Resource, f64)>,
    /// Utilisation one more connection adds through the work it does (CPU, memory, bytes and
    /// deliveries out), from the worker's own measurement; `None` when it has no connections to
    /// measure (the fleet's typical cost is used instead). Its connection slot is apart: slots
    /// differ between workers, so a cost borrowed from another worker never includes one.
    pub measured_cost: Option<f64>,
    /// Utilisation one connection slot takes, whatever the connection does.
    pub slot_cost: f64,
}

fn share(used: f64, capacity: f64) -> Option<f64> {
    (capacity > 0.0).then(|| used / capacity)
}

/// Scores a report against the capacities.
pub fn score(r: &LoadReport, caps: &Capacities) -> Score {
    let budget = r.memory_budget_bytes.max(1) as f64;
    let max_conns = r.max_connections.max(1) as f64;
    let resources: Vec<(Resource, f64)> = [
        (Resource::Cpu, share(r.cpu_ratio, caps.cpu_ratio)),
        (
            Resource::Memory,
            share(r.rss_bytes as f64 / budget, caps.memory_ratio),
        ),
        (
            Resource::Connections,
            share(r.connections as f64 / max_conns, caps.connections_ratio),
        ),
        (
            Resource::BytesOut,
            share(r.bytes_out_per_s, caps.bytes_out_per_s),
        ),
        (
            Resource::Deliveries,
            share(r.deliveries_per_s, caps.deliveries_per_s),
        ),
        (
            Resource::LoopLag,
            share(r.loop_lag_seconds, caps.loop_lag_seconds),
        ),
        (
            Resource::QueueBytes,
            share(r.queue_bytes as f64, caps.queue_bytes),
        ),
        (
            Resource::Latency,
            share(
                r.publish_to_socket_p99_seconds,
                caps.publish_to_socket_p99_seconds,
            ),
        ),
    ]
    .into_iter()
    .filter_map(|(res, v)| v.map(|v| (res, v)))
    .collect();
    let (dominant, utilisation) =
        resources
            .iter()
            .copied()
            .fold((Resource::Connections, 0.0), |best, (res, v)| {
                if v > best.1 {
                    (res, v)
                } else {
                    best
                }
            });
    let slot_cost = share(1.0 / max_conns, caps.connections_ratio).unwrap_or(0.0);
    let c = &r.cost_per_connection;
    let measured_cost = (r.connections > 0).then(|| {
        [
            share(c.cpu_ratio, caps.cpu_ratio),
            share(c.memory_bytes / budget, caps.memory_ratio),
            share(c.bytes_out_per_s, caps.bytes_out_per_s),
            share(c.deliveries_per_s, caps.deliveries_per_s),
        ]
        .into_iter()
        .flatten()
        .fold(0.0, f64::max)
    });
    Score {
        utilisation,
        dominant,
        resources,
        measured_cost,
        slot_cost,
    }
}

/// The median of some costs (the fleet's typical cost for workers that cannot measure their
/// own); `None` when there are none.
pub fn typical_cost(mut costs: Vec<f64>) -> Option<f64> {
    if costs.is_empty() {
        return None;
    }
    costs.sort_by(f64::total_cmp);
    let mid = costs.len() / 2;
    Some(if costs.len() % 2 == 1 {
        costs[mid]
    } else {
        (costs[mid - 1] + costs[mid]) / 2.0
    })
}

/// Exponentially weighted moving average over time: `tau` is the time constant, so a step
/// change is 63% through after `tau` however often reports come.
pub fn smooth(previous: f64, sample: f64, elapsed_s: f64, tau_s: f64) -> f64 {
    if tau_s <= 0.0 {
        return sample;
    }
    let alpha = 1.0 - (-elapsed_s.max(0.0) / tau_s).exp();
    previous + alpha * (sample - previous)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use protocol::load::{ConnectionCost, WorkerIdentity, WorkerState, REPORT_VERSION};

    /// A quiet report of worker `id` with `connections` clients and `cpu` CPU ratio.
    pub(crate) fn report(id: &str, connections: u64, cpu: f64) -> LoadReport {
        LoadReport {
            version: REPORT_VERSION,
            worker: WorkerIdentity {
                id: id.into(),
                address: format!("127.0.0.1:{}", 8000 + id.len()),
                admin_address: "127.0.0.1:9000".into(),
                instance_id: Some(format!("i-{id}")),
                boot: 1,
            },
            state: WorkerState::Ready,
            seq: 1,
            interval_ms: 2000,
            connections,
            max_connections: 10_000,
            subscriptions: connections,
            deliveries_per_s: 0.0,
            bytes_out_per_s: 0.0,
            cpu_ratio: cpu,
            rss_bytes: 100 << 20,
            memory_budget_bytes: 4 << 30,
            loop_lag_seconds: 0.001,
            queue_bytes: 0,
            publish_to_socket_p99_seconds: 0.01,
            cost_per_connection: if connections > 0 {
                ConnectionCost {
                    cpu_ratio: cpu / connections as f64,
                    ..ConnectionCost::default()
                }
            } else {
                ConnectionCost::default()
            },
        }
    }

    #[test]
    fn the_most_used_resource_wins() {
        let caps = Capacities::default();
        let s = score(&report("a", 1000, 0.425), &caps);
        assert_eq!(s.dominant, Resource::Cpu);
        assert!((s.utilisation - 0.5).abs() < 1e-9);

        // Few connections but a huge queue: the queue is what is full.
        let mut r = report("a", 10, 0.1);
        r.loop_lag_seconds = 0.4;
        let s = score(&r, &caps);
        assert_eq!(s.dominant, Resource::LoopLag);
        assert!((s.utilisation - 0.8).abs() < 1e-9);

        // Connection slots count even when they cost nothing else.
        let s = score(&report("a", 9_500, 0.0), &caps);
        assert_eq!(s.dominant, Resource::Connections);
        assert!((s.utilisation - 1.0).abs() < 1e-9);
    }

    #[test]
    fn a_zero_capacity_leaves_a_resource_out() {
        let caps = Capacities {
            cpu_ratio: 0.0,
            ..Capacities::default()
        };
        let s = score(&report("a", 100, 0.99), &caps);
        assert!(s.resources.iter().all(|(r, _)| *r != Resource::Cpu));
        assert!(s.utilisation < 0.1);
    }

    #[test]
    fn connection_cost_is_measured_or_left_to_the_fleet() {
        let caps = Capacities::default();
        let s = score(&report("a", 1000, 0.425), &caps);
        let cost = s.measured_cost.unwrap();
        assert!((cost - 0.0005).abs() < 1e-9, "{cost}");
        let idle = score(&report("b", 0, 0.01), &caps);
        assert_eq!(idle.measured_cost, None);
        assert!((idle.slot_cost - 1.0 / 9500.0).abs() < 1e-12);
        // A connection that costs nothing measurable: its slot is counted apart.
        let mut r = report("c", 1000, 0.0);
        r.cost_per_connection = ConnectionCost::default();
        assert_eq!(score(&r, &caps).measured_cost, Some(0.0));
    }

    #[test]
    fn typical_cost_is_the_median() {
        assert_eq!(typical_cost(vec![]), None);
        assert_eq!(typical_cost(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(typical_cost(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn smoothing_is_time_based() {
        let after_tau = smooth(0.0, 1.0, 10.0, 10.0);
        assert!((after_tau - (1.0 - (-1.0f64).exp())).abs() < 1e-12);
        // Two half steps equal one whole step.
        let half = smooth(smooth(0.0, 1.0, 5.0, 10.0), 1.0, 5.0, 10.0);
        assert!((half - after_tau).abs() < 1e-12);
        assert_eq!(smooth(0.3, 0.9, 1.0, 0.0), 0.9);
    }
}
