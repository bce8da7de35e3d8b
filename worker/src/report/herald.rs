//! Talking to herald: `POST /v1/reports` with one [`LoadReport`], one connection per report
//! (at one report every few seconds, reusing connections is not worth racing herald closing
//! idle ones).

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::StatusCode;
use hyper_util::rt::TokioIo;
use protocol::load::{LoadReport, ReportReply, REPORT_VERSION};
use std::time::Duration;
use thiserror::Error;
use tokio::net::TcpStream;

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
    let Some(rest) = url.strip_prefix("http://") else {
        return Err("must start with http:// (herald speaks plain HTTP)".into());
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#', '@']) || authority.chars().any(char::is_whitespace) {
        return Err("must be http://host:port with no path, query or user".into());
    }
    let Some((host, port)) = authority.rsplit_once(':') else {
        return Err("must name a port: http://host:port".into());
    };
    let bracketed = host.starts_with('[') && host.ends_with(']');
    if host.is_empty() || (host.contains(':') && !bracketed) || host == "[]" {
        return Err(format!("{host:?} is not a host name or address"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(authority.to_string()),
        _ => Err(format!("{port:?} is not a port number (1-65535)")),
    }
}

/// Posts `report` to herald at `authority` (`host:port`) and reads its reply, all within
/// `timeout`.
pub async fn post(
    authority: &str,
    report: &LoadReport,
    timeout: Duration,
) -> Result<ReportReply, SendError> {
    let body = Bytes::from(report.encode());
    tokio::time::timeout(timeout, exchange(authority, body, timeout))
        .await
        .unwrap_or(Err(SendError::Timeout(timeout)))
}

async fn exchange(
    authority: &str,
    body: Bytes,
    timeout: Duration,
) -> Result<ReportReply, SendError> {
    let io = |e: &dyn std::fmt::Display| SendError::Io(e.to_string());
    let stream = TcpStream::connect(authority).await.map_err(|e| io(&e))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| io(&e))?;
    // Ends when the exchange is over, or when `sender` is dropped; bounded all the same.
    tokio::spawn(async move {
        let _ = tokio::time::timeout(timeout, conn).await;
    });
    let request = hyper::Request::post(REPORTS_PATH)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::CONNECTION, "close")
        .body(Full::new(body))
        .map_err(|e| io(&e))?;
    let response = sender.send_request(request).await.map_err(|e| io(&e))?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_REPLY_BYTES)
        .collect()
        .await
        .map_err(|e| io(&*e))?
        .to_bytes();
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
