//! Placement: which worker takes the next connection. Pure: `now` is passed in, randomness
//! comes from a generator the caller owns.
//!
//! Connections are not equal work, so placement follows the load workers *report* (through
//! herald's routing table), not connection counts — until there is no table to trust:
//!
//! ```text
//! table age (since received)   mode       power of two choices on
//! ─────────────────────────    ────────   ───────────────────────────────────────────────
//! < stale_after                Fresh      projected utilisation  u + k·Δ/s
//! < fallback_after             Stale      the same, u and s blended toward equal figures
//!                                         linearly with age
//! ≥ fallback_after             Fallback   this proxy's open connections, last table's workers
//! no table ever                Static     this proxy's open connections, static list
//! ```
//!
//! `Δ` counts the connections this proxy placed on a worker since it first saw the worker's
//! current `report_seq` (see `p2c::Load` for the formula and why slow start and staleness
//! enter as they do, and `p2c` for why two random choices rather than the least loaded).
//!
//! Candidates are listed, not draining, not in `exclude`, and not marked down after a failed
//! dial. If only down workers remain they are used anyway: herald being away or every worker
//! flapping must never turn into refusing clients. `None` means no worker at all.
//!
//! Files: `known` (per-worker state and how a new table merges into it), `p2c` (the
//! choice), `tests` (unit and property tests).

mod known;
mod p2c;
#[cfg(test)]
mod tests;

use known::KnownWorker;
use p2c::Load;
use protocol::routing::RoutingTable;
use rand::Rng;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use known::{COST_PER_CONNECTION_CEILING, SLOW_START_FLOOR, UTILISATION_CEILING};

/// How placement behaves.
#[derive(Debug, Clone)]
pub struct PlaceSettings {
    /// Workers to use before herald has ever answered (and while it never has), `host:port`.
    pub static_workers: Vec<String>,
    /// A table received longer ago than this starts decaying toward equal weights, reaching
    /// them at `fallback_after`.
    pub stale_after: Duration,
    /// After this long without a fresh table, placement is local least-connections over the
    /// last known workers.
    pub fallback_after: Duration,
    /// First time a worker that refused or timed out a connect is left out; doubles per
    /// consecutive failure.
    pub down_min: Duration,
    /// Longest time a worker is left out after failures.
    pub down_max: Duration,
}

impl Default for PlaceSettings {
    fn default() -> Self {
        PlaceSettings {
            static_workers: Vec::new(),
            stale_after: Duration::from_secs(6),
            fallback_after: Duration::from_secs(30),
            down_min: Duration::from_millis(500),
            down_max: Duration::from_secs(30),
        }
    }
}

/// The worker chosen for one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// The worker's id (its address for static workers).
    pub id: Arc<str>,
    /// Where to dial, `host:port`.
    pub address: Arc<str>,
}

/// How the choice was made, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A fresh table: power of two choices on projected utilisation.
    Fresh,
    /// A stale table, decaying toward equal weights.
    Stale,
    /// No usable table: least connections (this proxy's own) over the last known workers.
    Fallback,
    /// Herald never answered: the static worker list.
    Static,
}

/// Placement state: the latest table, this proxy's placements since each worker's report,
/// its open connections per worker, and workers marked down locally.
#[derive(Debug)]
pub struct Placer {
    settings: PlaceSettings,
    table: Option<(Arc<RoutingTable>, Instant)>,
    /// Sorted by id: the table's workers (or the static list), plus unlisted workers this
    /// proxy still has connections to.
    known: Vec<KnownWorker>,
    /// Mean utilisation of the table's workers taking connections.
    mean_utilisation: f64,
    /// Reused by every choice.
    candidates: Vec<usize>,
}

impl Placer {
    /// A placer with no table yet.
    pub fn new(settings: PlaceSettings) -> Self {
        let mut known: Vec<KnownWorker> = settings
            .static_workers
            .iter()
            .map(|a| KnownWorker::fixed(a))
            .collect();
        known.sort_by(|a, b| a.id.cmp(&b.id));
        known.dedup_by(|a, b| a.id == b.id);
        Placer {
            candidates: Vec::with_capacity(known.len()),
            settings,
            table: None,
            known,
            mean_utilisation: 0.0,
        }
    }

