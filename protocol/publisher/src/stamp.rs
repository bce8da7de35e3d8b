//! Position stamping and position-check scheduling, with no sockets and no clock: every call
//! that depends on time takes `now`.
//!
//! Invariants (the product contract, see protocol/PROTOCOL.md section 1):
//! - within one epoch, the offsets of a topic are 0, 1, 2, ... with no gap and no repeat;
//! - a position check for a topic carries the position of the last message stamped on it;
//! - a topic is due a check once it has told workers nothing (no message, no check) for
//!   `interval`, and then again every `interval` while it stays quiet.
//!
//! The stamper remembers every topic it has stamped until [`Stamper::restart`]: forgetting a
//! topic would restart its offsets at 0 within the same epoch, which workers would read as a
//! repeat. Memory therefore grows with the number of distinct topics, not with messages.

use protocol::Position;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Stamps positions for one publisher (one epoch) and decides when each topic needs a check.
#[derive(Debug, Clone)]
pub struct Stamper {
    epoch: u64,
    topics: HashMap<String, TopicStream>,
}

/// What the stamper knows about one topic.
#[derive(Debug, Clone, Copy)]
struct TopicStream {
    /// Position of the last message stamped on the topic.
    last: Position,
    /// When workers last heard the topic's position: its last message or its last check.
    told_at: Instant,
}

impl Stamper {
    /// A stamper for a fresh stream: every topic starts at offset 0 in `epoch`.
    pub fn new(epoch: u64) -> Stamper {
        Stamper {
            epoch,
            topics: HashMap::new(),
        }
    }

    /// The epoch every position carries.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Number of topics stamped since the stamper started (or restarted).
    pub fn topic_count(&self) -> usize {
        self.topics.len()
    }

    /// The position of the next message on `topic`, which is sent at `now`.
    pub fn stamp(&mut self, topic: &str, now: Instant) -> Position {
        if let Some(stream) = self.topics.get_mut(topic) {
            stream.last.offset += 1;
            stream.told_at = now;
            return stream.last;
        }
        let last = Position {
            epoch: self.epoch,
            offset: 0,
        };
        self.topics
            .insert(topic.to_owned(), TopicStream { last, told_at: now });
        last
    }

    /// The position of the last message stamped on `topic`, if any.
    pub fn last(&self, topic: &str) -> Option<Position> {
        self.topics.get(topic).map(|s| s.last)
    }

    /// The topics that have been quiet (no message, no check) for at least `interval` at
    /// `now`, each with its last position, sorted by topic. They count as checked at `now`.
    /// Looks at every topic: call it a few times per interval, not per message.
    ///
    /// `Duration::ZERO` returns every topic (a final round of checks before exiting).
    pub fn due_checks(&mut self, now: Instant, interval: Duration) -> Vec<(String, Position)> {
        let mut due: Vec<(String, Position)> = self
            .topics
            .iter_mut()
            .filter(|(_, s)| now.saturating_duration_since(s.told_at) >= interval)
            .map(|(topic, s)| {
                s.told_at = now;
                (topic.clone(), s.last)
            })
            .collect();
        due.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        due
    }

