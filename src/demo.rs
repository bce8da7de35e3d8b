//! `pushfleet demo-publisher`: plays a few simulated football matches at once and publishes
//! their key moments on `match.1` … `match.N` with the publisher library (stamped positions,
//! position checks for quiet topics), as a backend would. When a match ends, the next one on
//! the same topic kicks off after a pause, so the demo runs for as long as the fleet does.

mod matches;

use clap::Parser;
use matches::{Kind, Match};
use publisher::{Options, PublishError, Publisher};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

/// How often quiet topics are looked at for due position checks.
const CHECK_TICK: Duration = Duration::from_millis(100);

/// Publish simulated football matches' key moments (kick-off, chances, cards, substitutions,
/// goals with the score, half-time, full time) on match.1 … match.N over ZeroMQ PUB.
#[derive(Debug, Clone, Parser)]
#[command(name = "pushfleet demo-publisher", version)]
pub struct DemoConfig {
    /// TOML file with any of these settings (keys are the long flag names).
    #[arg(long)]
    pub config: Option<PathBuf>,

    /// Endpoint to bind for workers to connect to.
    #[arg(long, value_name = "ENDPOINT", default_value = "tcp://127.0.0.1:5556")]
    pub bind: String,

    /// Matches played at once, on topics match.1 … match.N.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub matches: u32,

    /// Real time one simulated match minute takes (a match is 90 minutes plus a break).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_minute)]
    pub minute: Duration,

    /// Simulated minutes between a full time and the next kick-off on the same topic.
    #[arg(long, value_name = "MINUTES", default_value_t = 10)]
    pub pause: u32,

    /// Wait this long after binding before the first kick-off: ZeroMQ PUB drops what it sends
    /// before a subscriber has joined, and the workers connect to it only once it is bound.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
    pub start_delay: Duration,

    /// Seed of the simulation (default: random, a different set of matches each start).
    #[arg(long)]
    pub seed: Option<u64>,

    /// How often to log progress.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub progress_interval: Duration,

    /// Log format on stderr: text or json.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

fn parse_minute(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if d < Duration::from_millis(10) {
        return Err(format!("{text:?} is shorter than 10ms"));
    }
    Ok(d)
}

/// One topic's current match, or the pause before the next one.
struct Slot {
    number: u32,
    topic: String,
    game: Match,
    round: u64,
    pause_left: u32,
}

/// Runs until `shutdown`, then sends a last round of position checks.
pub async fn run(config: DemoConfig, shutdown: CancellationToken) -> Result<(), PublishError> {
    let seed = config.seed.unwrap_or_else(rand::random);
    let mut publisher = Publisher::new(Options {
        check_interval: Some(Duration::from_secs(1)),
        ..Options::default()
    });
    let endpoint = publisher.bind(&config.bind).await?;
    let mut slots: Vec<Slot> = (1..=config.matches)
        .map(|n| Slot {
            number: n,
            topic: format!("match.{n}"),
            game: Match::new(n, 0, seed),
            round: 0,
            pause_left: 0,
        })
        .collect();
    tracing::info!(
        %endpoint, matches = config.matches, minute = ?config.minute, seed,
        epoch = %format!("{:016x}", publisher.epoch()), "demo publisher bound"
    );
    for slot in &slots {
        let (home, away) = slot.game.teams();
        tracing::info!(topic = %slot.topic, "{home} v {away}");
    }
    let first = tokio::time::Instant::now() + config.start_delay;
    let mut minute = tokio::time::interval_at(first, config.minute);
    minute.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut checks = tokio::time::interval(CHECK_TICK);
    checks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut progress = tokio::time::interval(config.progress_interval);
    progress.tick().await;
    let mut published = 0u64;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = minute.tick() => {
                for slot in &mut slots {
                    published += play(slot, &mut publisher, seed, config.pause).await?;
                }
            }
            _ = checks.tick() => {
                publisher.send_due_checks(Instant::now()).await?;
            }
            _ = progress.tick() => tracing::info!(published, "progress"),
        }
    }
    publisher.send_all_checks().await?;
    publisher.close(Duration::from_millis(500)).await;
    tracing::info!(published, "demo publisher stopped");
    Ok(())
}

/// One simulated minute of a slot: its match's moments published, or a minute of the pause.
async fn play(
    slot: &mut Slot,
    publisher: &mut Publisher,
    seed: u64,
    pause: u32,
) -> Result<u64, PublishError> {
    if slot.game.is_over() {
        if slot.pause_left > 0 {
            slot.pause_left -= 1;
            return Ok(0);
        }
        slot.round += 1;
        slot.game = Match::new(slot.number, slot.round, seed);
        let (home, away) = slot.game.teams();
        tracing::info!(topic = %slot.topic, "next match: {home} v {away}");
    }
    let moments = slot.game.play_minute();
    for moment in &moments {
        let position = publisher
            .publish(&slot.topic, moment.payload.to_string())
            .await?;
        let text = moment.payload["text"].as_str().unwrap_or_default();
        if matches!(moment.kind, Kind::Goal | Kind::RedCard | Kind::FullTime) {
            tracing::info!(topic = %slot.topic, offset = position.offset, "{text}");
        } else {
            tracing::debug!(topic = %slot.topic, offset = position.offset, "{text}");
        }
    }
    if slot.game.is_over() {
        slot.pause_left = pause;
    }
    Ok(moments.len() as u64)
}
