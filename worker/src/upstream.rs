//! The ZeroMQ side: one task per publisher endpoint keeps a SUB socket connected, follows the
//! hub's wanted set (subscribe/unsubscribe upstream), decodes each message and queues it for
//! fan-out. The queue is bounded (`upstream_queue`); when it is full the task waits, and ZeroMQ
//! buffers (and at its limit drops, which the history layer detects as a gap).
//!
//! [`SubSocket`] is the seam: [`ZmqSub`] over the `zeromq` crate in production, an in-memory
//! socket in tests. On disconnect we drop the socket and make a new one with our own capped,
//! jittered backoff, and the new socket is given the whole wanted set: a restarted publisher
//! gets every subscription again within seconds.

use crate::interest;
use crate::metrics::Metrics;
use bytes::Bytes;
use futures::StreamExt;
use protocol::publish::{self, Inbound};
use rand::Rng;
use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use zeromq::{Socket, SocketEvent, SocketRecv};

/// Why a SUB socket failed.
#[derive(Debug, Error)]
pub enum UpstreamError {
    /// The publisher went away; reconnect.
    #[error("publisher disconnected")]
    Disconnected,
    /// Anything the ZeroMQ library reports.
    #[error("zeromq: {0}")]
    Zmq(String),
}

/// A subscriber socket to one publisher endpoint.
pub trait SubSocket: Send {
    /// Connects (bounded in time by the implementation).
    fn connect(&mut self, endpoint: &str)
        -> impl Future<Output = Result<(), UpstreamError>> + Send;
    /// The next multipart message.
    fn recv(&mut self) -> impl Future<Output = Result<Vec<Bytes>, UpstreamError>> + Send;
    /// Adds a prefix subscription.
    fn subscribe(&mut self, prefix: &str)
        -> impl Future<Output = Result<(), UpstreamError>> + Send;
    /// Removes a prefix subscription.
    fn unsubscribe(
        &mut self,
        prefix: &str,
    ) -> impl Future<Output = Result<(), UpstreamError>> + Send;
}

/// A SUB socket from the `zeromq` crate, with its monitor to notice disconnects.
pub struct ZmqSub {
    socket: zeromq::SubSocket,
    monitor: futures::channel::mpsc::Receiver<SocketEvent>,
}

impl ZmqSub {
    /// A new, unconnected socket whose connect attempt gives up after `connect_timeout`.
    pub fn new(connect_timeout: Duration) -> Self {
        let mut options = zeromq::SocketOptions::default();
        options.connect_timeout(connect_timeout);
        let mut socket = zeromq::SubSocket::with_options(options);
        let monitor = socket.monitor();
        ZmqSub { socket, monitor }
    }
}

fn zmq_err(e: zeromq::ZmqError) -> UpstreamError {
    UpstreamError::Zmq(e.to_string())
}

impl SubSocket for ZmqSub {
    async fn connect(&mut self, endpoint: &str) -> Result<(), UpstreamError> {
        self.socket.connect(endpoint).await.map_err(zmq_err)
    }

    async fn recv(&mut self) -> Result<Vec<Bytes>, UpstreamError> {
        loop {
            tokio::select! {
                m = self.socket.recv() => return m.map(|m| m.into_vec()).map_err(zmq_err),
                ev = self.monitor.next() => match ev {
                    Some(SocketEvent::Disconnected(_)) | None => return Err(UpstreamError::Disconnected),
                    Some(_) => continue,
                },
            }
        }
    }

    async fn subscribe(&mut self, prefix: &str) -> Result<(), UpstreamError> {
        self.socket.subscribe(prefix).await.map_err(zmq_err)
    }

    async fn unsubscribe(&mut self, prefix: &str) -> Result<(), UpstreamError> {
        self.socket.unsubscribe(prefix).await.map_err(zmq_err)
    }
}

/// Settings for an endpoint task.
#[derive(Debug, Clone)]
pub struct EndpointSettings {
    /// Largest acceptable topic, bytes.
    pub max_topic_bytes: usize,
    /// Largest acceptable payload, bytes.
    pub max_publish_bytes: usize,
    /// Silence longer than this (while subscribed to something) is reported.
    pub silence: Duration,
    /// First reconnect delay; doubles up to `reconnect_max`, with full jitter.
    pub reconnect_min: Duration,
    /// Largest reconnect delay.
    pub reconnect_max: Duration,
}

