//! Placement behaviour: where bursts land with fresh, stale and missing tables; draining,
//! excluded and down workers; slow start; counts. Then a property test over any table and any
//! sequence of calls.

use super::*;
use proptest::prelude::*;
use protocol::routing::{RoutedWorker, TABLE_VERSION};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::HashMap;

fn row(id: &str, utilisation: f64, cost_per_connection: f64) -> RoutedWorker {
    RoutedWorker {
        id: id.into(),
        address: format!("{id}.internal:8080"),
        instance_id: None,
        utilisation,
        cost_per_connection,
        connections: 100,
        report_seq: 1,
        report_age_ms: 500,
        slow_start: 1.0,
        weight: 1.0,
        draining: false,
    }
}

fn table(workers: Vec<RoutedWorker>) -> Arc<RoutingTable> {
    Arc::new(RoutingTable {
        format: TABLE_VERSION,
        generation: 1,
        version: 1,
        built_at_ms: 0,
        report_interval_ms: 2000,
        workers,
    })
}

/// Ten workers `w0..w9` with these utilisations and costs.
fn ten(utilisation: impl Fn(usize) -> f64, cost_per_connection: f64) -> Vec<RoutedWorker> {
    (0..10)
        .map(|i| row(&format!("w{i}"), utilisation(i), cost_per_connection))
        .collect()
}

fn placer(workers: Vec<RoutedWorker>, received: Instant) -> Placer {
    let mut p = Placer::new(PlaceSettings::default());
    p.update(table(workers), received);
    p
}

fn after(t0: Instant, ms: u64) -> Instant {
    t0 + Duration::from_millis(ms)
}

/// `n` connections placed at `now`, each established before the next choice; placements
/// per worker id.
fn burst(p: &mut Placer, now: Instant, n: usize, seed: u64) -> HashMap<String, usize> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut counts = HashMap::new();
    for _ in 0..n {
        let (c, _) = p.choose(now, &mut rng, &[]).expect("a worker");
        p.connected(&c.id, now);
        *counts.entry(c.id.to_string()).or_default() += 1;
    }
    counts
}

fn count(counts: &HashMap<String, usize>, id: &str) -> usize {
    counts.get(id).copied().unwrap_or(0)
}

/// The worker one choice picks.
fn chosen(p: &mut Placer, now: Instant, exclude: &[&str]) -> Option<String> {
    let exclude: Vec<Arc<str>> = exclude.iter().map(|&e| e.into()).collect();
    let mut rng = StdRng::seed_from_u64(9);
    p.choose(now, &mut rng, &exclude)
        .map(|(c, _)| c.id.to_string())
}

const SEEDS: u64 = 32;

/// Acceptance: reports 10 s stale (table received 10 s ago, between `stale_after` and
/// `fallback_after`), a burst of 1,000 placements with no new table, equal load: the fair
/// share is 1000 / 10 = 100 each, and no worker may get more than 200. Also with a cost of 0,
/// where placements do not move the projected figure at all (ties everywhere).
#[test]
fn burst_on_ten_second_old_reports_stays_within_twice_the_fair_share() {
    for cost in [0.0001, 0.0] {
        for seed in 0..SEEDS {
            let t0 = Instant::now();
            let mut p = placer(ten(|_| 0.5, cost), t0);
            let now = after(t0, 10_000);
            assert_eq!(p.mode(now), Mode::Stale);
            let counts = burst(&mut p, now, 1000, seed);
            let max = counts.values().max().unwrap();
            assert!(*max <= 200, "cost {cost}, seed {seed}: {counts:?}");
        }
    }
}

