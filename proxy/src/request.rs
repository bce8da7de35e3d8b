//! The client's upgrade request head: read it bounded in size (the caller bounds the time),
//! check that it is a WebSocket upgrade, and note where the forwarding headers sit so that
//! [`crate::forward`] can edit them without re-serialising anything else.
//!
//! Only what a proxy must know is checked here; the worker checks the rest (key, version,
//! path, subprotocol) and its answer reaches the client untouched.

use std::ops::Range;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Most header fields in a request head; the workers refuse more too.
pub const MAX_HEADERS: usize = 64;

/// Headers a WebSocket upgrade must carry besides `Upgrade: websocket`, as `(name, token its
/// value must list)`; presence is all the proxy checks for the last two (the worker checks
/// their values).
const REQUIRED: [(&str, Option<&str>); 3] = [
    ("Connection", Some("upgrade")),
    ("Sec-WebSocket-Key", None),
    ("Sec-WebSocket-Version", None),
];

/// Why a request head is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HeadError {
    /// Longer than `--max-request-bytes`, or too many header fields (431).
    #[error(
        "request head exceeds --max-request-bytes ({limit} bytes) or {MAX_HEADERS} header fields"
    )]
    TooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// Not parseable as HTTP/1.1 (400).
    #[error("malformed request: {0}")]
    Malformed(String),
    /// Not a GET (400).
    #[error("method {0} is not GET: only WebSocket upgrades are relayed")]
    NotGet(String),
    /// A GET with no `Upgrade: websocket` at all: a plain request for `target` (400, unless
    /// it names one of the [`crate::pages`] and `--demo-page` is on).
    #[error("not a WebSocket upgrade: missing header Upgrade: websocket")]
    NotUpgrade {
        /// The request target, as sent.
        target: String,
    },
    /// A header the upgrade needs is missing (400).
    #[error("not a WebSocket upgrade: missing header {0}")]
    Missing(String),
}

/// A complete request head as the client sent it, and where its forwarding headers are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Bytes read from the client: the request head, then whatever arrived after it (the
    /// client's first frames, forwarded too).
    pub bytes: Vec<u8>,
    /// The request head's length in `bytes`, through its blank line.
    pub len: usize,
    /// The request target (for logs).
    pub target: String,
    /// Where the last `X-Forwarded-For` value ends, and whether it is empty: another hop is
    /// appended there.
    pub forwarded_for_end: Option<(usize, bool)>,
    /// The whole lines (terminator included) of `X-Forwarded-Proto` headers.
    pub forwarded_proto_lines: Vec<Range<usize>>,
    /// Where the blank line that ends the head starts: new headers go there.
    pub blank_line_at: usize,
}

/// Reads a request head of at most `max_bytes` from `stream`. `Ok(None)`: the client closed
/// (or the read failed) before a whole head arrived, so there is no one to answer.
pub async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    max_bytes: usize,
) -> Result<Option<Head>, HeadError> {
    // Never more than `max_bytes` in memory, whatever the client sends.
    let mut buf = vec![0u8; max_bytes];
    let mut filled = 0;
    loop {
        let n = match stream.read(&mut buf[filled..]).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(n) => n,
        };
        filled += n;
        if let Some(head) = parse(&buf[..filled], max_bytes)? {
            buf.truncate(filled);
            return Ok(Some(Head { bytes: buf, ..head }));
        }
    }
}

