//! The fleet as herald sees it: every worker's latest report, smoothed utilisation, trust
//! (enough reports), slow start, drain marks and expiry. Pure: `now` is passed in.
//!
//! A worker's age is what herald saw of it or what its report sequence says (`seq` counts
//! reports since the worker process started), whichever is more, so a herald that restarts
//! does not put the whole fleet back into slow start.

use crate::score::{self, Capacities, Score};
use protocol::load::{LoadReport, WorkerState};
use protocol::routing::RoutedWorker;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How herald judges workers.
#[derive(Debug, Clone)]
pub struct FleetSettings {
    /// Reports a worker must send before it is trusted with connections.
    pub min_reports: u64,
    /// A worker silent for this many of its report intervals is expired.
    pub expire_after_intervals: u32,
    /// Time constant of utilisation smoothing.
    pub smoothing: Duration,
    /// A trusted worker's weight ramps from `slow_start_floor` to 1 over this window.
    pub slow_start: Duration,
    /// Weight of a worker at the very start of its slow start.
    pub slow_start_floor: f64,
    /// A worker counts in scale decisions once trusted for this long (so just-added idle
    /// workers do not hide hot ones).
    pub warmup: Duration,
    /// Lowest routing weight, so an overloaded fleet is never drained entirely.
    pub weight_floor: f64,
    /// Resource capacities.
    pub capacities: Capacities,
}

impl Default for FleetSettings {
    fn default() -> Self {
        FleetSettings {
            min_reports: 2,
            expire_after_intervals: 3,
            smoothing: Duration::from_secs(10),
            slow_start: Duration::from_secs(30),
            slow_start_floor: 0.1,
            warmup: Duration::from_secs(60),
            weight_floor: 0.01,
            capacities: Capacities::default(),
        }
    }
}

/// Why a worker is being drained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DrainCause {
    /// Herald chose it for scale-in; it stays chosen if its process restarts.
    ScaleIn,
    /// The worker reported it is draining (a signal, or an operator's `POST /drain`).
    Worker,
}

/// One worker.
#[derive(Debug, Clone)]
pub struct Tracked {
    /// Its latest report.
    pub report: LoadReport,
    /// Score of the latest report.
    pub score: Score,
    /// Smoothed utilisation.
    pub utilisation: f64,
    /// Reports received from this worker process.
    pub reports: u64,
    /// When herald first heard from this worker process.
    pub first_seen: Instant,
    /// When the latest report arrived.
    pub last_report: Instant,
    /// Set while it is draining.
    pub drain: Option<(DrainCause, Instant)>,
}

impl Tracked {
    /// Trusted with connections: enough reports, not starting.
    pub fn trusted(&self, min_reports: u64) -> bool {
        self.reports.max(self.report.seq) >= min_reports
            && self.reports >= 1
            && self.report.state != WorkerState::Starting
    }

    /// How long it has been trusted: what herald saw, or what its report sequence says.
    pub fn trusted_for(&self, now: Instant, min_reports: u64) -> Duration {
        let interval = Duration::from_millis(self.report.interval_ms);
        let by_seq = interval * self.report.seq.saturating_sub(min_reports).min(1 << 20) as u32;
        let seen = now.saturating_duration_since(self.first_seen);
        let by_herald = seen.saturating_sub(interval * (min_reports.saturating_sub(1)) as u32);
        by_seq.max(by_herald)
    }

    /// Whether it is draining.
    pub fn draining(&self) -> bool {
        self.drain.is_some()
    }
}

/// What herald answers a report with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// Whether the worker should drain.
    pub drain: bool,
    /// First report of this worker process (new worker or restarted).
    pub new_process: bool,
}

/// Every worker herald knows.
#[derive(Debug, Clone)]
pub struct Fleet {
    /// The settings.
    pub settings: FleetSettings,
    workers: BTreeMap<String, Tracked>,
}

impl Fleet {
    /// An empty fleet.
    pub fn new(settings: FleetSettings) -> Self {
        Fleet {
            settings,
            workers: BTreeMap::new(),
        }
    }

