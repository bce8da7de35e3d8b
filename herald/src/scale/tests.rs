//! The decision engine on recorded load sequences: a small simulated fleet where scale-outs
//! launch workers (they appear after a boot delay and warm up) and scale-ins drain them.

use super::*;
use proptest::prelude::*;

/// Seconds from boot until a launched worker reports.
const BOOT_S: u64 = 60;
/// Seconds until a trusted worker counts as warm (the fleet's default warm-up).
const WARMUP_S: u64 = 60;

#[derive(Clone)]
struct SimWorker {
    id: String,
    joined_s: u64,
    /// Running before the simulation started (warm at once).
    old: bool,
    connections: u64,
    draining_since: Option<u64>,
}

struct Sim {
    scaler: Scaler,
    t0: Instant,
    workers: Vec<SimWorker>,
    launches: Vec<u64>,
    decisions: Vec<(u64, Decision)>,
    next_id: usize,
    clock: u64,
}

impl Sim {
    fn new(n: usize, policy: ScalePolicy) -> Self {
        let mut sim = Sim {
            scaler: Scaler::new(policy),
            t0: Instant::now(),
            workers: Vec::new(),
            launches: Vec::new(),
            decisions: Vec::new(),
            next_id: 0,
            clock: 0,
        };
        for i in 0..n {
            // Old workers, warm from the start; connections differ so the cheapest is known.
            sim.add(0, 1000 + 100 * i as u64, true);
        }
        sim
    }

    fn add(&mut self, t: u64, connections: u64, old: bool) {
        self.workers.push(SimWorker {
            id: format!("w{:02}", self.next_id),
            joined_s: t,
            old,
            connections,
            draining_since: None,
        });
        self.next_id += 1;
    }

    fn warm(&self, w: &SimWorker, t: u64) -> bool {
        w.old || t >= w.joined_s + WARMUP_S
    }

    /// Runs for `seconds` in 2 s report steps; `load(t, worker, warm, live)` is a worker's
    /// utilisation.
    fn run(&mut self, seconds: u64, load: impl Fn(u64, &SimWorker, bool, usize) -> f64) {
        let mut t = self.clock;
        let end = t + seconds;
        while t < end {
            // Launched workers boot; drained ones leave a minute after their drain began.
            let due: Vec<u64> = self
                .launches
                .iter()
                .copied()
                .filter(|&at| at <= t)
                .collect();
            self.launches.retain(|&at| at > t);
            for _ in due {
                self.add(t, 0, false);
            }
            self.workers
                .retain(|w| w.draining_since.is_none_or(|since| t < since + 60));
            let live = self
                .workers
                .iter()
                .filter(|w| w.draining_since.is_none())
                .count();
            let members: Vec<Member> = self
                .workers
                .iter()
                .map(|w| Member {
                    id: w.id.clone(),
                    utilisation: load(t, w, self.warm(w, t), live),
                    connections: w.connections,
                    warm: self.warm(w, t),
                    draining: w.draining_since.is_some(),
                })
                .collect();
            if let Some(d) = self
                .scaler
                .decide(&members, self.t0 + Duration::from_secs(t))
            {
                match &d {
                    Decision::Out { desired, .. } => {
                        for _ in live as u32..*desired {
                            self.launches.push(t + BOOT_S);
                        }
                    }
                    Decision::In { drain, .. } => {
                        let w = self.workers.iter_mut().find(|w| &w.id == drain).unwrap();
                        w.draining_since = Some(t);
                    }
                }
                self.decisions.push((t, d));
            }
            t += 2;
            self.clock = t;
        }
    }
}