/// Parses and checks the request head at the start of `buf`. `Ok(None)`: incomplete, read
/// more. The returned head's `bytes` is empty: the caller owns the buffer.
pub fn parse(buf: &[u8], max_bytes: usize) -> Result<Option<Head>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= max_bytes => n,
        Ok(httparse::Status::Complete(_)) => return Err(HeadError::TooLarge { limit: max_bytes }),
        Ok(httparse::Status::Partial) if buf.len() >= max_bytes => {
            return Err(HeadError::TooLarge { limit: max_bytes })
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HeadError::TooLarge { limit: max_bytes })
        }
        Err(e) => return Err(HeadError::Malformed(e.to_string())),
    };
    if req.version != Some(1) {
        return Err(HeadError::Malformed("HTTP/1.1 required".into()));
    }
    let method = req.method.unwrap_or_default();
    if method != "GET" {
        return Err(HeadError::NotGet(method.into()));
    }
    let headers: &[httparse::Header<'_>] = req.headers;
    let named = |name: &'static str| {
        headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
    };
    if !named("upgrade").any(|h| lists_token(h.value, "websocket")) {
        let target = req.path.unwrap_or("/").to_string();
        return Err(HeadError::NotUpgrade { target });
    }
    for (name, token) in REQUIRED {
        let present = match token {
            Some(token) => named(name).any(|h| lists_token(h.value, token)),
            None => named(name).next().is_some(),
        };
        if !present {
            let what = token.map_or_else(|| name.to_string(), |t| format!("{name}: {t}"));
            return Err(HeadError::Missing(what));
        }
    }
    let offset = |part: &[u8]| part.as_ptr() as usize - buf.as_ptr() as usize;
    // A header line runs from its name through the next line feed.
    let line = |h: &httparse::Header<'_>| {
        let value_end = offset(h.value) + h.value.len();
        let lf = buf[value_end..len]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(len, |i| value_end + i + 1);
        offset(h.name.as_bytes())..lf
    };
    let forwarded_for_end = named("x-forwarded-for").next_back().map(|h| {
        let empty = h.value.iter().all(u8::is_ascii_whitespace);
        (offset(h.value) + h.value.len(), empty)
    });
    let forwarded_proto_lines = named("x-forwarded-proto").map(line).collect();
    let blank_line_at = if buf[..len].ends_with(b"\r\n\r\n") || buf[..len].ends_with(b"\n\r\n") {
        len - 2
    } else {
        len - 1
    };
    Ok(Some(Head {
        bytes: Vec::new(),
        len,
        target: req.path.unwrap_or("/").to_string(),
        forwarded_for_end,
        forwarded_proto_lines,
        blank_line_at,
    }))
}

