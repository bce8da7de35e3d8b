//! Scale decisions: target tracking on warm workers' utilisation, with windows, cooldowns and
//! hysteresis so a spike or an oscillation moves nothing. Pure: `now` comes with each sample,
//! so two heralds fed the same reports decide the same thing.
//!
//! - **Out**: the warm workers' mean utilisation has stayed above `scale_out_above` for
//!   `scale_out_window` → desired = `ceil(total load / target)` (at least one more). Workers
//!   still warming are left out of the mean (their idleness must not hide hot ones) but their
//!   load counts in the total, so a scale-out is not repeated while new workers warm up.
//! - **In**: the mean has stayed below `scale_in_below` for `scale_in_window`, the hottest
//!   `hot_fraction` of workers are below `hot_below`, nobody is warming or draining, and the
//!   fleet would still be at or under target without one worker → drain one worker, the one
//!   with the fewest connections (cheapest to drain), and start the window again.
//! - Cooldowns after every action, and `min_workers..=max_workers` always.

use std::time::{Duration, Instant};

/// The scaling policy.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalePolicy {
    /// Utilisation a scale-out aims for.
    pub target: f64,
    /// Mean utilisation above which the fleet is too small.
    pub scale_out_above: f64,
    /// How long it must stay above before scaling out.
    pub scale_out_window: Duration,
    /// Mean utilisation below which the fleet may be too big.
    pub scale_in_below: f64,
    /// How long it must stay below before scaling in.
    pub scale_in_window: Duration,
    /// Share of workers that make "the hottest" (at least one).
    pub hot_fraction: f64,
    /// The hottest workers must all be below this to scale in.
    pub hot_below: f64,
    /// No scale-out this soon after any scale action.
    pub scale_out_cooldown: Duration,
    /// No scale-in this soon after any scale action.
    pub scale_in_cooldown: Duration,
    /// Fewest workers.
    pub min_workers: u32,
    /// Most workers.
    pub max_workers: u32,
}

impl Default for ScalePolicy {
    fn default() -> Self {
        ScalePolicy {
            target: 0.6,
            scale_out_above: 0.7,
            scale_out_window: Duration::from_secs(60),
            scale_in_below: 0.45,
            scale_in_window: Duration::from_secs(300),
            hot_fraction: 0.1,
            hot_below: 0.6,
            scale_out_cooldown: Duration::from_secs(120),
            scale_in_cooldown: Duration::from_secs(300),
            min_workers: 1,
            max_workers: 100,
        }
    }
}

/// One worker as the scaler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// Its id.
    pub id: String,
    /// Smoothed utilisation.
    pub utilisation: f64,
    /// Connections.
    pub connections: u64,
    /// Warm: trusted long enough to count in the mean.
    pub warm: bool,
    /// Being drained (counts in nothing).
    pub draining: bool,
}

/// What the scaler decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Grow the fleet to `desired`.
    Out {
        /// The new fleet size.
        desired: u32,
        /// Why, for logs and the status page.
        reason: String,
    },
    /// Drain `drain` and shrink the fleet to `desired`.
    In {
        /// The new fleet size.
        desired: u32,
        /// The worker to drain.
        drain: String,
        /// Why.
        reason: String,
    },
}

/// The decision engine's memory: windows and the last action.
#[derive(Debug, Clone)]
pub struct Scaler {
    /// The policy.
    pub policy: ScalePolicy,
    desired: Option<u32>,
    above_since: Option<Instant>,
    below_since: Option<Instant>,
    last_action: Option<Instant>,
}

/// Where the scaler stands, for the status page.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ScalerState {
    /// The fleet size herald wants (unknown until the first sample).
    pub desired: Option<u32>,
    /// How long the mean has been above `scale_out_above`, seconds.
    pub above_for_s: Option<f64>,
    /// How long the mean has been below `scale_in_below` (with cool hottest workers), seconds.
    pub below_for_s: Option<f64>,
    /// Time since the last action, seconds.
    pub since_last_action_s: Option<f64>,
}

impl Scaler {
    /// A scaler with no history.
    pub fn new(policy: ScalePolicy) -> Self {
        Scaler {
            policy,
            desired: None,
            above_since: None,
            below_since: None,
            last_action: None,
        }
    }

