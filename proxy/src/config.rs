//! The proxy's configuration: every knob and limit, with its default and `--help` text.
//! Loaded from a TOML file (`--config`), `PROXY_*` environment variables and flags.

use crate::admission::AdmissionSettings;
use crate::place::PlaceSettings;
use crate::relay::RelaySettings;
use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Accepts client WebSockets, places each on a worker by the load the workers report, and
/// relays its bytes both ways.
#[derive(Parser, Debug, Clone)]
#[command(name = "proxy", version)]
pub struct Config {
    /// TOML file with any of these settings (keys are the long flag names); environment
    /// variables and flags override it.
    #[arg(long, env = "PROXY_CONFIG")]
    pub config: Option<PathBuf>,

    /// Address for client WebSocket connections.
    #[arg(long, env = "PROXY_LISTEN", default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,

    /// Pending client connections the kernel queues until they are accepted (capped by
    /// `net.core.somaxconn`); a burst past it is dropped and those clients retry a second later.
    #[arg(long, env = "PROXY_LISTEN_BACKLOG", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub listen_backlog: u32,

    /// Address for the admin HTTP port: /metrics, /healthz, /readyz.
    #[arg(long, env = "PROXY_ADMIN_LISTEN", default_value = "127.0.0.1:9100")]
    pub admin_listen: SocketAddr,

    /// Herald's URL, `http://host:port`: the proxy follows its routing table. Without it the
    /// proxy places on the `--worker` list only.
    #[arg(long, env = "PROXY_HERALD")]
    pub herald: Option<String>,

    /// A worker's client address, `host:port` (repeat, or comma-separate in the environment).
    /// Used until herald's table lists a worker (an empty table never replaces them), and always
    /// when there is no `--herald`.
    #[arg(long = "worker", env = "PROXY_WORKERS", value_delimiter = ',')]
    pub workers: Vec<String>,

    /// Serve the demo page at `/` and the JavaScript client at `/pushfleet.js` to plain GETs
    /// on --listen (any other request that is not a WebSocket upgrade still gets HTTP 400).
    #[arg(long, env = "PROXY_DEMO_PAGE")]
    pub demo_page: bool,

    /// Write {"ws": addr, "admin": addr} to this file once both ports are bound (for
    /// supervisors and tests that bind port 0).
    #[arg(long, env = "PROXY_ANNOUNCE_FILE")]
    pub announce_file: Option<PathBuf>,

    /// Most bytes of a client's HTTP upgrade request head; more gets HTTP 431.
    #[arg(long, env = "PROXY_MAX_REQUEST_BYTES", default_value_t = 8 * 1024)]
    pub max_request_bytes: usize,

    /// Time a client has to send its whole request head; slower ones get HTTP 408.
    #[arg(long, env = "PROXY_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,

    /// Time one worker has to accept a connection (and take the request head); after it the
    /// worker is marked down and another one is tried.
    #[arg(long, env = "PROXY_CONNECT_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,

    /// Most workers tried for one client connection (each a different worker); when all fail
    /// the client gets HTTP 502.
    #[arg(long, env = "PROXY_CONNECT_ATTEMPTS", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub connect_attempts: u32,

    /// A relayed connection with no byte in either direction for this long is closed
    /// (0 = never; workers ping their clients, so a live connection is never idle this long).
    #[arg(long, env = "PROXY_IDLE_TIMEOUT", default_value = "10m", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// Most bytes read from one side of a relayed connection at a time, and so the most kept
    /// for a side that is slower than the other. Reads go into a scratch buffer per thread; a
    /// connection holds a buffer of its own only while its receiver lags.
    #[arg(long, env = "PROXY_RELAY_BUFFER_BYTES", default_value_t = 4 * 1024,
          value_parser = clap::value_parser!(u32).range(512..=1_048_576))]
    pub relay_buffer_bytes: u32,

    /// Most client connections open at once (each relayed one holds two sockets: keep it under
    /// half the file descriptor limit); further connections get HTTP 503 with Retry-After.
    #[arg(long, env = "PROXY_MAX_CONNECTIONS", default_value_t = 9_500)]
    pub max_connections: usize,

    /// New client connections admitted per second on average; faster ones get HTTP 503 with
    /// Retry-After (a reconnect storm is spread out instead of landing at once).
    #[arg(long, env = "PROXY_ACCEPT_RATE", default_value_t = 1000.0)]
    pub accept_rate: f64,

    /// New client connections admitted at once above `--accept-rate`.
    #[arg(long, env = "PROXY_ACCEPT_BURST", default_value_t = 1000)]
    pub accept_burst: u32,

    /// Shortest Retry-After told to a refused client; each refusal draws a value between this
    /// and `--retry-after-max`, so refused clients come back spread out.
    #[arg(long, env = "PROXY_RETRY_AFTER_MIN", default_value = "1s", value_parser = humantime::parse_duration)]
    pub retry_after_min: Duration,

    /// Longest Retry-After told to a refused client.
    #[arg(long, env = "PROXY_RETRY_AFTER_MAX", default_value = "10s", value_parser = humantime::parse_duration)]
    pub retry_after_max: Duration,

    /// On SIGTERM, `/readyz` fails at once but the proxy goes on accepting for this long, so a
    /// load balancer that checks `/readyz` takes it out before any client is refused. Set it
    /// above the balancer's check interval × unhealthy threshold; 0 drains at once.
    #[arg(long, env = "PROXY_UNREADY_GRACE", default_value = "0s", value_parser = humantime::parse_duration)]
    pub unready_grace: Duration,

    /// After the unready grace, the proxy stops accepting and keeps relaying open connections
    /// for at most this long (their clients or workers usually end them first); then it closes
    /// the rest.
    #[arg(long, env = "PROXY_DRAIN_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// A routing table older than this (since it was received, plus its report ages) starts
    /// decaying toward equal weights.
    #[arg(long, env = "PROXY_STALE_AFTER", default_value = "6s", value_parser = humantime::parse_duration)]
    pub stale_after: Duration,

    /// After this long without a fresh table, placement is least-connections (this proxy's
    /// own) over the last known workers.
    #[arg(long, env = "PROXY_FALLBACK_AFTER", default_value = "30s", value_parser = humantime::parse_duration)]
    pub fallback_after: Duration,

    /// First time a worker that refused or timed out a connection is left out; doubles with
    /// each consecutive failure.
    #[arg(long, env = "PROXY_DOWN_MIN", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub down_min: Duration,

    /// Longest time a failing worker is left out.
    #[arg(long, env = "PROXY_DOWN_MAX", default_value = "30s", value_parser = humantime::parse_duration)]
    pub down_max: Duration,

    /// PEM certificate chain (leaf first) for TLS toward clients; with `--tls-key` the client
    /// port speaks TLS (wss://) and workers are told `X-Forwarded-Proto: https`.
    #[arg(long, env = "PROXY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for `--tls-cert`.
    #[arg(long, env = "PROXY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// How workers learn the client's address: `headers` (X-Forwarded-For, appended to one the
    /// client sent, and X-Forwarded-Proto), `proxy-v2` (a PROXY protocol v2 header before the
    /// request; the request goes unchanged) or `none`.
    #[arg(long, env = "PROXY_FORWARDED", value_enum, default_value = "headers")]
    pub forwarded: Forwarded,

    /// Log format: `text` or `json`.
    #[arg(long, env = "PROXY_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

