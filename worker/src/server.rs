//! Starting and stopping a worker: bind the ports, start fan-out, the publisher endpoints and
//! load reports to herald, accept clients, and run the lifecycle (serve → drain → stop).

use crate::broadcast::Compression;
use crate::config::Config;
use crate::history::{self, Streams};
use crate::hub::{self, Command, Hub, Subscriber};
use crate::metrics::Metrics;
use crate::peers::Peers;
use crate::upstream::{self, EndpointSettings, ZmqSub};
use crate::{admin, conn, drain, report};
use parking_lot::Mutex;
use protocol::client::close;
use protocol::load::ReportError;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Bound of the queue of requests from connections to the hub; a connection whose request
/// finds it full waits (and stops reading) until there is room.
const HUB_QUEUE: usize = 8192;

/// Why a worker could not start.
#[derive(Debug, Error)]
pub enum WorkerError {
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
    /// `--herald` is not `http://host:port`.
    #[error("--herald {url:?} is not a herald URL: {why}")]
    HeraldUrl {
        /// The configured URL.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// A setting would make load reports herald refuses (identity, interval, limits).
    #[error("{setting}: herald would refuse this worker's load reports: {error}")]
    Report {
        /// The flag at fault, e.g. `--report-interval`.
        setting: &'static str,
        /// What herald would say.
        error: ReportError,
    },
    /// An access-token key could not be loaded.
    #[error(transparent)]
    AccessKey(#[from] crate::access::KeyError),
}

/// State every connection and the admin port share.
pub struct Shared {
    /// The configuration.
    pub config: Arc<Config>,
    /// This worker's name.
    pub worker_id: String,
    /// Requests to the hub (subscriptions, history, peers' history requests).
    pub hub: mpsc::Sender<Command>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Live connections by id (for draining).
    pub connections: Mutex<HashMap<u64, Arc<Subscriber>>>,
    /// Last connection id handed out.
    pub next_connection_id: AtomicU64,
    /// Set once draining starts: new upgrades get 503, /readyz fails.
    pub draining: AtomicBool,
    /// Cancelled by `POST /drain`, or when herald's reply to a load report asks for a drain.
    pub drain_requested: CancellationToken,
    /// Who may connect and subscribe to what.
    pub access: crate::access::Access,
}

/// A running worker.
pub struct Worker {
    /// Where clients connect.
    pub ws_addr: SocketAddr,
    /// The admin port.
    pub admin_addr: SocketAddr,
    /// Its metrics.
    pub metrics: Arc<Metrics>,
    /// Its shared state (tests inspect connections through it).
    pub shared: Arc<Shared>,
    lifecycle: JoinHandle<()>,
}

impl Worker {
    /// Waits until the worker has stopped (after `shutdown` and the drain).
    pub async fn wait(self) {
        let _ = self.lifecycle.await;
    }
}

/// Runs a worker until `shutdown` is cancelled and its clients are drained.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), WorkerError> {
    protocol::process::ensure_open_files(
        config.max_connections as u64 + protocol::process::SPARE_OPEN_FILES,
        "max_connections",
    );
    start(config, shutdown).await?.wait().await;
    Ok(())
}

/// Starts a worker and returns once its ports are bound.
pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Worker, WorkerError> {
    let access = crate::access::Access::load(config.access())?;
    let (listener, admin_listener) = protocol::process::listen_client_and_admin(
        config.listen,
        config.listen_backlog,
        config.admin_listen,
    )
    .map_err(|e| WorkerError::Bind {
        what: e.what,
        addr: e.addr,
        source: e.source,
    })?;
    let ws_addr = listener.local_addr().expect("bound");
    let admin_addr = admin_listener.local_addr().expect("bound");
    let worker_id = config.worker_id();
    let reporting = match &config.herald {
        Some(url) => Some(report::setup(
            &config, url, &worker_id, ws_addr, admin_addr,
        )?),
        None => {
            tracing::info!("no --herald: this worker sends no load reports");
            None
        }
    };
    if let Some(path) = &config.announce_file {
        let text = serde_json::json!({"ws": ws_addr.to_string(), "admin": admin_addr.to_string()});
        protocol::process::write_atomically(path, &text.to_string()).map_err(|source| {
            WorkerError::Announce {
                path: path.clone(),
                source,
            }
        })?;
    }

    let metrics = Arc::new(Metrics::new(&worker_id));
    let compression = Compression {
        min_bytes: config.compression_min_bytes,
        level: config.compression_level,
    };
    let peers = Peers::new(
        config.peers.clone(),
        config.peer_timeout,
        config.max_topic_bytes,
    );
    let streams = Streams::new(
        history::Settings {
            rules: config.history.clone(),
            max_total_bytes: config.history_max_bytes,
            max_replay: config.max_replay,
            repair_timeout: config.repair_timeout,
            max_held: config.max_held,
            has_peers: !peers.is_empty(),
        },
        metrics.clone(),
    );
    // A history request waits for at most every fetch attempt of its topic, plus a margin.
    let park_timeout = (config.repair_timeout + Duration::from_millis(200)) * 3;
    let hub = Hub::new(
        metrics.clone(),
        compression,
        streams,
        peers.clone(),
        park_timeout,
    );
    let wanted = hub.wanted();
    let (hub_tx, hub_rx) = mpsc::channel(HUB_QUEUE);
    let config = Arc::new(config);
    let shared = Arc::new(Shared {
        config: config.clone(),
        worker_id: worker_id.clone(),
        hub: hub_tx,
        metrics: metrics.clone(),
        connections: Mutex::new(HashMap::new()),
        next_connection_id: AtomicU64::new(0),
        draining: AtomicBool::new(false),
        drain_requested: CancellationToken::new(),
        access,
    });
    tracing::info!(
        worker = %worker_id, ws = %ws_addr, admin = %admin_addr,
        publishers = ?config.publishers, echo = ?config.echo_path,
        history = ?config.history.iter().map(ToString::to_string).collect::<Vec<_>>(),
        peers = ?config.peers,
        "worker listening"
    );
    if shared.access.enabled() {
        tracing::info!(
            keys = config.auth_keys.len(),
            required = config.auth_required,
            anonymous_topics = ?config.anonymous_topics.iter().map(ToString::to_string).collect::<Vec<_>>(),
            origins = ?config.allowed_origins,
            "access tokens checked"
        );
    } else {
        tracing::info!(origins = ?config.allowed_origins, "access control off: no --auth-key");
    }

    // Fan-out and the publisher side. They stop when `stop` is cancelled at the very end.
    let stop = CancellationToken::new();
    let (tx, rx) = mpsc::channel(config.upstream_queue.max(1));
    let dispatcher = tokio::spawn(hub::run(hub, rx, hub_rx, stop.clone()));
    let settings = EndpointSettings {
        max_topic_bytes: config.max_topic_bytes,
        max_publish_bytes: config.max_publish_bytes,
        silence: config.publisher_silence,
        reconnect_min: Duration::from_millis(100),
        reconnect_max: config.publisher_reconnect_max,
    };
    let connect_timeout = config.publisher_reconnect_max.max(Duration::from_secs(1));
    for endpoint in &config.publishers {
        tokio::spawn(upstream::run_endpoint(
            endpoint.clone(),
            move || ZmqSub::new(connect_timeout),
            wanted.clone(),
            tx.clone(),
            metrics.clone(),
            settings.clone(),
            stop.clone(),
        ));
    }
    drop(tx);
    // Reports go on through a drain (herald watches it) and end with the worker.
    if let Some(setup) = reporting {
        tokio::spawn(report::run(setup, shared.clone(), peers, stop.clone()));
    }

    let stop_accepting = CancellationToken::new();
    let connections = TaskTracker::new();
    tokio::spawn(accept_loop(
        listener,
        shared.clone(),
        connections.clone(),
        stop_accepting.clone(),
    ));
    tokio::spawn(admin::serve(admin_listener, shared.clone(), stop.clone()));

    let lifecycle = tokio::spawn({
        let shared = shared.clone();
        async move {
            // SIGTERM (a stop, a rollout, an instance leaving its group) and herald's drain
            // both mean the service goes on elsewhere: clients get 1012 and reconnect soon.
            let asked_by_herald = tokio::select! {
                _ = shutdown.cancelled() => false,
                _ = shared.drain_requested.cancelled() => true,
            };
            shared.draining.store(true, Ordering::Relaxed);
            shared.metrics.draining.set(1);
            stop_accepting.cancel();
            let cfg = &shared.config;
            let plan = drain::Plan::new(cfg.drain_rate, cfg.drain_batch);
            drain::drain(&shared, close::SERVICE_RESTART, plan, cfg.drain_timeout).await;
            if asked_by_herald {
                tracing::info!("drained; waiting for shutdown");
                shutdown.cancelled().await;
            }
            connections.close();
            let grace = cfg.close_timeout * 2;
            if tokio::time::timeout(grace, connections.wait())
                .await
                .is_err()
            {
                tracing::warn!(
                    open = shared.connections.lock().len(),
                    "connections still open at exit"
                );
            }
            stop.cancel();
            let _ = dispatcher.await;
            tracing::info!("worker stopped");
        }
    });

    Ok(Worker {
        ws_addr,
        admin_addr,
        metrics,
        shared,
        lifecycle,
    })
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    tracker.spawn(conn::serve(stream, peer, shared.clone()));
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
