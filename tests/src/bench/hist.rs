//! A latency histogram that merges by adding counts, so load generator processes can send
//! theirs to the coordinator as sparse `[bucket, count]` pairs. Buckets are 10 µs wide below
//! 1 ms and 2 % wide above (up to ~2 minutes): a quantile is off by at most one bucket.

/// Bucket count: 100 linear buckets below 1 ms, then 2 % steps.
const LINEAR: usize = 100;
const BUCKETS: usize = LINEAR + 600;
const STEP: f64 = 1.02;

/// Counts of microsecond values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hist {
    counts: Vec<u64>,
    total: u64,
    max_us: u64,
}

impl Default for Hist {
    fn default() -> Self {
        Hist {
            counts: vec![0; BUCKETS],
            total: 0,
            max_us: 0,
        }
    }
}

fn bucket(us: u64) -> usize {
    if us < 1000 {
        return (us / 10) as usize;
    }
    let i = LINEAR + ((us as f64 / 1000.0).ln() / STEP.ln()) as usize;
    i.min(BUCKETS - 1)
}

/// The largest value a bucket holds.
fn upper(i: usize) -> u64 {
    if i < LINEAR {
        return (i as u64 + 1) * 10 - 1;
    }
    (1000.0 * STEP.powi((i - LINEAR + 1) as i32)) as u64
}

impl Hist {
    /// Counts one value.
    pub fn record(&mut self, us: u64) {
        self.counts[bucket(us)] += 1;
        self.total += 1;
        self.max_us = self.max_us.max(us);
    }

    /// Values counted.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The largest value counted.
    pub fn max_us(&self) -> u64 {
        self.max_us
    }

    /// The value at quantile `q` (0..=1), as its bucket's upper bound; 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                // The last bucket holds everything past its bound.
                return if i == BUCKETS - 1 {
                    self.max_us
                } else {
                    upper(i).min(self.max_us)
                };
            }
        }
        self.max_us
    }

    /// Adds `other`'s counts.
    pub fn merge(&mut self, other: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max_us = self.max_us.max(other.max_us);
    }

    /// `{"max":M,"b":[[bucket,count],...]}` with the non-empty buckets only.
    pub fn to_json(&self) -> serde_json::Value {
        let b: Vec<[u64; 2]> = self
            .counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(i, c)| [i as u64, *c])
            .collect();
        serde_json::json!({"max": self.max_us, "b": b})
    }

    /// The inverse of [`Hist::to_json`]; `None` if `v` is not one.
    pub fn from_json(v: &serde_json::Value) -> Option<Hist> {
        let mut h = Hist {
            max_us: v["max"].as_u64()?,
            ..Hist::default()
        };
        for pair in v["b"].as_array()? {
            let i = usize::try_from(pair[0].as_u64()?).ok()?;
            let c = pair[1].as_u64()?;
            *h.counts.get_mut(i)? += c;
            h.total += c;
        }
        Some(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_one_bucket() {
        let mut h = Hist::default();
        for us in 1..=100_000u64 {
            h.record(us);
        }
        for (q, exact) in [(0.5, 50_000.0), (0.99, 99_000.0), (0.001, 100.0)] {
            let got = h.quantile(q) as f64;
            assert!(
                (got - exact).abs() <= exact * 0.021 + 10.0,
                "q{q}: {got} vs {exact}"
            );
        }
        assert_eq!(h.quantile(1.0), 100_000);
        assert_eq!(Hist::default().quantile(0.5), 0);
    }

    #[test]
    fn merges_and_round_trips_through_json() {
        let (mut a, mut b) = (Hist::default(), Hist::default());
        a.record(5);
        a.record(2_000);
        b.record(300_000_000); // past the last bucket: counted there
        let back = Hist::from_json(&a.to_json()).unwrap();
        assert_eq!(back, a);
        a.merge(&b);
        assert_eq!(a.total(), 3);
        assert_eq!(a.max_us(), 300_000_000);
        assert_eq!(a.quantile(1.0), 300_000_000);
        assert!(Hist::from_json(&serde_json::json!({"max":1,"b":[[9999,1]]})).is_none());
    }
}
