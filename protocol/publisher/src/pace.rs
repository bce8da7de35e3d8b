//! Pacing of generated messages: how many rounds (one message per topic) are due at `now` for
//! a steady rate, without drift. Rates above the timer resolution come out as small bursts.

use std::time::{Duration, Instant};

/// Rounds at a fixed rate from a start time; the first round is due at the start.
#[derive(Debug, Clone)]
pub struct Pacer {
    start: Instant,
    rounds_per_s: f64,
    sent: u64,
}

impl Pacer {
    /// A pacer of `rounds_per_s` (finite, positive) rounds per second from `start`.
    pub fn new(start: Instant, rounds_per_s: f64) -> Pacer {
        debug_assert!(rounds_per_s.is_finite() && rounds_per_s > 0.0);
        Pacer {
            start,
            rounds_per_s,
            sent: 0,
        }
    }

    /// Rounds due at `now` and not yet sent.
    pub fn due(&self, now: Instant) -> u64 {
        let elapsed_ns = now.saturating_duration_since(self.start).as_nanos() as f64;
        // The epsilon absorbs float rounding, so that round n is due at `next_at`, not after.
        let due_total = (elapsed_ns * self.rounds_per_s / 1e9 + 1e-9).floor() as u64 + 1;
        due_total.saturating_sub(self.sent)
    }

    /// Records that `rounds` more rounds went out.
    pub fn sent(&mut self, rounds: u64) {
        self.sent += rounds;
    }

    /// Rounds sent so far.
    pub fn rounds_sent(&self) -> u64 {
        self.sent
    }

    /// When the next unsent round is due.
    pub fn next_at(&self) -> Instant {
        // Rounded up to the nanosecond, so that the round is due at the instant returned.
        let ns = (self.sent as f64 * 1e9 / self.rounds_per_s).ceil();
        self.start + Duration::from_nanos(ns as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_first_round_is_due_at_once_then_one_per_period() {
        let t0 = Instant::now();
        let mut p = Pacer::new(t0, 10.0);
        assert_eq!(p.due(t0), 1);
        p.sent(1);
        assert_eq!(p.due(t0), 0);
        assert_eq!(p.next_at(), t0 + Duration::from_millis(100));
        assert_eq!(p.due(t0 + Duration::from_millis(99)), 0);
        assert_eq!(p.due(t0 + Duration::from_millis(100)), 1);
        assert_eq!(p.due(t0 + Duration::from_millis(350)), 3);
        p.sent(3);
        assert_eq!(p.rounds_sent(), 4);
        assert_eq!(p.next_at(), t0 + Duration::from_millis(400));
    }

    #[test]
    fn high_rates_come_as_bursts() {
        let t0 = Instant::now();
        let p = Pacer::new(t0, 100_000.0);
        assert_eq!(p.due(t0 + Duration::from_millis(1)), 101);
    }

    #[test]
    fn a_clock_before_the_start_has_the_first_round_due() {
        let t0 = Instant::now() + Duration::from_secs(1);
        assert_eq!(Pacer::new(t0, 1.0).due(Instant::now()), 1);
    }

    proptest! {
        #[test]
        fn at_next_at_exactly_one_round_is_due(rate in 0.01f64..1e6, rounds in 0u64..100_000) {
            let t0 = Instant::now();
            let mut p = Pacer::new(t0, rate);
            p.sent(rounds);
            prop_assert_eq!(p.due(p.next_at()), 1);
        }
    }
}