/// Keeps one endpoint connected and its messages flowing to `out` until `shutdown`.
pub async fn run_endpoint<S: SubSocket>(
    endpoint: String,
    mut new_socket: impl FnMut() -> S,
    mut wanted: watch::Receiver<Arc<BTreeSet<String>>>,
    out: mpsc::Sender<Inbound>,
    metrics: Arc<Metrics>,
    settings: EndpointSettings,
    shutdown: CancellationToken,
) {
    let labels = [endpoint.as_str()];
    let connected = metrics.upstream_connected.with_label_values(&labels);
    let silent_gauge = metrics.upstream_silent.with_label_values(&labels);
    let received = metrics.upstream_messages.with_label_values(&labels);
    let received_bytes = metrics.upstream_bytes.with_label_values(&labels);
    let mut silence = Silence::new(settings.silence, Instant::now());
    let mut tick = tokio::time::interval(Duration::from_millis(250).min(settings.silence));
    let mut attempt: u32 = 0;
    let mut connected_before = false;
    let mut last_malformed_log: Option<Instant> = None;
    loop {
        let mut socket = new_socket();
        let result = loop {
            tokio::select! {
                r = socket.connect(&endpoint) => break r,
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => silence.check(&endpoint, !wanted.borrow().is_empty(), Instant::now(), &silent_gauge),
            }
        };
        if let Err(e) = result {
            let delay = backoff(attempt, &settings);
            attempt = attempt.saturating_add(1);
            tracing::warn!(%endpoint, error = %e, retry_in = ?delay, "cannot connect to publisher");
            tokio::select! {
                _ = tokio::time::sleep(delay) => continue,
                _ = shutdown.cancelled() => return,
            }
        }
        if connected_before {
            metrics.upstream_reconnects.with_label_values(&labels).inc();
        }
        connected_before = true;
        attempt = 0;
        connected.set(1);
        tracing::info!(%endpoint, "connected to publisher");
        let mut applied = BTreeSet::new();
        let current = wanted.borrow_and_update().clone();
        let mut healthy = apply(&mut socket, &mut applied, &current, &endpoint).await;
        while healthy {
            tokio::select! {
                _ = shutdown.cancelled() => { connected.set(0); return; }
                r = socket.recv() => match r {
                    Ok(frames) => {
                        silence.heard(&endpoint, Instant::now(), &silent_gauge);
                        received.inc();
                        let size: usize = frames.iter().map(Bytes::len).sum();
                        received_bytes.inc_by(size as u64);
                        match decode(&frames, &settings) {
                            Ok(p) => {
                                if out.send(p).await.is_err() {
                                    return;
                                }
                            }
                            Err(reason) => {
                                metrics.upstream_malformed.with_label_values(&[endpoint.as_str(), reason.0]).inc();
                                let now = Instant::now();
                                if last_malformed_log.is_none_or(|t| now - t > Duration::from_secs(10)) {
                                    last_malformed_log = Some(now);
                                    tracing::warn!(%endpoint, reason = reason.0, detail = %reason.1, "dropped malformed publisher message (further ones for 10 s are only counted)");
                                }
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%endpoint, error = %e, "lost publisher; reconnecting");
                        healthy = false;
                    }
                },
                changed = wanted.changed() => {
                    if changed.is_err() { return; }
                    let current = wanted.borrow_and_update().clone();
                    healthy = apply(&mut socket, &mut applied, &current, &endpoint).await;
                }
                _ = tick.tick() => silence.check(&endpoint, !applied.is_empty(), Instant::now(), &silent_gauge),
            }
        }
        connected.set(0);
        let delay = backoff(0, &settings);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Brings the socket's subscriptions to `wanted`; false if the socket failed.
async fn apply<S: SubSocket>(
    socket: &mut S,
    applied: &mut BTreeSet<String>,
    wanted: &BTreeSet<String>,
    endpoint: &str,
) -> bool {
    let (subscribe, unsubscribe) = interest::diff(applied, wanted);
    for prefix in subscribe {
        if let Err(e) = socket.subscribe(&prefix).await {
            tracing::warn!(%endpoint, error = %e, "subscribe failed; reconnecting");
            return false;
        }
        tracing::debug!(%endpoint, %prefix, "subscribed upstream");
        applied.insert(prefix);
    }
    for prefix in unsubscribe {
        if let Err(e) = socket.unsubscribe(&prefix).await {
            tracing::warn!(%endpoint, error = %e, "unsubscribe failed; reconnecting");
            return false;
        }
        tracing::debug!(%endpoint, %prefix, "unsubscribed upstream");
        applied.remove(&prefix);
    }
    true
}

fn decode(frames: &[Bytes], s: &EndpointSettings) -> Result<Inbound, (&'static str, String)> {
    let p = publish::decode(frames, s.max_topic_bytes).map_err(|e| {
        let reason = match e {
            publish::DecodeError::TooFewFrames(_) | publish::DecodeError::TooManyFrames(_) => {
                "frame_count"
            }
            publish::DecodeError::Topic(_) => "topic",
            publish::DecodeError::Meta(_) => "meta",
            publish::DecodeError::Check(_) => "check",
        };
        (reason, e.to_string())
    })?;
    let Inbound::Message(m) = &p else {
        return Ok(p);
    };
    if m.payload.len() > s.max_publish_bytes {
        return Err((
            "too_big",
            format!(
                "payload of {} bytes exceeds max_publish_bytes {}",
                m.payload.len(),
                s.max_publish_bytes
            ),
        ));
    }
    Ok(p)
}

/// Full-jitter exponential backoff: uniform in [0, min(max, min * 2^attempt)], at least 10 ms.
fn backoff(attempt: u32, s: &EndpointSettings) -> Duration {
    let cap = s
        .reconnect_min
        .saturating_mul(1u32 << attempt.min(16))
        .min(s.reconnect_max);
    let ms = rand::rng().random_range(0..=cap.as_millis() as u64);
    Duration::from_millis(ms.max(10))
}

/// Tracks whether an endpoint has gone quiet, logging each change once.
struct Silence {
    limit: Duration,
    last_heard: Instant,
    silent: bool,
}

impl Silence {
    fn new(limit: Duration, now: Instant) -> Self {
        Silence {
            limit,
            last_heard: now,
            silent: false,
        }
    }

    fn heard(&mut self, endpoint: &str, now: Instant, gauge: &prometheus::IntGauge) {
        self.last_heard = now;
        if self.silent {
            self.silent = false;
            gauge.set(0);
            tracing::info!(%endpoint, "publisher is sending again");
        }
    }

    /// Silence only counts while we are subscribed to something: an idle worker expects nothing.
    fn check(
        &mut self,
        endpoint: &str,
        subscribed: bool,
        now: Instant,
        gauge: &prometheus::IntGauge,
    ) {
        if !subscribed {
            self.last_heard = now;
            return;
        }
        let quiet = now.duration_since(self.last_heard);
        if !self.silent && quiet > self.limit {
            self.silent = true;
            gauge.set(1);
            tracing::warn!(%endpoint, quiet_for = ?quiet, limit = ?self.limit, "publisher silent");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

    /// Events an in-memory socket reports to the test.
    #[derive(Debug, PartialEq)]
    enum Seen {
        Connect(u32),
        Sub(String),
        Unsub(String),
    }

    struct FakeSub {
        n: u32,
        seen: UnboundedSender<Seen>,
        inbox: UnboundedReceiver<Result<Vec<Bytes>, ()>>,
    }

    impl SubSocket for FakeSub {
        async fn connect(&mut self, _: &str) -> Result<(), UpstreamError> {
            let _ = self.seen.send(Seen::Connect(self.n));
            Ok(())
        }
        async fn recv(&mut self) -> Result<Vec<Bytes>, UpstreamError> {
            match self.inbox.recv().await {
                Some(Ok(m)) => Ok(m),
                _ => Err(UpstreamError::Disconnected),
            }
        }
        async fn subscribe(&mut self, p: &str) -> Result<(), UpstreamError> {
            let _ = self.seen.send(Seen::Sub(p.into()));
            Ok(())
        }
        async fn unsubscribe(&mut self, p: &str) -> Result<(), UpstreamError> {
            let _ = self.seen.send(Seen::Unsub(p.into()));
            Ok(())
        }
    }

    fn settings() -> EndpointSettings {
        EndpointSettings {
            max_topic_bytes: 64,
            max_publish_bytes: 1024,
            silence: Duration::from_secs(30),
            reconnect_min: Duration::from_millis(10),
            reconnect_max: Duration::from_millis(20),
        }
    }

    async fn next(rx: &mut UnboundedReceiver<Seen>) -> Seen {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("event in time")
            .expect("open")
    }

    #[tokio::test]
    async fn follows_wanted_set_and_resubscribes_after_reconnect() {
        let (seen_tx, mut seen) = unbounded_channel();
        let (inbox_txs_tx, mut inbox_txs) = unbounded_channel();
        let mut n = 0;
        let factory = move || {
            n += 1;
            let (tx, rx) = unbounded_channel();
            inbox_txs_tx.send(tx).unwrap();
            FakeSub {
                n,
                seen: seen_tx.clone(),
                inbox: rx,
            }
        };
        let wanted = watch::Sender::new(Arc::new(BTreeSet::from(["a".to_string()])));
        let (out_tx, mut out) = mpsc::channel(8);
        let metrics = Arc::new(Metrics::new("t"));
        let stop = CancellationToken::new();
        let task = tokio::spawn(run_endpoint(
            "tcp://x".into(),
            factory,
            wanted.subscribe(),
            out_tx,
            metrics.clone(),
            settings(),
            stop.clone(),
        ));
        assert_eq!(next(&mut seen).await, Seen::Connect(1));
        assert_eq!(next(&mut seen).await, Seen::Sub("a".into()));
        wanted.send_replace(Arc::new(BTreeSet::from(["b".to_string()])));
        assert_eq!(next(&mut seen).await, Seen::Sub("b".into()));
        assert_eq!(next(&mut seen).await, Seen::Unsub("a".into()));

        let inbox1 = inbox_txs.recv().await.unwrap();
        inbox1
            .send(Ok(vec![
                Bytes::from_static(b"b.1"),
                Bytes::from_static(b"{}"),
            ]))
            .unwrap();
        inbox1.send(Ok(vec![Bytes::from_static(b"b.1")])).unwrap();
        let p = tokio::time::timeout(Duration::from_secs(5), out.recv())
            .await
            .unwrap()
            .unwrap();
        let Inbound::Message(p) = p else {
            panic!("expected a message")
        };
        assert_eq!(&p.topic[..], b"b.1");
        // The publisher goes away: a new socket gets the whole wanted set again.
        drop(inbox1);
        assert_eq!(next(&mut seen).await, Seen::Connect(2));
        assert_eq!(next(&mut seen).await, Seen::Sub("b".into()));
        assert_eq!(
            metrics
                .upstream_malformed
                .with_label_values(&["tcp://x", "frame_count"])
                .get(),
            1
        );
        assert_eq!(
            metrics
                .upstream_reconnects
                .with_label_values(&["tcp://x"])
                .get(),
            1
        );
        stop.cancel();
        task.await.unwrap();
    }

    #[test]
    fn silence_is_reported_once_and_cleared() {
        let g = prometheus::IntGauge::new("g", "g").unwrap();
        let t0 = Instant::now();
        let mut s = Silence::new(Duration::from_secs(5), t0);
        s.check("e", true, t0 + Duration::from_secs(4), &g);
        assert_eq!(g.get(), 0);
        s.check("e", true, t0 + Duration::from_secs(6), &g);
        assert_eq!(g.get(), 1);
        s.heard("e", t0 + Duration::from_secs(7), &g);
        assert_eq!(g.get(), 0);
        // Not subscribed to anything: quiet is expected.
        s.check("e", false, t0 + Duration::from_secs(60), &g);
        s.check("e", true, t0 + Duration::from_secs(61), &g);
        assert_eq!(g.get(), 0);
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        let s = settings();
        for attempt in 0..40 {
            let d = backoff(attempt, &s);
            assert!(d <= s.reconnect_max.max(Duration::from_millis(10)));
        }
    }
}
