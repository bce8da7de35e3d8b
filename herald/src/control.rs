//! The control state: the fleet, the scaler, drains in progress, recent decisions and the
//! routing table's versions. Pure: the caller passes `now` (monotonic) and the wall clock;
//! the async parts ([`crate::server`], [`crate::actuate`]) lock it briefly and act on what it
//! says.
//!
//! A scale-in's life here: the scaler picks a worker → [`Drain`] job, the worker is marked
//! draining (the table flags it, its report replies say `drain: true`) → the worker reports
//! itself draining with connections falling → empty (or gone, or the drain timed out) →
//! `finish` → the actuator removes it → the job ends and the worker is retired: it counts in
//! nothing until it stops reporting and expires.

use crate::actuator::Target;
use crate::fleet::{DrainCause, Fleet, Recorded, Tracked};
use crate::scale::{Decision, Member, Scaler};
use protocol::load::{LoadReport, ReportReply, WorkerState, REPORT_VERSION};
use protocol::routing::{RoutedWorker, RoutingTable, TABLE_VERSION};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Decisions kept for the status page.
const RECENT_DECISIONS: usize = 100;

/// Settings of the control state that are not the fleet's or the scaler's.
#[derive(Debug, Clone)]
pub struct ControlSettings {
    /// No scale decision this soon after start.
    pub startup_grace: Duration,
    /// Interval between "still draining" actuator calls.
    pub drain_heartbeat: Duration,
    /// A drain is finished anyway after this long.
    pub drain_timeout: Duration,
    /// The workers' report interval, for the table.
    pub report_interval: Duration,
}

/// A worker being drained for scale-in.
#[derive(Debug, Clone, Serialize)]
pub struct Drain {
    /// Who.
    pub target: Target,
    /// Fleet size without it.
    pub desired: u32,
    /// When herald chose it (seconds since herald started, for the status page).
    #[serde(skip)]
    pub started: Instant,
    /// The actuator has been told the drain started.
    pub announced: bool,
    /// Last time the actuator was told it is still draining.
    #[serde(skip)]
    pub last_progress: Option<Instant>,
    /// Why it may be removed now (`empty`, `gone`, `timeout`), once it may.
    pub finish: Option<&'static str>,
}

/// One decision, for logs, metrics and the status page.
#[derive(Debug, Clone, Serialize)]
pub struct DecisionRecord {
    /// Unix milliseconds.
    pub at_ms: u64,
    /// `scale_out`, `scale_in`, `expired`, `drained`.
    pub action: &'static str,
    /// Fleet size herald wants after it, when it changed.
    pub desired: Option<u32>,
    /// The worker it is about, if one.
    pub worker: Option<String>,
    /// Why.
    pub reason: String,
}

/// What the actuator should be doing, derived from the state (level-triggered).
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    /// Grow the fleet.
    SetDesired(u32, String),
    /// Tell it a drain started.
    DrainStarted(Target, u32),
    /// Tell it a drain goes on.
    DrainProgress(Target),
    /// Remove a drained worker.
    Drained(Target),
}

/// Everything herald knows and wants.
pub struct Control {
    /// The settings.
    pub settings: ControlSettings,
    /// The workers.
    pub fleet: Fleet,
    /// The decision engine.
    pub scaler: Scaler,
    /// Drains in progress, by worker id.
    pub drains: BTreeMap<String, Drain>,
    /// Workers whose drain finished; they count in nothing until they expire.
    pub retired: BTreeSet<String>,
    /// Recent decisions, oldest first.
    pub decisions: VecDeque<DecisionRecord>,
    /// Decisions made since start (the recent ones are the last of them).
    pub decisions_made: u64,
    /// Desired count the actuator was last asked for successfully.
    pub desired_applied: Option<u32>,
    /// Desired count to ask the actuator for, with the reason.
    pub desired_wanted: Option<(u32, String)>,
    started: Instant,
    generation: u64,
    table: Arc<RoutingTable>,
}

