//! What the placer knows about each worker: the figures of its latest report (from herald's
//! table), what this proxy did since (placements since that report, connections open now) and
//! local down marks after failed dials.
//!
//! Invariants:
//! - the list is sorted by id, ids are unique;
//! - a worker that leaves the table keeps its entry (unlisted, no figures, no down mark) only
//!   while this proxy still has connections open to it, so `released` stays exact;
//! - figures are sanitised on the way in: every number used in a comparison is finite.

use protocol::routing::{RoutedWorker, RoutingTable};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Lowest slow-start factor placement divides by. Herald never sends less than its own floor
/// (0.1); this only keeps a malformed table from dividing by zero.
pub const SLOW_START_FLOOR: f64 = 0.01;

/// Highest utilisation placement believes. Anything above is as full as it gets; the ceiling
/// keeps sums and means finite whatever a table says.
pub const UTILISATION_CEILING: f64 = 1e6;

/// Highest cost per connection placement believes (one connection filling a worker).
pub const COST_PER_CONNECTION_CEILING: f64 = 1.0;

/// A worker's figures from its latest report, sanitised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Figures {
    /// `0..=UTILISATION_CEILING`; a missing (NaN) figure reads as full.
    pub utilisation: f64,
    /// `0..=COST_PER_CONNECTION_CEILING`; a missing (NaN) figure reads as 0.
    pub cost_per_connection: f64,
    /// `SLOW_START_FLOOR..=1`; a missing (NaN) figure reads as 1.
    pub slow_start: f64,
    /// The report these come from.
    pub report_seq: u64,
    /// Place nothing there.
    pub draining: bool,
}

impl Figures {
    fn of(w: &RoutedWorker) -> Figures {
        let sane =
            |x: f64, nan: f64, lo: f64, hi: f64| if x.is_nan() { nan } else { x.clamp(lo, hi) };
        Figures {
            utilisation: sane(w.utilisation, 1.0, 0.0, UTILISATION_CEILING),
            cost_per_connection: sane(w.cost_per_connection, 0.0, 0.0, COST_PER_CONNECTION_CEILING),
            slow_start: sane(w.slow_start, 1.0, SLOW_START_FLOOR, 1.0),
            report_seq: w.report_seq,
            draining: w.draining,
        }
    }
}

/// One worker as this proxy knows it.
#[derive(Debug, Clone)]
pub(super) struct KnownWorker {
    pub id: Arc<str>,
    pub address: Arc<str>,
    /// In the current table, or the static list while there is no table: a candidate unless
    /// draining.
    pub listed: bool,
    /// From the table; `None` for static workers and unlisted ones.
    pub figures: Option<Figures>,
    /// Connections this proxy placed there since it first saw `figures.report_seq`.
    pub placed_since_report: u64,
    /// Connections this proxy has open there now.
    pub open: u64,
    /// Failed dials in a row.
    pub failures: u32,
    /// Left out from `.0` for `.1`, after a failed dial.
    pub down: Option<(Instant, Duration)>,
}

impl KnownWorker {
    /// A worker from the static list: its address is its id.
    pub fn fixed(address: &str) -> KnownWorker {
        let address: Arc<str> = address.into();
        KnownWorker {
            id: address.clone(),
            address,
            listed: true,
            figures: None,
            placed_since_report: 0,
            open: 0,
            failures: 0,
            down: None,
        }
    }

    /// A worker this proxy holds connections to but no longer lists.
    fn unlisted(id: &str) -> KnownWorker {
        KnownWorker {
            listed: false,
            ..KnownWorker::fixed(id)
        }
    }

    /// True when draining: never a candidate.
    pub fn draining(&self) -> bool {
        self.figures.is_some_and(|f| f.draining)
    }

    /// True while a down mark lasts.
    pub fn is_down(&self, now: Instant) -> bool {
        self.down
            .is_some_and(|(since, for_)| now.saturating_duration_since(since) < for_)
    }

