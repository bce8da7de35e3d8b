//! Configuration of the `pushfleet-publish` command; each field's doc comment is its `--help`.

use clap::{ArgGroup, Parser};
use std::time::Duration;

/// Publish stamped pushfleet messages on a ZeroMQ PUB socket, with position checks for quiet
/// topics.
///
/// Prints `bound <endpoint>` (one per --bind) and `epoch <16 hex digits>` on stdout once ready;
/// logs progress on stderr. Stops on SIGINT/SIGTERM, at the end of stdin, or after --count.
#[derive(Debug, Clone, Parser)]
#[command(name = "pushfleet-publish", version)]
#[command(group(ArgGroup::new("endpoints").required(true).multiple(true).args(["bind", "connect"])))]
#[command(group(ArgGroup::new("source").required(true).multiple(true).args(["topic", "stdin"])))]
pub struct Config {
    /// Endpoint to bind for workers to connect to, e.g. tcp://0.0.0.0:5556
    /// (tcp://127.0.0.1:0 picks a free port). Repeatable.
    #[arg(long, value_name = "ENDPOINT")]
    pub bind: Vec<String>,

    /// Endpoint to connect to (a SUB or XSUB socket that binds); it must be listening at
    /// start. Repeatable.
    #[arg(long, value_name = "ENDPOINT")]
    pub connect: Vec<String>,

    /// Epoch of the stream, up to 16 hex digits (default: random, so every start is a new
    /// stream). Reusing an epoch after a restart makes offsets repeat: only for tests.
    #[arg(long, value_name = "HEX", value_parser = parse_epoch)]
    pub epoch: Option<u64>,

    /// Send a position check for each topic quiet this long, and again at this interval
    /// while it stays quiet, so workers notice a lost last message. 0s disables checks.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    pub check_interval: Duration,

    /// Do not stamp the publish time in the meta frame.
    #[arg(long)]
    pub no_time: bool,

    /// Topic to publish generated messages on (repeatable). With --stdin, a single --topic
    /// makes each whole line the payload.
    #[arg(long, value_name = "TOPIC")]
    pub topic: Vec<String>,

    /// Generated messages per second on each topic.
    #[arg(long, value_name = "MSGS_PER_S", default_value_t = 1.0, value_parser = parse_rate, conflicts_with = "stdin")]
    pub rate: f64,

    /// Stop after this many generated messages per topic (0 = until stopped).
    #[arg(long, value_name = "N", default_value_t = 0, conflicts_with = "stdin")]
    pub count: u64,

    /// Publish stdin instead of generated messages: each line is `TOPIC<TAB>PAYLOAD` (or, with
    /// one --topic, the whole line is the payload). Stops at the end of input. Bad lines are
    /// reported with their number and skipped.
    #[arg(long)]
    pub stdin: bool,

    /// Most bytes of a topic; longer topics are rejected (workers drop them).
    #[arg(long, value_name = "BYTES", default_value_t = 256)]
    pub max_topic_bytes: usize,

    /// Most bytes of a stdin line (without its line end); longer lines are skipped and
    /// reported, never buffered whole.
    #[arg(long, value_name = "BYTES", default_value_t = 1024 * 1024)]
    pub max_line_bytes: usize,

    /// How long to wait before exiting so that queued messages and the final checks reach
    /// subscribers (ZeroMQ PUB has no flush).
    #[arg(long, value_name = "DURATION", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub linger: Duration,

    /// How often to log progress (messages sent, rate) on stderr.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    pub progress_interval: Duration,
}

impl Config {
    /// Checks what clap cannot express; the message names the flags involved.
    pub fn validate(&self) -> Result<(), String> {
        if self.stdin && self.topic.len() > 1 {
            return Err("--stdin takes at most one --topic (lines name their topic)".into());
        }
        for topic in &self.topic {
            protocol::publish::validate_topic(topic.as_bytes(), self.max_topic_bytes)
                .map_err(|e| format!("--topic {topic:?}: {e} (--max-topic-bytes)"))?;
        }
        if self.progress_interval.is_zero() {
            return Err("--progress-interval must be more than 0s".into());
        }
        Ok(())
    }

