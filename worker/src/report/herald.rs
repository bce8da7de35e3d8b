//! Talking to herald: `POST /v1/reports` with one [`LoadReport`], one connection per report
//! (at one report every few seconds, reusing connections is not worth racing herald closing
//! idle ones).

use bytes::Bytes;
use http_body_util::Full;
use hyper::StatusCode;
use protocol::load::{LoadReport, ReportReply, REPORT_VERSION};
use std::time::Duration;
use thiserror::Error;

/// The path reports are posted to.
pub const REPORTS_PATH: &str = "/v1/reports";

/// Largest reply body read from herald (a reply lists peers' addresses).
const MAX_REPLY_BYTES: usize = 1 << 20;

/// Longest refusal reason kept (for the log and the once-per-reason check).
const MAX_REASON_CHARS: usize = 300;

/// Why a report did not get a usable answer.
#[derive(Debug, Error, PartialEq)]
pub enum SendError {
    /// Connecting, sending or reading failed.
    #[error("{0}")]
    Io(String),
    /// No answer within the time allowed.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Herald refused the report (HTTP 400) for this reason.
    #[error("herald refused the report: {0}")]
    Refused(String),
    /// An unexpected HTTP status.
    #[error("herald answered HTTP {0}")]
    Status(StatusCode),
    /// A 200 whose body is not a reply this worker reads.
    #[error("herald's reply is not usable: {0}")]
    BadReply(String),
}

/// The `host:port` of an `http://host:port[/]` URL; the error says what is wrong.
pub fn parse_url(url: &str) -> Result<String, String> {
    protocol::process::parse_http_url(url)
}

/// Posts `report` to herald at `authority` (`host:port`) and reads its reply, all within
/// `timeout`.
pub async fn post(
    authority: &str,
    report: &LoadReport,
    timeout: Duration,
) -> Result<ReportReply, SendError> {
    let body = Bytes::from(report.encode());
    tokio::time::timeout(timeout, exchange(authority, body))
        .await
        .unwrap_or(Err(SendError::Timeout(timeout)))
}

async fn exchange(authority: &str, body: Bytes) -> Result<ReportReply, SendError> {
    let request = hyper::Request::post(REPORTS_PATH)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .map_err(|e| SendError::Io(e.to_string()))?;
    let (status, body) = protocol::process::http_call(authority, request, MAX_REPLY_BYTES)
        .await
        .map_err(SendError::Io)?;
    match status {
        StatusCode::OK => decode_reply(&body),
        StatusCode::BAD_REQUEST => Err(SendError::Refused(reason(&body))),
        other => Err(SendError::Status(other)),
    }
}

/// A 200 body: a [`ReportReply`] of the version this worker reads.
pub fn decode_reply(body: &[u8]) -> Result<ReportReply, SendError> {
    let reply: ReportReply =
        serde_json::from_slice(body).map_err(|e| SendError::BadReply(e.to_string()))?;
    if reply.version != REPORT_VERSION {
        return Err(SendError::BadReply(format!(
            "version {} (this worker reads {REPORT_VERSION})",
            reply.version
        )));
    }
    Ok(reply)
}

/// A 400 body as a one-line reason of bounded length.
fn reason(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let mut out: String = text
        .chars()
        .take(MAX_REASON_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().count() > MAX_REASON_CHARS {
        out.push('…');
    }
    if out.is_empty() {
        out.push_str("(no reason given)");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_http_host_port_only() {
        assert_eq!(parse_url("http://herald:7000").unwrap(), "herald:7000");
        assert_eq!(parse_url("http://10.0.0.1:7000/").unwrap(), "10.0.0.1:7000");
        assert_eq!(parse_url("http://[::1]:7000").unwrap(), "[::1]:7000");
        for bad in [
            "herald:7000",
            "https://herald:7000",
            "http://herald",
            "http://herald:0",
            "http://herald:70000",
            "http://:7000",
            "http://herald:7000/v1",
            "http://user@herald:7000",
            "http://::1:7000",
            "http://her ald:7000",
            "",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn replies_of_another_version_or_shape_are_not_acted_on() {
        let ok = decode_reply(br#"{"version":1,"drain":true,"peers":["a:1"],"later":0}"#).unwrap();
        assert!(ok.drain);
        assert_eq!(ok.peers, vec!["a:1".to_string()]);
        assert!(decode_reply(br#"{"version":1,"drain":false}"#)
            .unwrap()
            .peers
            .is_empty());
        assert!(matches!(
            decode_reply(br#"{"version":2,"drain":true}"#),
            Err(SendError::BadReply(_))
        ));
        assert!(matches!(decode_reply(b"nope"), Err(SendError::BadReply(_))));
    }

    #[test]
    fn refusal_reasons_are_one_bounded_line() {
        assert_eq!(
            reason(b"report field seq is invalid\n"),
            "report field seq is invalid"
        );
        assert_eq!(reason(b"a\nb"), "a b");
        assert_eq!(reason(b""), "(no reason given)");
        assert_eq!(
            reason(&vec![b'x'; 1000]).chars().count(),
            MAX_REASON_CHARS + 1
        );
    }
}