/// Acceptance with skewed load (utilisation 0.20, 0.25, .. 0.65; cost 1e-4, a slot of a
/// 10,000-connection worker). Fair share here follows headroom: worker `i` deserves
/// `1000 × (1 − u_i) / Σ (1 − u_j)`, the split herald's `weight` asks of a weighted balancer.
/// No worker may get more than twice that, and cooler workers must get more than hotter ones.
#[test]
fn burst_on_ten_second_old_skewed_reports_follows_headroom() {
    let u = |i: usize| 0.20 + 0.05 * i as f64;
    let headroom: f64 = (0..10).map(|i| 1.0 - u(i)).sum();
    let fair = |i: usize| 1000.0 * (1.0 - u(i)) / headroom;
    for seed in 0..SEEDS {
        let t0 = Instant::now();
        let mut p = placer(ten(u, 0.0001), t0);
        let counts = burst(&mut p, after(t0, 10_000), 1000, seed);
        for i in 0..10 {
            let n = count(&counts, &format!("w{i}"));
            assert!(
                n as f64 <= 2.0 * fair(i),
                "seed {seed}: w{i} got {n}, fair {:.0}",
                fair(i)
            );
        }
        let coolest: usize = (0..3).map(|i| count(&counts, &format!("w{i}"))).sum();
        let hottest: usize = (7..10).map(|i| count(&counts, &format!("w{i}"))).sum();
        assert!(coolest > 2 * hottest, "seed {seed}: {counts:?}");
    }
}

/// Not "always the least loaded": a worker a hair cooler than the rest, with a cost too small
/// to catch up within the burst, still gets only the draws it wins — about 2 in 10.
#[test]
fn the_coolest_worker_does_not_take_the_whole_burst() {
    for seed in 0..SEEDS {
        let t0 = Instant::now();
        let mut p = placer(ten(|i| if i == 0 { 0.29 } else { 0.30 }, 1e-7), t0);
        let counts = burst(&mut p, t0, 1000, seed);
        assert!(count(&counts, "w0") < 270, "seed {seed}: {counts:?}");
    }
}

#[test]
fn a_hot_worker_gets_clearly_fewer_from_a_fresh_table() {
    for seed in 0..SEEDS {
        let t0 = Instant::now();
        let mut p = placer(ten(|i| if i == 0 { 0.9 } else { 0.3 }, 0.0001), t0);
        assert_eq!(p.mode(t0), Mode::Fresh);
        let counts = burst(&mut p, t0, 1000, seed);
        let hot = count(&counts, "w0");
        let least_other = (1..10)
            .map(|i| count(&counts, &format!("w{i}")))
            .min()
            .unwrap();
        assert!(hot * 4 < least_other, "seed {seed}: {counts:?}");
    }
}

/// Slow start 0.5 among equal peers: for the same rise in projected level the worker takes
/// half what a peer takes.
#[test]
fn a_worker_in_slow_start_takes_proportionally_fewer() {
    for seed in 0..SEEDS {
        let t0 = Instant::now();
        let mut rows = ten(|_| 0.3, 0.001);
        rows[0].slow_start = 0.5;
        let mut p = placer(rows, t0);
        let counts = burst(&mut p, t0, 1000, seed);
        let peers = (1..10)
            .map(|i| count(&counts, &format!("w{i}")))
            .sum::<usize>() as f64
            / 9.0;
        let ratio = count(&counts, "w0") as f64 / peers;
        assert!((0.35..=0.65).contains(&ratio), "seed {seed}: {ratio}");
    }
}

#[test]
fn placements_count_until_the_report_seq_changes() {
    let t0 = Instant::now();
    let mut p = placer(vec![row("a", 0.45, 0.01), row("b", 0.5, 0.01)], t0);
    assert_eq!(chosen(&mut p, t0, &[]).as_deref(), Some("a"));
    for _ in 0..10 {
        p.connected("a", t0); // a: 0.45 + 0.1
    }
    assert_eq!(chosen(&mut p, t0, &[]).as_deref(), Some("b"));
    // The same report again: the placements still count.
    p.update(table(vec![row("a", 0.45, 0.01), row("b", 0.5, 0.01)]), t0);
    assert_eq!(chosen(&mut p, t0, &[]).as_deref(), Some("b"));
    // A new report from a includes them: start again from zero.
    let mut a = row("a", 0.45, 0.01);
    a.report_seq = 2;
    p.update(table(vec![a, row("b", 0.5, 0.01)]), t0);
    assert_eq!(chosen(&mut p, t0, &[]).as_deref(), Some("a"));
    assert_eq!(p.known[0].placed_since_report, 0);
    assert_eq!(
        p.open_connections("a"),
        10,
        "open connections are not reset"
    );
}