/// Deterministic noise in [-1, 1] from a time and an id.
fn noise(t: u64, w: &SimWorker) -> f64 {
    let mut x = t.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (w.id.len() as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    for b in w.id.bytes() {
        x = (x ^ b as u64).wrapping_mul(0x94D0_49BB_1331_11EB);
    }
    ((x >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
}

fn outs(sim: &Sim) -> Vec<u32> {
    sim.decisions
        .iter()
        .filter_map(|(_, d)| match d {
            Decision::Out { desired, .. } => Some(*desired),
            _ => None,
        })
        .collect()
}

fn ins(sim: &Sim) -> Vec<String> {
    sim.decisions
        .iter()
        .filter_map(|(_, d)| match d {
            Decision::In { drain, .. } => Some(drain.clone()),
            _ => None,
        })
        .collect()
}

/// Four workers at 0.9 for ten minutes: one scale-out, to ceil(3.6 / 0.6) = 6, and none
/// after it even though the four stay hot (their connections are long-lived) and the new two
/// are idle while they warm.
#[test]
fn sustained_overload_scales_out_once_to_the_right_count() {
    let mut sim = Sim::new(4, ScalePolicy::default());
    sim.run(600, |_, w, _, _| if w.old { 0.9 } else { 0.2 });
    assert_eq!(outs(&sim), [6]);
    let (at, _) = &sim.decisions[0];
    assert!(
        (60..=64).contains(at),
        "after the 60 s window, not before: {at}"
    );
    assert!(ins(&sim).is_empty());
    assert_eq!(sim.scaler.desired(), Some(6));
}

/// Half an hour of steady, noisy load around the target: nothing happens.
#[test]
fn steady_load_for_thirty_minutes_moves_nothing() {
    let mut sim = Sim::new(5, ScalePolicy::default());
    sim.run(1800, |t, w, _, _| 0.58 + 0.1 * noise(t, w));
    assert!(sim.decisions.is_empty(), "{:?}", sim.decisions);
    assert_eq!(sim.scaler.desired(), Some(5));
}

/// A 20 s spike to 0.95 in the middle of steady load: nothing happens.
#[test]
fn a_twenty_second_spike_moves_nothing() {
    let mut sim = Sim::new(4, ScalePolicy::default());
    sim.run(
        900,
        |t, _, _, _| if (300..320).contains(&t) { 0.95 } else { 0.55 },
    );
    assert!(sim.decisions.is_empty(), "{:?}", sim.decisions);
}

/// Load swinging between 0.85 and 0.3 every 40 s for half an hour: no flapping, no action.
#[test]
fn fast_oscillation_moves_nothing() {
    let mut sim = Sim::new(4, ScalePolicy::default());
    sim.run(
        1800,
        |t, _, _, _| if (t / 40) % 2 == 0 { 0.85 } else { 0.3 },
    );
    assert!(sim.decisions.is_empty(), "{:?}", sim.decisions);
}

/// Slow swings (3 min high, 3 min low) of a fixed total load spread over the warm workers: at
/// most one scale-out for the peaks, never a scale-in in the troughs (they are shorter than
/// the scale-in window), so the fleet never flaps.
#[test]
fn slow_oscillation_does_not_flap() {
    let mut sim = Sim::new(4, ScalePolicy::default());
    sim.run(1800, |t, _, warm, live| {
        let total = if (t / 180) % 2 == 0 { 3.4 } else { 1.4 };
        if warm {
            total / live as f64
        } else {
            0.05
        }
    });
    assert!(outs(&sim).len() <= 1, "{:?}", sim.decisions);
    assert!(ins(&sim).is_empty(), "{:?}", sim.decisions);
}

/// A quiet fleet shrinks one worker at a time, each time the one with the fewest
/// connections, and stops when one fewer would put the rest above target.
#[test]
fn scale_in_drains_the_fewest_connections_one_at_a_time() {
    let mut sim = Sim::new(4, ScalePolicy::default());
    // w02 has the fewest connections of all.
    sim.workers[2].connections = 10;
    // A total load of 0.9 spread over the live workers.
    sim.run(2400, |_, _, _, live| 0.9 / live as f64);
    let drained = ins(&sim);
    assert_eq!(drained.first().map(String::as_str), Some("w02"));
    // 0.9 over 2 workers is 0.45 ≤ 0.6; over 1 it would be 0.9 > 0.6: stops at 2.
    assert_eq!(drained, ["w02", "w00"]);
    assert_eq!(sim.scaler.desired(), Some(2));
    let times: Vec<u64> = sim.decisions.iter().map(|d| d.0).collect();
    assert!(times[0] >= 300, "waits for the scale-in window: {times:?}");
    assert!(times[1] - times[0] >= 300, "one at a time: {times:?}");
    assert!(outs(&sim).is_empty());
}

/// A quiet mean with one hot worker (the hottest 10%) is not a reason to scale in.
#[test]
fn a_hot_worker_blocks_scale_in() {
    let mut sim = Sim::new(10, ScalePolicy::default());
    sim.run(1200, |_, w, _, _| if w.id == "w03" { 0.75 } else { 0.2 });
    assert!(sim.decisions.is_empty(), "{:?}", sim.decisions);
}

/// Just-added idle workers do not hide hot ones: four warm workers at 0.9 and four
/// warming at 0 still scale out.
#[test]
fn warming_workers_do_not_mask_hot_ones() {
    let mut sim = Sim::new(4, ScalePolicy::default());
    for _ in 0..4 {
        // Counted as joined at 20 s: still warming when the 60 s window ends.
        sim.add(20, 0, false);
    }
    sim.run(70, |_, w, _, _| if w.old { 0.9 } else { 0.0 });
    assert_eq!(outs(&sim).len(), 1, "{:?}", sim.decisions);
}

/// Never below the minimum, never above the maximum.
#[test]
fn bounds_hold() {
    let policy = ScalePolicy {
        min_workers: 3,
        max_workers: 5,
        ..ScalePolicy::default()
    };
    let mut sim = Sim::new(3, policy.clone());
    sim.run(1200, |_, _, _, _| 0.0);
    assert!(
        sim.decisions.is_empty(),
        "at the minimum: {:?}",
        sim.decisions
    );
    let mut sim = Sim::new(4, policy);
    sim.run(600, |_, _, _, _| 2.0);
    assert_eq!(outs(&sim), [5]);
}

proptest! {
    /// On any load sequence: desired stays within bounds, decisions respect the cooldowns,
    /// and two scalers fed the same sequence decide the same thing.
    #[test]
    fn any_sequence_is_bounded_cooled_and_deterministic(
        steps in proptest::collection::vec((0.0f64..1.5, 0u8..4), 50..400)
    ) {
        let policy = ScalePolicy { min_workers: 2, max_workers: 12, ..ScalePolicy::default() };
        let run = || {
            let mut sim = Sim::new(4, policy.clone());
            for (load, repeat) in &steps {
                let load = *load;
                sim.run(10 * (*repeat as u64 + 1), move |_, _, _, _| load);
            }
            sim
        };
        let a = run();
        let b = run();
        prop_assert_eq!(&a.decisions, &b.decisions);
        for (_, d) in &a.decisions {
            let desired = match d { Decision::Out { desired, .. } | Decision::In { desired, .. } => *desired };
            prop_assert!((2..=12).contains(&desired), "{:?}", d);
        }
        for pair in a.decisions.windows(2) {
            let gap = Duration::from_secs(pair[1].0 - pair[0].0);
            let cooldown = match pair[1].1 {
                Decision::Out { .. } => policy.scale_out_cooldown,
                Decision::In { .. } => policy.scale_in_cooldown,
            };
            prop_assert!(gap >= cooldown, "{:?}", pair);
        }
    }
}