    /// A dial failed at `now`: down for `min`, doubled per consecutive failure, at most `max`.
    pub fn failed(&mut self, now: Instant, min: Duration, max: Duration) {
        self.failures = self.failures.saturating_add(1);
        let doublings = 1u32.checked_shl(self.failures - 1).unwrap_or(u32::MAX);
        self.down = Some((now, min.saturating_mul(doublings).min(max)));
    }

    /// A connection was established: counts toward projected load and open connections, and
    /// ends any failure streak.
    pub fn connected(&mut self) {
        self.open = self.open.saturating_add(1);
        if self.figures.is_some() {
            self.placed_since_report = self.placed_since_report.saturating_add(1);
        }
        self.failures = 0;
        self.down = None;
    }
}

/// The sorted, deduplicated list's index of `id`.
pub(super) fn find(known: &[KnownWorker], id: &str) -> Result<usize, usize> {
    known.binary_search_by(|w| (*w.id).cmp(id))
}

/// Records a connection to `id`; an id not known (chosen before a table that dropped it)
/// gets an unlisted entry so its release is counted.
pub(super) fn connected(known: &mut Vec<KnownWorker>, id: &str) {
    let i = match find(known, id) {
        Ok(i) => i,
        Err(i) => {
            known.insert(i, KnownWorker::unlisted(id));
            i
        }
    };
    known[i].connected();
}

/// Records a connection to `id` ending; unknown ids and workers with nothing open are left
/// alone. An unlisted worker is forgotten with its last connection.
pub(super) fn released(known: &mut Vec<KnownWorker>, id: &str) {
    if let Ok(i) = find(known, id) {
        let w = &mut known[i];
        w.open = w.open.saturating_sub(1);
        if w.open == 0 && !w.listed {
            known.remove(i);
        }
    }
}

/// The known workers after `table`: its workers with their figures, keeping this proxy's
/// counts and down marks for those already known (placements since the report only while
/// `report_seq` is unchanged); workers no longer listed keep only their open connections.
pub(super) fn merge(previous: Vec<KnownWorker>, table: &RoutingTable) -> Vec<KnownWorker> {
    let mut next: Vec<KnownWorker> = Vec::with_capacity(table.workers.len());
    for row in &table.workers {
        let figures = Figures::of(row);
        let w = match find(&previous, &row.id) {
            Ok(i) => {
                let p = &previous[i];
                let same_report = p.figures.is_some_and(|f| f.report_seq == row.report_seq);
                KnownWorker {
                    id: p.id.clone(),
                    address: if *p.address == *row.address {
                        p.address.clone()
                    } else {
                        row.address.as_str().into()
                    },
                    listed: true,
                    figures: Some(figures),
                    placed_since_report: if same_report {
                        p.placed_since_report
                    } else {
                        0
                    },
                    ..p.clone()
                }
            }
            Err(_) => KnownWorker {
                address: row.address.as_str().into(),
                figures: Some(figures),
                ..KnownWorker::fixed(&row.id)
            },
        };
        next.push(w);
    }
    // Herald orders by id; a table that does not (or repeats an id) must not break lookups.
    next.sort_by(|a, b| a.id.cmp(&b.id));
    next.dedup_by(|a, b| a.id == b.id);
    let listed = next.len();
    for p in previous {
        if p.open > 0 && find(&next[..listed], &p.id).is_err() {
            next.push(KnownWorker {
                listed: false,
                figures: None,
                placed_since_report: 0,
                failures: 0,
                down: None,
                ..p
            });
        }
    }
    if next.len() > listed {
        next.sort_by(|a, b| a.id.cmp(&b.id));
    }
    next
}

/// Mean utilisation of the listed workers that take connections (0 when there are none):
/// what a stale table's figures decay toward.
pub(super) fn mean_utilisation(known: &[KnownWorker]) -> f64 {
    let (sum, n) = known
        .iter()
        .filter(|w| w.listed)
        .filter_map(|w| w.figures)
        .filter(|f| !f.draining)
        .fold((0.0, 0u32), |(s, n), f| (s + f.utilisation, n + 1));
    if n == 0 {
        0.0
    } else {
        sum / f64::from(n)
    }
}
