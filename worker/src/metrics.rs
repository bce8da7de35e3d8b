//! The worker's Prometheus metrics, one registry per worker (tests run several in a process).
//! Stage counters line up so operators can compare counts between stages: received from
//! publishers → fanned out (deliveries) → frames written to sockets, with drops counted.

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Every metric the worker exports.
pub struct Metrics {
    registry: Registry,
    /// Messages received from each publisher endpoint.
    pub upstream_messages: IntCounterVec,
    /// Payload bytes received from each publisher endpoint.
    pub upstream_bytes: IntCounterVec,
    /// Messages from publishers that were not valid, by endpoint and reason.
    pub upstream_malformed: IntCounterVec,
    /// 1 while connected to the endpoint.
    pub upstream_connected: IntGaugeVec,
    /// 1 while the endpoint has been silent for longer than `publisher_silence`.
    pub upstream_silent: IntGaugeVec,
    /// Reconnections (new sockets) per endpoint.
    pub upstream_reconnects: IntCounterVec,
    /// Topics and prefixes subscribed on the ZeroMQ side.
    pub upstream_subscriptions: IntGauge,
    /// Messages that reached fan-out with at least one matching subscriber.
    pub fanout_messages: IntCounter,
    /// Frames queued for subscribers (one per subscriber per message).
    pub fanout_deliveries: IntCounter,
    /// Frames written to client sockets (all kinds).
    pub frames_written: IntCounter,
    /// Bytes written to client sockets.
    pub bytes_written: IntCounter,
    /// Socket write calls (one per batch of frames).
    pub write_calls: IntCounter,
    /// Message bytes fed to the deflater.
    pub compression_input_bytes: IntCounter,
    /// Compressed bytes it produced.
    pub compression_output_bytes: IntCounter,
    /// Deflate operations (one per message and window size, never per subscriber).
    pub deflate_operations: IntCounter,
    /// Clients closed for passing the outbound queue bound.
    pub slow_client_closes: IntCounter,
    /// Deliveries dropped, by reason.
    pub dropped: IntCounterVec,
    /// Open client connections.
    pub connections: IntGauge,
    /// Connections accepted (upgraded).
    pub connections_accepted: IntCounter,
    /// Connections closed, by close code sent or received ("none" if the TCP just ended).
    pub connections_closed: IntCounterVec,
    /// Upgrade requests refused, by reason.
    pub handshake_failures: IntCounterVec,
    /// Connections closed for their access token (4401, 4402), by reason.
    pub auth_failures: IntCounterVec,
    /// Connections that negotiated permessage-deflate.
    pub deflate_negotiated: IntCounter,
    /// Subscriptions held by clients.
    pub subscriptions: IntGauge,
    /// Client requests answered with an error, by code.
    pub client_errors: IntCounterVec,
    /// Time from the publisher's timestamp to the frame's write to the socket.
    pub publish_to_socket: Histogram,
    /// 1 while draining.
    pub draining: IntGauge,
    /// Messages kept in history, all topics.
    pub history_messages: IntGauge,
    /// Bytes kept in history, all topics.
    pub history_bytes: IntGauge,
    /// Topics with a stream (history or order tracking).
    pub history_topics: IntGauge,
    /// Messages dropped from history, by limit (messages, bytes, age, memory_cap).
    pub history_evicted: IntCounterVec,
    /// Stream events: duplicate, stale_epoch, gap (detected), lost (declared), reset, filled.
    pub stream_events: IntCounterVec,
    /// Holes handled by fetching from peers, by result (ok, failed).
    pub stream_repairs: IntCounterVec,
    /// Messages obtained from peers to fill holes.
    pub stream_repaired_messages: IntCounter,
    /// Messages declared lost (announced to clients as gaps).
    pub stream_lost_messages: IntCounter,
    /// History fetches from peers, by result (ok, not_found, error, timeout).
    pub peer_fetches: IntCounterVec,
    /// History requests from peers served on the admin port, by result.
    pub peer_served: IntCounterVec,
    /// Peer workers history is fetched from now (configured plus named by herald).
    pub peers: IntGauge,
    /// Load reports sent to herald, by result (ok, failed, refused).
    pub reports: IntCounterVec,
    /// 1 while herald answers load reports (the last one got an HTTP answer), else 0.
    pub herald_reachable: IntGauge,
    /// Client history requests answered, by outcome (recovered, last, or the not-recovered reason).
    pub history_requests: IntCounterVec,
    /// Messages replayed to clients from history.
    pub replayed_messages: IntCounter,
}