#[test]
fn mode_and_staleness_follow_the_table_age() {
    let t0 = Instant::now();
    let mut p = Placer::new(PlaceSettings::default());
    assert_eq!(p.mode(t0), Mode::Static);
    p.update(table(vec![row("a", 0.5, 0.0)]), t0);
    let at = |s: u64| after(t0, s * 1000);
    assert_eq!(p.mode(at(5)), Mode::Fresh);
    assert_eq!(p.staleness(at(5)), 0.0);
    assert_eq!(p.mode(at(6)), Mode::Stale);
    assert_eq!(p.staleness(at(18)), 0.5);
    assert_eq!(p.mode(at(30)), Mode::Fallback);
    assert_eq!(p.staleness(at(30)), 1.0);
    assert_eq!(p.mode(t0 - Duration::from_secs(1)), Mode::Fresh);
}

/// As the table ages the reported figures count less and this proxy's own placements more.
#[test]
fn a_stale_table_decays_toward_equal_weights() {
    let t0 = Instant::now();
    let mut p = placer(vec![row("a", 0.2, 0.01), row("b", 0.8, 0.01)], t0);
    for _ in 0..5 {
        p.connected("a", t0); // a projects 0.25
    }
    assert_eq!(chosen(&mut p, t0, &[]).as_deref(), Some("a"));
    // Half decayed: a 0.35 + 0.05, b 0.65.
    assert_eq!(chosen(&mut p, after(t0, 18_000), &[]).as_deref(), Some("a"));
    // Nearly equal: a 0.499 + 0.05, b 0.501.
    assert_eq!(chosen(&mut p, after(t0, 29_900), &[]).as_deref(), Some("b"));
}

#[test]
fn draining_and_excluded_workers_are_never_chosen() {
    let t0 = Instant::now();
    let mut rows = ten(|i| 0.1 * i as f64, 0.0001);
    rows[0].draining = true; // the most attractive by its figures
    let mut p = placer(rows, t0);
    let mut rng = StdRng::seed_from_u64(3);
    let exclude: Vec<Arc<str>> = vec!["w1".into(), "w2".into()];
    for age_ms in [0, 10_000, 40_000] {
        let now = after(t0, age_ms);
        for _ in 0..500 {
            let (c, _) = p.choose(now, &mut rng, &exclude).unwrap();
            assert!(
                !["w0", "w1", "w2"].contains(&&*c.id),
                "{} at {age_ms}",
                c.id
            );
            p.connected(&c.id, now);
        }
    }
    let only: Vec<Arc<str>> = (1..10).map(|i| format!("w{i}").into()).collect();
    assert_eq!(
        p.choose(t0, &mut rng, &only),
        None,
        "all excluded or draining"
    );
    let mut drained = row("a", 0.1, 0.0);
    drained.draining = true;
    p.update(table(vec![drained]), t0);
    assert_eq!(chosen(&mut p, t0, &[]), None);
}

#[test]
fn no_worker_at_all_is_none_and_a_single_candidate_is_chosen() {
    let t0 = Instant::now();
    assert_eq!(
        chosen(&mut Placer::new(PlaceSettings::default()), t0, &[]),
        None
    );
    let mut p = placer(vec![], t0);
    assert_eq!(chosen(&mut p, t0, &[]), None);
    let mut p = placer(vec![row("a", 5.0, 0.0), row("b", 0.1, 0.0)], t0);
    assert_eq!(chosen(&mut p, t0, &["b"]).as_deref(), Some("a"));
    let mut rng = StdRng::seed_from_u64(1);
    let (c, mode) = p.choose(t0, &mut rng, &[]).unwrap();
    assert_eq!(
        (&*c.id, &*c.address, mode),
        ("b", "b.internal:8080", Mode::Fresh)
    );
}

fn down_settings() -> PlaceSettings {
    PlaceSettings {
        stale_after: Duration::from_secs(600),
        fallback_after: Duration::from_secs(1200),
        down_min: Duration::from_millis(500),
        down_max: Duration::from_secs(2),
        ..PlaceSettings::default()
    }
}

/// `a` is always preferred to `b` while it is not down; how long a failure at `at` keeps it
/// out, to the millisecond.
fn down_for(p: &mut Placer, at: Instant) -> u64 {
    p.failed("a", at);
    let mut ms = 0;
    while chosen(p, after(at, ms), &[]).as_deref() == Some("b") {
        ms += 1;
        assert!(ms < 60_000, "never back");
    }
    ms
}

