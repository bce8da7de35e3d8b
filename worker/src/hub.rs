//! Who is subscribed to what, history, and fan-out — all owned by one dispatcher task.
//!
//! ```text
//!  upstream (Inbound) ──┐
//!  connections (Command)┼─▶ Hub (one task) ── history::Streams: order, dedup, holes, history
//!  peer fetch results ──┤        │ fan-out: encode once, push the shared frame into outboxes
//!  tick (250 ms) ───────┘        └─ Fetch effects ─▶ peers::fetch (spawned) ─▶ results
//! ```
//!
//! Because messages, subscriptions and history requests are handled one at a time by the same
//! task, a history reply is race-free by construction: the ack, the replayed messages and then
//! the live ones enter the connection's outbox in stream order, with nothing between them and
//! nothing twice. A topic that is catching up (a fetch from a peer under way) holds its live
//! messages and parks history requests until it settles.
//!
//! A connection subscribed through two filters that both match gets a message once (checked
//! with the message's sequence number).
//!
//! The tick also takes up changes of the peer list (herald names other workers in its replies
//! to load reports): from then on, holes and unknown topics are asked of them.

use crate::broadcast::{Broadcast, Compression, Encoding};
use crate::history::{Effect, Entry, Replay, SnapshotError, Streams};
use crate::interest::Interest;
use crate::metrics::Metrics;
use crate::outbox::{Outbox, Outgoing, Push};
use crate::peers::Peers;
use crate::ws::frame::{self, Opcode};
use bytes::Bytes;
use protocol::client::{Filter, HistoryRequest, NotRecovered, ServerMessage};
use protocol::publish::{Inbound, Published};
use protocol::Position;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

/// How often fetch deadlines, parked requests and history ages are looked at.
const TICK: Duration = Duration::from_millis(250);

/// What fan-out needs to know about a connection.
pub struct Subscriber {
    /// Connection id, unique within this worker.
    pub id: u64,
    /// Its outbound queue.
    pub outbox: Outbox,
    /// Its negotiated frame encoding.
    pub encoding: Encoding,
    /// Sequence number of the last message queued to it (de-duplicates overlapping filters).
    last_seq: AtomicU64,
}

impl Subscriber {
    /// A subscriber with an empty outbox bounded at `queue_bytes`.
    pub fn new(id: u64, encoding: Encoding, queue_bytes: usize) -> Self {
        Subscriber {
            id,
            outbox: Outbox::new(queue_bytes),
            encoding,
            last_seq: AtomicU64::new(0),
        }
    }

    /// Queues a frame of this connection's own (ack, error, notice).
    pub fn send(&self, message: &ServerMessage) {
        let frame = frame::encode(Opcode::Text, false, message.to_json().as_bytes());
        let _ = self.outbox.push(Outgoing {
            frame,
            published_at_us: None,
        });
    }
}

/// What connections and the admin port ask of the hub.
pub enum Command {
    /// Add a subscription (the connection checked its limits) and acknowledge it.
    Subscribe {
        /// The connection.
        sub: Arc<Subscriber>,
        /// Request id for the ack.
        id: Option<u64>,
        /// What to receive.
        filter: Filter,
        /// History to send first (topic filters only).
        history: Option<HistoryRequest>,
    },
    /// Remove a subscription and acknowledge it.
    Unsubscribe {
        /// The connection.
        sub: Arc<Subscriber>,
        /// Request id for the ack.
        id: Option<u64>,
        /// The filter given to subscribe.
        filter: Filter,
    },
    /// The connection is gone: drop all it held.
    Disconnected {
        /// Its id.
        sub_id: u64,
        /// Everything it had subscribed to.
        filters: Vec<Filter>,
    },
    /// A peer worker asks for a topic's history (admin `GET /history`).
    PeerHistory {
        /// The topic.
        topic: String,
        /// Only this epoch.
        epoch: Option<u64>,
        /// From this offset.
        from: Option<u64>,
        /// Most messages.
        limit: usize,
        /// The body, or why not.
        reply: oneshot::Sender<Result<Vec<u8>, SnapshotError>>,
    },
}