impl Metrics {
    /// Creates and registers every metric, labelled with the worker id.
    pub fn new(worker_id: &str) -> Self {
        let registry = Registry::new_custom(
            None,
            Some([("worker".to_string(), worker_id.to_string())].into()),
        )
        .expect("valid registry");
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid counter");
            registry.register(Box::new(c.clone())).expect("unique");
            c
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter");
            registry.register(Box::new(c.clone())).expect("unique");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid gauge");
            registry.register(Box::new(g.clone())).expect("unique");
            g
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge");
            registry.register(Box::new(g.clone())).expect("unique");
            g
        };
        let publish_to_socket = Histogram::with_opts(
            HistogramOpts::new(
                "worker_publish_to_socket_seconds",
                "Time from the publisher's timestamp to the frame's write to the client socket",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
                30.0,
            ]),
        )
        .expect("valid histogram");
        registry
            .register(Box::new(publish_to_socket.clone()))
            .expect("unique");
        let m = Metrics {
            upstream_messages: counter_vec(
                "worker_upstream_messages_total",
                "Messages received from each publisher endpoint",
                &["endpoint"],
            ),
            upstream_bytes: counter_vec(
                "worker_upstream_bytes_total",
                "Payload bytes received from each publisher endpoint",
                &["endpoint"],
            ),
            upstream_malformed: counter_vec(
                "worker_upstream_malformed_total",
                "Publisher messages dropped as invalid, by reason",
                &["endpoint", "reason"],
            ),
            upstream_connected: gauge_vec(
                "worker_upstream_connected",
                "1 while connected to the publisher endpoint",
                &["endpoint"],
            ),
            upstream_silent: gauge_vec(
                "worker_upstream_silent",
                "1 while the publisher endpoint has sent nothing for longer than publisher_silence",
                &["endpoint"],
            ),
            upstream_reconnects: counter_vec(
                "worker_upstream_reconnects_total",
                "New ZeroMQ connections made to each endpoint after the first",
                &["endpoint"],
            ),
            upstream_subscriptions: gauge(
                "worker_upstream_subscriptions",
                "Topics and prefixes subscribed on the ZeroMQ side",
            ),
            fanout_messages: counter(
                "worker_fanout_messages_total",
                "Published messages that matched at least one local subscriber",
            ),
            fanout_deliveries: counter(
                "worker_fanout_deliveries_total",
                "Frames queued for subscribers (one per subscriber per message)",
            ),
            frames_written: counter(
                "worker_frames_written_total",
                "Frames written to client sockets",
            ),
            bytes_written: counter(
                "worker_bytes_written_total",
                "Bytes written to client sockets",
            ),
            write_calls: counter(
                "worker_socket_writes_total",
                "Write system calls to client sockets (each carries a batch of frames)",
            ),
            compression_input_bytes: counter(
                "worker_compression_input_bytes_total",
                "Message bytes given to the deflater",
            ),
            compression_output_bytes: counter(
                "worker_compression_output_bytes_total",
                "Compressed bytes the deflater produced",
            ),
            deflate_operations: counter(
                "worker_deflate_operations_total",
                "Deflate operations: one per message and window size, never per subscriber",
            ),
            slow_client_closes: counter(
                "worker_slow_client_closes_total",
                "Clients closed (4001) because their outbound queue passed its bound",
            ),
            dropped: counter_vec(
                "worker_dropped_deliveries_total",
                "Deliveries not queued, by reason",
                &["reason"],
            ),
            connections: gauge("worker_connections", "Open client WebSocket connections"),
            connections_accepted: counter(
                "worker_connections_accepted_total",
                "Client connections upgraded to WebSocket",
            ),
            connections_closed: counter_vec(
                "worker_connections_closed_total",
                "Client connections closed, by close code",
                &["code"],
            ),
            handshake_failures: counter_vec(
                "worker_handshake_failures_total",
                "Upgrade requests refused, by reason",
                &["reason"],
            ),
            auth_failures: counter_vec(
                "worker_auth_failures_total",
                "Connections closed for their access token (4401 invalid, 4402 expired), by reason",
                &["reason"],
            ),
            deflate_negotiated: counter(
                "worker_deflate_negotiated_total",
                "Connections that negotiated permessage-deflate",
            ),
            subscriptions: gauge("worker_subscriptions", "Subscriptions held by clients"),
            client_errors: counter_vec(
                "worker_client_errors_total",
                "Client requests answered with an error, by code",
                &["code"],
            ),
            publish_to_socket,
            draining: gauge("worker_draining", "1 while the worker drains its clients"),
            history_messages: gauge(
                "worker_history_messages",
                "Messages kept in history, all topics",
            ),
            history_bytes: gauge("worker_history_bytes", "Bytes kept in history, all topics"),
            history_topics: gauge(
                "worker_history_topics",
                "Topics whose stream the worker tracks",
            ),
            history_evicted: counter_vec(
                "worker_history_evicted_total",
                "Messages dropped from history, by limit",
                &["reason"],
            ),
            stream_events: counter_vec(
                "worker_stream_events_total",
                "Stream order events: duplicate, stale_epoch, gap, lost, reset, filled",
                &["event"],
            ),
            stream_repairs: counter_vec(
                "worker_stream_repairs_total",
                "Holes in a topic's stream handled by fetching from peers, by result",
                &["result"],
            ),
            stream_repaired_messages: counter(
                "worker_stream_repaired_messages_total",
                "Messages obtained from peers to fill holes",
            ),
            stream_lost_messages: counter(
                "worker_stream_lost_messages_total",
                "Messages declared lost and announced to clients as gaps",
            ),
            peer_fetches: counter_vec(
                "worker_peer_fetches_total",
                "History fetches from peer workers, by result",
                &["result"],
            ),
            peer_served: counter_vec(
                "worker_peer_history_served_total",
                "History requests from peer workers answered, by result",
                &["result"],
            ),
            peers: gauge(
                "worker_peers",
                "Peer workers history is fetched from (configured plus named by herald)",
            ),
            reports: counter_vec(
                "worker_reports_total",
                "Load reports sent to herald, by result (ok, failed: no answer, refused: HTTP 400)",
                &["result"],
            ),
            herald_reachable: gauge(
                "worker_herald_reachable",
                "1 while herald answers load reports, else 0",
            ),
            history_requests: counter_vec(
                "worker_history_requests_total",
                "Client history requests, by outcome",
                &["outcome"],
            ),
            replayed_messages: counter(
                "worker_replayed_messages_total",
                "Messages replayed to clients from history",
            ),
            registry,
        };
        // Every known label value exists at 0 from the start, so a rate sees the first
        // increment and every dashboard panel and alert has a series to evaluate.
        let known: [(&IntCounterVec, &[&str]); 6] = [
            (&m.dropped, &["slow_consumer", "closing"]),
            (
                &m.stream_events,
                &["duplicate", "stale_epoch", "gap", "lost", "reset", "filled"],
            ),
            (&m.stream_repairs, &["ok", "failed"]),
            (
                &m.history_evicted,
                &["messages", "bytes", "age", "memory_cap"],
            ),
            (&m.peer_fetches, &["ok", "not_found", "error", "timeout"]),
            (&m.peer_served, &["ok", "unknown_topic", "other_epoch"]),
        ];
        for (counter, values) in known {
            protocol::process::preset(counter, values);
        }
        protocol::process::preset(&m.handshake_failures, crate::ws::handshake::Refusal::LABELS);
        protocol::process::preset(&m.auth_failures, crate::access::AccessError::LABELS);
        m
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        protocol::process::render_metrics(&self.registry)
    }
}
