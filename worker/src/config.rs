//! The worker's configuration: every knob and limit, with its default and `--help` text.
//! Loaded from a TOML file (`--config`), `WORKER_*` environment variables and flags.

use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Holds client WebSockets, subscribes to publishers over ZeroMQ and fans each message out
/// to its subscribers, compressed once.
#[derive(Parser, Debug, Clone)]
#[command(name = "worker", version)]
pub struct Config {
    /// TOML file with any of these settings (keys are the long flag names); environment
    /// variables and flags override it.
    #[arg(long, env = "WORKER_CONFIG")]
    pub config: Option<PathBuf>,

    /// This worker's name in logs, metrics, welcome messages and load reports; unique in the
    /// fleet. Defaults to `<host name>-<pid>`.
    #[arg(long, env = "WORKER_ID")]
    pub id: Option<String>,

    /// Address for client WebSocket connections.
    #[arg(long, env = "WORKER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Pending client connections the kernel queues until they are accepted (capped by
    /// `net.core.somaxconn`); a burst past it is dropped and those clients retry a second later.
    #[arg(long, env = "WORKER_LISTEN_BACKLOG", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub listen_backlog: u32,

    /// Address for the admin HTTP port: /metrics, /healthz, /readyz, POST /drain.
    #[arg(long, env = "WORKER_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
    pub admin_listen: SocketAddr,

    /// ZeroMQ PUB endpoint to subscribe to (repeat, or comma-separate in the environment),
    /// e.g. tcp://10.0.0.5:5556.
    #[arg(long = "publisher", env = "WORKER_PUBLISHERS", value_delimiter = ',')]
    pub publishers: Vec<String>,

    /// Path of the pushfleet.v1 WebSocket endpoint.
    #[arg(long, env = "WORKER_WS_PATH", default_value = "/ws")]
    pub ws_path: String,

    /// Path of an echo WebSocket endpoint for conformance testing (Autobahn); off unless set.
    #[arg(long, env = "WORKER_ECHO_PATH")]
    pub echo_path: Option<String>,

    /// Write {"ws": addr, "admin": addr} to this file once both ports are bound (for
    /// supervisors and tests that bind port 0).
    #[arg(long, env = "WORKER_ANNOUNCE_FILE")]
    pub announce_file: Option<PathBuf>,

    /// Most client connections held at once; further connections get HTTP 503 before upgrade.
    #[arg(long, env = "WORKER_MAX_CONNECTIONS", default_value_t = 19_000)]
    pub max_connections: usize,

    /// Most bytes of one WebSocket frame's payload from a client; more closes with 1009.
    #[arg(long, env = "WORKER_MAX_FRAME_BYTES", default_value_t = 64 * 1024)]
    pub max_frame_bytes: usize,

    /// Most bytes of one client message (all fragments, as received); more closes with 1009.
    #[arg(long, env = "WORKER_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024)]
    pub max_message_bytes: usize,

    /// Most bytes a compressed client message may inflate to; more closes with 1009
    /// before that much memory is used.
    #[arg(long, env = "WORKER_MAX_DECOMPRESSED_BYTES", default_value_t = 256 * 1024)]
    pub max_decompressed_bytes: usize,

    /// Most bytes of the HTTP upgrade request; more gets HTTP 431.
    #[arg(long, env = "WORKER_MAX_HANDSHAKE_BYTES", default_value_t = 8 * 1024)]
    pub max_handshake_bytes: usize,

    /// Most subscriptions (topics plus prefixes) one connection may hold; more is answered
    /// with error `too_many_subscriptions`.
    #[arg(long, env = "WORKER_MAX_SUBSCRIPTIONS", default_value_t = 100)]
    pub max_subscriptions: usize,

    /// Most bytes of a topic or prefix; longer is answered with error `topic_too_long`
    /// (clients) or dropped and counted (publishers).
    #[arg(long, env = "WORKER_MAX_TOPIC_BYTES", default_value_t = 256)]
    pub max_topic_bytes: usize,

    /// Bound of one connection's outbound queue, in bytes of encoded frames. A client whose
    /// queue passes it is closed with 4001 (slow consumer) and counted.
    #[arg(long, env = "WORKER_OUTBOUND_QUEUE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub outbound_queue_bytes: usize,

    /// Messages this size or larger (JSON bytes) are sent compressed to clients that
    /// negotiated permessage-deflate; smaller ones go uncompressed.
    #[arg(long, env = "WORKER_COMPRESSION_MIN_BYTES", default_value_t = 256)]
    pub compression_min_bytes: usize,

