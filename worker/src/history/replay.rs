//! Answering history: a client's catch-up or resume request ([`Streams::replay`]) and a peer
//! worker's request for a topic's history ([`Streams::snapshot`]).

use super::{Effect, Stream, Streams};
use crate::broadcast::Broadcast;
use protocol::client::{HistoryReply, HistoryRequest, NotRecovered};
use protocol::position::JsonPosition;
use protocol::Position;
use std::sync::Arc;
use std::time::Instant;

/// The answer to a history request.
pub enum Replay {
    /// The topic is catching up (a fetch is under way): ask again when it settles.
    Wait,
    /// Send the ack with `reply`, then these messages, then live ones.
    Ready {
        /// The ack's `history` field.
        reply: HistoryReply,
        /// Messages to replay, oldest first.
        messages: Vec<Arc<Broadcast>>,
    },
}

/// Why a peer's history request cannot be answered.
#[derive(Debug, PartialEq, Eq)]
pub enum SnapshotError {
    /// No history for the topic here.
    UnknownTopic,
    /// The history here is of another epoch (given).
    OtherEpoch(u64),
}

impl Streams {
    /// Answers a history request for `topic`. Unless `last_chance`, a topic that is catching
    /// up (or unknown here while peers may know it) gives [`Replay::Wait`].
    pub fn replay(
        &mut self,
        topic: &str,
        request: HistoryRequest,
        last_chance: bool,
        now: Instant,
        out: &mut Vec<Effect>,
    ) -> Replay {
        let max = self.settings.max_replay;
        let not_recovered = |reason: NotRecovered, tail: Option<Position>, s: Option<&Stream>| {
            let messages = match (request.last, s) {
                (Some(n), Some(s)) => last_n(s, (n as usize).min(max)),
                _ => Vec::new(),
            };
            Replay::Ready {
                reply: HistoryReply {
                    recovered: request.since.map(|_| false),
                    reason: request.since.map(|_| reason.as_str().to_string()),
                    replayed: messages.len() as u64,
                    position: tail.map(JsonPosition::from),
                },
                messages,
            }
        };
        let Some(rule) = self.rule_for(topic) else {
            return not_recovered(NotRecovered::NoHistory, None, None);
        };
        if !self.topics.contains_key(topic) {
            if last_chance || !self.settings.has_peers {
                return not_recovered(NotRecovered::NoHistory, None, None);
            }
            // Unknown here: a peer may have it (this worker started late).
            let key = self.key(topic, rule);
            self.start_fetch(&key, now, out);
            return Replay::Wait;
        }
        let s = &self.topics[topic];
        if (s.fetch.is_some() || s.filling) && !last_chance {
            return Replay::Wait;
        }
        let tail = s.tail();
        let Some(since) = request.since else {
            let messages = last_n(s, (request.last.unwrap_or(0) as usize).min(max));
            return Replay::Ready {
                reply: HistoryReply {
                    recovered: None,
                    reason: None,
                    replayed: messages.len() as u64,
                    position: tail.map(JsonPosition::from),
                },
                messages,
            };
        };
        let Some(epoch) = s.epoch.filter(|_| !s.filling) else {
            return not_recovered(NotRecovered::NoHistory, tail, Some(s));
        };
        if since.epoch != epoch {
            return not_recovered(NotRecovered::EpochChanged, tail, Some(s));
        }
        if since.offset >= s.next {
            if !last_chance {
                return Replay::Wait; // this worker is behind the one the client came from
            }
            return not_recovered(NotRecovered::PositionAhead, tail, Some(s));
        }
        if since.offset + 1 < s.first() {
            return not_recovered(NotRecovered::TooOld, tail, Some(s));
        }
        let missed = (s.next - 1 - since.offset) as usize;
        if missed > max {
            return not_recovered(NotRecovered::TooManyMissed, tail, Some(s));
        }
        let messages = last_n(s, missed);
        Replay::Ready {
            reply: HistoryReply {
                recovered: Some(true),
                reason: None,
                replayed: messages.len() as u64,
                position: tail.map(JsonPosition::from),
            },
            messages,
        }
    }

    /// Serves a peer: appends the topic's history (of `epoch`, from offset `from`, at most
    /// `limit`; without `from` the latest `limit`) to `body`; returns the count.
    pub fn snapshot(
        &self,
        topic: &str,
        epoch: Option<u64>,
        from: Option<u64>,
        limit: usize,
        body: &mut Vec<u8>,
    ) -> Result<usize, SnapshotError> {
        let s = self.topics.get(topic).ok_or(SnapshotError::UnknownTopic)?;
        let Some(own) = s.epoch.filter(|_| !s.entries.is_empty()) else {
            return Err(SnapshotError::UnknownTopic);
        };
        if epoch.is_some_and(|e| e != own) {
            return Err(SnapshotError::OtherEpoch(own));
        }
        let skip = match from {
            Some(from) => from.saturating_sub(s.first()).min(s.entries.len() as u64) as usize,
            None => s.entries.len().saturating_sub(limit),
        };
        let mut n = 0;
        for e in s.entries.iter().skip(skip).take(limit) {
            protocol::backfill::push_entry(
                body,
                topic,
                e.position(),
                e.message.published_at_us,
                &e.payload,
            );
            n += 1;
        }
        Ok(n)
    }
}

/// The last `n` messages of a stream's history, oldest first.
fn last_n(s: &Stream, n: usize) -> Vec<Arc<Broadcast>> {
    let skip = s.entries.len().saturating_sub(n);
    s.entries
        .iter()
        .skip(skip)
        .map(|e| e.message.clone())
        .collect()
}
