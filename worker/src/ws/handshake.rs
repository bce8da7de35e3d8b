//! The HTTP/1.1 upgrade (RFC 6455 §4.2): parse and check the request, negotiate the
//! subprotocol and permessage-deflate (RFC 7692), and write the response or the HTTP error.

use base64::Engine as _;
use sha1::{Digest, Sha1};

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const MAX_HEADERS: usize = 64;

/// A valid upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    /// Request path without the query.
    pub path: String,
    /// The query string, if any (without `?`).
    pub query: Option<String>,
    /// `Sec-WebSocket-Key`.
    pub key: String,
    /// Offered subprotocols, in order.
    pub protocols: Vec<String>,
    /// Concatenated `Sec-WebSocket-Extensions` values.
    pub extensions: String,
    /// `Origin`, when sent.
    pub origin: Option<String>,
    /// `X-Forwarded-For`, when sent (by our proxy).
    pub forwarded_for: Option<String>,
    /// `Authorization`, when sent (a bearer access token).
    pub authorization: Option<String>,
}

/// Why an upgrade is refused; each has its HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Request head over `max_handshake_bytes` or too many headers (431).
    TooLarge(usize),
    /// Not parseable HTTP/1.1 (400).
    Malformed(String),
    /// Not a GET (405).
    NotGet,
    /// Missing `Upgrade: websocket` / `Connection: upgrade` (426).
    NotWebSocket,
    /// `Sec-WebSocket-Version` is not 13 (426, with the supported version).
    BadVersion,
    /// Missing or malformed `Sec-WebSocket-Key` (400).
    BadKey,
    /// No endpoint at this path (404).
    NotFound(String),
    /// Only unknown subprotocols offered (400).
    UnsupportedSubprotocol(String),
    /// Handshake not completed within `handshake_timeout` (408).
    Timeout,
    /// `max_connections` reached or draining (503).
    Unavailable(&'static str),
    /// The `Origin` is not on the allowlist (403, RFC 6455 §10.2).
    ForbiddenOrigin(String),
}

impl Refusal {
    /// Every value [`Refusal::label`] returns.
    pub const LABELS: &'static [&'static str] = &[
        "too_large",
        "malformed",
        "not_get",
        "not_websocket",
        "bad_version",
        "bad_key",
        "not_found",
        "unsupported_subprotocol",
        "timeout",
        "unavailable",
        "forbidden_origin",
    ];

    /// Label for the `worker_handshake_failures_total{reason}` metric.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::TooLarge(_) => "too_large",
            Refusal::Malformed(_) => "malformed",
            Refusal::NotGet => "not_get",
            Refusal::NotWebSocket => "not_websocket",
            Refusal::BadVersion => "bad_version",
            Refusal::BadKey => "bad_key",
            Refusal::NotFound(_) => "not_found",
            Refusal::UnsupportedSubprotocol(_) => "unsupported_subprotocol",
            Refusal::Timeout => "timeout",
            Refusal::Unavailable(_) => "unavailable",
            Refusal::ForbiddenOrigin(_) => "forbidden_origin",
        }
    }

    /// The full HTTP response for this refusal.
    pub fn response(&self) -> Vec<u8> {
        let (status, extra, body) = match self {
            Refusal::TooLarge(limit) => (
                "431 Request Header Fields Too Large",
                "",
                format!("upgrade request exceeds {limit} bytes or {MAX_HEADERS} headers"),
            ),
            Refusal::Malformed(why) => ("400 Bad Request", "", format!("malformed request: {why}")),
            Refusal::NotGet => ("405 Method Not Allowed", "Allow: GET\r\n", "use GET".into()),
            Refusal::NotWebSocket => (
                "426 Upgrade Required",
                "Upgrade: websocket\r\nConnection: Upgrade\r\n",
                "this endpoint speaks WebSocket only".into(),
            ),
            Refusal::BadVersion => (
                "426 Upgrade Required",
                "Sec-WebSocket-Version: 13\r\n",
                "only WebSocket version 13 is supported".into(),
            ),
            Refusal::BadKey => (
                "400 Bad Request",
                "",
                "missing or malformed Sec-WebSocket-Key".into(),
            ),
            Refusal::NotFound(path) => ("404 Not Found", "", format!("no endpoint at {path}")),
            Refusal::UnsupportedSubprotocol(offered) => (
                "400 Bad Request",
                "",
                format!(
                    "no supported subprotocol in [{offered}]; supported: {}",
                    protocol::client::SUBPROTOCOL
                ),
            ),
            Refusal::Timeout => (
                "408 Request Timeout",
                "",
                "upgrade request not completed in time".into(),
            ),
            Refusal::Unavailable(why) => (
                "503 Service Unavailable",
                "Retry-After: 1\r\n",
                format!("worker unavailable: {why}"),
            ),
            Refusal::ForbiddenOrigin(origin) => (
                "403 Forbidden",
                "",
                format!("origin {origin:?} is not allowed"),
            ),
        };
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
            body.len()
        )
        .into_bytes()
    }
}