    /// Starts a new stream, as a restarted publisher would: `epoch` replaces the old one and
    /// every topic is forgotten, so offsets start at 0 again and no checks are due.
    pub fn restart(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.topics.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn pos(epoch: u64, offset: u64) -> Position {
        Position { epoch, offset }
    }

    #[test]
    fn offsets_start_at_zero_in_the_given_epoch_and_grow_by_one() {
        let t0 = Instant::now();
        let mut s = Stamper::new(7);
        assert_eq!(s.epoch(), 7);
        assert_eq!(s.stamp("a", t0), pos(7, 0));
        assert_eq!(s.stamp("a", t0), pos(7, 1));
        assert_eq!(s.stamp("a", t0), pos(7, 2));
    }

    #[test]
    fn topics_count_independently() {
        let t0 = Instant::now();
        let mut s = Stamper::new(1);
        assert_eq!(s.stamp("a", t0), pos(1, 0));
        assert_eq!(s.stamp("b", t0), pos(1, 0));
        assert_eq!(s.stamp("a", t0), pos(1, 1));
        assert_eq!(s.stamp("ab", t0), pos(1, 0));
        assert_eq!(s.stamp("b", t0), pos(1, 1));
        assert_eq!(s.topic_count(), 3);
    }

    #[test]
    fn last_is_the_latest_stamp_and_none_before_the_first() {
        let t0 = Instant::now();
        let mut s = Stamper::new(3);
        assert_eq!(s.last("a"), None);
        s.stamp("a", t0);
        assert_eq!(s.last("a"), Some(pos(3, 0)));
        s.stamp("a", t0);
        assert_eq!(s.last("a"), Some(pos(3, 1)));
        assert_eq!(s.last("b"), None);
    }

    #[test]
    fn no_checks_for_topics_never_stamped() {
        let mut s = Stamper::new(1);
        assert!(s.due_checks(Instant::now(), Duration::ZERO).is_empty());
    }

    #[test]
    fn a_check_is_due_once_the_topic_is_quiet_for_the_interval() {
        let t0 = Instant::now();
        let mut s = Stamper::new(5);
        s.stamp("a", t0);
        s.stamp("a", t0);
        assert!(s.due_checks(t0, SECOND).is_empty());
        assert!(s
            .due_checks(t0 + SECOND - Duration::from_nanos(1), SECOND)
            .is_empty());
        // "At least interval": exactly one interval is due.
        assert_eq!(s.due_checks(t0 + SECOND, SECOND), [("a".into(), pos(5, 1))]);
    }

    #[test]
    fn a_quiet_topic_is_checked_again_every_interval() {
        let t0 = Instant::now();
        let mut s = Stamper::new(5);
        s.stamp("a", t0);
        assert_eq!(s.due_checks(t0 + SECOND, SECOND).len(), 1);
        // Checked at t0+1s: not due again before t0+2s.
        assert!(s.due_checks(t0 + SECOND, SECOND).is_empty());
        assert!(s.due_checks(t0 + SECOND * 3 / 2, SECOND).is_empty());
        assert_eq!(
            s.due_checks(t0 + 2 * SECOND, SECOND),
            [("a".into(), pos(5, 0))]
        );
        assert_eq!(s.due_checks(t0 + 3 * SECOND, SECOND).len(), 1);
    }

    #[test]
    fn a_message_postpones_the_next_check() {
        let t0 = Instant::now();
        let mut s = Stamper::new(5);
        s.stamp("a", t0);
        s.stamp("a", t0 + SECOND / 2);
        assert!(s.due_checks(t0 + SECOND, SECOND).is_empty());
        assert_eq!(
            s.due_checks(t0 + SECOND * 3 / 2, SECOND),
            [("a".into(), pos(5, 1))]
        );
    }

    #[test]
    fn only_quiet_topics_are_due_and_they_come_sorted() {
        let t0 = Instant::now();
        let mut s = Stamper::new(2);
        s.stamp("c", t0);
        s.stamp("a", t0);
        s.stamp("busy", t0);
        s.stamp("b", t0);
        s.stamp("busy", t0 + SECOND);
        let due = s.due_checks(t0 + SECOND, SECOND);
        let topics: Vec<&str> = due.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(topics, ["a", "b", "c"]);
    }

    #[test]
    fn zero_interval_checks_every_topic() {
        let t0 = Instant::now();
        let mut s = Stamper::new(2);
        s.stamp("a", t0);
        s.stamp("b", t0);
        s.stamp("b", t0);
        assert_eq!(
            s.due_checks(t0, Duration::ZERO),
            [("a".into(), pos(2, 0)), ("b".into(), pos(2, 1))]
        );
        assert_eq!(s.due_checks(t0, Duration::ZERO).len(), 2);
    }

    #[test]
    fn a_clock_reading_older_than_the_last_message_is_not_due() {
        let t0 = Instant::now();
        let mut s = Stamper::new(2);
        s.stamp("a", t0 + SECOND);
        assert!(s.due_checks(t0, SECOND).is_empty());
    }

    #[test]
    fn restart_starts_a_new_epoch_from_offset_zero_and_forgets_topics() {
        let t0 = Instant::now();
        let mut s = Stamper::new(1);
        s.stamp("a", t0);
        s.stamp("a", t0);
        s.restart(2);
        assert_eq!(s.epoch(), 2);
        assert_eq!(s.last("a"), None);
        assert_eq!(s.topic_count(), 0);
        assert!(s.due_checks(t0 + 10 * SECOND, SECOND).is_empty());
        assert_eq!(s.stamp("a", t0), pos(2, 0));
    }

    /// One step of a publisher's life.
    #[derive(Debug, Clone)]
    enum Step {
        /// Publish on topic `n` after `ms` milliseconds.
        Publish(u8, u16),
        /// Look for due checks (interval 1 s) after `ms` milliseconds.
        Checks(u16),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => (0u8..5, 0u16..700).prop_map(|(t, ms)| Step::Publish(t, ms)),
            1 => (0u16..3000).prop_map(Step::Checks),
        ]
    }

    proptest! {
        #[test]
        fn offsets_are_contiguous_per_topic_whatever_the_interleaving(
            epoch: u64,
            steps in proptest::collection::vec(step(), 0..300),
        ) {
            let mut now = Instant::now();
            let mut s = Stamper::new(epoch);
            let mut expected = [0u64; 5];
            for step in steps {
                match step {
                    Step::Publish(t, ms) => {
                        now += Duration::from_millis(ms.into());
                        let topic = format!("topic.{t}");
                        let p = s.stamp(&topic, now);
                        prop_assert_eq!(p, Position { epoch, offset: expected[t as usize] });
                        expected[t as usize] += 1;
                    }
                    Step::Checks(ms) => {
                        now += Duration::from_millis(ms.into());
                        for (topic, last) in s.due_checks(now, SECOND) {
                            let t: usize = topic["topic.".len()..].parse().unwrap();
                            // A check names the last message actually stamped on its topic.
                            prop_assert!(expected[t] > 0);
                            prop_assert_eq!(last, Position { epoch, offset: expected[t] - 1 });
                        }
                    }
                }
            }
        }

        #[test]
        fn every_quiet_topic_is_checked_within_one_call_after_the_interval(
            quiet_ms in proptest::collection::vec(0u64..5000, 1..8),
        ) {
            let t0 = Instant::now();
            let mut s = Stamper::new(1);
            for (i, ms) in quiet_ms.iter().enumerate() {
                s.stamp(&format!("t{i}"), t0 + Duration::from_millis(5000 - ms));
            }
            let now = t0 + Duration::from_millis(5000);
            let due = s.due_checks(now, SECOND);
            let expected = quiet_ms.iter().filter(|ms| **ms >= 1000).count();
            prop_assert_eq!(due.len(), expected);
        }
    }
}
