//! Placement: which worker takes the next connection. Pure: `now` is passed in, randomness
//! comes from a seeded generator the caller owns.
//!
//! THE API BELOW IS FIXED (the connection path calls it); the bodies are a first, naive
//! version to be replaced by power-of-two choices on projected utilisation, staleness decay
//! and local least-connections fallback.

use protocol::routing::RoutingTable;
use rand::Rng;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How placement behaves.
#[derive(Debug, Clone)]
pub struct PlaceSettings {
    /// Workers to use before herald has ever answered (and while it never has), `host:port`.
    pub static_workers: Vec<String>,
    /// A table older than this (since it was received, plus its report ages) starts decaying
    /// toward equal weights.
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
}

impl Placer {
    /// A placer with no table yet.
    pub fn new(settings: PlaceSettings) -> Self {
        Placer {
            settings,
            table: None,
        }
    }

    /// A new table from herald, received at `now`.
    pub fn update(&mut self, table: Arc<RoutingTable>, now: Instant) {
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

    /// Chooses a worker for a new connection, leaving out `exclude` (workers already tried
    /// for this connection) and workers marked down. `None`: no worker at all.
    pub fn choose(
        &mut self,
        now: Instant,
        rng: &mut impl Rng,
        exclude: &[Arc<str>],
    ) -> Option<(Choice, Mode)> {
        let mode = self.mode(now);
        let candidates: Vec<Choice> = match &self.table {
            Some((t, _)) => t
                .eligible()
                .map(|w| Choice {
                    id: w.id.as_str().into(),
                    address: w.address.as_str().into(),
                })
                .collect(),
            None => self
                .settings
                .static_workers
                .iter()
                .map(|a| Choice {
                    id: a.as_str().into(),
                    address: a.as_str().into(),
                })
                .collect(),
        };
        let candidates: Vec<Choice> = candidates
            .into_iter()
            .filter(|c| !exclude.contains(&c.id))
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let i = rng.random_range(0..candidates.len());
        Some((candidates[i].clone(), mode))
    }

    /// A connection to `id` was established (counts toward its projected load and this
    /// proxy's open connections to it).
    pub fn connected(&mut self, id: &str, now: Instant) {
        let _ = (id, now);
    }

    /// A connection to `id` ended.
    pub fn released(&mut self, id: &str) {
        let _ = id;
    }

    /// Dialing `id` failed (refused or timed out): leave it out for a while, longer each
    /// consecutive time.
    pub fn failed(&mut self, id: &str, now: Instant) {
        let _ = (id, now);
    }
}