#[test]
fn down_marks_double_per_failure_up_to_the_limit_and_expire() {
    let t0 = Instant::now();
    let mut p = Placer::new(down_settings());
    p.update(table(vec![row("a", 0.1, 0.0), row("b", 0.5, 0.0)]), t0);
    assert_eq!(chosen(&mut p, t0, &[]).as_deref(), Some("a"));
    let mut t = t0;
    let mut marks = Vec::new();
    for _ in 0..5 {
        let ms = down_for(&mut p, t);
        marks.push(ms);
        t = after(t, ms + 10);
    }
    assert_eq!(marks, [500, 1000, 2000, 2000, 2000]);
    // A new table keeps the streak; a connection ends it.
    p.update(table(vec![row("a", 0.1, 0.0), row("b", 0.5, 0.0)]), t);
    assert_eq!(down_for(&mut p, t), 2000);
    t = after(t, 3000);
    p.connected("a", t);
    assert_eq!(down_for(&mut p, t), 500);
    p.failed("nobody", t); // ignored
}

#[test]
fn when_every_worker_is_down_one_is_still_chosen() {
    let t0 = Instant::now();
    let mut p = Placer::new(down_settings());
    p.update(table(vec![row("a", 0.1, 0.0), row("b", 0.5, 0.0)]), t0);
    p.failed("a", t0);
    p.failed("b", t0);
    assert_eq!(
        chosen(&mut p, t0, &[]).as_deref(),
        Some("a"),
        "lower load wins"
    );
    assert_eq!(chosen(&mut p, t0, &["a"]).as_deref(), Some("b"));
    assert_eq!(chosen(&mut p, t0, &["a", "b"]), None);
    // In fallback too.
    let late = after(t0, 1_300_000);
    p.failed("a", late);
    p.failed("b", late);
    assert_eq!(p.mode(late), Mode::Fallback);
    assert!(chosen(&mut p, late, &[]).is_some());
}

#[test]
fn static_mode_balances_by_this_proxys_connections() {
    let t0 = Instant::now();
    let mut p = Placer::new(PlaceSettings {
        static_workers: vec![
            "10.0.0.1:80".into(),
            "10.0.0.2:80".into(),
            "10.0.0.1:80".into(),
        ],
        ..PlaceSettings::default()
    });
    assert_eq!(p.mode(t0), Mode::Static);
    let counts = burst(&mut p, t0, 300, 5);
    assert_eq!(counts.len(), 2, "duplicates in the list count once");
    assert!(
        counts.values().all(|n| (140..=160).contains(n)),
        "{counts:?}"
    );
    let mut rng = StdRng::seed_from_u64(1);
    let (c, mode) = p.choose(t0, &mut rng, &[]).unwrap();
    assert_eq!((c.id.clone(), mode), (c.address.clone(), Mode::Static));
    // Releases move the balance.
    for _ in 0..100 {
        p.released("10.0.0.2:80");
    }
    let next = burst(&mut p, t0, 50, 6);
    assert!(count(&next, "10.0.0.2:80") >= 45, "{next:?}");
}

/// Herald away past `fallback_after`: its figures are ignored, this proxy's open
/// connections decide.
#[test]
fn fallback_is_least_connections_over_the_last_known_workers() {
    let t0 = Instant::now();
    let mut rows = vec![
        row("a", 0.1, 0.0001),
        row("b", 0.2, 0.0001),
        row("c", 0.3, 0.0001),
        row("d", 0.9, 0.0001),
    ];
    rows.push(row("e", 0.0, 0.0001));
    rows[4].draining = true;
    let mut p = placer(rows, t0);
    for _ in 0..60 {
        p.connected("a", t0);
    }
    let now = after(t0, 40_000);
    assert_eq!(p.mode(now), Mode::Fallback);
    let counts = burst(&mut p, now, 140, 11);
    assert_eq!(count(&counts, "a"), 0, "a already holds more: {counts:?}");
    assert_eq!(count(&counts, "e"), 0, "draining");
    for id in ["b", "c", "d"] {
        let open = p.open_connections(id);
        assert!((40..=55).contains(&open), "{id}: {open}; {counts:?}");
    }
    for _ in 0..40 {
        p.released("a");
    }
    // Now a holds the fewest: it wins every draw it is in (half of them with four workers).
    let counts = burst(&mut p, now, 30, 12);
    let a = count(&counts, "a");
    assert!(
        ["b", "c", "d"].iter().all(|id| a > 2 * count(&counts, id)),
        "{counts:?}"
    );
}

