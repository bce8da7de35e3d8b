//! Starting and stopping a proxy: bind the ports, follow herald's routing table (when
//! configured), accept clients, and run the lifecycle: serve → unready (SIGTERM: `/readyz` fails,
//! still accepting for `--unready-grace`) → drain (stop accepting, keep relaying up to
//! `--drain-timeout`) → close what is left → stop.

use crate::admission::Admission;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::place::Placer;
use crate::relay::RelaySettings;
use crate::watch::{self, WatchSettings, WatchStatus};
use crate::{admin, conn};
use parking_lot::Mutex;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Once the drain timeout has closed the relays, how long connections still in their
/// handshake get to finish before the proxy stops without them.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Why a proxy could not start.
#[derive(Debug, Error)]
pub enum ProxyError {
    /// A port could not be bound.
    #[error("cannot bind {what} address {addr}: {source}")]
    Bind {
        /// "client" or "admin".
        what: &'static str,
        /// The configured address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The announce file could not be written.
    #[error("cannot write announce file {path}: {source}")]
    Announce {
        /// The configured path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Settings that cannot work (together).
    #[error("{setting}: {why}")]
    Setting {
        /// The flag at fault.
        setting: &'static str,
        /// What is wrong.
        why: String,
    },
}

/// State every connection and the admin port share.
pub struct Shared {
    /// The configuration.
    pub config: Config,
    /// Admission control (rate and concurrent connections).
    pub admission: Admission,
    /// Placement. The lock is held for one decision or update at a time, never across I/O.
    pub placer: Arc<Mutex<Placer>>,
    /// TLS toward clients, when configured.
    pub tls: Option<TlsAcceptor>,
    /// Relay settings, from the configuration.
    pub relay: RelaySettings,
    /// Metrics.
    pub metrics: Metrics,
    /// What the herald watcher knows (with `--herald` only).
    pub watch: Option<Arc<WatchStatus>>,
    /// Set once draining starts: /readyz fails.
    pub draining: AtomicBool,
}

impl Shared {
    /// The metrics' text exposition, gauges refreshed.
    pub fn render_metrics(&self) -> String {
        let open = self.admission.open();
        self.metrics
            .render(&self.placer, self.watch.as_deref(), open, Instant::now())
    }
}

/// A running proxy.
pub struct Proxy {
    /// Where clients connect.
    pub ws_addr: SocketAddr,
    /// The admin port.
    pub admin_addr: SocketAddr,
    /// Its shared state (tests read metrics and the placer through it).
    pub shared: Arc<Shared>,
    lifecycle: JoinHandle<()>,
}

impl Proxy {
    /// Waits until the proxy has stopped (after `shutdown` and the drain).
    pub async fn wait(self) {
        let _ = self.lifecycle.await;
    }
}

/// Runs a proxy until `shutdown` is cancelled and its connections are drained.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), ProxyError> {
    protocol::process::ensure_open_files(
        // Two sockets per relayed connection.
        2 * config.max_connections as u64 + protocol::process::SPARE_OPEN_FILES,
        "max_connections",
    );
    start(config, shutdown).await?.wait().await;
    Ok(())
}

/// Starts a proxy and returns once its ports are bound.
pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Proxy, ProxyError> {
    config
        .check()
        .map_err(|(setting, why)| ProxyError::Setting { setting, why })?;
    let herald = match &config.herald {
        Some(url) => {
            Some(
                protocol::process::parse_http_url(url).map_err(|why| ProxyError::Setting {
                    setting: "--herald",
                    why: format!("{url:?} {why}"),
                })?,
            )
        }
        None => None,
    };
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(
            crate::tls::acceptor(cert, key)
                .map_err(|(setting, why)| ProxyError::Setting { setting, why })?,
        ),
        _ => None,
    };
    let (listener, admin_listener) = protocol::process::listen_client_and_admin(
        config.listen,
        config.listen_backlog,
        config.admin_listen,
    )
    .map_err(|e| ProxyError::Bind {
        what: e.what,
        addr: e.addr,
        source: e.source,
    })?;
    let ws_addr = listener.local_addr().expect("bound");
    let admin_addr = admin_listener.local_addr().expect("bound");
    if let Some(path) = &config.announce_file {
        let text = serde_json::json!({"ws": ws_addr.to_string(), "admin": admin_addr.to_string()});
        protocol::process::write_atomically(path, &text.to_string()).map_err(|source| {
            ProxyError::Announce {
                path: path.clone(),
                source,
            }
        })?;
    }

    let shared = Arc::new(Shared {
        admission: Admission::new(config.admission()),
        placer: Arc::new(Mutex::new(Placer::new(config.placement()))),
        tls,
        relay: config.relay(),
        metrics: Metrics::new(),
        watch: herald.as_ref().map(|_| Arc::new(WatchStatus::default())),
        draining: AtomicBool::new(false),
        config,
    });
    tracing::info!(
        ws = %ws_addr, admin = %admin_addr, tls = shared.tls.is_some(), herald = ?herald,
        workers = ?shared.config.workers, forwarded = ?shared.config.forwarded,
        "proxy listening"
    );

    // Herald and the admin port run until `stop`, cancelled at the very end.
    let stop = CancellationToken::new();
    if let (Some(authority), Some(status)) = (herald, &shared.watch) {
        let settings = WatchSettings::new(authority);
        let placer = shared.placer.clone();
        tokio::spawn(watch::run(settings, placer, status.clone(), stop.clone()));
    }
    tokio::spawn(admin::serve(admin_listener, shared.clone(), stop.clone()));

    let stop_accepting = CancellationToken::new();
    let close = CancellationToken::new();
    let connections = TaskTracker::new();
    tokio::spawn(accept_loop(
        listener,
        shared.clone(),
        connections.clone(),
        stop_accepting.clone(),
        close.clone(),
    ));

    let lifecycle = tokio::spawn({
        let shared = shared.clone();
        async move {
            shutdown.cancelled().await;
            shared.draining.store(true, Ordering::Relaxed);
            shared.metrics.draining.set(1);
            let grace = shared.config.unready_grace;
            if !grace.is_zero() {
                tracing::info!(
                    ?grace,
                    "unready: /readyz fails, still accepting while load balancers take this proxy out"
                );
                tokio::time::sleep(grace).await;
            }
            stop_accepting.cancel();
            connections.close();
            let drain_timeout = shared.config.drain_timeout;
            tracing::info!(
                open = shared.admission.open(),
                ?drain_timeout,
                "draining: not accepting, relaying open connections until they end or the timeout"
            );
            if tokio::time::timeout(drain_timeout, connections.wait())
                .await
                .is_err()
            {
                tracing::info!(
                    open = shared.admission.open(),
                    "drain timeout: closing the connections still open"
                );
                close.cancel();
                if tokio::time::timeout(CLOSE_GRACE, connections.wait())
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        open = shared.admission.open(),
                        "connections still open at exit"
                    );
                }
            }
            stop.cancel();
            tracing::info!("proxy stopped");
        }
    });

    Ok(Proxy {
        ws_addr,
        admin_addr,
        shared,
        lifecycle,
    })
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    stop: CancellationToken,
    close: CancellationToken,
) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    tracker.spawn(conn::serve(stream, peer, shared.clone(), close.clone()));
                }
                Err(e) => {
                    // Out of file descriptors or similar: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.cancelled() => {
                tracing::info!("stopped accepting clients");
                return;
            }
        }
    }
}