    /// A new table from herald, received at `now`. An empty table never replaces known
    /// workers (from a table or `--worker`): a herald that just started or restarted trusts
    /// nobody for a report or two, while the workers are there; an old table ages as if
    /// herald were away, and the static list goes on being used.
    pub fn update(&mut self, table: Arc<RoutingTable>, now: Instant) {
        if table.workers.is_empty() && !self.known.is_empty() {
            return;
        }
        self.known = known::merge(std::mem::take(&mut self.known), &table);
        self.mean_utilisation = known::mean_utilisation(&self.known);
        self.candidates.reserve(self.known.len());
        self.table = Some((table, now));
    }

    /// The table in use and when it arrived, if any.
    pub fn table(&self) -> Option<(&RoutingTable, Instant)> {
        self.table.as_ref().map(|(t, at)| (&**t, *at))
    }

    /// How the next choice would be made at `now`.
    pub fn mode(&self, now: Instant) -> Mode {
        match &self.table {
            None => Mode::Static,
            Some((_, at)) if now.saturating_duration_since(*at) < self.settings.stale_after => {
                Mode::Fresh
            }
            Some((_, at)) if now.saturating_duration_since(*at) < self.settings.fallback_after => {
                Mode::Stale
            }
            Some(_) => Mode::Fallback,
        }
    }

    /// How far the table at `now` has decayed toward equal weights: 0 until `stale_after`,
    /// 1 at `fallback_after` (and without a table), linear between.
    pub fn staleness(&self, now: Instant) -> f64 {
        let Some((_, at)) = &self.table else {
            return 1.0;
        };
        let age = now.saturating_duration_since(*at).as_secs_f64();
        let stale = self.settings.stale_after.as_secs_f64();
        let span = self.settings.fallback_after.as_secs_f64() - stale;
        if span <= 0.0 {
            return if age < stale { 0.0 } else { 1.0 };
        }
        ((age - stale) / span).clamp(0.0, 1.0)
    }

    /// Chooses a worker for a new connection, leaving out `exclude` (workers already tried
    /// for this connection) and workers marked down. `None`: no worker at all.
    pub fn choose(
        &mut self,
        now: Instant,
        rng: &mut impl Rng,
        exclude: &[Arc<str>],
    ) -> Option<(Choice, Mode)> {
        let mode = self.mode(now);
        let load = match mode {
            Mode::Fresh | Mode::Stale => Load::Projected {
                staleness: self.staleness(now),
                mean_utilisation: self.mean_utilisation,
            },
            Mode::Fallback | Mode::Static => Load::OpenConnections,
        };
        let i = p2c::choose(&self.known, exclude, now, load, &mut self.candidates, rng)?;
        let w = &self.known[i];
        Some((
            Choice {
                id: w.id.clone(),
                address: w.address.clone(),
            },
            mode,
        ))
    }

    /// A connection to `id` was established (counts toward its projected load and this
    /// proxy's open connections to it).
    pub fn connected(&mut self, id: &str, now: Instant) {
        let _ = now; // a success ends the down mark whenever it happened
        known::connected(&mut self.known, id);
    }

    /// A connection to `id` ended.
    pub fn released(&mut self, id: &str) {
        known::released(&mut self.known, id);
    }

    /// Dialing `id` failed (refused or timed out): leave it out for a while, longer each
    /// consecutive time.
    pub fn failed(&mut self, id: &str, now: Instant) {
        if let Ok(i) = known::find(&self.known, id) {
            let s = &self.settings;
            self.known[i].failed(now, s.down_min, s.down_max);
        }
    }

    /// Connections this proxy has open to `id` (for metrics).
    pub fn open_connections(&self, id: &str) -> u64 {
        known::find(&self.known, id).map_or(0, |i| self.known[i].open)
    }
}
