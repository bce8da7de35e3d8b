//! Who is subscribed to what, and fan-out. The dispatcher task takes each published message
//! from the upstream queue, encodes it once ([`Broadcast`]) and pushes the shared frame into
//! the outbox of every matching connection. Subscription changes update the upstream
//! [`Interest`] and publish the wanted set on a watch channel that the ZeroMQ side follows.
//!
//! Fan-out runs on one task, so a connection subscribed through two filters that both match
//! gets the message once (checked with the message's sequence number).

use crate::broadcast::{Broadcast, Compression, Encoding};
use crate::interest::Interest;
use crate::metrics::Metrics;
use crate::outbox::{Outbox, Outgoing, Push};
use parking_lot::RwLock;
use protocol::client::Filter;
use protocol::publish::Published;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, watch};

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

/// The subscription registry and fan-out.
pub struct Hub {
    registry: RwLock<Registry>,
    wanted: watch::Sender<Arc<BTreeSet<String>>>,
    metrics: Arc<Metrics>,
    compression: Compression,
    seq: AtomicU64,
}

impl Hub {
    /// An empty hub.
    pub fn new(metrics: Arc<Metrics>, compression: Compression) -> Self {
        Hub {
            registry: RwLock::new(Registry::default()),
            wanted: watch::Sender::new(Arc::new(BTreeSet::new())),
            metrics,
            compression,
            seq: AtomicU64::new(0),
        }
    }

    /// Follows the set of ZeroMQ subscription strings the worker needs.
    pub fn wanted(&self) -> watch::Receiver<Arc<BTreeSet<String>>> {
        self.wanted.subscribe()
    }

    /// Adds a subscription; the caller has checked it is not held yet.
    pub fn subscribe(&self, sub: &Arc<Subscriber>, filter: &Filter) {
        let mut r = self.registry.write();
        r.map(filter)
            .entry(filter.text().into())
            .or_default()
            .push(sub.clone());
        if r.interest.add(filter.text()) {
            self.publish_wanted(&r);
        }
        self.metrics.subscriptions.inc();
    }

    /// Removes a subscription the connection holds.
    pub fn unsubscribe(&self, sub_id: u64, filter: &Filter) {
        let mut r = self.registry.write();
        let map = r.map(filter);
        if let Some(subs) = map.get_mut(filter.text()) {
            if let Some(i) = subs.iter().position(|s| s.id == sub_id) {
                subs.swap_remove(i);
                self.metrics.subscriptions.dec();
            }
            if subs.is_empty() {
                map.remove(filter.text());
            }
        }
        if r.interest.remove(filter.text()) {
            self.publish_wanted(&r);
        }
    }

    fn publish_wanted(&self, r: &Registry) {
        let wanted = r.interest.wanted();
        self.metrics.upstream_subscriptions.set(wanted.len() as i64);
        self.wanted.send_replace(Arc::new(wanted));
    }

    /// Queues one published message to every matching subscriber; returns the deliveries.
    pub fn dispatch(&self, topic: &str, published: &Published) -> usize {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let r = self.registry.read();
        let exact = r.topics.get(topic);
        let has_prefixes = !r.prefixes.is_empty();
        if exact.is_none() && !has_prefixes {
            return 0;
        }
        let message = Broadcast::new(topic, published);
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

/// Runs fan-out: takes messages from the upstream queue until every sender is gone.
pub async fn run_dispatcher(hub: Arc<Hub>, mut rx: mpsc::Receiver<protocol::publish::Inbound>) {
    while let Some(p) = rx.recv().await {
        let protocol::publish::Inbound::Message(p) = p else {
            continue;
        };
        // The upstream side validated the topic as UTF-8.
        if let Ok(topic) = std::str::from_utf8(&p.topic) {
            hub.dispatch(topic, &p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::collections::VecDeque;

    fn hub() -> Hub {
        Hub::new(
            Arc::new(Metrics::new("t")),
            Compression {
                min_bytes: 0,
                level: 6,
            },
        )
    }

    fn msg(topic: &str) -> Published {
        Published {
            topic: Bytes::copy_from_slice(topic.as_bytes()),
            position: None,
            published_at_us: None,
            payload: Bytes::from_static(b"{\"x\":1}"),
        }
    }

    fn sub(id: u64, enc: Encoding) -> Arc<Subscriber> {
        Arc::new(Subscriber::new(id, enc, 1 << 20))
    }

    fn drain(s: &Subscriber) -> usize {
        let mut q = VecDeque::new();
        s.outbox.take(&mut q);
        q.len()
    }

    #[test]
    fn exact_and_prefix_filters_match_and_overlap_delivers_once() {
        let h = hub();
        let a = sub(1, Encoding::Plain);
        let b = sub(2, Encoding::Plain);
        h.subscribe(&a, &Filter::Topic("m.1".into()));
        h.subscribe(&a, &Filter::Prefix("m.".into()));
        h.subscribe(&b, &Filter::Prefix("m.1".into()));
        assert_eq!(h.dispatch("m.1", &msg("m.1")), 2);
        assert_eq!(drain(&a), 1, "two matching filters, one delivery");
        assert_eq!(drain(&b), 1);
        assert_eq!(h.dispatch("m.10", &msg("m.10")), 2);
        assert_eq!(h.dispatch("n.1", &msg("n.1")), 0);
        h.unsubscribe(2, &Filter::Prefix("m.1".into()));
        assert_eq!(h.dispatch("m.10", &msg("m.10")), 1);
    }

    #[test]
    fn wanted_set_follows_first_and_last_subscriber() {
        let h = hub();
        let w = h.wanted();
        let (a, b) = (sub(1, Encoding::Plain), sub(2, Encoding::Plain));
        let t = Filter::Topic("x".into());
        h.subscribe(&a, &t);
        h.subscribe(&b, &t);
        assert_eq!(w.borrow().iter().collect::<Vec<_>>(), vec!["x"]);
        h.unsubscribe(1, &t);
        assert_eq!(w.borrow().len(), 1, "one subscriber left");
        h.unsubscribe(2, &t);
        assert!(w.borrow().is_empty());
    }

    #[test]
    fn compresses_once_whatever_the_subscriber_count() {
        let h = hub();
        let subs: Vec<_> = (0..500).map(|i| sub(i, Encoding::deflate(15))).collect();
        for s in &subs {
            h.subscribe(s, &Filter::Topic("hot".into()));
        }
        let plain = sub(999, Encoding::Plain);
        h.subscribe(&plain, &Filter::Topic("hot".into()));
        for _ in 0..3 {
            assert_eq!(h.dispatch("hot", &msg("hot")), 501);
        }
        assert_eq!(
            h.metrics.deflate_operations.get(),
            3,
            "one deflate per message"
        );
        assert_eq!(h.metrics.fanout_deliveries.get(), 1503);
    }

    #[test]
    fn a_full_outbox_is_overflowed_and_others_still_get_messages() {
        let h = hub();
        let tiny = Arc::new(Subscriber::new(1, Encoding::Plain, 40));
        let fine = sub(2, Encoding::Plain);
        for s in [&tiny, &fine] {
            h.subscribe(s, &Filter::Topic("t".into()));
        }
        for _ in 0..5 {
            h.dispatch("t", &msg("t"));
        }
        let mut q = VecDeque::new();
        assert!(tiny.outbox.take(&mut q).overflowed);
        assert_eq!(drain(&fine), 5);
        assert!(
            h.metrics
                .dropped
                .with_label_values(&["slow_consumer"])
                .get()
                >= 1
        );
    }
}
