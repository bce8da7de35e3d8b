//! Load reports: what each worker tells herald every report interval, and herald's reply.
//!
//! Transport: `POST /v1/reports` on herald's HTTP port, body one [`LoadReport`] as JSON
//! (`application/json`, at most [`MAX_REPORT_BYTES`]); herald answers `200` with a
//! [`ReportReply`], or `400` with the reason a report was refused. Specification with an example:
//! `protocol/PROTOCOL.md` §4.
//!
//! Every figure is a measurement over the interval since the worker's previous report, except
//! the gauges (connections, subscriptions, RSS, queue bytes), which are read when the report is
//! built. Fields unknown to the reader are ignored, so a newer worker can add figures without
//! breaking an older herald; a change of meaning bumps [`REPORT_VERSION`].

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The report format this code writes and reads.
pub const REPORT_VERSION: u32 = 1;

/// Largest report body herald accepts.
pub const MAX_REPORT_BYTES: usize = 16 * 1024;

/// Longest worker id, instance id or address, in bytes.
pub const MAX_NAME_BYTES: usize = 256;

/// Who a worker is and where to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerIdentity {
    /// The worker's name, unique in the fleet (`--id`).
    pub id: String,
    /// Where proxies dial for client WebSockets, `host:port`.
    pub address: String,
    /// The worker's admin port, `host:port` (metrics, history for peers).
    pub admin_address: String,
    /// The cloud instance the worker runs on (an EC2 instance id), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// Random per worker process: a new value means the worker restarted, and herald forgets
    /// what it measured of the previous process.
    pub boot: u64,
}

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Bound its ports but not yet serving (reserved for workers that warm up before serving).
    Starting,
    /// Accepting clients.
    Ready,
    /// Closing its clients in staggered batches; accepts no new ones.
    Draining,
}

/// What one more connection costs a worker, per resource, estimated from its current
/// connections (resource used above an idle worker's, divided by connections). All zero when
/// the worker has no connections: herald then uses the fleet's typical cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectionCost {
    /// Share of the worker's CPU capacity (same unit as [`LoadReport::cpu_ratio`]).
    pub cpu_ratio: f64,
    /// Resident memory, bytes.
    pub memory_bytes: f64,
    /// Bytes written to clients per second.
    pub bytes_out_per_s: f64,
    /// Messages delivered to clients per second.
    pub deliveries_per_s: f64,
}

/// One worker's load over its last report interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Always [`REPORT_VERSION`].
    pub version: u32,
    /// Who is reporting.
    pub worker: WorkerIdentity,
    /// Its state.
    pub state: WorkerState,
    /// 1 for the first report of a worker process, then +1 per report built (a retry after a
    /// failed send is a new report with fresh figures).
    pub seq: u64,
    /// The worker's report interval, milliseconds; herald expires a worker silent for three.
    pub interval_ms: u64,
    /// Client connections held now.
    pub connections: u64,
    /// Most client connections the worker accepts (`--max-connections`).
    pub max_connections: u64,
    /// Subscriptions held now, all connections together.
    pub subscriptions: u64,
    /// Messages delivered to clients per second.
    pub deliveries_per_s: f64,
    /// Bytes written to clients per second.
    pub bytes_out_per_s: f64,
    /// Process CPU time over wall time, divided by the cores the process may use (0..1).
    pub cpu_ratio: f64,
    /// Resident set size, bytes.
    pub rss_bytes: u64,
    /// Memory the worker may use (`--memory-budget`), bytes.
    pub memory_budget_bytes: u64,
    /// Worst lateness of the worker's event loop over the interval, seconds.
    pub loop_lag_seconds: f64,
    /// Bytes queued for clients now, all connections together.
    pub queue_bytes: u64,
    /// 99th percentile of publish-to-socket latency over the interval, seconds (0 when
    /// nothing was delivered).
    pub publish_to_socket_p99_seconds: f64,
    /// Estimated cost of one more connection.
    pub cost_per_connection: ConnectionCost,
}

/// Why herald refused a report (answered with HTTP 400 and this text).
#[derive(Debug, Error, PartialEq)]
pub enum ReportError {
    /// More than [`MAX_REPORT_BYTES`].
    #[error("report is {0} bytes; the limit is {MAX_REPORT_BYTES}")]
    TooLarge(usize),
    /// Not JSON of the expected shape.
    #[error("report is not a valid load report: {0}")]
    Malformed(String),
    /// A version this herald does not read.
    #[error("report version {0} is not supported (this herald reads {REPORT_VERSION})")]
    Version(u32),
    /// A field's value is out of range.
    #[error("report field {field} is invalid: {why}")]
    Invalid {
        /// The field's name.
        field: &'static str,
        /// What is wrong with it.
        why: String,
    },
}