    /// zlib level 0-9 for outbound compression (done once per message).
    #[arg(long, env = "WORKER_COMPRESSION_LEVEL", default_value_t = 6,
          value_parser = clap::value_parser!(u32).range(0..=9))]
    pub compression_level: u32,

    /// Disable permessage-deflate (clients that offer it are answered without it).
    #[arg(long, env = "WORKER_NO_COMPRESSION")]
    pub no_compression: bool,

    /// Time a client has to complete the HTTP upgrade; slower ones get HTTP 408.
    #[arg(long, env = "WORKER_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,

    /// Interval between keepalive pings to each client.
    #[arg(long, env = "WORKER_PING_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub ping_interval: Duration,

    /// A client that has not answered a ping within this time is closed with 4003.
    #[arg(long, env = "WORKER_PONG_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub pong_timeout: Duration,

    /// A client that sends no frame at all (pongs count) for this long is closed with 4002.
    #[arg(long, env = "WORKER_IDLE_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// Time to wait for a closing client's close frame to be written before dropping it.
    #[arg(long, env = "WORKER_CLOSE_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub close_timeout: Duration,

    /// Clients closed per second while draining (SIGTERM or POST /drain), so that they
    /// reconnect elsewhere without a herd.
    #[arg(long, env = "WORKER_DRAIN_RATE", default_value_t = 500)]
    pub drain_rate: u32,

    /// Clients closed per batch while draining; batches are spaced to keep `drain_rate`.
    #[arg(long, env = "WORKER_DRAIN_BATCH", default_value_t = 50)]
    pub drain_batch: u32,

    /// Most time a drain may take; clients still connected then are closed at once.
    #[arg(long, env = "WORKER_DRAIN_TIMEOUT", default_value = "120s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// A publisher endpoint with no message for this long is reported silent (log, metric).
    #[arg(long, env = "WORKER_PUBLISHER_SILENCE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub publisher_silence: Duration,

    /// Bound of the queue between the ZeroMQ receivers and fan-out, in messages. At the bound
    /// the receivers wait (ZeroMQ then queues, and drops at its own limit).
    #[arg(long, env = "WORKER_UPSTREAM_QUEUE", default_value_t = 4096)]
    pub upstream_queue: usize,

    /// Largest payload accepted from a publisher; larger messages are dropped and counted.
    #[arg(long, env = "WORKER_MAX_PUBLISH_BYTES", default_value_t = 2 * 1024 * 1024)]
    pub max_publish_bytes: usize,

    /// Longest wait between reconnection attempts to a publisher (full-jitter exponential
    /// backoff from 100 ms).
    #[arg(long, env = "WORKER_PUBLISHER_RECONNECT_MAX", default_value = "2s", value_parser = humantime::parse_duration)]
    pub publisher_reconnect_max: Duration,

    /// Keep history for matching topics (repeat; the first match applies):
    /// `PATTERN[,messages=N][,bytes=SIZE][,age=DURATION]`, PATTERN a topic or a prefix ending
    /// in `*`, e.g. `match.*,messages=500,age=3h`. Defaults: 1000 messages, 8MiB, 24h per topic.
    /// The worker subscribes to these topics upstream for good, so history is complete whether
    /// or not a local client is subscribed.
    #[arg(long = "history", env = "WORKER_HISTORY", value_delimiter = ';')]
    pub history: Vec<crate::history::Rule>,

    /// Cap on all history together, in bytes; past it the oldest messages of any topic go.
    #[arg(long, env = "WORKER_HISTORY_MAX_BYTES", default_value = "256MiB",
          value_parser = parse_size)]
    pub history_max_bytes: usize,

    /// Most messages replayed for one history request (`last`, or catching up after `since`);
    /// a resume that missed more is answered `recovered: false, reason: too_many_missed`.
    #[arg(long, env = "WORKER_MAX_REPLAY", default_value_t = 1000)]
    pub max_replay: usize,

    /// A peer worker's admin address (`host:port`) to fetch history from (repeat, or
    /// comma-separate in the environment). Used to fill history after a late start and to
    /// repair messages lost on the way from a publisher.
    #[arg(long = "peer", env = "WORKER_PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,

    /// Time one peer has to answer a history request.
    #[arg(long, env = "WORKER_PEER_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub peer_timeout: Duration,

    /// Time one attempt to fill a hole from peers may take (three attempts are made); live
    /// messages of the topic wait meanwhile, then a lost range is announced as a gap.
    #[arg(long, env = "WORKER_REPAIR_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub repair_timeout: Duration,

    /// Most messages of one topic held while a hole before them is being filled; past it the
    /// hole is declared lost at once.
    #[arg(long, env = "WORKER_MAX_HELD", default_value_t = 10_000)]
    pub max_held: usize,

    /// Herald's URL, `http://host:port`. The worker sends it a load report every
    /// `report_interval` and follows its replies (drain, peers). Without it the worker does not
    /// report.
    #[arg(long, env = "WORKER_HERALD")]
    pub herald: Option<String>,

    /// Time between load reports to herald (100ms to 10m). Each wait is stretched or shortened
    /// by up to 20% at random so a fleet's reports do not synchronise; a failed report is
    /// retried sooner (full-jitter exponential backoff from 100 ms up to this interval), and
    /// each try waits at most this interval or 2 s for herald's answer.
    #[arg(long, env = "WORKER_REPORT_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub report_interval: Duration,

    /// Where proxies dial for this worker's clients (`host:port`), as told to herald.
    /// Defaults to the bound client address.
    #[arg(long, env = "WORKER_ADVERTISE_ADDRESS")]
    pub advertise_address: Option<String>,

    /// Where other workers reach this worker's admin port (`host:port`), as told to herald.
    /// Defaults to the bound admin address.
    #[arg(long, env = "WORKER_ADVERTISE_ADMIN_ADDRESS")]
    pub advertise_admin_address: Option<String>,

    /// The cloud instance this worker runs on (e.g. an EC2 instance id), told to herald so it
    /// can retire the right machine.
    #[arg(long, env = "WORKER_INSTANCE_ID")]
    pub instance_id: Option<String>,

    /// Memory this worker may use (e.g. 4GiB), told to herald for placement. Defaults to the
    /// machine's memory, or the cgroup's memory limit when lower; 1GiB when neither can be read.
    #[arg(long, env = "WORKER_MEMORY_BUDGET", value_parser = parse_size)]
    pub memory_budget: Option<usize>,

    /// Most peer workers taken from herald's replies (configured `--peer`s come on top); the
    /// rest of herald's list is ignored.
    #[arg(long, env = "WORKER_MAX_PEERS", default_value_t = 64)]
    pub max_peers: usize,

    /// A key that verifies client access tokens (JWT; repeat for rotation, e.g. the old and
    /// the new key): `[id=KID,]alg=ALG[|ALG...],secret-file=PATH` for HS256/384/512 (the file
    /// holds the secret, at least 32 bytes) or `...,pem-file=PATH` for RS*/PS*/ES*/EdDSA (a PEM
    /// public key). A token naming a `kid` is checked with that key only, and only with the
    /// algorithms listed for it. Without any key, access control is off: every connection may
    /// subscribe to every topic.
    #[arg(long = "auth-key", env = "WORKER_AUTH_KEYS", value_delimiter = ';')]
    pub auth_keys: Vec<crate::access::KeySpec>,

    /// With auth keys: close connections that present no valid token (4401). Without it a
    /// connection may present none and gets the anonymous topics only.
    #[arg(long, env = "WORKER_AUTH_REQUIRED")]
    pub auth_required: bool,

    /// With auth keys: topics a connection without a token may subscribe to (a topic, or a
    /// prefix ending in `*`; repeat). Tokens get them too, on top of their own.
    #[arg(long = "anonymous-topics", env = "WORKER_ANONYMOUS_TOPICS", value_delimiter = ',',
          value_parser = |t: &str| protocol::client::TopicPattern::parse(t, "anonymous topics"))]
    pub anonymous_topics: Vec<protocol::client::TopicPattern>,

    /// Accepted token audiences (`aud`; repeat). When set, a token must name one of them.
    #[arg(
        long = "auth-audience",
        env = "WORKER_AUTH_AUDIENCE",
        value_delimiter = ','
    )]
    pub auth_audience: Vec<String>,

    /// Accepted token issuers (`iss`; repeat). When set, a token must come from one of them.
    #[arg(
        long = "auth-issuer",
        env = "WORKER_AUTH_ISSUER",
        value_delimiter = ','
    )]
    pub auth_issuer: Vec<String>,

    /// The token claim that lists the topics it may subscribe to (a list of topics and
    /// prefixes ending in `*`).
    #[arg(long, env = "WORKER_AUTH_TOPICS_CLAIM", default_value = "topics")]
    pub auth_topics_claim: String,

    /// Clock skew tolerated when checking a token's `exp` and `nbf`.
    #[arg(long, env = "WORKER_AUTH_LEEWAY", default_value = "30s", value_parser = humantime::parse_duration)]
    pub auth_leeway: Duration,

    /// Browser origins allowed to connect (`https://app.example.com`, or
    /// `https://*.example.com` for its subdomains; repeat). Others get 403 before the upgrade
    /// (RFC 6455 §10.2); requests without `Origin` (non-browser clients) are let through.
    /// Unset: any origin.
    #[arg(
        long = "allowed-origin",
        env = "WORKER_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    pub allowed_origins: Vec<String>,

    /// Log format: `text` or `json`.
    #[arg(long, env = "WORKER_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

fn parse_size(text: &str) -> Result<usize, String> {
    crate::history::rule::parse_bytes(text)
        .ok_or_else(|| format!("{text:?} is not a size like 256MiB"))
}

impl Config {
    /// The worker's name: `--id`, or `<host name>-<pid>` (unique across hosts, where a pid
    /// alone is not: instances booted from one image often start the worker with the same pid).
    pub fn worker_id(&self) -> String {
        self.id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "worker".to_string());
            format!("{host}-{}", std::process::id())
        })
    }

    /// The access-control settings.
    pub fn access(&self) -> crate::access::Settings {
        crate::access::Settings {
            keys: self.auth_keys.clone(),
            required: self.auth_required,
            anonymous_topics: self.anonymous_topics.clone(),
            audience: self.auth_audience.clone(),
            issuer: self.auth_issuer.clone(),
            topics_claim: self.auth_topics_claim.clone(),
            leeway_s: self.auth_leeway.as_secs(),
            origins: self.allowed_origins.clone(),
        }
    }

    /// A configuration for tests: loopback, port 0, no publishers, defaults otherwise.
    pub fn for_tests() -> Self {
        Config::parse_from([
            "worker",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
    }
}
