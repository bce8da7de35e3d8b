//! Per-topic history and stream order. Pure logic: no sockets, no clock of its own (`now` is
//! passed in); the hub calls it from its single dispatcher task and carries out the
//! [`Effect`]s it returns (fan-out, notices, fetches from peers).
//!
//! For each topic covered by a history [`Rule`] the worker keeps a stream: the epoch, the
//! contiguous run of recent messages (the history), and `next`, the offset expected next.
//!
//! ```text
//!  offer(offset == next) ──▶ append + Deliver                       (the fast path)
//!  offer(offset <  next) ──▶ duplicate, dropped
//!  offer(offset >  next) ──▶ held; Fetch the hole from a peer ──▶ fetched(): merge by offset,
//!                             Deliver in order; a hole nobody has ──▶ Gap notice, history restarts
//!  check(last >= next)   ──▶ same as a hole (the topic's last message was lost)
//!  new epoch             ──▶ Reset notice, history restarts
//!  first sight, offset>0 ──▶ filling: Fetch the peer's history, merge with what arrives live
//! ```
//!
//! While a topic waits for a fetch, its live messages are held (for at most `repair_timeout`
//! per attempt) so that every subscriber sees the stream in order, and history requests for it
//! wait too: a reply is always a contiguous run followed by live messages, never a partial
//! or duplicated replay.

pub mod merge;
mod replay;
pub mod rule;

use crate::broadcast::Broadcast;
use crate::metrics::Metrics;
use bytes::Bytes;
use merge::{first_hole, take_contiguous, Offset};
use protocol::Position;
pub use replay::{Replay, SnapshotError};
pub use rule::{Pattern, Rule};
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Fetch attempts for one hole before it is declared lost; later attempts wait a little so a
/// peer that was only slightly behind has caught up.
const FETCH_ATTEMPTS: u32 = 3;
/// How many times `repair_timeout` a fill of a quiet topic (no live message waiting) may take.
const QUIET_FILL_PATIENCE: u32 = 10;
/// Epochs of a topic remembered as finished: their late messages are stale, not a new reset.
const RETIRED_EPOCHS: usize = 4;
/// When the memory cap is passed, evict down to this share of it so eviction runs in batches.
const EVICT_TO_PERCENT: usize = 90;

/// A positioned message kept (or held) for a topic.
#[derive(Clone)]
pub struct Entry {
    /// The encoded message, shared with fan-out.
    pub message: Arc<Broadcast>,
    /// The payload as published (handed to peers).
    pub payload: Bytes,
    /// When it reached this worker (for `max_age`).
    pub received_at: Instant,
    /// It arrived from the publisher (not from a peer's history).
    pub live: bool,
}

impl Entry {
    fn position(&self) -> Position {
        self.message
            .position
            .expect("history entries have positions")
    }

    fn bytes(&self) -> usize {
        self.message.encoded_len() + self.payload.len()
    }
}

impl Offset for Entry {
    fn offset(&self) -> u64 {
        self.position().offset
    }
}

/// What the history needs to know beyond the rules.
#[derive(Debug, Clone)]
pub struct Settings {
    /// History rules; the first that matches a topic applies.
    pub rules: Vec<Rule>,
    /// Cap on all history bytes together; the oldest messages across topics go first.
    pub max_total_bytes: usize,
    /// Most messages one history request replays.
    pub max_replay: usize,
    /// How long one fetch attempt may take before it counts as failed.
    pub repair_timeout: Duration,
    /// Most messages held per topic while waiting for a hole to be filled; past it the hole
    /// is declared lost at once.
    pub max_held: usize,
    /// Whether there are peers to fetch from at all.
    pub has_peers: bool,
}