impl LoadReport {
    /// Decodes and checks a report body.
    pub fn decode(body: &[u8]) -> Result<LoadReport, ReportError> {
        if body.len() > MAX_REPORT_BYTES {
            return Err(ReportError::TooLarge(body.len()));
        }
        // The version is checked before the shape, so an old herald explains a new format.
        #[derive(Deserialize)]
        struct Versioned {
            version: u32,
        }
        match serde_json::from_slice::<Versioned>(body) {
            Ok(v) if v.version != REPORT_VERSION => return Err(ReportError::Version(v.version)),
            _ => {}
        }
        let report: LoadReport =
            serde_json::from_slice(body).map_err(|e| ReportError::Malformed(e.to_string()))?;
        report.check()?;
        Ok(report)
    }

    /// Checks every field's range; [`LoadReport::decode`] calls it.
    pub fn check(&self) -> Result<(), ReportError> {
        let invalid = |field, why: &str| {
            Err(ReportError::Invalid {
                field,
                why: why.to_string(),
            })
        };
        let w = &self.worker;
        if w.id.is_empty() || w.id.len() > MAX_NAME_BYTES || w.id.chars().any(char::is_control) {
            return invalid(
                "worker.id",
                "must be 1 to 256 bytes without control characters",
            );
        }
        for (field, addr) in [
            ("worker.address", &w.address),
            ("worker.admin_address", &w.admin_address),
        ] {
            if let Err(why) = check_address(addr) {
                return invalid(field, &why);
            }
        }
        if let Some(instance) = &w.instance_id {
            if instance.is_empty()
                || instance.len() > MAX_NAME_BYTES
                || !instance.bytes().all(|b| b.is_ascii_graphic())
            {
                return invalid(
                    "worker.instance_id",
                    "must be 1 to 256 printable ASCII bytes",
                );
            }
        }
        if self.seq == 0 {
            return invalid("seq", "starts at 1");
        }
        if !(100..=600_000).contains(&self.interval_ms) {
            return invalid("interval_ms", "must be between 100 and 600000");
        }
        if self.memory_budget_bytes == 0 {
            return invalid("memory_budget_bytes", "must be positive");
        }
        if self.max_connections == 0 {
            return invalid("max_connections", "must be positive");
        }
        let c = &self.cost_per_connection;
        for (field, value) in [
            ("deliveries_per_s", self.deliveries_per_s),
            ("bytes_out_per_s", self.bytes_out_per_s),
            ("cpu_ratio", self.cpu_ratio),
            ("loop_lag_seconds", self.loop_lag_seconds),
            (
                "publish_to_socket_p99_seconds",
                self.publish_to_socket_p99_seconds,
            ),
            ("cost_per_connection.cpu_ratio", c.cpu_ratio),
            ("cost_per_connection.memory_bytes", c.memory_bytes),
            ("cost_per_connection.bytes_out_per_s", c.bytes_out_per_s),
            ("cost_per_connection.deliveries_per_s", c.deliveries_per_s),
        ] {
            if !value.is_finite() || value < 0.0 {
                return invalid(field, "must be a finite number ≥ 0");
            }
        }
        Ok(())
    }

    /// The report as a JSON body.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a report always serialises")
    }
}

/// `host:port` with a non-empty host that others can dial (not a wildcard like 0.0.0.0) and a
/// port.
fn check_address(addr: &str) -> Result<(), String> {
    if addr.len() > MAX_NAME_BYTES {
        return Err(format!("longer than {MAX_NAME_BYTES} bytes"));
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(format!("{addr:?} is not host:port"));
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{addr:?} has no valid host"));
    }
    if host
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_unspecified())
    {
        return Err(format!(
            "{addr:?} is a wildcard address that nobody can dial; advertise the host's own address"
        ));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("{addr:?} has no valid port")),
    }
}

