//! Which topics keep history, and how much: `--history 'match.*,messages=500,age=3h'`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Topics a rule covers (the same patterns as access control's).
pub use protocol::client::TopicPattern as Pattern;

/// How much history to keep for the topics of a pattern (each topic separately).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The topics.
    pub pattern: Pattern,
    /// Most messages kept per topic.
    pub max_messages: usize,
    /// Most bytes kept per topic (encoded message plus raw payload).
    pub max_bytes: usize,
    /// Messages older than this (since they reached the worker) are dropped.
    pub max_age: Duration,
}

/// Default messages per topic when a rule does not say.
pub const DEFAULT_MESSAGES: usize = 1000;
/// Default bytes per topic when a rule does not say.
pub const DEFAULT_BYTES: usize = 8 << 20;
/// Default age when a rule does not say.
pub const DEFAULT_AGE: Duration = Duration::from_secs(24 * 3600);

impl FromStr for Rule {
    type Err = String;

    /// `PATTERN[,messages=N][,bytes=N[KiB|MiB|GiB]][,age=DURATION]`; PATTERN is a topic, or a
    /// prefix ending in `*`.
    fn from_str(text: &str) -> Result<Self, String> {
        let mut parts = text.split(',').map(str::trim);
        let pattern = match parts.next().unwrap_or("") {
            "" => return Err(format!("history rule {text:?} has no topic pattern")),
            p => Pattern::parse(p, "history")?,
        };
        let mut rule = Rule {
            pattern,
            max_messages: DEFAULT_MESSAGES,
            max_bytes: DEFAULT_BYTES,
            max_age: DEFAULT_AGE,
        };
        for part in parts {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("history rule {text:?}: {part:?} is not key=value"))?;
            let bad = |what: &str| format!("history rule {text:?}: {key}={value:?} {what}");
            match key {
                "messages" => {
                    rule.max_messages = value.parse().map_err(|_| bad("is not a whole number"))?
                }
                "bytes" => {
                    rule.max_bytes =
                        parse_bytes(value).ok_or_else(|| bad("is not a size like 4MiB"))?
                }
                "age" => {
                    rule.max_age = humantime::parse_duration(value)
                        .map_err(|_| bad("is not a duration like 3h"))?
                }
                _ => {
                    return Err(format!(
                        "history rule {text:?}: unknown key {key:?} (messages, bytes, age)"
                    ))
                }
            }
        }
        if rule.max_messages == 0 {
            return Err(format!(
                "history rule {text:?}: messages must be at least 1"
            ));
        }
        Ok(rule)
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.pattern)?;
        write!(
            f,
            ",messages={},bytes={},age={}",
            self.max_messages,
            self.max_bytes,
            humantime::format_duration(self.max_age)
        )
    }
}

/// `123`, `64KiB`, `4MiB`, `1GiB` (also `k`/`M`/`G` and `KB`/`MB`/`GB`, all binary).
pub fn parse_bytes(text: &str) -> Option<usize> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: usize = digits.parse().ok()?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "k" | "K" | "KB" | "KiB" => 10,
        "M" | "MB" | "MiB" => 20,
        "G" | "GB" | "GiB" => 30,
        _ => return None,
    };
    n.checked_mul(1 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_with_defaults_and_reject_nonsense() {
        let r: Rule = "match.*,messages=500,bytes=2MiB,age=3h".parse().unwrap();
        assert_eq!(r.pattern, Pattern::Prefix("match.".into()));
        assert_eq!((r.max_messages, r.max_bytes), (500, 2 << 20));
        assert_eq!(r.max_age, Duration::from_secs(3 * 3600));
        let all: Rule = "*".parse().unwrap();
        assert!(all.pattern.matches("anything"));
        assert_eq!(all.pattern.upstream_prefix(), "");
        let exact: Rule = "scores".parse().unwrap();
        assert!(exact.pattern.matches("scores") && !exact.pattern.matches("scores2"));
        assert_eq!(exact.max_messages, DEFAULT_MESSAGES);
        for bad in [
            "",
            "a*b",
            "a**",
            "a,messages=x",
            "a,messages=0",
            "a,bytes=4XB",
            "a,age=soon",
            "a,colour=red",
            "a,messages",
        ] {
            assert!(bad.parse::<Rule>().is_err(), "{bad:?} should be rejected");
        }
        let shown = r.to_string();
        assert_eq!(shown.parse::<Rule>().unwrap(), r);
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("12"), Some(12));
        assert_eq!(parse_bytes("64KiB"), Some(64 << 10));
        assert_eq!(parse_bytes("1G"), Some(1 << 30));
        assert_eq!(parse_bytes("MiB"), None);
    }
}
