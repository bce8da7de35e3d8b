//! Admission control: a token bucket on new connections and a cap on concurrent ones. Over
//! either, the client gets HTTP 503 with a jittered `Retry-After` before any upgrade.
//!
//! Order of checks: the bucket first, then a slot. A refused connection takes neither: a
//! client refused for the cap keeps its token for the next one, and one refused for the rate
//! holds no slot. The bucket refills from the `now` each caller passes in (an earlier `now`
//! than one already seen adds nothing), so tests drive time by hand.
//!
//! `Retry-After` is drawn uniformly from a range: a crowd refused together (a kick-off, a
//! worker dying) comes back spread over the range instead of as the next spike.

use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Admission limits.
#[derive(Debug, Clone)]
pub struct AdmissionSettings {
    /// New connections per second admitted on average (0: only the burst, ever).
    pub rate_per_s: f64,
    /// Burst: new connections admitted at once above the rate (the bucket's size; 0 acts
    /// as 1, since a bucket that holds no token admits nothing).
    pub burst: u32,
    /// Most connections open at once.
    pub max_connections: usize,
    /// `Retry-After` is drawn uniformly from this range, so refused clients come back spread
    /// out instead of together.
    pub retry_after: (Duration, Duration),
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Over the new-connection rate.
    Rate,
    /// Over the concurrent-connection cap.
    Connections,
}

impl Refusal {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Rate => "rate",
            Refusal::Connections => "connections",
        }
    }
}

/// Held for the life of an admitted connection; dropping it frees its slot.
#[derive(Debug)]
pub struct Permit {
    open: Arc<AtomicUsize>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        // One permit per slot taken: never below zero.
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The token bucket and the jitter source, behind one lock.
#[derive(Debug)]
struct Bucket {
    /// `0..=capacity`.
    tokens: f64,
    /// Latest `now` the bucket was refilled to; `None` before the first admission.
    refilled_at: Option<Instant>,
    rng: StdRng,
}

/// Shared by every accept: `&self` methods, safe to call from many tasks.
#[derive(Debug)]
pub struct Admission {
    settings: AdmissionSettings,
    /// Tokens the bucket holds when full.
    capacity: f64,
    /// Refill rate, tokens per second, finite and not negative.
    rate_per_s: f64,
    bucket: Mutex<Bucket>,
    /// Slots taken; only `admit` raises it, under the bucket lock, and never above the cap.
    open: Arc<AtomicUsize>,
}

impl Admission {
    /// Admission with these limits; the bucket starts full.
    pub fn new(settings: AdmissionSettings) -> Self {
        Admission::with_seed(settings, rand::rng().random())
    }

    /// Admission whose `Retry-After` jitter comes from a generator seeded with `seed`
    /// (reproducible tests).
    pub fn with_seed(settings: AdmissionSettings, seed: u64) -> Self {
        let capacity = f64::from(settings.burst.max(1));
        let rate_per_s = match settings.rate_per_s {
            r if r.is_nan() || r <= 0.0 => 0.0,
            r => r.min(f64::MAX),
        };
        Admission {
            capacity,
            rate_per_s,
            bucket: Mutex::new(Bucket {
                tokens: capacity,
                refilled_at: None,
                rng: StdRng::seed_from_u64(seed),
            }),
            open: Arc::new(AtomicUsize::new(0)),
            settings,
        }
    }

