//! Which topics and prefixes the worker needs from its publishers: a reference count per
//! ZeroMQ subscription string, so the worker subscribes upstream when the first local client
//! wants something and unsubscribes when the last one leaves. An exact topic `a.b` becomes
//! the ZeroMQ prefix `a.b` (which also lets `a.bc` through; fan-out filters exactly).

use std::collections::{BTreeMap, BTreeSet};

/// Reference counts of ZeroMQ subscription strings.
#[derive(Debug, Default, Clone)]
pub struct Interest {
    counts: BTreeMap<String, usize>,
}

impl Interest {
    /// Counts one more local subscription; true if upstream must now subscribe.
    pub fn add(&mut self, prefix: &str) -> bool {
        let n = self.counts.entry(prefix.to_string()).or_insert(0);
        *n += 1;
        *n == 1
    }

    /// Counts one fewer; true if upstream must now unsubscribe.
    pub fn remove(&mut self, prefix: &str) -> bool {
        match self.counts.get_mut(prefix) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                self.counts.remove(prefix);
                true
            }
            None => false,
        }
    }

    /// The strings upstream should be subscribed to.
    pub fn wanted(&self) -> BTreeSet<String> {
        self.counts.keys().cloned().collect()
    }
}

/// What to change upstream to go from `applied` to `wanted`: (subscribe, unsubscribe).
pub fn diff(applied: &BTreeSet<String>, wanted: &BTreeSet<String>) -> (Vec<String>, Vec<String>) {
    (
        wanted.difference(applied).cloned().collect(),
        applied.difference(wanted).cloned().collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn first_in_subscribes_last_out_unsubscribes() {
        let mut i = Interest::default();
        assert!(i.add("a"));
        assert!(!i.add("a"));
        assert!(!i.remove("a"));
        assert!(i.remove("a"));
        assert!(!i.remove("a"), "removing what is not there changes nothing");
        assert!(i.wanted().is_empty());
    }

    proptest! {
        /// Any sequence of adds and removes (removes only of what was added) leaves exactly the
        /// strings with a positive balance, and applying the diffs in order tracks them.
        #[test]
        fn tracks_balance(ops in proptest::collection::vec((0u8..4, any::<bool>()), 0..200)) {
            let mut i = Interest::default();
            let mut model: BTreeMap<String, i32> = BTreeMap::new();
            let mut applied = BTreeSet::new();
            for (k, add) in ops {
                let key = format!("t{k}");
                let n = model.entry(key.clone()).or_insert(0);
                if add { *n += 1; i.add(&key); } else if *n > 0 { *n -= 1; i.remove(&key); }
                let wanted = i.wanted();
                let (sub, unsub) = diff(&applied, &wanted);
                for s in sub { applied.insert(s); }
                for s in unsub { applied.remove(&s); }
                prop_assert_eq!(&applied, &wanted);
            }
            let expected: BTreeSet<String> =
                model.into_iter().filter(|(_, n)| *n > 0).map(|(k, _)| k).collect();
            prop_assert_eq!(i.wanted(), expected);
        }
    }
}
