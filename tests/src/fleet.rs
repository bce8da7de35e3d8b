//! A local fleet for tests: herald and proxies in this process, and workers that can be killed
//! the hard way. Each [`KillableWorker`] runs on its own Tokio runtime on its own thread; killing it
//! shuts that runtime down at once, so its sockets close and its reports stop mid-sentence,
//! like `kill -9` (no drain, no goodbye).

use crate::WsClient;
use anyhow::{bail, Context, Result};
use protocol::routing::RoutingTable;
use std::net::SocketAddr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Herald running in this process.
pub struct TestHerald {
    /// The running herald.
    pub herald: herald::Herald,
    /// Cancel to stop it.
    pub shutdown: CancellationToken,
}

/// Sets a herald config to expect reports every `interval` and to judge workers by
/// connection slots only (CPU, loop lag and latency left out), with no slow start.
pub fn slots_only(c: &mut herald::Config, interval: Duration) {
    c.report_interval = interval;
    c.slow_start = Duration::ZERO;
    c.smoothing = Duration::from_millis(100);
    c.capacity_cpu = 0.0;
    c.capacity_loop_lag = Duration::ZERO;
    c.capacity_latency = Duration::ZERO;
}

impl TestHerald {
    /// Starts herald on loopback port 0 (HTTP and agent) after `tweak` adjusts its test
    /// configuration.
    pub async fn start(tweak: impl FnOnce(&mut herald::Config)) -> Result<TestHerald> {
        let mut config = herald::Config::for_tests();
        tweak(&mut config);
        let shutdown = CancellationToken::new();
        let herald = herald::start(config, shutdown.clone()).await?;
        Ok(TestHerald { herald, shutdown })
    }

    /// Herald expecting reports every `interval` and judging workers by connection slots
    /// only (CPU, loop lag and latency left out), so a test's load is the only load it sees,
    /// whatever else the machine is doing; no slow start.
    pub async fn start_slots_only(interval: Duration) -> Result<TestHerald> {
        TestHerald::start(|c| slots_only(c, interval)).await
    }

    /// `http://addr` for workers' `--herald`.
    pub fn url(&self) -> String {
        format!("http://{}", self.herald.http_addr)
    }

    /// The current routing table, over HTTP.
    pub async fn table(&self) -> Result<RoutingTable> {
        let (status, body) = crate::http_request(self.herald.http_addr, "GET", "/v1/table").await?;
        anyhow::ensure!(status == 200, "GET /v1/table answered {status}: {body}");
        RoutingTable::decode(body.as_bytes()).context("table body")
    }

    /// The current value of one of herald's metrics (see [`crate::metric_value`]).
    pub fn metric(&self, name: &str) -> f64 {
        crate::metric_value(&self.herald.metrics.render(), name)
    }
}

/// A proxy running in this process.
pub struct TestProxy {
    /// The running proxy.
    pub proxy: proxy::Proxy,
    /// Cancel to stop it (SIGTERM: it drains).
    pub shutdown: CancellationToken,
}

impl TestProxy {
    /// Starts a proxy on loopback port 0 placing on the static `workers`, after `tweak`.
    pub async fn start(
        workers: &[SocketAddr],
        tweak: impl FnOnce(&mut proxy::Config),
    ) -> Result<TestProxy> {
        let mut config = proxy::Config::for_tests();
        config.workers = workers.iter().map(ToString::to_string).collect();
        tweak(&mut config);
        let shutdown = CancellationToken::new();
        let proxy = proxy::start(config, shutdown.clone()).await?;
        Ok(TestProxy { proxy, shutdown })
    }

    /// Starts a proxy following the routing table of the herald at `herald_url`.
    pub async fn following(herald_url: &str) -> Result<TestProxy> {
        TestProxy::start(&[], |c| c.herald = Some(herald_url.to_string())).await
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.proxy.ws_addr
    }

    /// A metric sample (see [`crate::metric_value`]).
    pub fn metric(&self, name: &str) -> f64 {
        crate::metric_value(&self.proxy.shared.render_metrics(), name)
    }

    /// Whether the table in use has exactly `n` eligible workers.
    pub fn knows_eligible(&self, n: usize) -> bool {
        self.proxy
            .shared
            .placer
            .lock()
            .table()
            .is_some_and(|(t, _)| t.eligible().count() == n)
    }

    /// A pushfleet client through the proxy, welcome read.
    pub async fn client(&self, deflate: bool) -> Result<WsClient> {
        let mut c = WsClient::connect(self.addr(), "/ws", deflate, &[]).await?;
        let welcome = c.recv_json().await?;
        if welcome["type"] != "welcome" {
            bail!("expected welcome, got {welcome}");
        }
        Ok(c)
    }
}

/// A worker on its own runtime, which [`KillableWorker::kill`] shuts down at once.
pub struct KillableWorker {
    /// Its id.
    pub id: String,
    /// Where clients connect.
    pub ws_addr: SocketAddr,
    /// Its admin port.
    pub admin_addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl KillableWorker {
    /// Starts a worker named `id` reporting to `herald_url` every `interval`, after `tweak`.
    pub fn start(
        id: &str,
        herald_url: &str,
        interval: Duration,
        tweak: impl FnOnce(&mut worker::Config),
    ) -> Result<KillableWorker> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("worker-{id}"))
            .enable_all()
            .build()?;
        let mut config = worker::Config::for_tests();
        config.id = Some(id.to_string());
        config.herald = Some(herald_url.to_string());
        config.report_interval = interval;
        config.ping_interval = Duration::from_secs(3600);
        tweak(&mut config);
        // Started from a plain thread: the caller may itself be inside a runtime.
        let (runtime, started) = std::thread::spawn(move || {
            let started = runtime
                .block_on(worker::start(config, CancellationToken::new()))
                .map(|w| (w.ws_addr, w.admin_addr));
            (runtime, started)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("worker start panicked"))?;
        let (ws_addr, admin_addr) = started?;
        Ok(KillableWorker {
            id: id.to_string(),
            ws_addr,
            admin_addr,
            runtime: Some(runtime),
        })
    }

    /// Kills it: every task stops now, every socket closes.
    pub fn kill(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for KillableWorker {
    fn drop(&mut self) {
        self.kill();
    }
}