/// A request for history from peers, carried out by the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchRequest {
    /// Identifies the attempt; a reply for an older attempt is ignored.
    pub id: u64,
    /// The topic.
    pub topic: Arc<str>,
    /// Only messages of this epoch (None: whatever the peer has).
    pub epoch: Option<u64>,
    /// From this offset on (None: the peer's latest `limit` messages).
    pub from: Option<u64>,
    /// Most messages wanted.
    pub limit: usize,
    /// Wait this long before asking (later attempts).
    pub delay: Duration,
}

/// What the hub must do, in order.
#[derive(Debug)]
pub enum Effect {
    /// Fan this message out to the topic's subscribers.
    Deliver(Arc<Broadcast>),
    /// Tell the topic's subscribers that offsets `from..=to` of `epoch` are lost.
    Gap {
        /// The topic.
        topic: Arc<str>,
        /// The epoch.
        epoch: u64,
        /// First lost offset.
        from: u64,
        /// Last lost offset.
        to: u64,
    },
    /// Tell the topic's subscribers that the stream restarted with `epoch`.
    Reset {
        /// The topic.
        topic: Arc<str>,
        /// The new epoch.
        epoch: u64,
    },
    /// Ask peers for history; answer with [`Streams::fetched`].
    Fetch(FetchRequest),
    /// The topic is in order again: history requests waiting for it can be answered.
    Settled(Arc<str>),
}

#[derive(Debug, Clone, Copy)]
struct PendingFetch {
    id: u64,
    deadline: Instant,
    attempt: u32,
}

/// One topic's stream.
struct Stream {
    rule: usize,
    /// None until a message, a check or a peer names it.
    epoch: Option<u64>,
    /// The history: contiguous offsets ending at `next - 1`.
    entries: VecDeque<Entry>,
    bytes: usize,
    next: u64,
    /// Arrived ahead of `next` (or, while filling, anything).
    held: BTreeMap<u64, Entry>,
    /// The newest offset known to exist (from a position check).
    known_last: Option<u64>,
    /// No start yet: the first contiguous run may begin at any offset.
    filling: bool,
    fetch: Option<PendingFetch>,
    retired: Vec<u64>,
}

impl Stream {
    fn new(rule: usize) -> Self {
        Stream {
            rule,
            epoch: None,
            entries: VecDeque::new(),
            bytes: 0,
            next: 0,
            held: BTreeMap::new(),
            known_last: None,
            filling: true,
            fetch: None,
            retired: Vec::new(),
        }
    }

    fn tail(&self) -> Option<Position> {
        let epoch = self.epoch?;
        (!self.filling && self.next > 0).then(|| Position {
            epoch,
            offset: self.next - 1,
        })
    }

    fn first(&self) -> u64 {
        self.entries.front().map_or(self.next, Offset::offset)
    }

    fn push(&mut self, e: Entry, totals: &mut Totals) {
        let size = e.bytes();
        self.entries.push_back(e);
        self.bytes += size;
        totals.bytes += size;
        totals.messages += 1;
    }

    /// Drops the oldest message of the history, counted under `reason`.
    fn evict_front(&mut self, totals: &mut Totals, metrics: &Metrics, reason: &str) {
        let e = self.entries.pop_front().expect("history is not empty");
        self.bytes -= e.bytes();
        totals.bytes -= e.bytes();
        totals.messages -= 1;
        metrics.history_evicted.with_label_values(&[reason]).inc();
    }

    /// Forgets the whole history (the stream restarts).
    fn clear_history(&mut self, totals: &mut Totals) {
        totals.bytes -= self.bytes;
        totals.messages -= self.entries.len();
        self.entries.clear();
        self.bytes = 0;
    }
}

/// Messages and bytes kept in all histories.
#[derive(Default)]
struct Totals {
    bytes: usize,
    messages: usize,
}

/// Every topic's stream, the memory accounting, and the counters.
pub struct Streams {
    settings: Settings,
    topics: HashMap<Arc<str>, Stream>,
    totals: Totals,
    next_fetch_id: u64,
    metrics: Arc<Metrics>,
}

