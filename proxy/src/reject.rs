//! Every way the proxy turns a client away before the upgrade, with its HTTP answer and metric
//! label, in one place. Each answer names the limit and its value, and closes the connection.

use crate::admission::Refusal;
use crate::request::HeadError;
use std::time::Duration;

/// Why a client connection is turned away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reject {
    /// Admission refused it (rate or concurrent connections): 503 with `Retry-After`.
    Admission {
        /// Which admission limit.
        refusal: Refusal,
        /// When to come back.
        retry_after: Duration,
        /// The limit's value as configured, e.g. `9500` or `1000/s`.
        limit: String,
    },
    /// The request head is not a WebSocket upgrade, or too large: 400 or 431.
    Head(HeadError),
    /// The request head did not arrive within `--handshake-timeout`: 408.
    HandshakeTimeout(Duration),
    /// Placement knows no worker to try: 503 with `Retry-After`.
    NoWorker {
        /// When to come back.
        retry_after: Duration,
    },
    /// Every worker tried failed to take the connection: 502.
    UpstreamFailed {
        /// How many were tried.
        attempts: u32,
    },
}

impl Reject {
    /// The `proxy_refused_total{reason}` label.
    pub fn label(&self) -> &'static str {
        match self {
            Reject::Admission { refusal, .. } => refusal.label(),
            Reject::Head(HeadError::TooLarge { .. }) => "request_too_large",
            Reject::Head(_) => "bad_request",
            Reject::HandshakeTimeout(_) => "handshake_timeout",
            Reject::NoWorker { .. } => "no_worker",
            Reject::UpstreamFailed { .. } => "upstream_failed",
        }
    }

    /// The whole HTTP response.
    pub fn response(&self) -> Vec<u8> {
        let (status, retry_after, body) = match self {
            Reject::Admission {
                refusal,
                retry_after,
                limit,
            } => {
                let flag = match refusal {
                    Refusal::Rate => "--accept-rate",
                    Refusal::Connections => "--max-connections",
                };
                let body = format!("proxy busy: over {flag} ({limit}); retry later");
                ("503 Service Unavailable", Some(*retry_after), body)
            }
            Reject::Head(e @ HeadError::TooLarge { .. }) => {
                ("431 Request Header Fields Too Large", None, e.to_string())
            }
            Reject::Head(e) => ("400 Bad Request", None, e.to_string()),
            Reject::HandshakeTimeout(limit) => (
                "408 Request Timeout",
                None,
                format!(
                    "request head not received within --handshake-timeout ({})",
                    humantime::format_duration(*limit)
                ),
            ),
            Reject::NoWorker { retry_after } => (
                "503 Service Unavailable",
                Some(*retry_after),
                "no worker available; retry later".to_string(),
            ),
            Reject::UpstreamFailed { attempts } => (
                "502 Bad Gateway",
                None,
                format!("no worker took the connection: {attempts} tried (--connect-attempts)"),
            ),
        };
        // Whole seconds, rounded up: never tell a client to come back at once.
        let retry_after = retry_after.map_or_else(String::new, |d| {
            let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
            format!("Retry-After: {}\r\n", secs.max(1))
        });
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n{retry_after}\r\n{body}\n",
            body.len() + 1
        )
        .into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(r: Reject) -> String {
        String::from_utf8(r.response()).unwrap()
    }

    #[test]
    fn admission_refusals_say_when_to_retry_and_close() {
        let t = text(Reject::Admission {
            refusal: Refusal::Connections,
            retry_after: Duration::from_millis(2500),
            limit: "9500".into(),
        });
        assert!(t.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{t}");
        assert!(t.contains("\r\nRetry-After: 3\r\n"), "{t}");
        assert!(t.contains("\r\nConnection: close\r\n"), "{t}");
        assert!(
            t.ends_with("over --max-connections (9500); retry later\n"),
            "{t}"
        );
        let (head, body) = t.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        let t = text(Reject::NoWorker {
            retry_after: Duration::from_millis(10),
        });
        assert!(t.contains("\r\nRetry-After: 1\r\n"), "{t}");
    }

    #[test]
    fn each_rejection_has_its_status_and_label() {
        let cases = [
            (
                Reject::Head(HeadError::TooLarge { limit: 8192 }),
                "431",
                "request_too_large",
            ),
            (
                Reject::Head(HeadError::Missing("Upgrade: websocket".into())),
                "400",
                "bad_request",
            ),
            (
                Reject::HandshakeTimeout(Duration::from_secs(10)),
                "408",
                "handshake_timeout",
            ),
            (
                Reject::UpstreamFailed { attempts: 3 },
                "502",
                "upstream_failed",
            ),
            (
                Reject::Admission {
                    refusal: Refusal::Rate,
                    retry_after: Duration::from_secs(1),
                    limit: "1000/s".into(),
                },
                "503",
                "rate",
            ),
        ];
        for (reject, status, label) in cases {
            assert_eq!(reject.label(), label);
            let t = text(reject);
            assert!(t.starts_with(&format!("HTTP/1.1 {status} ")), "{t}");
            assert!(!t.contains("Retry-After") || status == "503", "{t}");
        }
        let t = text(Reject::Head(HeadError::Missing(
            "Connection: upgrade".into(),
        )));
        assert!(t.contains("missing header Connection: upgrade"), "{t}");
        let t = text(Reject::HandshakeTimeout(Duration::from_secs(10)));
        assert!(t.contains("--handshake-timeout (10s)"), "{t}");
    }
}