    /// Admits a new connection at `now`, or says why not and when to retry.
    pub fn admit(&self, now: Instant) -> Result<Permit, (Refusal, Duration)> {
        let mut b = self.bucket.lock();
        match b.refilled_at {
            Some(at) if now > at => {
                let earned = now.duration_since(at).as_secs_f64() * self.rate_per_s;
                b.tokens = (b.tokens + earned).min(self.capacity);
                b.refilled_at = Some(now);
            }
            Some(_) => {}
            None => b.refilled_at = Some(now),
        }
        if b.tokens < 1.0 {
            return Err((Refusal::Rate, self.retry_after(&mut b.rng)));
        }
        let max = self.settings.max_connections;
        if self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_err()
        {
            return Err((Refusal::Connections, self.retry_after(&mut b.rng)));
        }
        b.tokens -= 1.0;
        Ok(Permit {
            open: self.open.clone(),
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// A `Retry-After` drawn uniformly from the configured range (bounds in either order).
    fn retry_after(&self, rng: &mut StdRng) -> Duration {
        let (a, b) = self.settings.retry_after;
        let (lo, hi) = (a.min(b), a.max(b));
        lo + (hi - lo).mul_f64(rng.random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::atomic::AtomicBool;

    fn settings(rate_per_s: f64, burst: u32, max_connections: usize) -> AdmissionSettings {
        AdmissionSettings {
            rate_per_s,
            burst,
            max_connections,
            retry_after: (Duration::from_secs(1), Duration::from_secs(5)),
        }
    }

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn the_burst_passes_at_once_then_the_rate() {
        let a = Admission::with_seed(settings(10.0, 5, 1000), 1);
        let t0 = Instant::now();
        let mut held = Vec::new();
        for _ in 0..5 {
            held.push(a.admit(t0).expect("within the burst"));
        }
        assert_eq!(a.admit(t0).unwrap_err().0, Refusal::Rate);
        assert_eq!(a.admit(ms(t0, 50)).unwrap_err().0, Refusal::Rate);
        held.push(
            a.admit(ms(t0, 101))
                .expect("one token after 100 ms at 10/s"),
        );
        assert_eq!(a.admit(ms(t0, 101)).unwrap_err().0, Refusal::Rate);
        // Ten seconds earn a hundred tokens, of which the bucket keeps its size.
        let later = ms(t0, 10_000);
        let admitted = (0..20).filter(|_| a.admit(later).is_ok()).count();
        assert_eq!(admitted, 5, "a long pause refills the burst, no more");
    }

    #[test]
    fn over_a_second_the_rate_holds() {
        let a = Admission::with_seed(settings(100.0, 10, 100_000), 1);
        let t0 = Instant::now();
        let mut held = Vec::new();
        // One attempt per millisecond for a second: the burst plus 100.
        for i in 0..=1000 {
            if let Ok(p) = a.admit(ms(t0, i)) {
                held.push(p);
            }
        }
        assert!((109..=111).contains(&held.len()), "{}", held.len());
    }

    #[test]
    fn the_cap_refuses_and_dropping_a_permit_frees_its_slot() {
        let a = Admission::with_seed(settings(1e6, 100, 2), 1);
        let t0 = Instant::now();
        let p1 = a.admit(t0).unwrap();
        let _p2 = a.admit(t0).unwrap();
        assert_eq!(a.open(), 2);
        assert_eq!(a.admit(t0).unwrap_err().0, Refusal::Connections);
        drop(p1);
        assert_eq!(a.open(), 1);
        let _p3 = a.admit(t0).expect("the freed slot");
        assert_eq!(a.open(), 2);
    }

    #[test]
    fn a_refused_connection_takes_no_token_and_no_slot() {
        // No refill: tokens are only the burst.
        let a = Admission::with_seed(settings(0.0, 2, 1), 1);
        let t0 = Instant::now();
        let p = a.admit(t0).unwrap();
        for _ in 0..10 {
            assert_eq!(a.admit(t0).unwrap_err().0, Refusal::Connections);
        }
        drop(p);
        let p = a
            .admit(t0)
            .expect("refusals for the cap kept the second token");
        drop(p);
        assert_eq!(a.admit(t0).unwrap_err().0, Refusal::Rate);
        assert_eq!(a.open(), 0, "a refusal for the rate holds no slot");
    }

    #[test]
    fn time_going_backwards_adds_no_tokens() {
        let a = Admission::with_seed(settings(10.0, 1, 10), 1);
        let t0 = Instant::now() + Duration::from_secs(10);
        let _p = a.admit(t0).unwrap();
        assert_eq!(
            a.admit(t0 - Duration::from_secs(5)).unwrap_err().0,
            Refusal::Rate
        );
        assert_eq!(a.admit(ms(t0, 50)).unwrap_err().0, Refusal::Rate);
        assert!(a.admit(ms(t0, 101)).is_ok());
    }

    #[test]
    fn a_zero_burst_still_admits_at_the_rate() {
        let a = Admission::with_seed(settings(1.0, 0, 10), 1);
        let t0 = Instant::now();
        assert!(a.admit(t0).is_ok());
        assert_eq!(a.admit(t0).unwrap_err().0, Refusal::Rate);
        assert!(a.admit(ms(t0, 1000)).is_ok());
    }

    #[test]
    fn retry_after_is_jittered_across_its_range() {
        let a = Admission::with_seed(settings(0.0, 1, 10), 7);
        let t0 = Instant::now();
        let _p = a.admit(t0).unwrap();
        let waits: Vec<Duration> = (0..500).map(|_| a.admit(t0).unwrap_err().1).collect();
        let (lo, hi) = (Duration::from_secs(1), Duration::from_secs(5));
        assert!(waits.iter().all(|w| (lo..=hi).contains(w)));
        let min = *waits.iter().min().unwrap();
        let max = *waits.iter().max().unwrap();
        assert!(min < Duration::from_millis(1200), "{min:?}");
        assert!(max > Duration::from_millis(4800), "{max:?}");
        // Spread: each second of the range gets a fair part of the draws.
        for s in 1..5 {
            let n = waits.iter().filter(|w| w.as_secs() == s).count();
            assert!((75..=175).contains(&n), "{s} s: {n} of 500");
        }
    }

    #[test]
    fn retry_after_for_the_cap_is_jittered_too_and_bounds_may_be_equal() {
        let mut s = settings(1e6, 100, 0);
        let a = Admission::with_seed(s.clone(), 3);
        let t0 = Instant::now();
        let waits: Vec<Duration> = (0..50).map(|_| a.admit(t0).unwrap_err().1).collect();
        assert!(waits.iter().any(|w| *w != waits[0]), "not constant");
        s.retry_after = (Duration::from_secs(2), Duration::from_secs(2));
        let a = Admission::with_seed(s, 3);
        assert_eq!(
            a.admit(t0).unwrap_err(),
            (Refusal::Connections, Duration::from_secs(2))
        );
    }

    #[test]
    fn concurrent_admissions_never_exceed_the_cap() {
        const CAP: usize = 16;
        let a = Arc::new(Admission::new(settings(1e9, 1_000_000, CAP)));
        let held = Arc::new(AtomicUsize::new(0));
        let over = Arc::new(AtomicBool::new(false));
        let admitted = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let (a, held, over, admitted) =
                    (a.clone(), held.clone(), over.clone(), admitted.clone());
                std::thread::spawn(move || {
                    let mut mine = Vec::new();
                    for i in 0..5_000usize {
                        if let Ok(p) = a.admit(Instant::now()) {
                            admitted.fetch_add(1, Ordering::Relaxed);
                            if held.fetch_add(1, Ordering::SeqCst) + 1 > CAP || a.open() > CAP {
                                over.store(true, Ordering::SeqCst);
                            }
                            mine.push(p);
                        }
                        // Hold a few, release in varying order.
                        if mine.len() > (i + t) % 4 {
                            held.fetch_sub(1, Ordering::SeqCst);
                            mine.swap_remove(0);
                        }
                    }
                    held.fetch_sub(mine.len(), Ordering::SeqCst);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(!over.load(Ordering::SeqCst), "more than {CAP} open at once");
        assert!(admitted.load(Ordering::Relaxed) > CAP, "slots were reused");
        assert_eq!(a.open(), 0, "every dropped permit freed its slot");
    }

    proptest! {
        /// Over any span, admissions never beat the burst plus the rate times the span, and
        /// open connections never beat the cap.
        #[test]
        fn never_more_than_burst_plus_rate(
            rate in 0.0f64..200.0,
            burst in 0u32..20,
            cap in 0usize..30,
            steps in proptest::collection::vec((0u64..50, any::<bool>()), 1..300),
        ) {
            let a = Admission::with_seed(settings(rate, burst, cap), 1);
            let t0 = Instant::now();
            let (mut at_ms, mut admitted) = (0u64, 0usize);
            let mut held = Vec::new();
            for (advance_ms, release) in steps {
                at_ms += advance_ms;
                if release && !held.is_empty() {
                    held.remove(0);
                }
                if let Ok(p) = a.admit(ms(t0, at_ms)) {
                    admitted += 1;
                    held.push(p);
                }
                prop_assert!(a.open() <= cap);
                prop_assert_eq!(a.open(), held.len());
                let allowed = f64::from(burst.max(1)) + rate * at_ms as f64 / 1000.0;
                prop_assert!(admitted as f64 <= allowed + 1e-9, "{} > {}", admitted, allowed);
            }
        }
    }
}