    /// The fleet size herald wants, once known.
    pub fn desired(&self) -> Option<u32> {
        self.desired
    }

    /// Where the windows stand at `now`.
    pub fn state(&self, now: Instant) -> ScalerState {
        let since = |t: Option<Instant>| t.map(|t| now.saturating_duration_since(t).as_secs_f64());
        ScalerState {
            desired: self.desired,
            above_for_s: since(self.above_since),
            below_for_s: since(self.below_since),
            since_last_action_s: since(self.last_action),
        }
    }

    /// Looks at the fleet at `now` and decides, at most one action.
    pub fn decide(&mut self, members: &[Member], now: Instant) -> Option<Decision> {
        let p = &self.policy;
        let live: Vec<&Member> = members.iter().filter(|m| !m.draining).collect();
        let live_count = live.len() as u32;
        // Herald's wish never falls below what runs: workers can be added by others.
        let desired = self.desired.unwrap_or(0).max(live_count);
        self.desired = Some(desired.clamp(p.min_workers, p.max_workers.max(p.min_workers)));
        let mut warm: Vec<f64> = live
            .iter()
            .filter(|m| m.warm)
            .map(|m| m.utilisation)
            .collect();
        if warm.is_empty() {
            self.above_since = None;
            self.below_since = None;
            return None;
        }
        warm.sort_by(|a, b| b.total_cmp(a));
        let mean = warm.iter().sum::<f64>() / warm.len() as f64;
        let total: f64 = live.iter().map(|m| m.utilisation).sum();
        let hottest_n = ((warm.len() as f64 * p.hot_fraction).ceil() as usize).max(1);
        let hottest = warm[..hottest_n].iter().copied().fold(0.0, f64::max);

        if mean > p.scale_out_above {
            self.above_since.get_or_insert(now);
        } else {
            self.above_since = None;
        }
        if mean < p.scale_in_below && hottest < p.hot_below {
            self.below_since.get_or_insert(now);
        } else {
            self.below_since = None;
        }
        let cooled = |cooldown: Duration| {
            self.last_action
                .is_none_or(|t| now.saturating_duration_since(t) >= cooldown)
        };
        let held = |since: Option<Instant>, window: Duration| {
            since.is_some_and(|t| now.saturating_duration_since(t) >= window)
        };
        let current = self.desired.expect("set above");

        if held(self.above_since, p.scale_out_window) && cooled(p.scale_out_cooldown) {
            let wanted = (total / p.target).ceil() as u32;
            let next = wanted.max(current + 1).min(p.max_workers);
            if next > current {
                self.desired = Some(next);
                self.last_action = Some(now);
                self.above_since = None;
                return Some(Decision::Out {
                    desired: next,
                    reason: format!(
                        "mean utilisation {mean:.2} of {} warm workers above {:.2} for {:?}; \
                         load {total:.2} at target {:.2} needs {wanted}",
                        warm.len(),
                        p.scale_out_above,
                        p.scale_out_window,
                        p.target
                    ),
                });
            }
        }

        let warming = live.iter().any(|m| !m.warm);
        let draining = members.iter().any(|m| m.draining);
        if held(self.below_since, p.scale_in_window)
            && cooled(p.scale_in_cooldown)
            && !warming
            && !draining
            && live_count > p.min_workers
            && total / (live_count - 1) as f64 <= p.target
        {
            let victim = live
                .iter()
                .min_by(|a, b| a.connections.cmp(&b.connections).then(a.id.cmp(&b.id)))
                .expect("live is not empty");
            let next = live_count - 1;
            self.desired = Some(next);
            self.last_action = Some(now);
            self.below_since = None;
            return Some(Decision::In {
                desired: next,
                drain: victim.id.clone(),
                reason: format!(
                    "mean utilisation {mean:.2} below {:.2} and hottest {hottest:.2} below {:.2} \
                     for {:?}; {} workers carry load {total:.2} at ≤ {:.2}; {} has the fewest \
                     connections ({})",
                    p.scale_in_below,
                    p.hot_below,
                    p.scale_in_window,
                    next,
                    p.target,
                    victim.id,
                    victim.connections
                ),
            });
        }
        None
    }
}

#[cfg(test)]
mod tests;