impl Streams {
    /// No topics yet.
    pub fn new(settings: Settings, metrics: Arc<Metrics>) -> Self {
        Streams {
            settings,
            topics: HashMap::new(),
            totals: Totals::default(),
            next_fetch_id: 0,
            metrics,
        }
    }

    /// The rule covering `topic`, if any.
    pub fn rule_for(&self, topic: &str) -> Option<usize> {
        self.settings
            .rules
            .iter()
            .position(|r| r.pattern.matches(topic))
    }

    /// Whether there are peers to fetch from now (the list changes with herald's replies).
    /// Fetches already under way finish as they are; an empty list answers them with nothing.
    pub fn set_has_peers(&mut self, has_peers: bool) {
        self.settings.has_peers = has_peers;
    }

    /// Whether the topic has a stream here (known, or being fetched).
    pub fn knows(&self, topic: &str) -> bool {
        self.topics.contains_key(topic)
    }

    /// ZeroMQ prefixes the worker subscribes to for good, so history is complete whether or
    /// not a local client is subscribed.
    pub fn upstream_prefixes(&self) -> Vec<String> {
        let mut p: Vec<String> = self
            .settings
            .rules
            .iter()
            .map(|r| r.pattern.upstream_prefix().to_string())
            .collect();
        p.sort();
        p.dedup();
        p
    }

    /// A positioned message from the publisher on a topic covered by history rule `rule`
    /// (from [`Self::rule_for`]).
    pub fn offer(
        &mut self,
        topic: &str,
        rule: usize,
        entry: Entry,
        now: Instant,
        out: &mut Vec<Effect>,
    ) {
        let pos = entry.position();
        let key = self.key(topic, rule);
        let s = self.topics.get_mut(&key).expect("just ensured");
        match s.epoch {
            None => s.epoch = Some(pos.epoch),
            Some(e) if e == pos.epoch => {}
            Some(_) if s.retired.contains(&pos.epoch) => {
                self.metrics
                    .stream_events
                    .with_label_values(&["stale_epoch"])
                    .inc();
                return;
            }
            Some(_) => self.reset(&key, pos.epoch, out),
        }
        let s = self.topics.get_mut(&key).expect("exists");
        if s.filling && s.fetch.is_none() && pos.offset == 0 && s.held.is_empty() {
            // The stream starts here: nothing came before, nothing to fetch.
            s.filling = false;
            s.next = 0;
        }
        if s.filling {
            s.held.entry(pos.offset).or_insert(entry);
            if s.fetch.is_none() {
                self.start_fetch(&key, now, out);
            }
            return;
        }
        if pos.offset < s.next || s.held.contains_key(&pos.offset) {
            self.metrics
                .stream_events
                .with_label_values(&["duplicate"])
                .inc();
            return;
        }
        if pos.offset == s.next && s.held.is_empty() && s.fetch.is_none() {
            s.next += 1;
            out.push(Effect::Deliver(entry.message.clone()));
            return self.append(&key, entry, now);
        }
        let late_fill = pos.offset == s.next;
        s.held.insert(pos.offset, entry);
        if late_fill {
            // A message that was late (not lost) closes the hole itself.
            self.drain_in_order(&key, Vec::new(), now, out);
            let s = &self.topics[&key];
            if s.fetch.is_some() && first_hole(s.next, &s.held, s.known_last).is_none() {
                self.topics.get_mut(&key).expect("exists").fetch = None;
                out.push(Effect::Settled(key));
            }
            return;
        }
        if s.held.len() > self.settings.max_held {
            return self.give_up(&key, now, out);
        }
        if s.fetch.is_none() {
            self.metrics.stream_events.with_label_values(&["gap"]).inc();
            self.start_fetch(&key, now, out);
        }
    }