#[test]
fn released_never_underflows_and_ignores_unknown_ids() {
    let t0 = Instant::now();
    let mut p = placer(vec![row("a", 0.1, 0.0)], t0);
    p.released("a");
    p.released("nobody");
    assert_eq!(p.open_connections("a"), 0);
    p.connected("a", t0);
    p.released("a");
    p.released("a");
    assert_eq!(p.open_connections("a"), 0);
    assert_eq!(p.known.len(), 1);
}

#[test]
fn a_worker_leaving_the_table_keeps_only_its_open_connections() {
    let t0 = Instant::now();
    let mut p = Placer::new(down_settings());
    p.update(table(vec![row("a", 0.1, 0.0), row("b", 0.5, 0.0)]), t0);
    p.connected("a", t0);
    p.connected("a", t0);
    p.failed("a", t0);
    p.update(table(vec![row("b", 0.5, 0.0)]), t0);
    assert_eq!(p.open_connections("a"), 2);
    for _ in 0..20 {
        assert_eq!(chosen(&mut p, t0, &[]).as_deref(), Some("b"));
    }
    p.released("a");
    p.released("a");
    assert_eq!(p.known.len(), 1, "forgotten with its last connection");
    p.released("a");
    // Back with nothing remembered: no down mark, no placements.
    p.update(table(vec![row("a", 0.1, 0.0), row("b", 0.5, 0.0)]), t0);
    assert_eq!(chosen(&mut p, t0, &[]).as_deref(), Some("a"));
    assert_eq!(p.known[0].placed_since_report, 0);
}

#[test]
fn connections_made_before_a_table_are_released_after_it() {
    let t0 = Instant::now();
    let mut p = Placer::new(PlaceSettings {
        static_workers: vec!["10.0.0.1:80".into()],
        ..PlaceSettings::default()
    });
    p.connected("10.0.0.1:80", t0);
    p.update(table(vec![row("a", 0.1, 0.0)]), t0);
    assert_eq!(p.open_connections("10.0.0.1:80"), 1);
    assert_eq!(chosen(&mut p, t0, &[]).as_deref(), Some("a"));
    // Chosen before a table that no longer lists it, established after.
    p.connected("gone", t0);
    assert_eq!(p.open_connections("gone"), 1);
    p.released("gone");
    p.released("10.0.0.1:80");
    assert_eq!(p.known.len(), 1);
}

#[test]
fn tables_out_of_order_or_with_repeated_ids_still_work() {
    let t0 = Instant::now();
    let mut p = placer(
        vec![row("c", 0.3, 0.0), row("a", 0.9, 0.0), row("c", 0.0, 0.0)],
        t0,
    );
    let ids: Vec<&str> = p.known.iter().map(|w| &*w.id).collect();
    assert_eq!(ids, ["a", "c"]);
    p.connected("c", t0);
    assert_eq!(p.open_connections("c"), 1);
}

/// Figures a table might carry, sane or not.
fn any_figure() -> impl Strategy<Value = f64> {
    prop_oneof![
        4 => 0.0f64..1.5,
        1 => Just(f64::NAN),
        1 => Just(f64::INFINITY),
        1 => Just(f64::NEG_INFINITY),
        1 => any::<f64>(),
    ]
}

/// Worker ids the operations use: table workers, static workers and one never listed.
const IDS: [&str; 9] = ["w0", "w1", "w2", "w3", "w4", "w5", "s0", "s1", "x"];

fn any_row() -> impl Strategy<Value = RoutedWorker> {
    (
        0..6usize,
        any_figure(),
        any_figure(),
        0..3u64,
        any_figure(),
        proptest::bool::weighted(0.25),
    )
        .prop_map(|(i, u, k, seq, slow_start, draining)| RoutedWorker {
            report_seq: seq,
            slow_start,
            draining,
            ..row(IDS[i], u, k)
        })
}

#[derive(Debug, Clone)]
enum Op {
    Update(Vec<RoutedWorker>),
    Choose { exclude: u16 },
    Connected(usize),
    Released(usize),
    Failed(usize),
    Wait { ms: u64 },
}