/// A peer's answer to a fetch, back in the dispatcher.
pub struct Fetched {
    topic: Arc<str>,
    id: u64,
    messages: Vec<Published>,
}

/// A history request waiting for its topic to settle.
struct Parked {
    sub: Arc<Subscriber>,
    id: Option<u64>,
    topic: Arc<str>,
    request: HistoryRequest,
    deadline: Instant,
}

#[derive(Default)]
struct Registry {
    topics: HashMap<Box<str>, Vec<Arc<Subscriber>>>,
    prefixes: HashMap<Box<str>, Vec<Arc<Subscriber>>>,
    interest: Interest,
}

impl Registry {
    fn map(&mut self, filter: &Filter) -> &mut HashMap<Box<str>, Vec<Arc<Subscriber>>> {
        match filter {
            Filter::Topic(_) => &mut self.topics,
            Filter::Prefix(_) => &mut self.prefixes,
        }
    }
}

/// The registry, the streams and fan-out. Owned by the dispatcher task ([`run`]).
pub struct Hub {
    registry: Registry,
    wanted: watch::Sender<Arc<BTreeSet<String>>>,
    metrics: Arc<Metrics>,
    compression: Compression,
    seq: u64,
    streams: Streams,
    parked: Vec<Parked>,
    effects: VecDeque<Effect>,
    /// How long a history request may wait for its topic to settle.
    park_timeout: Duration,
    peers: Peers,
    fetched_tx: mpsc::UnboundedSender<Fetched>,
    fetched_rx: Option<mpsc::UnboundedReceiver<Fetched>>,
    /// Upstream prefixes subscribed for good (history topics): filters they cover need no
    /// upstream subscription of their own, so client churn on them costs publishers nothing.
    permanent: Vec<String>,
    /// Reused buffer for what the streams return, so the hot path does not allocate.
    scratch: Vec<Effect>,
}

impl Hub {
    /// An empty hub; the worker subscribes upstream for good to what `streams` keeps history of.
    pub fn new(
        metrics: Arc<Metrics>,
        compression: Compression,
        streams: Streams,
        peers: Peers,
        park_timeout: Duration,
    ) -> Self {
        let (fetched_tx, fetched_rx) = mpsc::unbounded_channel();
        let mut registry = Registry::default();
        let permanent = streams.upstream_prefixes();
        for prefix in &permanent {
            registry.interest.add(prefix);
        }
        let hub = Hub {
            wanted: watch::Sender::new(Arc::new(registry.interest.wanted())),
            registry,
            metrics,
            compression,
            seq: 0,
            streams,
            parked: Vec::new(),
            effects: VecDeque::new(),
            park_timeout,
            peers,
            fetched_tx,
            fetched_rx: Some(fetched_rx),
            permanent,
            scratch: Vec::new(),
        };
        hub.metrics
            .upstream_subscriptions
            .set(hub.wanted.borrow().len() as i64);
        hub.metrics.peers.set(hub.peers.current().len() as i64);
        hub
    }

    /// The peer list changed (herald named other workers): fetch from them from now on.
    pub fn peers_changed(&mut self) {
        let n = self.peers.current().len();
        self.streams.set_has_peers(n > 0);
        self.metrics.peers.set(n as i64);
    }

    /// Follows the set of ZeroMQ subscription strings the worker needs.
    pub fn wanted(&self) -> watch::Receiver<Arc<BTreeSet<String>>> {
        self.wanted.subscribe()
    }

    /// Handles one message or position check from a publisher.
    pub fn inbound(&mut self, inbound: Inbound, now: Instant) {
        match inbound {
            Inbound::Message(p) => {
                // The upstream side validated the topic as UTF-8.
                let Ok(topic) = std::str::from_utf8(&p.topic) else {
                    return;
                };
                let rule = p.position.and_then(|_| self.streams.rule_for(topic));
                if let Some(rule) = rule {
                    let entry = Entry {
                        message: Arc::new(Broadcast::new(topic, &p)),
                        payload: p.payload.clone(),
                        received_at: now,
                        live: true,
                    };
                    let mut out = std::mem::take(&mut self.scratch);
                    self.streams.offer(topic, rule, entry, now, &mut out);
                    self.effects.extend(out.drain(..));
                    self.scratch = out;
                } else if self.has_subscribers(topic) {
                    self.fan_out(&Broadcast::new(topic, &p));
                }
            }
            Inbound::Check { topic, position } => {
                let Ok(topic) = std::str::from_utf8(&topic) else {
                    return;
                };
                let mut out = std::mem::take(&mut self.scratch);
                self.streams.check(topic, position, now, &mut out);
                self.effects.extend(out.drain(..));
                self.scratch = out;
            }
        }
        self.run_effects(now);
    }