    /// A position check: `last` is the newest message the publisher sent on `topic`.
    pub fn check(&mut self, topic: &str, last: Position, now: Instant, out: &mut Vec<Effect>) {
        let Some(rule) = self.rule_for(topic) else {
            return;
        };
        let key = self.key(topic, rule);
        let s = self.topics.get_mut(&key).expect("just ensured");
        match s.epoch {
            None => s.epoch = Some(last.epoch),
            Some(e) if e == last.epoch => {}
            Some(_) if s.retired.contains(&last.epoch) => return,
            Some(_) => self.reset(&key, last.epoch, out),
        }
        let s = self.topics.get_mut(&key).expect("exists");
        s.known_last = Some(s.known_last.map_or(last.offset, |k| k.max(last.offset)));
        if s.fetch.is_some() {
            return;
        }
        if s.filling || last.offset >= s.next {
            if !s.filling {
                self.metrics.stream_events.with_label_values(&["gap"]).inc();
            }
            self.start_fetch(&key, now, out);
        }
    }

    /// The peers' answer to fetch `id` (empty when none had anything or none answered).
    pub fn fetched(
        &mut self,
        topic: &str,
        id: u64,
        messages: Vec<Entry>,
        now: Instant,
        out: &mut Vec<Effect>,
    ) {
        let Some(s) = self.topics.get_mut(topic) else {
            return;
        };
        if s.fetch.is_none_or(|f| f.id != id) {
            return; // an attempt that was given up or made unnecessary
        }
        let key: Arc<str> = self.topics.get_key_value(topic).expect("exists").0.clone();
        let s = self.topics.get_mut(&key).expect("exists");
        if s.epoch.is_none() {
            s.epoch = messages.last().map(|m| m.position().epoch);
        }
        let epoch = s.epoch;
        let useful: Vec<Entry> = messages
            .into_iter()
            .filter(|m| Some(m.position().epoch) == epoch)
            .collect();
        let mut attempt = s.fetch.map_or(1, |f| f.attempt);
        s.fetch = None;
        let was_filling = s.filling;
        let before = s.next;
        if s.filling {
            if s.epoch.is_none() {
                // Nobody knows the topic: forget it until it is published.
                self.topics.remove(&key);
                return out.push(Effect::Settled(key));
            }
            let live_from = s.held.values().filter(|e| e.live).map(Offset::offset).min();
            let lowest = useful
                .iter()
                .map(Offset::offset)
                .chain(s.held.keys().copied())
                .min();
            s.next = match (lowest, s.known_last) {
                (Some(l), _) => l,
                (None, Some(k)) => k + 1,
                (None, None) => s.next,
            };
            s.filling = false;
            let from = live_from.unwrap_or(u64::MAX);
            let repaired = self.drain_in_order_from(&key, useful, from, now, out);
            self.metrics
                .stream_repaired_messages
                .inc_by(repaired as u64);
            self.metrics
                .stream_events
                .with_label_values(&["filled"])
                .inc();
        } else {
            let repaired = self.drain_in_order(&key, useful, now, out);
            self.metrics
                .stream_repaired_messages
                .inc_by(repaired as u64);
        }
        let s = &self.topics[&key];
        if s.next > before && !was_filling {
            attempt = 0; // progress: the next hole gets every attempt again
        }
        if first_hole(s.next, &s.held, s.known_last).is_some() {
            if attempt < FETCH_ATTEMPTS {
                return self.start_fetch_attempt(&key, now, attempt + 1, out);
            }
            self.metrics
                .stream_repairs
                .with_label_values(&["failed"])
                .inc();
            self.give_up(&key, now, out);
        } else if !was_filling {
            self.metrics.stream_repairs.with_label_values(&["ok"]).inc();
        }
        out.push(Effect::Settled(key));
    }