    /// Takes a (checked) report.
    pub fn record(&mut self, report: LoadReport, now: Instant) -> Recorded {
        let score = score::score(&report, &self.settings.capacities);
        let self_draining = report.state == WorkerState::Draining;
        let id = report.worker.id.clone();
        let tau = self.settings.smoothing.as_secs_f64();
        match self.workers.get_mut(&id) {
            Some(t) if t.report.worker.boot == report.worker.boot => {
                let elapsed = now.saturating_duration_since(t.last_report).as_secs_f64();
                t.utilisation = score::smooth(t.utilisation, score.utilisation, elapsed, tau);
                t.reports += 1;
                t.last_report = now;
                t.report = report;
                t.score = score;
                if self_draining && t.drain.is_none() {
                    t.drain = Some((DrainCause::Worker, now));
                }
                Recorded {
                    drain: t.drain.is_some(),
                    new_process: false,
                }
            }
            previous => {
                // A scale-in choice outlives a restart of the chosen worker's process: herald
                // still wants that worker gone.
                let kept = previous
                    .and_then(|t| t.drain)
                    .filter(|(cause, _)| *cause == DrainCause::ScaleIn);
                let drain = kept.or(self_draining.then_some((DrainCause::Worker, now)));
                let tracked = Tracked {
                    utilisation: score.utilisation,
                    score,
                    report,
                    reports: 1,
                    first_seen: now,
                    last_report: now,
                    drain,
                };
                self.workers.insert(id, tracked);
                Recorded {
                    drain: drain.is_some(),
                    new_process: true,
                }
            }
        }
    }

    /// Removes workers silent for their expiry time; returns them.
    pub fn expire(&mut self, now: Instant) -> Vec<Tracked> {
        let n = self.settings.expire_after_intervals.max(1);
        let expired: Vec<String> = self
            .workers
            .iter()
            .filter(|(_, t)| {
                let limit = Duration::from_millis(t.report.interval_ms) * n;
                now.saturating_duration_since(t.last_report) >= limit
            })
            .map(|(id, _)| id.clone())
            .collect();
        expired
            .iter()
            .filter_map(|id| self.workers.remove(id))
            .collect()
    }

    /// Marks a worker for scale-in; false if unknown or already draining.
    pub fn start_drain(&mut self, id: &str, now: Instant) -> bool {
        match self.workers.get_mut(id) {
            Some(t) if t.drain.is_none() => {
                t.drain = Some((DrainCause::ScaleIn, now));
                true
            }
            _ => false,
        }
    }

    /// A worker by id.
    pub fn get(&self, id: &str) -> Option<&Tracked> {
        self.workers.get(id)
    }

    /// Every worker, by id.
    pub fn iter(&self) -> impl Iterator<Item = &Tracked> {
        self.workers.values()
    }

    /// Workers trusted with connections.
    pub fn trusted(&self) -> impl Iterator<Item = &Tracked> {
        let min = self.settings.min_reports;
        self.workers.values().filter(move |t| t.trusted(min))
    }

    /// Whether a trusted worker is also warm enough to count in scale decisions.
    pub fn warm(&self, t: &Tracked, now: Instant) -> bool {
        t.trusted(self.settings.min_reports)
            && t.trusted_for(now, self.settings.min_reports) >= self.settings.warmup
    }

    /// Slow-start weight of a trusted worker, `slow_start_floor..=1`.
    pub fn slow_start(&self, t: &Tracked, now: Instant) -> f64 {
        let s = &self.settings;
        if s.slow_start.is_zero() {
            return 1.0;
        }
        let ramp = t.trusted_for(now, s.min_reports).as_secs_f64() / s.slow_start.as_secs_f64();
        ramp.clamp(s.slow_start_floor.clamp(0.0, 1.0), 1.0)
    }

    /// Admin addresses of the other workers, for a worker's history peers.
    pub fn peers_of(&self, id: &str) -> Vec<String> {
        self.workers
            .values()
            .filter(|t| t.report.worker.id != id)
            .map(|t| t.report.worker.admin_address.clone())
            .collect()
    }

