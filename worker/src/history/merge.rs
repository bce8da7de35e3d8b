//! Putting a topic's messages back in order: what arrived live ahead of a hole is held; what a
//! peer sends to fill the hole is merged with it by offset. Whatever order the two sources
//! arrive in, the result is contiguous from `next` and has each offset once.

use std::collections::BTreeMap;

/// Something with an offset in its topic's stream.
pub trait Offset {
    /// The offset.
    fn offset(&self) -> u64;
}

/// Adds `incoming` to `held` (offsets below `next` are already delivered and are dropped; the
/// first copy of an offset wins), then takes out the contiguous run starting at `next`, in
/// order, and advances `next` past it. Returns the run and how many incoming were new.
pub fn take_contiguous<E: Offset>(
    next: &mut u64,
    held: &mut BTreeMap<u64, E>,
    incoming: impl IntoIterator<Item = E>,
) -> (Vec<E>, usize) {
    let mut added = 0;
    for e in incoming {
        let offset = e.offset();
        if offset >= *next {
            if let std::collections::btree_map::Entry::Vacant(slot) = held.entry(offset) {
                slot.insert(e);
                added += 1;
            }
        }
    }
    let mut run = Vec::new();
    while let Some(e) = held.remove(next) {
        run.push(e);
        *next += 1;
    }
    (run, added)
}

/// The first hole at or after `next`, as `(from, to)` inclusive, given what is held and the
/// newest offset known to exist (`known_last`, from a position check). None when in sync.
pub fn first_hole<E>(
    next: u64,
    held: &BTreeMap<u64, E>,
    known_last: Option<u64>,
) -> Option<(u64, u64)> {
    match held.keys().next() {
        Some(&first) => (first > next).then(|| (next, first - 1)),
        None => known_last.filter(|&k| k >= next).map(|k| (next, k)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone, PartialEq, Eq)]
    struct E(u64, &'static str);
    impl Offset for E {
        fn offset(&self) -> u64 {
            self.0
        }
    }

    #[test]
    fn holds_until_the_hole_is_filled() {
        let mut next = 5;
        let mut held = BTreeMap::new();
        let (run, _) = take_contiguous(&mut next, &mut held, [E(7, "live"), E(8, "live")]);
        assert!(run.is_empty());
        assert_eq!(first_hole(next, &held, None), Some((5, 6)));
        let (run, added) = take_contiguous(
            &mut next,
            &mut held,
            [E(4, "peer"), E(5, "peer"), E(6, "peer"), E(7, "peer")],
        );
        assert_eq!(added, 2, "4 is delivered already, 7 is held already");
        assert_eq!(
            run,
            vec![E(5, "peer"), E(6, "peer"), E(7, "live"), E(8, "live")]
        );
        assert_eq!(next, 9);
        assert_eq!(first_hole(next, &held, Some(8)), None);
        assert_eq!(first_hole(next, &held, Some(10)), Some((9, 10)));
    }

    proptest! {
        /// Live messages `start..end` with some lost, arriving in any order and possibly twice,
        /// plus a peer's history `peer_from..peer_to` merged at any moment: what is taken out
        /// is exactly `start..` up to the first offset nobody had, each once, in order.
        #[test]
        fn any_interleaving_gives_a_contiguous_run_without_duplicates(
            start in 0u64..5,
            len in 1u64..60,
            lost in proptest::collection::btree_set(0u64..60, 0..20),
            dup in proptest::collection::vec(0u64..60, 0..10),
            peer_from in 0u64..10,
            peer_len in 0u64..70,
            merge_at in 0usize..80,
            shuffle_seed in any::<u64>(),
        ) {
            let end = start + len;
            let mut live: Vec<u64> = (start..end).filter(|o| !lost.contains(&(o - start))).collect();
            live.extend(dup.iter().map(|d| start + d % len));
            // A deterministic shuffle from the seed.
            let mut seed = shuffle_seed | 1;
            for i in (1..live.len()).rev() {
                seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17;
                live.swap(i, (seed % (i as u64 + 1)) as usize);
            }
            let peer: Vec<u64> = (peer_from..peer_from + peer_len).collect();
            let mut next = start;
            let mut held = BTreeMap::new();
            let mut out = Vec::new();
            for (i, o) in live.iter().enumerate() {
                if i == merge_at.min(live.len()) {
                    out.extend(take_contiguous(&mut next, &mut held, peer.iter().map(|&p| E(p, "peer"))).0);
                }
                out.extend(take_contiguous(&mut next, &mut held, [E(*o, "live")]).0);
            }
            if merge_at >= live.len() {
                out.extend(take_contiguous(&mut next, &mut held, peer.iter().map(|&p| E(p, "peer"))).0);
            }
            let offsets: Vec<u64> = out.iter().map(|e| e.0).collect();
            // Contiguous from start, no duplicates.
            let expected: Vec<u64> = (start..start + offsets.len() as u64).collect();
            prop_assert_eq!(&offsets, &expected);
            // It stops exactly at the first offset neither source had.
            let had = |o: u64| live.contains(&o) || peer.contains(&o);
            let first_missing = (start..).find(|&o| !had(o)).unwrap();
            prop_assert_eq!(next, first_missing);
            // Nothing below `next` is left held; the hole reported is the real one.
            prop_assert!(held.keys().all(|&k| k > next));
            if let Some((from, to)) = first_hole(next, &held, None) {
                prop_assert_eq!(from, next);
                prop_assert!((from..=to).all(|o| !had(o)));
                prop_assert!(had(to + 1));
            }
        }
    }
}
