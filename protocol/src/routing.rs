//! The routing table: herald's view of which workers may take new connections, for proxies.
//!
//! Transport: `GET /v1/table` on herald's HTTP port answers the current table as JSON.
//! `GET /v1/table?generation=G&after=V&wait=DURATION` is a long poll: it answers as soon as the
//! table differs from version `V` of generation `G` (at once if it already does), or with the
//! unchanged table when `wait` (at most 60 s) has passed. Specification: `protocol/PROTOCOL.md` §5.
//!
//! The table carries what a proxy needs to correct for the connections it placed since a
//! worker's last report: the **projected utilisation** of worker `i` is
//! `utilisation + cost_per_connection × placed_i`, where `placed_i` counts the connections this
//! proxy sent to `i` since it first saw `report_seq`.

use serde::{Deserialize, Serialize};

/// The table format this code writes and reads.
pub const TABLE_VERSION: u32 = 1;

/// One worker as proxies see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoutedWorker {
    /// The worker's name.
    pub id: String,
    /// Where to dial for client WebSockets, `host:port`.
    pub address: String,
    /// Its cloud instance id, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// Smoothed utilisation: the most used resource over its capacity (1.0 = at capacity;
    /// may exceed 1).
    pub utilisation: f64,
    /// Utilisation one more connection adds.
    pub cost_per_connection: f64,
    /// Connections at its last report.
    pub connections: u64,
    /// Sequence number of the report the figures come from; a proxy resets its count of
    /// placements to this worker when it changes.
    pub report_seq: u64,
    /// Age of that report when the table was built, milliseconds.
    pub report_age_ms: u64,
    /// Slow-start weight, 0..1: a worker that just joined takes this share of its fair load,
    /// ramping to 1 over the slow-start window.
    pub slow_start: f64,
    /// Relative weight for weighted balancers (HAProxy's agent check), 0..1: headroom over the
    /// best headroom in the fleet, times `slow_start`, never below a floor so an overloaded
    /// fleet is not drained entirely.
    pub weight: f64,
    /// True when the worker is being drained: place nothing there.
    pub draining: bool,
}

/// Every worker that has reported enough to be trusted, draining ones included (flagged).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoutingTable {
    /// Always [`TABLE_VERSION`].
    pub format: u32,
    /// Random per herald process; versions compare only within one generation.
    pub generation: u64,
    /// Increases by one whenever the content changes.
    pub version: u64,
    /// When the table was built, Unix milliseconds.
    pub built_at_ms: u64,
    /// Workers' report interval, milliseconds (a proxy treats the table as stale after a few).
    pub report_interval_ms: u64,
    /// The workers, ordered by id.
    pub workers: Vec<RoutedWorker>,
}

impl RoutingTable {
    /// The table as a JSON body.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a table always serialises")
    }

    /// Reads a table body.
    pub fn decode(body: &[u8]) -> Result<RoutingTable, serde_json::Error> {
        serde_json::from_slice(body)
    }

    /// A worker by id.
    pub fn worker(&self, id: &str) -> Option<&RoutedWorker> {
        self.workers
            .binary_search_by(|w| w.id.as_str().cmp(id))
            .ok()
            .map(|i| &self.workers[i])
    }

    /// Workers that may take new connections.
    pub fn eligible(&self) -> impl Iterator<Item = &RoutedWorker> {
        self.workers.iter().filter(|w| !w.draining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON example in PROTOCOL.md §5 is valid.
    #[test]
    fn the_specification_example_decodes() {
        let spec = include_str!("../PROTOCOL.md");
        let t =
            RoutingTable::decode(crate::spec_example(spec, "routing-table").as_bytes()).unwrap();
        assert_eq!(t.workers.len(), 2);
        assert_eq!(t.worker("w-b2").unwrap().instance_id, None);
    }

    #[test]
    fn round_trips_and_finds_workers() {
        let w = |id: &str, draining| RoutedWorker {
            id: id.into(),
            address: "127.0.0.1:1".into(),
            instance_id: None,
            utilisation: 0.5,
            cost_per_connection: 0.0001,
            connections: 10,
            report_seq: 4,
            report_age_ms: 300,
            slow_start: 1.0,
            weight: 1.0,
            draining,
        };
        let t = RoutingTable {
            format: TABLE_VERSION,
            generation: 9,
            version: 3,
            built_at_ms: 1,
            report_interval_ms: 2000,
            workers: vec![w("a", false), w("b", true), w("c", false)],
        };
        let back = RoutingTable::decode(&t.encode()).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.worker("b").unwrap().id, "b");
        assert!(back.worker("d").is_none());
        let ids: Vec<_> = back.eligible().map(|w| w.id.as_str()).collect();
        assert_eq!(ids, ["a", "c"]);
    }
}