/// Parses an upgrade request from the start of `buf`. `Ok(None)`: incomplete, read more.
/// On success also returns the number of bytes the request head took.
pub fn parse(buf: &[u8], max_bytes: usize) -> Result<Option<(Upgrade, usize)>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let used = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > max_bytes => {
            return Err(Refusal::TooLarge(max_bytes))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::TooLarge(max_bytes)),
        Err(e) => return Err(Refusal::Malformed(e.to_string())),
    };
    if used > max_bytes {
        return Err(Refusal::TooLarge(max_bytes));
    }
    if req.version != Some(1) {
        return Err(Refusal::Malformed("HTTP/1.1 required".into()));
    }
    if req.method != Some("GET") {
        return Err(Refusal::NotGet);
    }
    let target = req.path.unwrap_or("/");
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (target.to_string(), None),
    };
    let headers: &[httparse::Header<'_>] = req.headers;
    let values = |name: &'static str| {
        headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
    };
    let has_token = |name: &'static str, token: &str| {
        values(name)
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return Err(Refusal::NotWebSocket);
    }
    if values("sec-websocket-version").next().map(str::trim) != Some("13") {
        return Err(Refusal::BadVersion);
    }
    let key = values("sec-websocket-key")
        .next()
        .map(|k| k.trim().to_string())
        .filter(|k| {
            base64::engine::general_purpose::STANDARD
                .decode(k)
                .is_ok_and(|raw| raw.len() == 16)
        })
        .ok_or(Refusal::BadKey)?;
    let protocols = values("sec-websocket-protocol")
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect();
    let extensions = values("sec-websocket-extensions")
        .collect::<Vec<_>>()
        .join(", ");
    let first = |name: &'static str| values(name).next().map(|v| v.trim().to_string());
    let upgrade = Upgrade {
        path,
        query,
        key,
        protocols,
        extensions,
        origin: first("origin"),
        forwarded_for: first("x-forwarded-for"),
        authorization: first("authorization"),
    };
    Ok(Some((upgrade, used)))
}

/// The outcome of permessage-deflate negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deflate {
    /// Largest LZ77 window (bits) our compressed frames may use, 8..=15.
    pub server_max_window_bits: u8,
    /// Whether the client limited it (echoed in the response).
    pub window_limited: bool,
}

impl Deflate {
    /// The `Sec-WebSocket-Extensions` response value.
    pub fn response(&self) -> String {
        let mut s = String::from(
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
        );
        if self.window_limited {
            s.push_str(&format!(
                "; server_max_window_bits={}",
                self.server_max_window_bits
            ));
        }
        s
    }
}

/// Picks the first acceptable permessage-deflate offer (RFC 7692 §5). We always answer with
/// both no-context-takeover parameters, which a server may add even when not offered.
pub fn negotiate_deflate(extensions: &str) -> Option<Deflate> {
    extensions
        .split(',')
        .filter_map(|offer| accept_offer(offer.trim()))
        .next()
}

fn accept_offer(offer: &str) -> Option<Deflate> {
    let mut parts = offer.split(';').map(str::trim);
    if parts.next()? != "permessage-deflate" {
        return None;
    }
    let mut seen = Vec::new();
    let mut result = Deflate {
        server_max_window_bits: 15,
        window_limited: false,
    };
    for param in parts.filter(|p| !p.is_empty()) {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (param, None),
        };
        if seen.contains(&name) {
            return None;
        }
        seen.push(name);
        let bits = |v: Option<&str>| v?.parse::<u8>().ok().filter(|b| (8..=15).contains(b));
        match (name, value) {
            ("server_no_context_takeover" | "client_no_context_takeover", None) => {}
            ("server_max_window_bits", v) => {
                result.server_max_window_bits = bits(v)?;
                result.window_limited = true;
            }
            ("client_max_window_bits", None) => {}
            ("client_max_window_bits", v) => {
                bits(v)?;
            }
            _ => return None,
        }
    }
    Some(result)
}