    /// Handles one request from a connection or the admin port.
    pub fn command(&mut self, command: Command, now: Instant) {
        match command {
            Command::Subscribe {
                sub,
                id,
                filter,
                history: None,
            } => {
                self.register(&sub, &filter);
                sub.send(&ServerMessage::ack(id, "subscribe", Some(&filter)));
            }
            Command::Subscribe {
                sub,
                id,
                filter,
                history: Some(request),
            } => {
                let parked = Parked {
                    sub,
                    id,
                    topic: filter.text().into(),
                    request,
                    deadline: now + self.park_timeout,
                };
                self.answer_history(parked, false, now);
            }
            Command::Unsubscribe { sub, id, filter } => {
                self.unregister(sub.id, &filter);
                self.parked
                    .retain(|p| !(p.sub.id == sub.id && *p.topic == *filter.text()));
                sub.send(&ServerMessage::ack(id, "unsubscribe", Some(&filter)));
            }
            Command::Disconnected { sub_id, filters } => {
                for f in &filters {
                    self.unregister(sub_id, f);
                }
                self.parked.retain(|p| p.sub.id != sub_id);
            }
            Command::PeerHistory {
                topic,
                epoch,
                from,
                limit,
                reply,
            } => {
                let mut body = Vec::new();
                protocol::backfill::begin(&mut body);
                let result = self
                    .streams
                    .snapshot(&topic, epoch, from, limit, &mut body)
                    .map(|_| body);
                let label = match &result {
                    Ok(_) => "ok",
                    Err(SnapshotError::UnknownTopic) => "unknown_topic",
                    Err(SnapshotError::OtherEpoch(_)) => "other_epoch",
                };
                self.metrics.peer_served.with_label_values(&[label]).inc();
                let _ = reply.send(result);
            }
        }
        self.run_effects(now);
    }

    /// A peer fetch finished.
    pub fn fetched(&mut self, f: Fetched, now: Instant) {
        let entries = f
            .messages
            .into_iter()
            .filter(|p| *p.topic == *f.topic.as_bytes())
            .map(|p| Entry {
                message: Arc::new(Broadcast::new(&f.topic, &p)),
                payload: p.payload,
                received_at: now,
                live: false,
            })
            .collect();
        let mut out = std::mem::take(&mut self.scratch);
        self.streams.fetched(&f.topic, f.id, entries, now, &mut out);
        self.effects.extend(out.drain(..));
        self.scratch = out;
        self.run_effects(now);
    }

    /// Periodic work: fetch deadlines, parked requests, history ages.
    pub fn tick(&mut self, now: Instant) {
        let mut out = std::mem::take(&mut self.scratch);
        self.streams.tick(now, &mut out);
        self.effects.extend(out.drain(..));
        self.scratch = out;
        self.run_effects(now);
        // Requests past their deadline are answered with what there is; others are retried
        // (a worker that was behind the client's position may have caught up).
        for p in std::mem::take(&mut self.parked) {
            let last_chance = p.deadline <= now || !self.streams.knows(&p.topic);
            self.answer_history(p, last_chance, now);
        }
        self.run_effects(now);
    }