/// Whether a comma-separated header value lists `token` (case-insensitive).
fn lists_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPGRADE: &str = "GET /ws?x=1 HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";

    fn request(extra: &str) -> String {
        format!("{UPGRADE}{extra}\r\n")
    }

    #[test]
    fn an_upgrade_parses_once_complete() {
        let text = request("");
        for cut in 0..text.len() {
            assert_eq!(
                parse(&text.as_bytes()[..cut], 8192),
                Ok(None),
                "cut at {cut}"
            );
        }
        let head = parse(text.as_bytes(), 8192).unwrap().unwrap();
        assert_eq!(head.len, text.len());
        assert_eq!(head.target, "/ws?x=1");
        assert_eq!(head.blank_line_at, text.len() - 2);
        assert_eq!(head.forwarded_for_end, None);
        assert!(head.forwarded_proto_lines.is_empty());
    }

    #[test]
    fn forwarding_headers_are_located() {
        let text = request("X-Forwarded-Proto: https\r\nX-Forwarded-For: 1.2.3.4\r\nx-forwarded-for: 5.6.7.8  \r\nX-Forwarded-For:\r\n");
        let head = parse(text.as_bytes(), 8192).unwrap().unwrap();
        let proto = &head.forwarded_proto_lines;
        assert_eq!(proto.len(), 1);
        assert_eq!(&text[proto[0].clone()], "X-Forwarded-Proto: https\r\n");
        // The last one counts, and it is empty.
        let (end, empty) = head.forwarded_for_end.unwrap();
        assert!(empty);
        assert_eq!(&text[..end], &text[..text.len() - 4]);
        let text = request("X-Forwarded-For: 1.2.3.4  \r\n");
        let (end, empty) = parse(text.as_bytes(), 8192)
            .unwrap()
            .unwrap()
            .forwarded_for_end
            .unwrap();
        assert!(!empty);
        assert!(text[..end].ends_with("1.2.3.4"), "{:?}", &text[..end]);
    }

    #[test]
    fn bare_line_feeds_are_understood() {
        let text = request("X-Forwarded-Proto: http\r\n").replace("\r\n", "\n");
        let head = parse(text.as_bytes(), 8192).unwrap().unwrap();
        assert_eq!(head.blank_line_at, text.len() - 1);
        assert_eq!(
            &text[head.forwarded_proto_lines[0].clone()],
            "X-Forwarded-Proto: http\n"
        );
    }

    #[test]
    fn what_is_not_an_upgrade_says_why() {
        let missing = |text: &str| match parse(text.as_bytes(), 8192) {
            Err(HeadError::Missing(what)) => what,
            other => panic!("{other:?}"),
        };
        let plain = parse(b"GET /pushfleet.js?v=2 HTTP/1.1\r\nHost: h\r\n\r\n", 8192);
        let target = "/pushfleet.js?v=2".to_string();
        assert_eq!(plain, Err(HeadError::NotUpgrade { target }));
        let h2c = request("").replace("Upgrade: websocket", "Upgrade: h2c");
        assert!(matches!(
            parse(h2c.as_bytes(), 8192),
            Err(HeadError::NotUpgrade { .. })
        ));
        let no_connection = request("").replace("keep-alive, Upgrade", "keep-alive");
        assert_eq!(missing(&no_connection), "Connection: upgrade");
        let no_key = request("").replace("Sec-WebSocket-Key", "X-Key");
        assert_eq!(missing(&no_key), "Sec-WebSocket-Key");
        let no_version = request("").replace("Sec-WebSocket-Version: 13\r\n", "");
        assert_eq!(missing(&no_version), "Sec-WebSocket-Version");
        let post = request("").replacen("GET", "POST", 1);
        assert_eq!(
            parse(post.as_bytes(), 8192),
            Err(HeadError::NotGet("POST".into()))
        );
        let old = request("").replacen("HTTP/1.1", "HTTP/1.0", 1);
        assert!(matches!(
            parse(old.as_bytes(), 8192),
            Err(HeadError::Malformed(_))
        ));
        let garbage = "\u{1} nonsense\r\n\r\n";
        assert!(matches!(
            parse(garbage.as_bytes(), 8192),
            Err(HeadError::Malformed(_))
        ));
        let e = HeadError::NotUpgrade { target: "/".into() };
        assert!(e.to_string().contains("missing header Upgrade: websocket"));
    }

    #[test]
    fn the_size_limit_holds_whether_or_not_the_head_is_complete() {
        let big = request(&format!("X-Big: {}\r\n", "a".repeat(600)));
        let too_large = Err(HeadError::TooLarge { limit: 512 });
        assert_eq!(parse(big.as_bytes(), 512), too_large);
        assert_eq!(parse(&big.as_bytes()[..512], 512), too_large);
        assert_eq!(parse(&big.as_bytes()[..511], 512), Ok(None));
        let many: String = (0..MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(
            parse(request(&many).as_bytes(), 1 << 20),
            Err(HeadError::TooLarge { limit: 1 << 20 })
        );
    }

    #[tokio::test]
    async fn reading_keeps_what_came_after_the_head() {
        let mut sent = request("").into_bytes();
        sent.extend([0x81, 0x00]);
        let head = read_head(&mut &sent[..], 8192).await.unwrap().unwrap();
        assert_eq!(head.bytes, sent);
        assert_eq!(head.len, sent.len() - 2);
        let mut closed: &[u8] = b"GET / HTTP/1.1\r\n";
        assert_eq!(read_head(&mut closed, 8192).await, Ok(None));
    }
}