/// The `Sec-WebSocket-Accept` value for a key.
pub fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// The 101 response.
pub fn accept_response(key: &str, protocol: Option<&str>, deflate: Option<&Deflate>) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
        accept_key(key)
    );
    if let Some(p) = protocol {
        r.push_str(&format!("Sec-WebSocket-Protocol: {p}\r\n"));
    }
    if let Some(d) = deflate {
        r.push_str(&format!("Sec-WebSocket-Extensions: {}\r\n", d.response()));
    }
    r.push_str("\r\n");
    r.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "GET /ws?token=abc HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: foo, pushfleet.v1\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\nOrigin: https://app.example\r\n\r\n";

    #[test]
    fn every_refusal_label_is_listed_once() {
        let all = [
            Refusal::TooLarge(1),
            Refusal::Malformed(String::new()),
            Refusal::NotGet,
            Refusal::NotWebSocket,
            Refusal::BadVersion,
            Refusal::BadKey,
            Refusal::NotFound(String::new()),
            Refusal::UnsupportedSubprotocol(String::new()),
            Refusal::Timeout,
            Refusal::Unavailable("full"),
            Refusal::ForbiddenOrigin(String::new()),
        ];
        let labels: Vec<&str> = all.iter().map(Refusal::label).collect();
        assert_eq!(labels, Refusal::LABELS);
    }

    #[test]
    fn parses_a_browser_request() {
        let (u, used) = parse(GOOD.as_bytes(), 8192).unwrap().unwrap();
        assert_eq!(used, GOOD.len());
        assert_eq!(u.path, "/ws");
        assert_eq!(u.query.as_deref(), Some("token=abc"));
        assert_eq!(u.protocols, vec!["foo", "pushfleet.v1"]);
        assert_eq!(u.origin.as_deref(), Some("https://app.example"));
        assert!(negotiate_deflate(&u.extensions).is_some());
    }

    #[test]
    fn rfc_6455_sample_accept_key() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn partial_requests_wait_and_oversized_ones_are_refused() {
        assert_eq!(parse(&GOOD.as_bytes()[..40], 8192), Ok(None));
        assert_eq!(
            parse(&GOOD.as_bytes()[..40], 30),
            Err(Refusal::TooLarge(30))
        );
        assert_eq!(parse(GOOD.as_bytes(), 100), Err(Refusal::TooLarge(100)));
    }

    #[test]
    fn each_bad_request_has_its_refusal() {
        let swap = |from: &str, to: &str| parse(GOOD.replace(from, to).as_bytes(), 8192);
        assert_eq!(swap("GET", "POST"), Err(Refusal::NotGet));
        assert_eq!(
            swap("Upgrade: websocket", "Upgrade: h2c"),
            Err(Refusal::NotWebSocket)
        );
        assert_eq!(
            swap("keep-alive, Upgrade", "keep-alive"),
            Err(Refusal::NotWebSocket)
        );
        assert_eq!(swap("Version: 13", "Version: 8"), Err(Refusal::BadVersion));
        assert_eq!(
            swap("dGhlIHNhbXBsZSBub25jZQ==", "short"),
            Err(Refusal::BadKey)
        );
        assert!(matches!(
            swap("HTTP/1.1\r\nHost", "HTTP/1.0\r\nHost"),
            Err(Refusal::Malformed(_))
        ));
        assert!(matches!(
            parse(b"\x00\x01garbage\r\n\r\n", 8192),
            Err(Refusal::Malformed(_))
        ));
        let many: String = (0..70).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(swap("Host: x\r\n", &many), Err(Refusal::TooLarge(8192)));
    }

    #[test]
    fn refusals_are_complete_http_responses() {
        let r = String::from_utf8(Refusal::BadVersion.response()).unwrap();
        assert!(r.starts_with("HTTP/1.1 426 "));
        assert!(r.contains("Sec-WebSocket-Version: 13\r\n"));
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
    }

    #[test]
    fn deflate_negotiation_follows_rfc_7692() {
        let d = negotiate_deflate("permessage-deflate").unwrap();
        assert_eq!(d.server_max_window_bits, 15);
        assert_eq!(
            d.response(),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
        let d = negotiate_deflate("permessage-deflate; server_max_window_bits=10").unwrap();
        assert_eq!(d.server_max_window_bits, 10);
        assert!(d.response().ends_with("server_max_window_bits=10"));
        // Invalid offers are declined; a later valid one is taken.
        assert_eq!(
            negotiate_deflate("permessage-deflate; server_max_window_bits=7"),
            None
        );
        assert_eq!(
            negotiate_deflate("permessage-deflate; server_max_window_bits"),
            None
        );
        assert_eq!(negotiate_deflate("permessage-deflate; bogus"), None);
        assert_eq!(
            negotiate_deflate(
                "permessage-deflate; server_no_context_takeover; server_no_context_takeover"
            ),
            None
        );
        assert_eq!(negotiate_deflate("x-webkit-deflate-frame"), None);
        let d = negotiate_deflate(
            "permessage-deflate; client_max_window_bits=20, permessage-deflate; client_max_window_bits=\"9\"",
        );
        assert!(d.is_some());
        assert_eq!(negotiate_deflate(""), None);
    }
}
