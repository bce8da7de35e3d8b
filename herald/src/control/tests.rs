use super::*;
use crate::fleet::FleetSettings;
use crate::scale::ScalePolicy;
use crate::score::tests::report;

fn control(policy: ScalePolicy, now: Instant) -> Control {
    let settings = ControlSettings {
        startup_grace: Duration::ZERO,
        drain_heartbeat: Duration::from_secs(10),
        drain_timeout: Duration::from_secs(600),
        report_interval: Duration::from_secs(2),
    };
    let fleet = Fleet::new(FleetSettings {
        smoothing: Duration::ZERO,
        ..FleetSettings::default()
    });
    Control::new(settings, fleet, Scaler::new(policy), 42, now)
}

/// A report of an old (warm) worker.
fn old(id: &str, seq: u64, connections: u64, cpu: f64) -> LoadReport {
    let mut r = report(id, connections, cpu);
    r.seq = 100 + seq;
    r
}

fn quick_scale_in() -> ScalePolicy {
    ScalePolicy {
        scale_in_window: Duration::from_secs(10),
        scale_in_cooldown: Duration::ZERO,
        ..ScalePolicy::default()
    }
}

#[test]
fn scale_in_drains_then_removes_the_cheapest_worker() {
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    let mut c = control(quick_scale_in(), t0);
    let mut victim = None;
    for step in 0..20u64 {
        for (id, conns) in [("a", 300), ("b", 100), ("c", 200)] {
            let (reply, _) = c.report(old(id, step, conns, 0.05), at(step * 2));
            if victim.as_deref() == Some(id) {
                assert!(reply.drain, "the chosen worker is told to drain");
            }
        }
        c.tick(at(step * 2), 0);
        if let Some(id) = c.drains.keys().next() {
            victim = Some(id.clone());
        }
    }
    assert_eq!(victim.as_deref(), Some("b"), "fewest connections");
    assert_eq!(
        c.decisions
            .iter()
            .filter(|d| d.action == "scale_in")
            .count(),
        1
    );
    assert!(c.table().worker("b").unwrap().draining);
    assert_eq!(c.table().eligible().count(), 2);

    // The actuator hears of it once, then every heartbeat.
    let now = at(40);
    let calls = c.due_calls(now);
    let b = Target {
        worker_id: "b".into(),
        instance_id: Some("i-b".into()),
    };
    assert_eq!(calls, [Call::DrainStarted(b.clone(), 2)]);
    c.call_done(&calls[0], now, 0);
    assert!(c.due_calls(at(45)).is_empty());
    assert_eq!(c.due_calls(at(50)), [Call::DrainProgress(b.clone())]);

    // The worker drains to empty: now it may go.
    let mut r = old("b", 30, 0, 0.01);
    r.state = WorkerState::Draining;
    c.report(r, at(52));
    c.tick(at(52), 0);
    assert_eq!(c.due_calls(at(52)), [Call::Drained(b.clone())]);
    c.call_done(&Call::Drained(b), at(53), 0);
    assert!(c.drains.is_empty());
    assert!(c.retired.contains("b"));
    assert!(
        c.table().worker("b").unwrap().draining,
        "retired stays flagged"
    );
    let last = c.decisions.back().unwrap();
    assert_eq!(
        (last.action, last.worker.as_deref()),
        ("drained", Some("b"))
    );
}

#[test]
fn a_drain_ends_when_the_worker_vanishes_or_times_out() {
    let t0 = Instant::now();
    let mut c = control(quick_scale_in(), t0);
    for (id, seq) in [("a", 1), ("b", 1)] {
        c.report(old(id, seq, 10, 0.0), t0);
    }
    c.fleet.start_drain("a", t0);
    c.drains.insert(
        "a".into(),
        Drain {
            target: Target {
                worker_id: "a".into(),
                instance_id: None,
            },
            desired: 1,
            started: t0,
            announced: true,
            last_progress: Some(t0),
            finish: None,
        },
    );
    // Still reporting with clients after the timeout: finished anyway.
    let mut c2 = control(quick_scale_in(), t0);
    c2.settings.drain_timeout = Duration::from_secs(5);
    c2.report(old("a", 1, 10, 0.0), t0);
    c2.drains = c.drains.clone();
    c2.report(old("a", 2, 10, 0.0), t0 + Duration::from_secs(5));
    c2.tick(t0 + Duration::from_secs(5), 0);
    assert_eq!(c2.drains["a"].finish, Some("timeout"));
    // Silent for three intervals: expired, and the drain finishes as "gone".
    c.report(old("b", 2, 10, 0.0), t0 + Duration::from_secs(6));
    let (expired, _) = c.tick(t0 + Duration::from_secs(6), 0);
    assert_eq!(expired.len(), 1);
    assert_eq!(c.drains["a"].finish, Some("gone"));
}

#[test]
fn scale_out_is_asked_until_applied() {
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    let mut c = control(ScalePolicy::default(), t0);
    for step in 0..40u64 {
        for id in ["a", "b"] {
            c.report(old(id, step, 100, 0.8), at(step * 2));
        }
        c.tick(at(step * 2), 0);
    }
    let calls = c.due_calls(at(80));
    assert!(
        matches!(&calls[..], [Call::SetDesired(4, _)]),
        "2 workers at 0.94 need ceil(1.88 / 0.6) = 4: {calls:?}"
    );
    c.call_done(&calls[0], at(80), 0);
    assert!(c.due_calls(at(81)).is_empty());
}

#[test]
fn the_table_version_moves_with_content_not_with_age() {
    let t0 = Instant::now();
    let mut c = control(ScalePolicy::default(), t0);
    c.report(old("a", 1, 10, 0.1), t0);
    let (_, changed) = c.tick(t0, 1);
    assert!(changed);
    let v = c.table().version;
    let (_, changed) = c.tick(t0 + Duration::from_secs(1), 2);
    assert!(!changed, "only the report's age moved");
    assert_eq!(c.table().version, v);
    c.report(old("a", 2, 10, 0.1), t0 + Duration::from_secs(2));
    let (_, changed) = c.tick(t0 + Duration::from_secs(2), 3);
    assert!(changed, "a new report (seq) is new content");
    assert_eq!(c.table().version, v + 1);
    assert_eq!(c.table().generation, 42);
}

#[test]
fn no_decision_during_startup_grace() {
    let t0 = Instant::now();
    let mut c = control(quick_scale_in(), t0);
    c.settings.startup_grace = Duration::from_secs(1000);
    for step in 0..100u64 {
        for id in ["a", "b", "c"] {
            c.report(old(id, step, 10, 0.01), t0 + Duration::from_secs(step * 2));
        }
        c.tick(t0 + Duration::from_secs(step * 2), 0);
    }
    assert!(c.decisions.is_empty());
}