impl Control {
    /// A fresh state; `generation` identifies this herald process in its tables.
    pub fn new(
        settings: ControlSettings,
        fleet: Fleet,
        scaler: Scaler,
        generation: u64,
        now: Instant,
    ) -> Self {
        let table = Arc::new(RoutingTable {
            format: TABLE_VERSION,
            generation,
            version: 0,
            built_at_ms: 0,
            report_interval_ms: settings.report_interval.as_millis() as u64,
            workers: Vec::new(),
        });
        Control {
            settings,
            fleet,
            scaler,
            drains: BTreeMap::new(),
            retired: BTreeSet::new(),
            decisions: VecDeque::new(),
            decisions_made: 0,
            desired_applied: None,
            desired_wanted: None,
            started: now,
            generation,
            table,
        }
    }

    /// Takes a checked report and says what to answer.
    pub fn report(&mut self, report: LoadReport, now: Instant) -> (ReportReply, Recorded) {
        let id = report.worker.id.clone();
        let recorded = self.fleet.record(report, now);
        let reply = ReportReply {
            version: REPORT_VERSION,
            drain: recorded.drain,
            peers: self.fleet.peers_of(&id),
        };
        (reply, recorded)
    }

    /// The current routing table.
    pub fn table(&self) -> Arc<RoutingTable> {
        self.table.clone()
    }