fn any_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => proptest::collection::vec(any_row(), 0..7).prop_map(Op::Update),
        4 => any::<u16>().prop_map(|exclude| Op::Choose { exclude }),
        3 => (0..IDS.len()).prop_map(Op::Connected),
        2 => (0..IDS.len()).prop_map(Op::Released),
        1 => (0..IDS.len()).prop_map(Op::Failed),
        1 => (0..40_000u64).prop_map(|ms| Op::Wait { ms }),
    ]
}

proptest! {
    /// Whatever the table and the calls: no panic, never a draining or excluded or unknown
    /// worker, `None` only when nothing else was possible, and open counts exactly match
    /// connections made minus released (never below zero).
    #[test]
    fn any_table_and_any_calls_keep_placement_sound(
        statics in proptest::collection::vec(6..8usize, 0..3),
        ops in proptest::collection::vec(any_op(), 1..80),
        seed in any::<u64>(),
    ) {
        let mut p = Placer::new(PlaceSettings {
            static_workers: statics.iter().map(|&i| IDS[i].to_string()).collect(),
            ..PlaceSettings::default()
        });
        let mut rng = StdRng::seed_from_u64(seed);
        let mut now = Instant::now();
        let mut open: HashMap<&str, u64> = HashMap::new();
        for op in ops {
            match op {
                Op::Update(rows) => p.update(table(rows), now),
                Op::Choose { exclude } => {
                    let exclude: Vec<Arc<str>> = (0..IDS.len())
                        .filter(|i| exclude & (1 << i) != 0)
                        .map(|i| IDS[i].into())
                        .collect();
                    // Candidates as a user would define them: the table's first row per
                    // id (or the static list), not draining, not excluded.
                    let allowed: HashMap<&str, String> = IDS
                        .iter()
                        .filter(|&&id| !exclude.iter().any(|e| &**e == id))
                        .filter_map(|&id| match p.table() {
                            Some((t, _)) => t
                                .workers
                                .iter()
                                .find(|w| w.id == id)
                                .filter(|w| !w.draining)
                                .map(|w| (id, w.address.clone())),
                            None => statics.iter().any(|&i| IDS[i] == id).then(|| (id, id.into())),
                        })
                        .collect();
                    let expected_mode = p.mode(now);
                    let choice = p.choose(now, &mut rng, &exclude);
                    match choice {
                        Some((c, mode)) => {
                            prop_assert_eq!(mode, expected_mode);
                            prop_assert_eq!(allowed.get(&*c.id), Some(&c.address.to_string()));
                        }
                        None => prop_assert!(allowed.is_empty(), "refused with a candidate left"),
                    }
                }
                Op::Connected(i) => {
                    p.connected(IDS[i], now);
                    *open.entry(IDS[i]).or_default() += 1;
                }
                Op::Released(i) => {
                    p.released(IDS[i]);
                    let n = open.entry(IDS[i]).or_default();
                    *n = n.saturating_sub(1);
                }
                Op::Failed(i) => p.failed(IDS[i], now),
                Op::Wait { ms } => now += Duration::from_millis(ms),
            }
            for id in IDS {
                prop_assert_eq!(p.open_connections(id), open.get(id).copied().unwrap_or(0));
            }
            prop_assert!(p.known.windows(2).all(|w| w[0].id < w[1].id), "sorted, unique");
        }
    }
}

/// A restarted herald's empty table does not take away the workers this proxy knows.
#[test]
fn an_empty_table_does_not_replace_known_workers() {
    let t0 = Instant::now();
    let mut p = placer(ten(|_| 0.3, 0.0001), t0);
    p.update(table(Vec::new()), after(t0, 100));
    assert_eq!(
        p.table().map(|(t, at)| (t.workers.len(), at)),
        Some((10, t0))
    );
    assert!(chosen(&mut p, after(t0, 100), &[]).is_some());
    // Nor the static list: a herald that has just started trusts nobody yet.
    let mut fixed = Placer::new(PlaceSettings {
        static_workers: vec!["10.0.0.1:80".into()],
        ..PlaceSettings::default()
    });
    fixed.update(table(Vec::new()), t0);
    assert_eq!(fixed.mode(t0), Mode::Static);
    assert!(chosen(&mut fixed, t0, &[]).is_some());
    // Without workers known, an empty table is taken as it is.
    let mut empty = placer(Vec::new(), t0);
    empty.update(table(Vec::new()), after(t0, 100));
    assert_eq!(empty.table().map(|(_, at)| at), Some(after(t0, 100)));
}