    /// Answers a history request now, or parks it until its topic settles.
    fn answer_history(&mut self, p: Parked, last_chance: bool, now: Instant) {
        let mut out = std::mem::take(&mut self.scratch);
        let replay = self
            .streams
            .replay(&p.topic, p.request, last_chance, now, &mut out);
        self.effects.extend(out.drain(..));
        self.scratch = out;
        let (mut reply, messages) = match replay {
            Replay::Wait => return self.parked.push(p),
            Replay::Ready { reply, messages } => (reply, messages),
        };
        // A replay must fit in half the connection's queue (the rest is for live messages),
        // or the client would be closed as a slow consumer before it got anything.
        let mut frames: Vec<Bytes> = messages
            .iter()
            .map(|m| m.frame(p.sub.encoding, &self.compression, &self.metrics))
            .collect();
        let budget = p.sub.outbox.limit() / 2;
        if frames.iter().map(Bytes::len).sum::<usize>() > budget {
            if reply.recovered == Some(true) {
                reply.recovered = Some(false);
                reply.reason = Some(NotRecovered::TooManyMissed.as_str().into());
                if p.request.last.is_none() {
                    frames.clear();
                }
            }
            // Keep the newest messages that fit.
            let mut kept = 0;
            let fit = frames
                .iter()
                .rev()
                .take_while(|f| {
                    kept += f.len();
                    kept <= budget
                })
                .count();
            frames.drain(..frames.len() - fit);
            reply.replayed = frames.len() as u64;
        }
        let outcome = match (&reply.recovered, &reply.reason) {
            (Some(true), _) => "recovered",
            (_, Some(reason)) => reason.as_str(),
            _ => "last",
        };
        self.metrics
            .history_requests
            .with_label_values(&[outcome])
            .inc();
        self.metrics.replayed_messages.inc_by(reply.replayed);
        let filter = Filter::Topic(p.topic.to_string());
        self.register(&p.sub, &filter);
        p.sub.send(&ServerMessage::Ack {
            id: p.id,
            op: "subscribe".into(),
            topic: Some(p.topic.to_string()),
            prefix: None,
            history: Some(reply),
        });
        for frame in frames {
            let pushed = p.sub.outbox.push(Outgoing {
                frame,
                published_at_us: None,
            });
            if pushed != Push::Queued {
                break; // gone, or live messages filled the other half meanwhile
            }
        }
    }