    /// Time since herald started.
    pub fn uptime(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.started)
    }

    /// One step: expire silent workers, decide, follow drains, rebuild the table. Returns the
    /// expired workers and whether the table changed.
    pub fn tick(&mut self, now: Instant, unix_ms: u64) -> (Vec<Tracked>, bool) {
        let expired = self.fleet.expire(now);
        for t in &expired {
            let id = &t.report.worker.id;
            self.retired.remove(id);
            self.record(
                unix_ms,
                "expired",
                None,
                Some(id.clone()),
                format!(
                    "no report for {} intervals of {} ms",
                    self.fleet.settings.expire_after_intervals, t.report.interval_ms
                ),
            );
        }
        if self.uptime(now) >= self.settings.startup_grace {
            let members = self.members(now);
            if let Some(decision) = self.scaler.decide(&members, now) {
                self.apply(decision, now, unix_ms);
            }
        }
        for (id, drain) in self.drains.iter_mut() {
            if drain.finish.is_some() {
                continue;
            }
            drain.finish = match self.fleet.get(id) {
                None => Some("gone"),
                Some(t) if t.report.state == WorkerState::Draining && t.report.connections == 0 => {
                    Some("empty")
                }
                _ if now.saturating_duration_since(drain.started)
                    >= self.settings.drain_timeout =>
                {
                    Some("timeout")
                }
                _ => None,
            };
        }
        let changed = self.rebuild_table(now, unix_ms);
        (expired, changed)
    }

    /// The scaler's view: trusted workers that are not retired; a worker draining on its own
    /// counts as draining only while it still has clients.
    fn members(&self, now: Instant) -> Vec<Member> {
        self.fleet
            .trusted()
            .filter(|t| !self.retired.contains(&t.report.worker.id))
            .filter(|t| {
                !matches!(t.drain, Some((DrainCause::Worker, _))) || t.report.connections > 0
            })
            .map(|t| Member {
                id: t.report.worker.id.clone(),
                utilisation: t.utilisation,
                connections: t.report.connections,
                warm: self.fleet.warm(t, now),
                draining: t.draining(),
            })
            .collect()
    }

    fn apply(&mut self, decision: Decision, now: Instant, unix_ms: u64) {
        match decision {
            Decision::Out { desired, reason } => {
                self.desired_wanted = Some((desired, reason.clone()));
                self.record(unix_ms, "scale_out", Some(desired), None, reason);
            }
            Decision::In {
                desired,
                drain,
                reason,
            } => {
                if !self.fleet.start_drain(&drain, now) {
                    return;
                }
                let instance_id = self
                    .fleet
                    .get(&drain)
                    .and_then(|t| t.report.worker.instance_id.clone());
                self.drains.insert(
                    drain.clone(),
                    Drain {
                        target: Target {
                            worker_id: drain.clone(),
                            instance_id,
                        },
                        desired,
                        started: now,
                        announced: false,
                        last_progress: None,
                        finish: None,
                    },
                );
                self.record(unix_ms, "scale_in", Some(desired), Some(drain), reason);
            }
        }
    }

    fn record(
        &mut self,
        at_ms: u64,
        action: &'static str,
        desired: Option<u32>,
        worker: Option<String>,
        reason: String,
    ) {
        tracing::info!(action, ?desired, worker = worker.as_deref().unwrap_or("-"), %reason, "decision");
        if self.decisions.len() == RECENT_DECISIONS {
            self.decisions.pop_front();
        }
        self.decisions_made += 1;
        self.decisions.push_back(DecisionRecord {
            at_ms,
            action,
            desired,
            worker,
            reason,
        });
    }

    /// The actuator calls due now, in order: growth first, then each drain's next step.
    pub fn due_calls(&self, now: Instant) -> Vec<Call> {
        let mut calls = Vec::new();
        if let Some((wanted, reason)) = &self.desired_wanted {
            if self.desired_applied != Some(*wanted) {
                calls.push(Call::SetDesired(*wanted, reason.clone()));
            }
        }
        for drain in self.drains.values() {
            let call = if !drain.announced {
                Call::DrainStarted(drain.target.clone(), drain.desired)
            } else if drain.finish.is_some() {
                Call::Drained(drain.target.clone())
            } else if drain
                .last_progress
                .is_none_or(|t| now.saturating_duration_since(t) >= self.settings.drain_heartbeat)
            {
                Call::DrainProgress(drain.target.clone())
            } else {
                continue;
            };
            calls.push(call);
        }
        calls
    }

    /// Notes that `call` succeeded.
    pub fn call_done(&mut self, call: &Call, now: Instant, unix_ms: u64) {
        match call {
            Call::SetDesired(n, _) => self.desired_applied = Some(*n),
            Call::DrainStarted(t, _) => {
                if let Some(d) = self.drains.get_mut(&t.worker_id) {
                    d.announced = true;
                    d.last_progress = Some(now);
                }
            }
            Call::DrainProgress(t) => {
                if let Some(d) = self.drains.get_mut(&t.worker_id) {
                    d.last_progress = Some(now);
                }
            }
            Call::Drained(t) => {
                if let Some(d) = self.drains.remove(&t.worker_id) {
                    let why = d.finish.unwrap_or("empty");
                    if self.fleet.get(&t.worker_id).is_some() {
                        self.retired.insert(t.worker_id.clone());
                    }
                    self.record(
                        unix_ms,
                        "drained",
                        None,
                        Some(t.worker_id.clone()),
                        format!(
                            "drain finished ({why}) after {:?}; worker removed",
                            now.saturating_duration_since(d.started)
                        ),
                    );
                }
            }
        }
    }

    /// Rebuilds the table; bumps its version when anything but report ages changed.
    fn rebuild_table(&mut self, now: Instant, unix_ms: u64) -> bool {
        let workers: Vec<RoutedWorker> = self
            .fleet
            .routed(now)
            .into_iter()
            .map(|mut w| {
                // A retired worker is still in the fleet until it expires; keep it flagged.
                w.draining |= self.retired.contains(&w.id);
                w
            })
            .collect();
        let same = |a: &RoutedWorker, b: &RoutedWorker| {
            RoutedWorker {
                report_age_ms: 0,
                ..a.clone()
            } == RoutedWorker {
                report_age_ms: 0,
                ..b.clone()
            }
        };
        let old = &self.table.workers;
        let changed =
            old.len() != workers.len() || old.iter().zip(&workers).any(|(a, b)| !same(a, b));
        if changed || self.table.version == 0 {
            self.table = Arc::new(RoutingTable {
                format: TABLE_VERSION,
                generation: self.generation,
                version: self.table.version + 1,
                built_at_ms: unix_ms,
                report_interval_ms: self.settings.report_interval.as_millis() as u64,
                workers,
            });
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests;