    /// The routing table's rows: trusted workers, ordered by id.
    pub fn routed(&self, now: Instant) -> Vec<RoutedWorker> {
        let s = &self.settings;
        let trusted: Vec<&Tracked> = self.trusted().collect();
        let typical = score::typical_cost(
            trusted
                .iter()
                .filter_map(|t| t.score.measured_cost)
                .collect(),
        );
        let headroom = |t: &Tracked| (1.0 - t.utilisation).max(0.0);
        let best = trusted
            .iter()
            .filter(|t| !t.draining())
            .map(|t| headroom(t))
            .fold(0.0, f64::max);
        trusted
            .iter()
            .map(|t| {
                let slow_start = self.slow_start(t, now);
                let share = if best > 0.0 { headroom(t) / best } else { 1.0 };
                let cost = score::connection_cost(&t.score, typical);
                RoutedWorker {
                    id: t.report.worker.id.clone(),
                    address: t.report.worker.address.clone(),
                    instance_id: t.report.worker.instance_id.clone(),
                    utilisation: t.utilisation,
                    cost_per_connection: cost,
                    connections: t.report.connections,
                    report_seq: t.report.seq,
                    report_age_ms: now.saturating_duration_since(t.last_report).as_millis() as u64,
                    slow_start,
                    weight: (share * slow_start).clamp(s.weight_floor, 1.0),
                    draining: t.draining(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::score::tests::report;

    fn at(base: Instant, s: u64) -> Instant {
        base + Duration::from_secs(s)
    }

    fn send(fleet: &mut Fleet, id: &str, seq: u64, cpu: f64, now: Instant) -> Recorded {
        let mut r = report(id, 100, cpu);
        r.seq = seq;
        fleet.record(r, now)
    }

    #[test]
    fn trusted_after_two_reports_and_slow_start_ramps() {
        let t0 = Instant::now();
        let mut f = Fleet::new(FleetSettings::default());
        assert!(send(&mut f, "a", 1, 0.1, t0).new_process);
        assert!(f.routed(t0).is_empty(), "one report is not enough");
        send(&mut f, "a", 2, 0.1, at(t0, 2));
        let rows = f.routed(at(t0, 2));
        assert_eq!(rows.len(), 1);
        assert!((rows[0].slow_start - 0.1).abs() < 1e-9);
        let later = f.routed(at(t0, 17));
        assert!(
            (later[0].slow_start - 0.5).abs() < 1e-9,
            "{}",
            later[0].slow_start
        );
        assert_eq!(f.routed(at(t0, 40))[0].slow_start, 1.0);
        assert!(!f.warm(f.get("a").unwrap(), at(t0, 40)));
        assert!(f.warm(f.get("a").unwrap(), at(t0, 63)));
    }

    #[test]
    fn a_restarted_herald_trusts_old_workers_at_once() {
        let t0 = Instant::now();
        let mut f = Fleet::new(FleetSettings::default());
        send(&mut f, "a", 500, 0.3, t0);
        let rows = f.routed(t0);
        assert_eq!(rows.len(), 1, "seq 500 means the worker is not new");
        assert_eq!(rows[0].slow_start, 1.0);
        assert!(f.warm(f.get("a").unwrap(), t0));
    }

    #[test]
    fn silent_workers_expire_after_three_intervals() {
        let t0 = Instant::now();
        let mut f = Fleet::new(FleetSettings::default());
        send(&mut f, "a", 1, 0.1, t0);
        send(&mut f, "b", 1, 0.1, t0);
        send(&mut f, "b", 2, 0.1, at(t0, 4));
        assert!(f.expire(t0 + Duration::from_millis(5999)).is_empty());
        let gone = f.expire(at(t0, 6));
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].report.worker.id, "a");
        assert!(f.get("b").is_some());
    }

    #[test]
    fn utilisation_is_smoothed_and_a_restart_resets_it() {
        let t0 = Instant::now();
        let mut f = Fleet::new(FleetSettings::default());
        send(&mut f, "a", 1, 0.0, t0);
        let first = f.get("a").unwrap().utilisation;
        send(&mut f, "a", 2, 0.85, at(t0, 10));
        let u = f.get("a").unwrap().utilisation;
        let expected = first + (1.0 - first) * (1.0 - (-1.0f64).exp());
        assert!((u - expected).abs() < 1e-9, "{u} vs {expected}");
        let mut r = report("a", 100, 0.0);
        r.worker.boot = 2;
        assert!(f.record(r, at(t0, 12)).new_process);
        let a = f.get("a").unwrap();
        assert_eq!(
            a.utilisation, a.score.utilisation,
            "no smoothing across processes"
        );
        assert_eq!(f.get("a").unwrap().reports, 1);
    }

    #[test]
    fn drains_are_answered_and_scale_in_survives_a_restart() {
        let t0 = Instant::now();
        let mut f = Fleet::new(FleetSettings::default());
        send(&mut f, "a", 1, 0.1, t0);
        assert!(f.start_drain("a", t0));
        assert!(!f.start_drain("a", t0), "already draining");
        assert!(!f.start_drain("zz", t0), "unknown");
        assert!(send(&mut f, "a", 2, 0.1, at(t0, 2)).drain);
        let mut r = report("a", 0, 0.0);
        r.worker.boot = 9;
        assert!(
            f.record(r, at(t0, 3)).drain,
            "the restarted process still drains"
        );
        // A worker draining on its own is marked, and not asked to drain by herald's cause.
        let mut r = report("b", 10, 0.0);
        r.state = WorkerState::Draining;
        assert!(f.record(r, t0).drain);
        assert_eq!(f.get("b").unwrap().drain.unwrap().0, DrainCause::Worker);
    }

    #[test]
    fn weights_follow_headroom_with_a_floor() {
        let t0 = Instant::now();
        let mut f = Fleet::new(FleetSettings {
            smoothing: Duration::ZERO,
            ..FleetSettings::default()
        });
        for (id, cpu) in [("cool", 0.17), ("warm", 0.595), ("hot", 1.7)] {
            let mut r = report(id, 100, cpu);
            r.seq = 100;
            f.record(r, t0);
        }
        let rows = f.routed(t0);
        let w = |id: &str| rows.iter().find(|r| r.id == id).unwrap().weight;
        assert!((w("cool") - 1.0).abs() < 1e-9);
        assert!((w("warm") - 0.3 / 0.8).abs() < 1e-9, "{}", w("warm"));
        assert_eq!(w("hot"), 0.01);
        // Everyone overloaded: everyone equal, none drained.
        let mut f2 = Fleet::new(f.settings.clone());
        for id in ["x", "y"] {
            let mut r = report(id, 100, 2.0);
            r.seq = 100;
            f2.record(r, t0);
        }
        assert!(f2.routed(t0).iter().all(|r| r.weight == 1.0));
    }

    #[test]
    fn idle_workers_borrow_the_typical_connection_cost() {
        let t0 = Instant::now();
        let mut f = Fleet::new(FleetSettings::default());
        for (id, conns, cpu) in [("a", 1000, 0.2), ("b", 1000, 0.4), ("idle", 0, 0.0)] {
            let mut r = report(id, conns, cpu);
            r.seq = 100;
            f.record(r, t0);
        }
        let rows = f.routed(t0);
        let cost = rows
            .iter()
            .find(|r| r.id == "idle")
            .unwrap()
            .cost_per_connection;
        let expected = (0.2 / 1000.0 / 0.85 + 0.4 / 1000.0 / 0.85) / 2.0;
        assert!((cost - expected).abs() < 1e-12, "{cost} vs {expected}");
    }

    /// A worker with few slots must not lend its slot cost to workers with many.
    #[test]
    fn a_borrowed_cost_never_includes_another_workers_slot() {
        let t0 = Instant::now();
        let mut f = Fleet::new(FleetSettings::default());
        let mut small = report("small", 10, 0.0);
        small.max_connections = 20;
        small.cost_per_connection = protocol::load::ConnectionCost::default();
        small.seq = 100;
        f.record(small, t0);
        let mut idle = report("idle", 0, 0.0);
        idle.seq = 100;
        f.record(idle, t0);
        let rows = f.routed(t0);
        let cost = |id: &str| {
            rows.iter()
                .find(|r| r.id == id)
                .unwrap()
                .cost_per_connection
        };
        assert!((cost("small") - 1.0 / 19.0).abs() < 1e-12);
        assert!(
            (cost("idle") - 1.0 / 9500.0).abs() < 1e-12,
            "{}",
            cost("idle")
        );
    }

    #[test]
    fn peers_are_the_other_workers() {
        let t0 = Instant::now();
        let mut f = Fleet::new(FleetSettings::default());
        send(&mut f, "a", 1, 0.1, t0);
        let mut r = report("b", 1, 0.1);
        r.worker.admin_address = "127.0.0.1:9999".into();
        f.record(r, t0);
        assert_eq!(f.peers_of("a"), ["127.0.0.1:9999"]);
    }
}