    /// Carries out effects from the streams, in order, until none are left.
    fn run_effects(&mut self, now: Instant) {
        while let Some(effect) = self.effects.pop_front() {
            match effect {
                Effect::Deliver(message) => {
                    self.fan_out(&message);
                }
                Effect::Gap {
                    topic,
                    epoch,
                    from,
                    to,
                } => {
                    tracing::warn!(%topic, epoch = %format_args!("{epoch:016x}"), from, to, "messages lost; clients told");
                    let notice = ServerMessage::Gap {
                        topic: topic.to_string(),
                        epoch: Position { epoch, offset: 0 }.epoch_hex().to_string(),
                        from,
                        to,
                    };
                    self.fan_out(&Broadcast::notice(&topic, notice.to_json()));
                }
                Effect::Reset { topic, epoch } => {
                    tracing::info!(%topic, epoch = %format_args!("{epoch:016x}"), "stream restarted with a new epoch");
                    let notice = ServerMessage::Reset {
                        topic: topic.to_string(),
                        epoch: Position { epoch, offset: 0 }.epoch_hex().to_string(),
                    };
                    self.fan_out(&Broadcast::notice(&topic, notice.to_json()));
                }
                Effect::Fetch(request) => {
                    let peers = self.peers.clone();
                    let tx = self.fetched_tx.clone();
                    let metrics = self.metrics.clone();
                    tokio::spawn(async move {
                        let messages = peers.fetch(&request, &metrics).await;
                        let _ = tx.send(Fetched {
                            topic: request.topic,
                            id: request.id,
                            messages,
                        });
                    });
                }
                Effect::Settled(topic) => {
                    let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.parked)
                        .into_iter()
                        .partition(|p| p.topic == topic);
                    self.parked = waiting;
                    // A topic that settled unknown (no peer had it) is not asked about again.
                    let last_chance = !self.streams.knows(&topic);
                    for p in ready {
                        self.answer_history(p, last_chance, now);
                    }
                }
            }
        }
    }

    fn has_subscribers(&self, topic: &str) -> bool {
        self.registry.topics.contains_key(topic) || !self.registry.prefixes.is_empty()
    }

    /// Adds a subscription; the connection has checked it does not hold it yet.
    fn register(&mut self, sub: &Arc<Subscriber>, filter: &Filter) {
        let r = &mut self.registry;
        let subs = r.map(filter).entry(filter.text().into()).or_default();
        subs.push(sub.clone());
        let covered = covered(&self.permanent, filter.text());
        if !covered && r.interest.add(filter.text()) {
            self.publish_wanted();
        }
        self.metrics.subscriptions.inc();
    }

    fn unregister(&mut self, sub_id: u64, filter: &Filter) {
        let r = &mut self.registry;
        let map = r.map(filter);
        let Some(subs) = map.get_mut(filter.text()) else {
            return;
        };
        let Some(i) = subs.iter().position(|s| s.id == sub_id) else {
            return;
        };
        subs.swap_remove(i);
        if subs.is_empty() {
            map.remove(filter.text());
        }
        self.metrics.subscriptions.dec();
        let covered = covered(&self.permanent, filter.text());
        if !covered && r.interest.remove(filter.text()) {
            self.publish_wanted();
        }
    }

    fn publish_wanted(&self) {
        let wanted = self.registry.interest.wanted();
        self.metrics.upstream_subscriptions.set(wanted.len() as i64);
        self.wanted.send_replace(Arc::new(wanted));
    }

    /// Queues one message to every matching subscriber; returns the deliveries.
    pub fn fan_out(&mut self, message: &Broadcast) -> usize {
        self.seq += 1;
        let seq = self.seq;
        let topic: &str = &message.topic;
        let r = &self.registry;
        let exact = r.topics.get(topic);
        let has_prefixes = !r.prefixes.is_empty();
        if exact.is_none() && !has_prefixes {
            return 0;
        }
        let mut delivered = 0;
        let mut deliver = |subs: &Vec<Arc<Subscriber>>| {
            for s in subs {
                if s.last_seq.swap(seq, Ordering::Relaxed) == seq {
                    continue;
                }
                let frame = message.frame(s.encoding, &self.compression, &self.metrics);
                match s.outbox.push(Outgoing {
                    frame,
                    published_at_us: message.published_at_us,
                }) {
                    Push::Queued => delivered += 1,
                    Push::Overflowed => self
                        .metrics
                        .dropped
                        .with_label_values(&["slow_consumer"])
                        .inc(),
                    Push::Refused => self.metrics.dropped.with_label_values(&["closing"]).inc(),
                }
            }
        };
        if let Some(subs) = exact {
            deliver(subs);
        }
        if has_prefixes {
            for (i, _) in topic.char_indices().skip(1).chain([(topic.len(), ' ')]) {
                if let Some(subs) = r.prefixes.get(&topic[..i]) {
                    deliver(subs);
                }
            }
        }
        if delivered > 0 {
            self.metrics.fanout_messages.inc();
            self.metrics.fanout_deliveries.inc_by(delivered as u64);
        }
        delivered
    }
}

/// Whether a filter's text is already received through one of `prefixes`.
fn covered(prefixes: &[String], text: &str) -> bool {
    prefixes.iter().any(|p| text.starts_with(p.as_str()))
}

/// Runs the hub until `stop`: messages from publishers, commands from connections, peer
/// fetch results and the tick, one at a time.
pub async fn run(
    mut hub: Hub,
    mut upstream: mpsc::Receiver<Inbound>,
    mut commands: mpsc::Receiver<Command>,
    stop: CancellationToken,
) {
    let mut fetched = hub.fetched_rx.take().expect("run once");
    // Looked at on the tick rather than raced against every message: a peer list that
    // changes every few seconds at most needs no place on the hot path.
    let mut peer_changes = hub.peers.changes();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut upstream_open = true;
    loop {
        tokio::select! {
            m = upstream.recv(), if upstream_open => match m {
                Some(m) => hub.inbound(m, Instant::now()),
                None => upstream_open = false,
            },
            Some(c) = commands.recv() => hub.command(c, Instant::now()),
            Some(f) = fetched.recv() => hub.fetched(f, Instant::now()),
            _ = tick.tick() => {
                if peer_changes.has_changed().unwrap_or(false) {
                    peer_changes.mark_unchanged();
                    hub.peers_changed();
                }
                hub.tick(Instant::now())
            }
            _ = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests;
