//! Herald's configuration: every knob with its default and `--help` text. Loaded from a TOML
//! file (`--config`), `HERALD_*` environment variables and flags.

use crate::fleet::FleetSettings;
use crate::scale::ScalePolicy;
use crate::score::Capacities;
use clap::{Parser, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Which actuator carries out scale decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ActuatorKind {
    /// Log decisions only.
    Log,
    /// POST each decision as JSON to `--webhook-url`.
    Webhook,
    /// Run `--exec` for each decision.
    Exec,
    /// EC2 Auto Scaling group `--aws-group`.
    Aws,
}

/// Collects the workers' load reports, publishes routing weights to proxies (and HAProxy's
/// agent check), and decides the fleet's size.
#[derive(Parser, Debug, Clone)]
#[command(name = "herald", version)]
pub struct Config {
    /// TOML file with any of these settings (keys are the long flag names); environment
    /// variables and flags override it.
    #[arg(long, env = "HERALD_CONFIG")]
    pub config: Option<PathBuf>,

    /// Address of the HTTP port: POST /v1/reports (workers), GET /v1/table (proxies),
    /// GET /v1/status and / (people), /metrics, /healthz.
    #[arg(long, env = "HERALD_LISTEN", default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,

    /// Address for HAProxy's agent check (one line per check: the worker's weight or
    /// `drain`); off unless set.
    #[arg(long, env = "HERALD_AGENT_LISTEN")]
    pub agent_listen: Option<SocketAddr>,

    /// HAProxy agent checks served at once; more are closed unanswered (HAProxy then keeps
    /// the server as it was) and counted.
    #[arg(long, env = "HERALD_AGENT_MAX_CONNECTIONS", default_value_t = 1024)]
    pub agent_max_connections: usize,

    /// Time an agent check has to send its request line (and to read the reply).
    #[arg(long, env = "HERALD_AGENT_REQUEST_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub agent_request_timeout: Duration,

    /// Write {"http": addr, "agent": addr} to this file once the ports are bound (for
    /// supervisors and tests that bind port 0).
    #[arg(long, env = "HERALD_ANNOUNCE_FILE")]
    pub announce_file: Option<PathBuf>,

    /// The workers' report interval (workers set their own; herald uses this for its tick and
    /// tells proxies how fresh a table should be).
    #[arg(long, env = "HERALD_REPORT_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub report_interval: Duration,

    /// Reports a worker must send before it is given connections.
    #[arg(long, env = "HERALD_MIN_REPORTS", default_value_t = 2)]
    pub min_reports: u64,

    /// A worker silent for this many of its report intervals is expired and removed from
    /// the table.
    #[arg(long, env = "HERALD_EXPIRE_AFTER", default_value_t = 3)]
    pub expire_after: u32,

    /// Time constant of utilisation smoothing (EWMA).
    #[arg(long, env = "HERALD_SMOOTHING", default_value = "10s", value_parser = humantime::parse_duration)]
    pub smoothing: Duration,

    /// A new worker's weight ramps from 10% to 100% over this window.
    #[arg(long, env = "HERALD_SLOW_START", default_value = "30s", value_parser = humantime::parse_duration)]
    pub slow_start: Duration,

    /// A worker counts in scale decisions once trusted for this long, so just-added idle
    /// workers do not hide hot ones.
    #[arg(long, env = "HERALD_WARMUP", default_value = "60s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,

    /// Lowest routing weight (0..1), so an overloaded fleet is never drained entirely.
    #[arg(long, env = "HERALD_WEIGHT_FLOOR", default_value_t = 0.01)]
    pub weight_floor: f64,

    /// CPU ratio (process CPU over its cores) at which a worker is full; 0 ignores CPU.
    #[arg(long, env = "HERALD_CAPACITY_CPU", default_value_t = 0.85)]
    pub capacity_cpu: f64,

    /// Share of a worker's memory budget at which it is full; 0 ignores memory.
    #[arg(long, env = "HERALD_CAPACITY_MEMORY", default_value_t = 0.85)]
    pub capacity_memory: f64,

    /// Share of a worker's max connections at which it is full; 0 ignores connection slots.
    #[arg(long, env = "HERALD_CAPACITY_CONNECTIONS", default_value_t = 0.95)]
    pub capacity_connections: f64,

    /// Bytes out per second at which a worker is full (its network share); 0 ignores it.
    #[arg(long, env = "HERALD_CAPACITY_BYTES_OUT", default_value_t = 0.0)]
    pub capacity_bytes_out: f64,

    /// Deliveries per second at which a worker is full; 0 ignores it.
    #[arg(long, env = "HERALD_CAPACITY_DELIVERIES", default_value_t = 0.0)]
    pub capacity_deliveries: f64,

    /// Event-loop lag at which a worker is full; 0 ignores it.
    #[arg(long, env = "HERALD_CAPACITY_LOOP_LAG", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub capacity_loop_lag: Duration,

    /// Bytes queued for clients at which a worker is full; 0 ignores it.
    #[arg(long, env = "HERALD_CAPACITY_QUEUE_BYTES", default_value_t = 0)]
    pub capacity_queue_bytes: u64,

    /// p99 publish-to-socket latency at which a worker is full; 0 ignores it.
    #[arg(long, env = "HERALD_CAPACITY_LATENCY", default_value = "2s", value_parser = humantime::parse_duration)]
    pub capacity_latency: Duration,

    /// Utilisation a scale-out aims for.
    #[arg(long, env = "HERALD_TARGET", default_value_t = 0.6)]
    pub target: f64,

    /// Mean utilisation of warm workers above which the fleet grows (after the window).
    #[arg(long, env = "HERALD_SCALE_OUT_ABOVE", default_value_t = 0.7)]
    pub scale_out_above: f64,

    /// How long the mean must stay above `scale_out_above`.
    #[arg(long, env = "HERALD_SCALE_OUT_WINDOW", default_value = "60s", value_parser = humantime::parse_duration)]
    pub scale_out_window: Duration,

    /// Mean utilisation below which the fleet shrinks (after the window).
    #[arg(long, env = "HERALD_SCALE_IN_BELOW", default_value_t = 0.45)]
    pub scale_in_below: f64,

    /// How long the mean must stay below `scale_in_below`.
    #[arg(long, env = "HERALD_SCALE_IN_WINDOW", default_value = "5m", value_parser = humantime::parse_duration)]
    pub scale_in_window: Duration,

    /// Share of workers that make "the hottest"; they must all be below `hot_below` to
    /// scale in.
    #[arg(long, env = "HERALD_HOT_FRACTION", default_value_t = 0.1)]
    pub hot_fraction: f64,

    /// The hottest workers must be below this utilisation to scale in.
    #[arg(long, env = "HERALD_HOT_BELOW", default_value_t = 0.6)]
    pub hot_below: f64,

    /// No scale-out this soon after a scale action.
    #[arg(long, env = "HERALD_SCALE_OUT_COOLDOWN", default_value = "2m", value_parser = humantime::parse_duration)]
    pub scale_out_cooldown: Duration,

    /// No scale-in this soon after a scale action.
    #[arg(long, env = "HERALD_SCALE_IN_COOLDOWN", default_value = "5m", value_parser = humantime::parse_duration)]
    pub scale_in_cooldown: Duration,

    /// Fewest workers: herald never drains below this (the group's own minimum keeps it).
    #[arg(long, env = "HERALD_MIN_WORKERS", default_value_t = 1)]
    pub min_workers: u32,

    /// Most workers herald asks for.
    #[arg(long, env = "HERALD_MAX_WORKERS", default_value_t = 100)]
    pub max_workers: u32,

    /// Herald makes no scale decision this soon after it starts, while its view fills.
    #[arg(long, env = "HERALD_STARTUP_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub startup_grace: Duration,

    /// Interval between "still draining" calls to the actuator (AWS lifecycle heartbeats).
    #[arg(long, env = "HERALD_DRAIN_HEARTBEAT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub drain_heartbeat: Duration,

    /// A drain still not empty after this long is finished anyway (the worker is removed
    /// with whatever connections it has left).
    #[arg(long, env = "HERALD_DRAIN_TIMEOUT", default_value = "15m", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// Which actuator carries out scale decisions.
    #[arg(long, env = "HERALD_ACTUATOR", value_enum, default_value_t = ActuatorKind::Log)]
    pub actuator: ActuatorKind,

    /// URL for `--actuator webhook` (http://host:port/path).
    #[arg(long, env = "HERALD_WEBHOOK_URL")]
    pub webhook_url: Option<String>,

    /// Program and arguments for `--actuator exec`: repeat the flag for each argument, or give
    /// a TOML array (the environment variable holds the program alone). No shell is involved;
    /// decisions arrive as PUSHFLEET_* environment variables.
    #[arg(long = "exec", env = "HERALD_EXEC")]
    pub exec: Vec<String>,

    /// Auto Scaling group name for `--actuator aws`.
    #[arg(long, env = "HERALD_AWS_GROUP")]
    pub aws_group: Option<String>,

    /// Termination lifecycle hook of the group, when it has one: herald then heartbeats it
    /// while a worker drains and completes it (CONTINUE) when the worker is empty.
    #[arg(long, env = "HERALD_AWS_LIFECYCLE_HOOK")]
    pub aws_lifecycle_hook: Option<String>,

    /// AWS region (default: the SDK's usual lookup).
    #[arg(long, env = "HERALD_AWS_REGION")]
    pub aws_region: Option<String>,

    /// AWS endpoint URL override (for testing against a local emulator).
    #[arg(long, env = "HERALD_AWS_ENDPOINT_URL")]
    pub aws_endpoint_url: Option<String>,

    /// Log format: `text` or `json`.
    #[arg(long, env = "HERALD_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

/// A setting that cannot work.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("invalid setting --{flag}: {why}")]
pub struct ConfigError {
    /// The flag.
    pub flag: &'static str,
    /// What is wrong.
    pub why: String,
}

impl Config {
    /// A configuration for tests: loopback, port 0, short intervals.
    pub fn for_tests() -> Self {
        Config::parse_from([
            "herald",
            "--listen",
            "127.0.0.1:0",
            "--agent-listen",
            "127.0.0.1:0",
        ])
    }

    /// Checks settings that do not fit together.
    pub fn check(&self) -> Result<(), ConfigError> {
        let bad = |flag, why: String| Err(ConfigError { flag, why });
        for (flag, v) in [
            ("target", self.target),
            ("scale-out-above", self.scale_out_above),
            ("scale-in-below", self.scale_in_below),
            ("hot-fraction", self.hot_fraction),
            ("hot-below", self.hot_below),
            ("weight-floor", self.weight_floor),
        ] {
            if !(v > 0.0 && v <= 1.0) {
                return bad(flag, format!("{v} is not in (0, 1]"));
            }
        }
        if !(self.scale_in_below < self.target && self.target < self.scale_out_above) {
            return bad(
                "target",
                format!(
                    "needs scale-in-below ({}) < target ({}) < scale-out-above ({}) so decisions \
                     cannot flap",
                    self.scale_in_below, self.target, self.scale_out_above
                ),
            );
        }
        if self.min_workers > self.max_workers {
            return bad(
                "min-workers",
                format!(
                    "{} is above --max-workers {}",
                    self.min_workers, self.max_workers
                ),
            );
        }
        if self.min_reports == 0 {
            return bad("min-reports", "must be at least 1".into());
        }
        if self.report_interval < Duration::from_millis(100) {
            return bad("report-interval", "must be at least 100ms".into());
        }
        match self.actuator {
            ActuatorKind::Webhook if self.webhook_url.is_none() => {
                bad("webhook-url", "is required with --actuator webhook".into())
            }
            ActuatorKind::Exec if self.exec.is_empty() => {
                bad("exec", "is required with --actuator exec".into())
            }
            ActuatorKind::Aws if self.aws_group.is_none() => {
                bad("aws-group", "is required with --actuator aws".into())
            }
            _ => Ok(()),
        }
    }

    /// How herald judges workers.
    pub fn fleet(&self) -> FleetSettings {
        FleetSettings {
            min_reports: self.min_reports,
            expire_after_intervals: self.expire_after,
            smoothing: self.smoothing,
            slow_start: self.slow_start,
            slow_start_floor: 0.1,
            warmup: self.warmup,
            weight_floor: self.weight_floor,
            capacities: Capacities {
                cpu_ratio: self.capacity_cpu,
                memory_ratio: self.capacity_memory,
                connections_ratio: self.capacity_connections,
                bytes_out_per_s: self.capacity_bytes_out,
                deliveries_per_s: self.capacity_deliveries,
                loop_lag_seconds: self.capacity_loop_lag.as_secs_f64(),
                queue_bytes: self.capacity_queue_bytes as f64,
                publish_to_socket_p99_seconds: self.capacity_latency.as_secs_f64(),
            },
        }
    }

    /// The scaling policy.
    pub fn policy(&self) -> ScalePolicy {
        ScalePolicy {
            target: self.target,
            scale_out_above: self.scale_out_above,
            scale_out_window: self.scale_out_window,
            scale_in_below: self.scale_in_below,
            scale_in_window: self.scale_in_window,
            hot_fraction: self.hot_fraction,
            hot_below: self.hot_below,
            scale_out_cooldown: self.scale_out_cooldown,
            scale_in_cooldown: self.scale_in_cooldown,
            min_workers: self.min_workers,
            max_workers: self.max_workers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exec_command_keeps_its_arguments_whole() {
        let path = std::env::temp_dir().join(format!("herald-exec-{}.toml", std::process::id()));
        std::fs::write(
            &path,
            "actuator = \"exec\"\nexec = [\"/bin/sh\", \"-c\", \"echo a b\"]\n",
        )
        .unwrap();
        let args = ["herald", "--config", path.to_str().unwrap()];
        let c: Config = protocol::layered::parse_from(args, "config").unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(c.exec, ["/bin/sh", "-c", "echo a b"]);
        assert_eq!(c.check(), Ok(()));
    }

    #[test]
    fn defaults_are_valid_and_mismatches_are_named() {
        assert_eq!(Config::for_tests().check(), Ok(()));
        let mut c = Config::for_tests();
        c.target = 0.8;
        assert_eq!(c.check().unwrap_err().flag, "target");
        let mut c = Config::for_tests();
        c.actuator = ActuatorKind::Aws;
        assert_eq!(c.check().unwrap_err().flag, "aws-group");
        let mut c = Config::for_tests();
        c.min_workers = 5;
        c.max_workers = 2;
        assert_eq!(c.check().unwrap_err().flag, "min-workers");
        let mut c = Config::for_tests();
        c.weight_floor = 0.0;
        assert_eq!(c.check().unwrap_err().flag, "weight-floor");
    }
}