/// How the client's address reaches the worker.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarded {
    /// X-Forwarded-For and X-Forwarded-Proto in the request head.
    Headers,
    /// A PROXY protocol v2 header before the request head.
    ProxyV2,
    /// Nothing: the worker sees the proxy's address.
    None,
}

impl Config {
    /// A configuration for tests: loopback, port 0, no workers, defaults otherwise.
    pub fn for_tests() -> Self {
        Config::parse_from([
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
    }

    /// The admission limits.
    pub fn admission(&self) -> AdmissionSettings {
        AdmissionSettings {
            rate_per_s: self.accept_rate,
            burst: self.accept_burst,
            max_connections: self.max_connections,
            retry_after: (self.retry_after_min, self.retry_after_max),
        }
    }

    /// The placement settings.
    pub fn placement(&self) -> PlaceSettings {
        PlaceSettings {
            static_workers: self.workers.clone(),
            stale_after: self.stale_after,
            fallback_after: self.fallback_after,
            down_min: self.down_min,
            down_max: self.down_max,
        }
    }

    /// The relay settings.
    pub fn relay(&self) -> RelaySettings {
        RelaySettings {
            buffer_bytes: self.relay_buffer_bytes as usize,
            idle_timeout: (!self.idle_timeout.is_zero()).then_some(self.idle_timeout),
        }
    }

    /// Settings that parse but cannot work together: which flag, and why.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.workers.is_empty() && self.herald.is_none() {
            return Err((
                "--worker",
                "no --worker and no --herald: nowhere to place connections".into(),
            ));
        }
        if let Some(w) = self.workers.iter().find(|w| !w.contains(':')) {
            return Err(("--worker", format!("{w:?} is not host:port")));
        }
        if self.max_request_bytes < 256 {
            return Err((
                "--max-request-bytes",
                format!(
                    "{} is too small for any upgrade request",
                    self.max_request_bytes
                ),
            ));
        }
        if !(self.accept_rate > 0.0 && self.accept_rate.is_finite()) {
            return Err((
                "--accept-rate",
                format!("{} is not a positive rate", self.accept_rate),
            ));
        }
        if self.retry_after_min > self.retry_after_max {
            return Err(("--retry-after-min", "is above --retry-after-max".into()));
        }
        if self.down_min > self.down_max {
            return Err(("--down-min", "is above --down-max".into()));
        }
        if self.stale_after > self.fallback_after {
            return Err(("--stale-after", "is above --fallback-after".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = Config::parse_from(["proxy", "--worker", "127.0.0.1:1"]);
        assert_eq!(c.listen.to_string(), "127.0.0.1:8000");
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:9100");
        assert_eq!(c.max_request_bytes, 8192);
        assert_eq!(c.max_connections, 9_500);
        assert_eq!(c.forwarded, Forwarded::Headers);
        assert_eq!(c.relay().idle_timeout, Some(Duration::from_secs(600)));
        assert!(c.check().is_ok());
    }

    #[test]
    fn settings_that_cannot_work_are_named() {
        let c = Config::for_tests();
        assert_eq!(c.check().unwrap_err().0, "--worker");
        let c = Config::parse_from(["proxy", "--worker", "a:1,b:2", "--idle-timeout", "0s"]);
        assert_eq!(c.workers, ["a:1", "b:2"]);
        assert_eq!(c.relay().idle_timeout, None);
        let c = Config::parse_from(["proxy", "--worker", "a:1", "--forwarded", "proxy-v2"]);
        assert_eq!(c.forwarded, Forwarded::ProxyV2);
        let c = Config::parse_from(["proxy", "--worker", "a:1", "--retry-after-min", "1m"]);
        assert_eq!(c.check().unwrap_err().0, "--retry-after-min");
        assert!(Config::try_parse_from(["proxy", "--connect-attempts", "0"]).is_err());
        assert!(Config::try_parse_from(["proxy", "--tls-cert", "c.pem"]).is_err());
    }
}
