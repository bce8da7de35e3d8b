//! Starting and stopping herald: bind the ports, build the actuator, and run the tick loop
//! (expire → decide → follow drains → publish the table and metrics), the actuator driver,
//! the HTTP API and the HAProxy agent.

use crate::actuator::{self, Actuator};
use crate::config::{ActuatorKind, Config, ConfigError};
use crate::control::{Control, ControlSettings};
use crate::fleet::Fleet;
use crate::metrics::Metrics;
use crate::scale::Scaler;
use crate::{actuate, agent, api};
use parking_lot::Mutex;
use protocol::routing::RoutingTable;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use thiserror::Error;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Why herald could not start.
#[derive(Debug, Error)]
pub enum HeraldError {
    /// Settings that cannot work together.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A port could not be bound.
    #[error("cannot bind {what} address {addr}: {source}")]
    Bind {
        /// "http" or "agent".
        what: &'static str,
        /// The configured address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The actuator could not be set up.
    #[error("cannot set up the {0} actuator: {1}")]
    Actuator(&'static str, String),
    /// The announce file could not be written.
    #[error("cannot write announce file {path}: {source}")]
    Announce {
        /// The configured path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// What the HTTP handlers share.
pub struct Shared {
    /// The control state.
    pub control: Arc<Mutex<Control>>,
    /// The latest routing table.
    pub table: watch::Receiver<Arc<RoutingTable>>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

/// A running herald.
pub struct Herald {
    /// The HTTP port.
    pub http_addr: SocketAddr,
    /// The HAProxy agent port, when enabled.
    pub agent_addr: Option<SocketAddr>,
    /// Its state (tests look inside).
    pub control: Arc<Mutex<Control>>,
    /// Its metrics.
    pub metrics: Arc<Metrics>,
    lifecycle: JoinHandle<()>,
}

impl Herald {
    /// Waits until herald has stopped.
    pub async fn wait(self) {
        let _ = self.lifecycle.await;
    }
}

/// Runs herald until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), HeraldError> {
    protocol::process::ensure_open_files(
        config.agent_max_connections as u64 + protocol::process::SPARE_OPEN_FILES,
        "agent_max_connections",
    );
    start(config, shutdown).await?.wait().await;
    Ok(())
}

/// Unix time in milliseconds.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Builds the configured actuator.
pub async fn build_actuator(config: &Config) -> Result<Arc<dyn Actuator>, HeraldError> {
    let missing = |flag: &str| ConfigError {
        flag: "actuator",
        why: format!("--{flag} is required"),
    };
    Ok(match config.actuator {
        ActuatorKind::Log => Arc::new(actuator::log::LogOnly),
        ActuatorKind::Webhook => {
            let url = config
                .webhook_url
                .clone()
                .ok_or_else(|| missing("webhook-url"))?;
            let settings = actuator::webhook::WebhookSettings::new(url);
            Arc::new(
                actuator::webhook::Webhook::new(settings)
                    .map_err(|e| HeraldError::Actuator("webhook", e.to_string()))?,
            )
        }
        ActuatorKind::Exec => {
            let settings = actuator::exec::ExecSettings::new(config.exec.clone());
            Arc::new(
                actuator::exec::Exec::new(settings)
                    .map_err(|e| HeraldError::Actuator("exec", e.to_string()))?,
            )
        }
        ActuatorKind::Aws => {
            let settings = actuator::aws::AwsSettings {
                group: config
                    .aws_group
                    .clone()
                    .ok_or_else(|| missing("aws-group"))?,
                lifecycle_hook: config.aws_lifecycle_hook.clone(),
                region: config.aws_region.clone(),
                endpoint_url: config.aws_endpoint_url.clone(),
            };
            let aws = actuator::aws::Aws::connect(settings)
                .await
                .map_err(|e| HeraldError::Actuator("aws", e.to_string()))?;
            let want = actuator::aws::Expectations {
                min_workers: config.min_workers,
                max_workers: config.max_workers,
                drain_heartbeat: config.drain_heartbeat,
            };
            aws.check_group(&want)
                .await
                .map_err(|e| HeraldError::Actuator("aws", e.to_string()))?;
            Arc::new(aws)
        }
    })
}

/// Starts herald and returns once its ports are bound.
pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Herald, HeraldError> {
    config.check()?;
    let bind = |what, addr| {
        protocol::process::listen(addr, protocol::process::ADMIN_BACKLOG)
            .map_err(|source| HeraldError::Bind { what, addr, source })
    };
    let listener = bind("http", config.listen)?;
    let http_addr = listener.local_addr().expect("bound");
    let agent_listener = match config.agent_listen {
        Some(addr) => Some(bind("agent", addr)?),
        None => None,
    };
    let agent_addr = agent_listener
        .as_ref()
        .map(|l| l.local_addr().expect("bound"));
    let actuator = build_actuator(&config).await?;
    if let Some(path) = &config.announce_file {
        let text = serde_json::json!({
            "http": http_addr.to_string(),
            "agent": agent_addr.map(|a| a.to_string()),
        });
        protocol::process::write_atomically(path, &text.to_string()).map_err(|source| {
            HeraldError::Announce {
                path: path.clone(),
                source,
            }
        })?;
    }

    let generation = rand::random::<u64>() >> 11; // fits a JSON number exactly
    let now = Instant::now();
    let settings = ControlSettings {
        startup_grace: config.startup_grace,
        drain_heartbeat: config.drain_heartbeat,
        drain_timeout: config.drain_timeout,
        report_interval: config.report_interval,
    };
    let control = Control::new(
        settings,
        Fleet::new(config.fleet()),
        Scaler::new(config.policy()),
        generation,
        now,
    );
    let (table_tx, table_rx) = watch::channel(control.table());
    let control = Arc::new(Mutex::new(control));
    let metrics = Arc::new(Metrics::new());
    tracing::info!(
        http = %http_addr, agent = ?agent_addr, actuator = actuator.name(), generation,
        report_interval = ?config.report_interval, target = config.target,
        min_workers = config.min_workers, max_workers = config.max_workers,
        "herald listening"
    );

    let stop = CancellationToken::new();
    let wake = Arc::new(Notify::new());
    let shared = Arc::new(Shared {
        control: control.clone(),
        table: table_rx.clone(),
        metrics: metrics.clone(),
    });
    tokio::spawn(api::serve(listener, shared, stop.clone()));
    if let Some(listener) = agent_listener {
        let limits = agent::AgentLimits {
            max_connections: config.agent_max_connections.max(1),
            request_timeout: config.agent_request_timeout,
        };
        tokio::spawn(agent::serve_with_limits(
            listener,
            table_rx,
            metrics.clone(),
            limits,
            stop.clone(),
        ));
    }
    tokio::spawn(actuate::run(
        control.clone(),
        actuator,
        metrics.clone(),
        wake.clone(),
        stop.clone(),
    ));
    let tick =
        (config.report_interval / 4).clamp(Duration::from_millis(50), Duration::from_millis(500));
    let ticker = tokio::spawn(tick_loop(
        control.clone(),
        table_tx,
        metrics.clone(),
        wake,
        tick,
        stop.clone(),
    ));
    let lifecycle = tokio::spawn(async move {
        shutdown.cancelled().await;
        tracing::info!("herald stopping");
        stop.cancel();
        let _ = ticker.await;
        tracing::info!("herald stopped");
    });
    Ok(Herald {
        http_addr,
        agent_addr,
        control,
        metrics,
        lifecycle,
    })
}

/// Every `tick`: expire, decide, follow drains, publish the table and metrics.
async fn tick_loop(
    control: Arc<Mutex<Control>>,
    table_tx: watch::Sender<Arc<RoutingTable>>,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
    tick: Duration,
    stop: CancellationToken,
) {
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = stop.cancelled() => return,
        }
        let now = Instant::now();
        let mut c = control.lock();
        let decisions_before = c.decisions_made;
        let drains_before = c.drains.len();
        let (expired, changed) = c.tick(now, unix_ms());
        for t in &expired {
            let id = &t.report.worker.id;
            tracing::warn!(worker = %id, address = %t.report.worker.address,
                silent = ?now.saturating_duration_since(t.last_report), "worker expired");
            metrics.workers_expired.inc();
            metrics.forget_worker(id);
        }
        let new = (c.decisions_made - decisions_before) as usize;
        if new > 0 || c.drains.len() != drains_before {
            wake.notify_one();
        }
        for d in c.decisions.iter().rev().take(new) {
            metrics
                .decisions
                .with_label_values(&[d.action, reason_label(d.action)])
                .inc();
        }
        publish_metrics(&c, &metrics, now);
        if changed {
            let table = c.table();
            metrics.table_version.set(table.version as i64);
            drop(c);
            table_tx.send_replace(table);
        }
    }
}

/// A small, fixed set of reason labels per action (reasons themselves are free text).
pub(crate) fn reason_label(action: &str) -> &'static str {
    match action {
        "scale_out" => "utilisation_above_target",
        "scale_in" => "utilisation_below_target",
        "expired" => "missed_reports",
        "drained" => "drain_finished",
        _ => "other",
    }
}

fn publish_metrics(c: &Control, metrics: &Metrics, now: Instant) {
    let table = c.table();
    let min = c.fleet.settings.min_reports;
    let mut counts = [
        ("new", 0i64),
        ("slow_start", 0),
        ("ready", 0),
        ("draining", 0),
    ];
    for t in c.fleet.iter() {
        let id = &t.report.worker.id;
        let state = if t.draining() || c.retired.contains(id) {
            3
        } else if !t.trusted(min) {
            0
        } else if c.fleet.slow_start(t, now) < 1.0 {
            1
        } else {
            2
        };
        counts[state].1 += 1;
        metrics
            .worker_utilisation
            .with_label_values(&[id])
            .set(t.utilisation);
        metrics
            .worker_report_age
            .with_label_values(&[id])
            .set(now.saturating_duration_since(t.last_report).as_secs_f64());
        metrics
            .worker_connections
            .with_label_values(&[id])
            .set(t.report.connections as i64);
        let weight = table
            .worker(id)
            .map_or(0.0, |w| if w.draining { 0.0 } else { w.weight });
        metrics.worker_weight.with_label_values(&[id]).set(weight);
    }
    for (state, n) in counts {
        metrics.workers.with_label_values(&[state]).set(n);
    }
    if let Some(d) = c.scaler.desired() {
        metrics.desired_workers.set(d as i64);
    }
}
