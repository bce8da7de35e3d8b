//! The `pushfleet-publish` command from start to stop: bind and connect, announce on stdout,
//! publish from the chosen source while sending due checks and logging progress, then send a
//! final round of checks, linger so queued frames go out, and report a summary.

use crate::config::Config;
use crate::input::{parse_line, LineError, LineReader};
use crate::pace::Pacer;
use crate::publisher::{now_us, Options, PublishError, Publisher};
use bytes::Bytes;
use protocol::position::EpochHex;
use std::fmt;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::io::{AsyncRead, BufReader};
use tokio::time::{Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Most generated rounds sent in one go before the loop looks at signals and ticks again.
const MAX_BURST_ROUNDS: u64 = 1000;
/// Due checks are looked for this many times per check interval (so a check goes out at most
/// a tenth of an interval late), but not more often than every `MIN_CHECK_TICK`.
const CHECK_TICKS_PER_INTERVAL: u32 = 10;
const MIN_CHECK_TICK: Duration = Duration::from_millis(10);

/// Why the command stopped early.
#[derive(Debug, Error)]
pub enum RunError {
    /// A flag combination or value that cannot work.
    #[error("{0}")]
    Config(String),
    /// Binding, connecting or sending failed.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// Reading stdin failed.
    #[error("reading stdin: {0}")]
    Stdin(#[source] std::io::Error),
}

/// What a run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Stamped messages sent.
    pub messages: u64,
    /// Position checks sent (including the final round).
    pub checks: u64,
    /// Stdin lines skipped as invalid.
    pub bad_lines: u64,
    /// From the start of publishing to the end of the final round of checks (not lingering).
    pub elapsed: Duration,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} messages, {} position checks, {} bad lines skipped, in {:.1}s",
            self.messages,
            self.checks,
            self.bad_lines,
            self.elapsed.as_secs_f64()
        )
    }
}

/// Runs the command until its source ends or `shutdown` is cancelled. Prints `bound <endpoint>`
/// per bind, `connected <endpoint>` per connect and `epoch <16 hex>` on stdout once ready.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<Summary, RunError> {
    run_with_input(config, tokio::io::stdin(), shutdown).await
}

/// [`run`] with `input` in place of stdin (used with `--stdin`).
pub async fn run_with_input(
    config: Config,
    input: impl AsyncRead + Unpin,
    shutdown: CancellationToken,
) -> Result<Summary, RunError> {
    config.validate().map_err(RunError::Config)?;
    let mut publisher = Publisher::new(Options {
        epoch: config.epoch.unwrap_or_else(rand::random),
        stamp_time: !config.no_time,
        check_interval: config.check_interval(),
        max_topic_bytes: config.max_topic_bytes,
    });
    for endpoint in &config.bind {
        let bound = publisher.bind(endpoint).await?;
        announce(format_args!("bound {bound}"));
    }
    for endpoint in &config.connect {
        publisher.connect(endpoint).await?;
        announce(format_args!("connected {endpoint}"));
    }
    announce(format_args!("epoch {}", EpochHex(publisher.epoch())));

    let mut session = Session::new(publisher, &config);
    if config.stdin {
        publish_lines(&mut session, &config, input, &shutdown).await?;
    } else {
        publish_generated(&mut session, &config, &shutdown).await?;
    }
    let summary = session.finish().await?;
    info!("done: {summary}");
    session.publisher.close(config.linger).await;
    Ok(summary)
}