    /// Gives up fetch attempts past their deadline, and trims history by age and memory.
    pub fn tick(&mut self, now: Instant, out: &mut Vec<Effect>) {
        let expired: Vec<(Arc<str>, u64)> = self
            .topics
            .iter()
            .filter_map(|(k, s)| {
                s.fetch
                    .filter(|f| f.deadline <= now)
                    .map(|f| (k.clone(), f.id))
            })
            .collect();
        for (topic, id) in expired {
            self.metrics
                .peer_fetches
                .with_label_values(&["timeout"])
                .inc();
            self.fetched(&topic, id, Vec::new(), now, out);
        }
        for s in self.topics.values_mut() {
            let max_age = self.settings.rules[s.rule].max_age;
            while s
                .entries
                .front()
                .is_some_and(|e| now.duration_since(e.received_at) > max_age)
            {
                s.evict_front(&mut self.totals, &self.metrics, "age");
            }
        }
        self.metrics
            .history_messages
            .set(self.totals.messages as i64);
        self.metrics.history_bytes.set(self.totals.bytes as i64);
        self.metrics.history_topics.set(self.topics.len() as i64);
    }

    /// The stream's key, creating the stream if needed.
    fn key(&mut self, topic: &str, rule: usize) -> Arc<str> {
        if let Some((k, _)) = self.topics.get_key_value(topic) {
            return k.clone();
        }
        let key: Arc<str> = topic.into();
        self.topics.insert(key.clone(), Stream::new(rule));
        key
    }

    /// The publisher restarted (new epoch): drop the old stream, tell subscribers.
    fn reset(&mut self, key: &Arc<str>, epoch: u64, out: &mut Vec<Effect>) {
        let s = self.topics.get_mut(key).expect("exists");
        if let Some(old) = s.epoch {
            s.retired.push(old);
            if s.retired.len() > RETIRED_EPOCHS {
                s.retired.remove(0);
            }
        }
        s.clear_history(&mut self.totals);
        s.held.clear();
        s.known_last = None;
        s.fetch = None;
        s.filling = true;
        s.next = 0;
        s.epoch = Some(epoch);
        self.metrics
            .stream_events
            .with_label_values(&["reset"])
            .inc();
        out.push(Effect::Reset {
            topic: key.clone(),
            epoch,
        });
        out.push(Effect::Settled(key.clone()));
    }

    fn start_fetch(&mut self, key: &Arc<str>, now: Instant, out: &mut Vec<Effect>) {
        self.start_fetch_attempt(key, now, 1, out)
    }

    fn start_fetch_attempt(
        &mut self,
        key: &Arc<str>,
        now: Instant,
        attempt: u32,
        out: &mut Vec<Effect>,
    ) {
        let s = self.topics.get_mut(key).expect("exists");
        let rule = &self.settings.rules[s.rule];
        let (from, limit) = match (s.filling, first_hole(s.next, &s.held, s.known_last)) {
            (false, Some((from, to))) => (
                Some(from),
                ((to - from + 1) as usize).min(self.settings.max_held),
            ),
            _ => (None, rule.max_messages),
        };
        if !self.settings.has_peers {
            // Nobody to ask: settle at once with what we have.
            self.next_fetch_id += 1;
            let id = self.next_fetch_id;
            s.fetch = Some(PendingFetch {
                id,
                deadline: now,
                attempt: FETCH_ATTEMPTS,
            });
            return self.fetched(&key.clone(), id, Vec::new(), now, out);
        }
        self.next_fetch_id += 1;
        let delay = Duration::from_millis(match attempt {
            1 => 0,
            2 => 100,
            _ => 400,
        });
        // Nothing live waits on a fill of a quiet topic, so it may queue behind other fetches
        // (a late worker fills every quiet topic at once) for longer.
        let patience = if s.held.is_empty() && s.filling {
            self.settings.repair_timeout * QUIET_FILL_PATIENCE
        } else {
            self.settings.repair_timeout
        };
        s.fetch = Some(PendingFetch {
            id: self.next_fetch_id,
            deadline: now + delay + patience,
            attempt,
        });
        out.push(Effect::Fetch(FetchRequest {
            id: self.next_fetch_id,
            topic: key.clone(),
            epoch: s.epoch,
            from,
            limit,
            delay,
        }));
    }

