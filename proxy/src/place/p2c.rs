//! Power of two choices: draw two distinct candidates at random, keep the less loaded.
//!
//! Why not the least loaded of all: every proxy sees the same table, so "the global minimum"
//! sends every proxy's whole burst to one worker until the next report corrects it (herding),
//! and a stale table never corrects it. Two random draws still favour light workers, but a
//! worker wins at most the draws it appears in: about `2/n` of all choices, whatever the
//! figures say. The projected figure then closes the gap within one proxy's burst.

use super::known::KnownWorker;
use rand::Rng;
use std::sync::Arc;
use std::time::Instant;

/// What "less loaded" means.
#[derive(Debug, Clone, Copy)]
pub(super) enum Load {
    /// Herald's figures corrected for this proxy's placements since each report:
    ///
    /// `u' + k · Δ / s'`, with `u' = u + staleness · (ū − u)` and
    /// `s' = s + staleness · (1 − s)`
    ///
    /// where `u` is the reported utilisation, `k` the cost per connection, `Δ` the connections
    /// this proxy placed there since the report, `s` the slow-start factor and `ū` the mean
    /// utilisation of the workers taking connections.
    ///
    /// **Slow start divides the placement term only.** A worker at slow start `s` counts each
    /// connection placed on it as `1/s` connections, as if it had `s` of its capacity: for the
    /// same rise of the fleet's projected level it takes `s` times the connections an equal
    /// peer takes (the proportion of herald's `weight`). Dividing the whole figure would also
    /// multiply the load the worker already carries: a worker at 0.5 in slow start 0.5 would
    /// read as full and take nothing rather than half.
    ///
    /// **Staleness** (0 fresh .. 1 at the fallback age) blends the reported figures toward
    /// equal ones, because a worker's load moves on without us seeing it. `Δ` is not blended:
    /// this proxy's own placements are never stale, so as a table ages the choice rests more
    /// and more on them, nearing the fallback's least-connections.
    Projected {
        /// 0..=1.
        staleness: f64,
        /// `ū` above.
        mean_utilisation: f64,
    },
    /// This proxy's own open connections.
    OpenConnections,
}

impl Load {
    /// The figure compared: lower takes the connection.
    pub fn of(self, w: &KnownWorker) -> f64 {
        match (self, w.figures) {
            (
                Load::Projected {
                    staleness,
                    mean_utilisation,
                },
                Some(f),
            ) => {
                let utilisation = f.utilisation + staleness * (mean_utilisation - f.utilisation);
                let slow_start = f.slow_start + staleness * (1.0 - f.slow_start);
                utilisation + f.cost_per_connection * w.placed_since_report as f64 / slow_start
            }
            // Never met in practice: listed workers have figures whenever there is a table.
            (Load::Projected { .. }, None) | (Load::OpenConnections, _) => w.open as f64,
        }
    }
}

/// The index in `known` of the worker for the next connection, `None` when no listed worker
/// that is not draining is outside `exclude`. Workers marked down are left out unless every
/// other candidate is too: a down mark is a preference, not a refusal. `candidates` is
/// scratch space, reused so a choice allocates nothing. O(workers × excluded).
pub(super) fn choose(
    known: &[KnownWorker],
    exclude: &[Arc<str>],
    now: Instant,
    load: Load,
    candidates: &mut Vec<usize>,
    rng: &mut impl Rng,
) -> Option<usize> {
    let open = |w: &KnownWorker| w.listed && !w.draining() && !exclude.iter().any(|e| **e == *w.id);
    candidates.clear();
    candidates.extend(
        known
            .iter()
            .enumerate()
            .filter(|(_, w)| open(w) && !w.is_down(now))
            .map(|(i, _)| i),
    );
    if candidates.is_empty() {
        candidates.extend(
            known
                .iter()
                .enumerate()
                .filter(|(_, w)| open(w))
                .map(|(i, _)| i),
        );
    }
    match candidates.len() {
        0 => None,
        1 => Some(candidates[0]),
        n => {
            let a = rng.random_range(0..n);
            let b = rng.random_range(0..n - 1);
            let (a, b) = (candidates[a], candidates[if b >= a { b + 1 } else { b }]);
            // Ties go to the first draw, itself uniform.
            Some(if load.of(&known[b]) < load.of(&known[a]) {
                b
            } else {
                a
            })
        }
    }
}