/// Prints one line on stdout for whoever started the command. A closed stdout is not an
/// error: nobody is reading the announcement.
fn announce(line: fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// `--topic ... --rate --count`: one JSON message per topic per round.
async fn publish_generated(
    session: &mut Session,
    config: &Config,
    shutdown: &CancellationToken,
) -> Result<(), RunError> {
    let mut pacer = Pacer::new(Instant::now(), config.rate);
    loop {
        let remaining = match config.count {
            0 => u64::MAX,
            count => count - pacer.rounds_sent(),
        };
        if remaining == 0 {
            return Ok(());
        }
        let rounds = pacer
            .due(Instant::now())
            .min(MAX_BURST_ROUNDS)
            .min(remaining);
        for _ in 0..rounds {
            let seq = pacer.rounds_sent();
            for topic in &config.topic {
                let payload = serde_json::json!({
                    "topic": topic,
                    "seq": seq,
                    "sent_at_us": now_us(),
                });
                session.publish(topic, payload.to_string().into()).await?;
            }
            pacer.sent(1);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            tick = session.next_tick() => session.on_tick(tick).await?,
            _ = tokio::time::sleep_until(pacer.next_at().into()) => {}
        }
    }
}

/// `--stdin`: one message per line until the end of input.
async fn publish_lines(
    session: &mut Session,
    config: &Config,
    input: impl AsyncRead + Unpin,
    shutdown: &CancellationToken,
) -> Result<(), RunError> {
    let mut lines = LineReader::new(BufReader::new(input), config.max_line_bytes);
    let fixed_topic = config.topic.first().map(String::as_str);
    loop {
        // Both waits are cancel-safe: a tick in the middle of a line loses nothing.
        let (number, line) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            tick = session.next_tick() => {
                session.on_tick(tick).await?;
                continue;
            }
            line = lines.next_line() => match line.map_err(RunError::Stdin)? {
                Some(line) => line,
                None => return Ok(()),
            },
        };
        match line {
            Ok(line) => match parse_line(&line, fixed_topic, config.max_topic_bytes) {
                Ok((topic, payload)) => session.publish(topic, payload).await?,
                Err(error) => session.skip_line(number, error),
            },
            Err(error) => session.skip_line(number, error),
        }
    }
}

/// The publisher with its counters and periodic duties (checks, progress logs).
struct Session {
    publisher: Publisher,
    started: Instant,
    messages: u64,
    checks: u64,
    bad_lines: u64,
    check_ticks: Option<Interval>,
    progress_ticks: Interval,
    /// Time and message count of the last progress log, for the rate since then.
    last_progress: (Instant, u64),
}

/// What a tick asks for.
enum Tick {
    Checks,
    Progress,
}

impl Session {
    fn new(publisher: Publisher, config: &Config) -> Session {
        let now = Instant::now();
        let ticks = |period: Duration| {
            let start = tokio::time::Instant::now() + period;
            let mut ticks = tokio::time::interval_at(start, period);
            ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
            ticks
        };
        let check_ticks = config.check_interval().map(|check_interval| {
            ticks((check_interval / CHECK_TICKS_PER_INTERVAL).max(MIN_CHECK_TICK))
        });
        Session {
            publisher,
            started: now,
            messages: 0,
            checks: 0,
            bad_lines: 0,
            check_ticks,
            progress_ticks: ticks(config.progress_interval),
            last_progress: (now, 0),
        }
    }

    async fn publish(&mut self, topic: &str, payload: Bytes) -> Result<(), PublishError> {
        self.publisher.publish(topic, payload).await?;
        self.messages += 1;
        Ok(())
    }

    fn skip_line(&mut self, number: u64, error: LineError) {
        warn!("line {number}: {error}; skipped");
        self.bad_lines += 1;
    }

    /// Waits for the next periodic duty. Cancel-safe (interval ticks are); the duty itself
    /// is done by `on_tick`, outside any `select!`, so that it is never cut short.
    async fn next_tick(&mut self) -> Tick {
        match &mut self.check_ticks {
            Some(check_ticks) => tokio::select! {
                _ = check_ticks.tick() => Tick::Checks,
                _ = self.progress_ticks.tick() => Tick::Progress,
            },
            None => {
                self.progress_ticks.tick().await;
                Tick::Progress
            }
        }
    }

    async fn on_tick(&mut self, tick: Tick) -> Result<(), PublishError> {
        match tick {
            Tick::Checks => {
                self.checks += self.publisher.send_due_checks(Instant::now()).await? as u64;
            }
            Tick::Progress => self.log_progress(),
        }
        Ok(())
    }

    fn log_progress(&mut self) {
        let now = Instant::now();
        let (since, sent_then) = self.last_progress;
        let rate = (self.messages - sent_then) as f64 / (now - since).as_secs_f64();
        info!(
            "{} messages sent ({rate:.0} msg/s), {} position checks, {} topics",
            self.messages,
            self.checks,
            self.publisher.stamper().topic_count()
        );
        self.last_progress = (now, self.messages);
    }

    /// Sends the final round of checks (unless checks are disabled): workers learn every
    /// topic's last position now rather than never.
    async fn finish(&mut self) -> Result<Summary, PublishError> {
        if self.check_ticks.is_some() {
            self.checks += self.publisher.send_all_checks().await? as u64;
        }
        Ok(Summary {
            messages: self.messages,
            checks: self.checks,
            bad_lines: self.bad_lines,
            elapsed: self.started.elapsed(),
        })
    }
}
