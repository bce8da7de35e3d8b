//! Test harness for pushfleet: start real components on port 0, publish over real ZeroMQ, and
//! talk to workers with a raw WebSocket client that can send anything (including broken frames)
//! and read everything (including compressed frames and close codes).
//!
//! Every wait has a deadline: [`eventually`] polls a condition; client reads time out.

pub mod bench;
pub mod client;
pub mod fleet;
pub mod haproxy;
pub mod publisher;

use anyhow::{bail, Context, Result};
use std::future::Future;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub use client::{Frame, WsClient};
pub use publisher::Publisher;

/// A worker running in this process.
pub struct TestWorker {
    /// The running worker.
    pub worker: worker::Worker,
    /// Cancel to shut it down (drain with 1012, then stop).
    pub shutdown: CancellationToken,
}

impl TestWorker {
    /// Starts a worker on loopback port 0 after `tweak` adjusts the test configuration.
    pub async fn start(tweak: impl FnOnce(&mut worker::Config)) -> Result<TestWorker> {
        let mut config = worker::Config::for_tests();
        config.ping_interval = Duration::from_secs(3600);
        config.close_timeout = Duration::from_secs(2);
        tweak(&mut config);
        let shutdown = CancellationToken::new();
        let worker = worker::start(config, shutdown.clone()).await?;
        Ok(TestWorker { worker, shutdown })
    }

    /// Binds a publisher, then starts a worker subscribed to it (after `tweak`).
    pub async fn with_publisher(
        tweak: impl FnOnce(&mut worker::Config),
    ) -> Result<(Publisher, TestWorker)> {
        let publisher = Publisher::bind().await?;
        let endpoint = publisher.endpoint.clone();
        let worker = TestWorker::start(|c| {
            c.publishers = vec![endpoint];
            tweak(c);
        })
        .await?;
        Ok((publisher, worker))
    }

    /// The client URL path `/ws` on this worker, as `host:port`.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.worker.ws_addr
    }

    /// Connects a client to `/ws` with the pushfleet.v1 subprotocol and reads the welcome.
    pub async fn client(&self, deflate: bool) -> Result<WsClient> {
        let mut c = WsClient::connect(self.addr(), "/ws", deflate, &[]).await?;
        let welcome = c.recv_json().await?;
        if welcome["type"] != "welcome" {
            bail!("expected welcome, got {welcome}");
        }
        Ok(c)
    }

    /// The current value of a metric sample (exact line prefix, e.g. `worker_connections`),
    /// summed over label sets when `name` has none.
    pub fn metric(&self, name: &str) -> f64 {
        metric_value(&self.worker.metrics.render(), name)
    }

    /// GET/POST an admin path; returns (status, body).
    pub async fn admin(&self, method: &str, path: &str) -> Result<(u16, String)> {
        http_request(self.worker.admin_addr, method, path).await
    }
}

/// Sums the samples of `name` in a Prometheus text exposition. `name` may include labels,
/// e.g. `worker_connections_closed_total{code="4001"` (matched as a prefix).
pub fn metric_value(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{', ',', '}']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls `check` every 20 ms until it returns true or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {within:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A minimal HTTP/1.1 request (for admin ports); returns (status, body).
pub async fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
) -> Result<(u16, String)> {
    http_request_with_body(addr, method, path, b"").await
}

/// As [`http_request`], sending `body` as JSON.
pub async fn http_request_with_body(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await?;
        s.write_all(body).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(10), io)
        .await
        .context("admin request timed out")??;
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no HTTP status")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}