    /// Merges `incoming` with what is held and delivers the contiguous run; returns how many
    /// delivered messages came from a peer (holes repaired).
    fn drain_in_order(
        &mut self,
        key: &Arc<str>,
        incoming: Vec<Entry>,
        now: Instant,
        out: &mut Vec<Effect>,
    ) -> usize {
        self.drain_in_order_from(key, incoming, 0, now, out)
    }

    /// As [`Self::drain_in_order`], but messages below `deliver_from` only enter history (a
    /// fill: live subscribers never expected them).
    fn drain_in_order_from(
        &mut self,
        key: &Arc<str>,
        incoming: Vec<Entry>,
        deliver_from: u64,
        now: Instant,
        out: &mut Vec<Effect>,
    ) -> usize {
        let s = self.topics.get_mut(key).expect("exists");
        let (run, _) = take_contiguous(&mut s.next, &mut s.held, incoming);
        let mut repaired = 0;
        for e in run {
            if e.offset() >= deliver_from {
                out.push(Effect::Deliver(e.message.clone()));
                repaired += usize::from(!e.live);
            }
            self.append(key, e, now);
        }
        repaired
    }

    /// Declares every hole lost: Gap notices, history restarts after each, held messages go out.
    fn give_up(&mut self, key: &Arc<str>, now: Instant, out: &mut Vec<Effect>) {
        loop {
            let s = self.topics.get_mut(key).expect("exists");
            let Some((from, to)) = first_hole(s.next, &s.held, s.known_last) else {
                break;
            };
            let epoch = s.epoch.expect("a hole has an epoch");
            self.metrics
                .stream_events
                .with_label_values(&["lost"])
                .inc();
            self.metrics.stream_lost_messages.inc_by(to - from + 1);
            out.push(Effect::Gap {
                topic: key.clone(),
                epoch,
                from,
                to,
            });
            // History must stay contiguous: it restarts after the hole.
            s.clear_history(&mut self.totals);
            s.next = to + 1;
            self.drain_in_order(key, Vec::new(), now, out);
        }
        let s = self.topics.get_mut(key).expect("exists");
        s.fetch = None;
        s.filling = false;
    }

    /// Appends to a topic's history and applies its limits and the memory cap.
    fn append(&mut self, key: &Arc<str>, e: Entry, now: Instant) {
        let s = self.topics.get_mut(key).expect("exists");
        let rule = &self.settings.rules[s.rule];
        s.push(e, &mut self.totals);
        let (totals, metrics) = (&mut self.totals, &self.metrics);
        while s.entries.len() > rule.max_messages {
            s.evict_front(totals, metrics, "messages");
        }
        while s.bytes > rule.max_bytes && s.entries.len() > 1 {
            s.evict_front(totals, metrics, "bytes");
        }
        while s
            .entries
            .front()
            .is_some_and(|f| now.duration_since(f.received_at) > rule.max_age)
        {
            s.evict_front(totals, metrics, "age");
        }
        if self.totals.bytes > self.settings.max_total_bytes {
            self.evict_oldest();
        }
    }

    /// Past the memory cap: drops the oldest messages across all topics, down to 90% of it.
    fn evict_oldest(&mut self) {
        let target = self.settings.max_total_bytes / 100 * EVICT_TO_PERCENT;
        let mut heap: BinaryHeap<std::cmp::Reverse<(Instant, Arc<str>)>> = self
            .topics
            .iter()
            .filter_map(|(k, s)| {
                Some(std::cmp::Reverse((
                    s.entries.front()?.received_at,
                    k.clone(),
                )))
            })
            .collect();
        while self.totals.bytes > target {
            let Some(std::cmp::Reverse((_, key))) = heap.pop() else {
                break;
            };
            let s = self.topics.get_mut(&key).expect("exists");
            s.evict_front(&mut self.totals, &self.metrics, "memory_cap");
            if let Some(f) = s.entries.front() {
                heap.push(std::cmp::Reverse((f.received_at, key)));
            }
        }
    }
}

#[cfg(test)]
mod tests;