/// Herald's answer to a report. Level-triggered: every reply says the whole of what herald
/// wants from the worker now, so a lost reply is repaired by the next one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ReportReply {
    /// Always [`REPORT_VERSION`].
    pub version: u32,
    /// True when herald wants this worker drained (scale-in or termination): it closes its
    /// clients in staggered batches and accepts no new ones. Never undone for a process.
    pub drain: bool,
    /// Admin addresses of the other workers herald knows, for history fills and repairs.
    #[serde(default)]
    pub peers: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> LoadReport {
        LoadReport {
            version: REPORT_VERSION,
            worker: WorkerIdentity {
                id: "w1".into(),
                address: "10.0.0.5:8080".into(),
                admin_address: "10.0.0.5:9090".into(),
                instance_id: Some("i-0abc".into()),
                boot: 7,
            },
            state: WorkerState::Ready,
            seq: 3,
            interval_ms: 2000,
            connections: 1200,
            max_connections: 19_000,
            subscriptions: 3600,
            deliveries_per_s: 5000.0,
            bytes_out_per_s: 2.5e6,
            cpu_ratio: 0.31,
            rss_bytes: 120 << 20,
            memory_budget_bytes: 4 << 30,
            loop_lag_seconds: 0.002,
            queue_bytes: 4096,
            publish_to_socket_p99_seconds: 0.012,
            cost_per_connection: ConnectionCost {
                cpu_ratio: 0.0002,
                memory_bytes: 9000.0,
                bytes_out_per_s: 2000.0,
                deliveries_per_s: 4.0,
            },
        }
    }

    /// The JSON examples in PROTOCOL.md §4 are valid.
    #[test]
    fn the_specification_examples_decode() {
        let spec = include_str!("../PROTOCOL.md");
        let report = crate::spec_example(spec, "load-report");
        let r = LoadReport::decode(report.as_bytes()).unwrap();
        assert_eq!(r.worker.id, "w-a1");
        let reply: ReportReply =
            serde_json::from_str(&crate::spec_example(spec, "report-reply")).unwrap();
        assert_eq!(reply.peers.len(), 2);
    }

    #[test]
    fn round_trips() {
        let r = sample();
        assert_eq!(LoadReport::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn unknown_fields_are_ignored_and_versions_are_checked() {
        let mut v: serde_json::Value = serde_json::from_slice(&sample().encode()).unwrap();
        v["future_figure"] = 1.into();
        assert!(LoadReport::decode(v.to_string().as_bytes()).is_ok());
        v["version"] = 2.into();
        v.as_object_mut().unwrap().remove("seq");
        assert_eq!(
            LoadReport::decode(v.to_string().as_bytes()),
            Err(ReportError::Version(2))
        );
    }

    #[test]
    fn bad_reports_say_what_is_wrong() {
        let check = |edit: fn(&mut LoadReport), field: &str| {
            let mut r = sample();
            edit(&mut r);
            match LoadReport::decode(&r.encode()) {
                Err(ReportError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        };
        check(|r| r.worker.id.clear(), "worker.id");
        check(|r| r.worker.id = "a\nb".into(), "worker.id");
        check(|r| r.worker.address = "nohost".into(), "worker.address");
        check(|r| r.worker.address = ":80".into(), "worker.address");
        check(
            |r| r.worker.address = "0.0.0.0:8080".into(),
            "worker.address",
        );
        check(|r| r.worker.address = "[::]:8080".into(), "worker.address");
        check(
            |r| r.worker.admin_address = "0.0.0.0:9090".into(),
            "worker.admin_address",
        );
        check(
            |r| r.worker.admin_address = "h:0".into(),
            "worker.admin_address",
        );
        check(
            |r| r.worker.instance_id = Some("".into()),
            "worker.instance_id",
        );
        check(|r| r.seq = 0, "seq");
        check(|r| r.interval_ms = 5, "interval_ms");
        check(|r| r.memory_budget_bytes = 0, "memory_budget_bytes");
        check(|r| r.max_connections = 0, "max_connections");
        check(|r| r.cpu_ratio = -0.1, "cpu_ratio");
        check(
            |r| r.cost_per_connection.memory_bytes = -1.0,
            "cost_per_connection.memory_bytes",
        );
        assert!(matches!(
            LoadReport::decode(b"{\"version\":1}"),
            Err(ReportError::Malformed(_))
        ));
        assert!(matches!(
            LoadReport::decode(b"not json"),
            Err(ReportError::Malformed(_))
        ));
        assert!(matches!(
            LoadReport::decode(&vec![b' '; MAX_REPORT_BYTES + 1]),
            Err(ReportError::TooLarge(_))
        ));
        let mut r = sample();
        r.worker.address = "[::1]:8080".into();
        assert!(r.check().is_ok(), "IPv6 addresses are fine");
    }
}