    /// The check interval, or `None` when checks are disabled (`0s`).
    pub fn check_interval(&self) -> Option<Duration> {
        (!self.check_interval.is_zero()).then_some(self.check_interval)
    }
}

fn parse_epoch(text: &str) -> Result<u64, String> {
    let digits = text.strip_prefix("0x").unwrap_or(text);
    if digits.is_empty() || digits.len() > 16 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{text:?} is not 1 to 16 hex digits"));
    }
    u64::from_str_radix(digits, 16).map_err(|e| e.to_string())
}

fn parse_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err(format!("{text:?} is not a positive number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("pushfleet-publish").chain(args.iter().copied()))
    }

    #[test]
    fn defaults() {
        let c = parse(&["--bind", "tcp://127.0.0.1:0", "--topic", "t"]).unwrap();
        assert_eq!(c.check_interval(), Some(Duration::from_secs(1)));
        assert_eq!(c.rate, 1.0);
        assert_eq!(c.count, 0);
        assert_eq!(c.epoch, None);
        assert_eq!(c.max_topic_bytes, 256);
        assert!(!c.no_time && !c.stdin);
        c.validate().unwrap();
    }

    #[test]
    fn epochs_are_hex() {
        let epoch =
            |e: &str| parse(&["--bind", "x", "--topic", "t", "--epoch", e]).map(|c| c.epoch);
        assert_eq!(epoch("ff").unwrap(), Some(255));
        assert_eq!(epoch("0xFF").unwrap(), Some(255));
        assert_eq!(epoch("ffffffffffffffff").unwrap(), Some(u64::MAX));
        for bad in ["", "0x", "g", "1ffffffffffffffff", "-1", "+1"] {
            assert!(epoch(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn zero_check_interval_disables_checks() {
        let c = parse(&["--bind", "x", "--stdin", "--check-interval", "0s"]).unwrap();
        assert_eq!(c.check_interval(), None);
        let c = parse(&["--bind", "x", "--stdin", "--check-interval", "250ms"]).unwrap();
        assert_eq!(c.check_interval(), Some(Duration::from_millis(250)));
    }

    #[test]
    fn an_endpoint_and_a_source_are_required() {
        assert!(parse(&["--topic", "t"]).is_err());
        assert!(parse(&["--bind", "x"]).is_err());
        assert!(parse(&["--connect", "x", "--stdin"]).is_ok());
        assert!(parse(&["--bind", "x", "--connect", "y", "--topic", "t"]).is_ok());
    }

    #[test]
    fn stdin_excludes_generator_flags_and_several_topics() {
        assert!(parse(&["--bind", "x", "--stdin", "--rate", "5"]).is_err());
        assert!(parse(&["--bind", "x", "--stdin", "--count", "5"]).is_err());
        let c = parse(&["--bind", "x", "--stdin", "--topic", "a", "--topic", "b"]).unwrap();
        assert!(c.validate().is_err());
        let c = parse(&["--bind", "x", "--stdin", "--topic", "a"]).unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn topics_are_validated_against_the_limit() {
        let c = parse(&["--bind", "x", "--topic", "abcde", "--max-topic-bytes", "4"]).unwrap();
        let err = c.validate().unwrap_err();
        assert_eq!(
            err,
            "--topic \"abcde\": topic is 5 bytes, limit is 4 (--max-topic-bytes)"
        );
        let c = parse(&["--bind", "x", "--topic", ""]).unwrap();
        assert!(c.validate().is_err());
    }

    #[test]
    fn rates_must_be_positive() {
        for bad in ["0", "-1", "nan", "inf", "x"] {
            assert!(
                parse(&["--bind", "x", "--topic", "t", "--rate", bad]).is_err(),
                "{bad}"
            );
        }
        let c = parse(&["--bind", "x", "--topic", "t", "--rate", "0.5"]).unwrap();
        assert_eq!(c.rate, 0.5);
    }
}
