//! The client protocol, `pushfleet.v1`: JSON text frames over one WebSocket.
//!
//! Requests (client → worker) carry an `op`; replies and pushes (worker → client) carry a
//! `type`. Every request may carry a numeric `id` that its reply echoes. The full
//! specification with examples is `protocol/PROTOCOL.md`.

use crate::position::{JsonPosition, Position};
use crate::publish::{validate_topic, TopicError};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::fmt::Write as _;

/// The WebSocket subprotocol naming this protocol and its version.
pub const SUBPROTOCOL: &str = "pushfleet.v1";

/// WebSocket close codes the worker sends, each with one meaning.
pub mod close {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// Going away. Workers do not send it (a stopping worker drains with 1012); clients
    /// reconnect after a jittered backoff when something in between sends it.
    pub const GOING_AWAY: u16 = 1001;
    /// A frame broke RFC 6455 (bad opcode, unmasked, reserved bits, bad control frame...).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// Binary data on the `pushfleet.v1` endpoint (the protocol is JSON text only).
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// A text message was not valid UTF-8.
    pub const INVALID_UTF8: u16 = 1007;
    /// Too many malformed requests in a row.
    pub const POLICY_VIOLATION: u16 = 1008;
    /// A frame, message or decompressed message exceeded its size limit.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The worker failed internally.
    pub const INTERNAL_ERROR: u16 = 1011;
    /// The worker is draining (herald's scale-in, or SIGTERM: a stop, a rollout, an instance
    /// leaving its group); reconnect soon, you will land elsewhere.
    pub const SERVICE_RESTART: u16 = 1012;
    /// The client did not read fast enough: its outbound queue passed the configured bound.
    pub const SLOW_CONSUMER: u16 = 4001;
    /// No frame from the client within the idle timeout.
    pub const IDLE_TIMEOUT: u16 = 4002;
    /// No pong to the worker's ping within the keepalive timeout.
    pub const KEEPALIVE_TIMEOUT: u16 = 4003;
    /// The access token is missing (tokens required) or invalid: malformed, unknown key,
    /// algorithm not allowed for its key, bad signature, wrong audience or issuer, not yet
    /// valid. Retrying with the same token cannot succeed.
    pub const UNAUTHORIZED: u16 = 4401;
    /// The access token expired, at connect or while connected: get a new one, reconnect.
    pub const TOKEN_EXPIRED: u16 = 4402;
}

/// Stable machine-readable error codes in `{"type":"error","code":...}` replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The text frame is not a JSON object.
    BadJson,
    /// `op` is missing or not one of the known operations.
    UnknownOp,
    /// A field is missing, of the wrong type, or contradicts another.
    BadRequest,
    /// The topic or prefix is empty, not UTF-8 or contains control characters.
    InvalidTopic,
    /// The topic or prefix is longer than the worker's `max_topic_bytes`.
    TopicTooLong,
    /// The connection already holds `max_subscriptions` subscriptions.
    TooManySubscriptions,
    /// Unsubscribe for something this connection is not subscribed to.
    NotSubscribed,
    /// A history request (`since`/`last`) for a topic the connection already holds.
    AlreadySubscribed,
    /// The connection's access token (or anonymous access) does not allow this topic.
    Forbidden,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::InvalidTopic => "invalid_topic",
            ErrorCode::TopicTooLong => "topic_too_long",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ErrorCode::NotSubscribed => "not_subscribed",
            ErrorCode::AlreadySubscribed => "already_subscribed",
            ErrorCode::Forbidden => "forbidden",
        }
    }
}

/// What a subscription matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Filter {
    /// Exactly this topic.
    Topic(String),
    /// Every topic starting with this prefix.
    Prefix(String),
}

impl Filter {
    /// The topic or prefix text.
    pub fn text(&self) -> &str {
        match self {
            Filter::Topic(t) | Filter::Prefix(t) => t,
        }
    }

    /// Whether `topic` is matched by this filter.
    pub fn matches(&self, topic: &str) -> bool {
        match self {
            Filter::Topic(t) => t == topic,
            Filter::Prefix(p) => topic.starts_with(p.as_str()),
        }
    }
}

/// Topics named by a configuration or an access token: a topic, or a prefix ending in `*`
/// (`match.*`; a lone `*` is every topic).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TopicPattern {
    /// Exactly this topic.
    Exact(String),
    /// Every topic starting with this.
    Prefix(String),
}

impl TopicPattern {
    /// Parses `topic` or `prefix*`; `what` names the setting in the error.
    pub fn parse(text: &str, what: &str) -> Result<Self, String> {
        match text.trim() {
            "" => Err(format!("{what} pattern {text:?} is empty")),
            p if p.ends_with('*') && !p[..p.len() - 1].contains('*') => {
                Ok(TopicPattern::Prefix(p[..p.len() - 1].to_string()))
            }
            p if p.contains('*') => Err(format!(
                "{what} pattern {p:?}: only a trailing * is allowed"
            )),
            p => Ok(TopicPattern::Exact(p.to_string())),
        }
    }

    /// Whether `topic` is covered.
    pub fn matches(&self, topic: &str) -> bool {
        match self {
            TopicPattern::Exact(t) => t == topic,
            TopicPattern::Prefix(p) => topic.starts_with(p.as_str()),
        }
    }

    /// Whether every topic `filter` can match is covered: an exact topic the pattern matches,
    /// or a prefix at least as long as the pattern's (`match.*` covers `match.1` and `match.`;
    /// `match.1` covers no prefix).
    pub fn covers(&self, filter: &Filter) -> bool {
        match (self, filter) {
            (_, Filter::Topic(t)) => self.matches(t),
            (TopicPattern::Prefix(p), Filter::Prefix(f)) => f.starts_with(p.as_str()),
            (TopicPattern::Exact(_), Filter::Prefix(_)) => false,
        }
    }

    /// The ZeroMQ subscription that receives every covered topic.
    pub fn upstream_prefix(&self) -> &str {
        match self {
            TopicPattern::Exact(t) | TopicPattern::Prefix(t) => t,
        }
    }
}

impl std::fmt::Display for TopicPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TopicPattern::Exact(t) => write!(f, "{t}"),
            TopicPattern::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

/// What a subscribe asks of the topic's history (topic filters only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HistoryRequest {
    /// Resume: the last position the client has; it wants every message after it.
    pub since: Option<Position>,
    /// The last `n` messages: alone, a catch-up; with `since`, what to send instead when the
    /// resume cannot be recovered.
    pub last: Option<u32>,
}

/// Why a resume (`since`) was not recovered. The client should drop what it holds for the
/// topic and start again from what follows (the last messages, if it asked with `last`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotRecovered {
    /// The topic's stream restarted (new epoch): old positions mean nothing.
    EpochChanged,
    /// Messages after the position are no longer in history.
    TooOld,
    /// More messages were missed than `max_replay` allows in one request.
    TooManyMissed,
    /// This worker keeps no history for the topic, or knows nothing of it.
    NoHistory,
    /// The position is ahead of everything this worker has for the topic.
    PositionAhead,
}

impl NotRecovered {
    /// The reason as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            NotRecovered::EpochChanged => "epoch_changed",
            NotRecovered::TooOld => "too_old",
            NotRecovered::TooManyMissed => "too_many_missed",
            NotRecovered::NoHistory => "no_history",
            NotRecovered::PositionAhead => "position_ahead",
        }
    }
}

/// A validated client request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Start receiving messages that match `filter`.
    Subscribe {
        /// Echoed in the reply.
        id: Option<u64>,
        /// What to receive.
        filter: Filter,
        /// History to send before live messages, if asked.
        history: Option<HistoryRequest>,
    },
    /// Stop receiving messages that match `filter`.
    Unsubscribe {
        /// Echoed in the reply.
        id: Option<u64>,
        /// The filter given to subscribe.
        filter: Filter,
    },
    /// Application-level ping; answered with `{"type":"pong"}`.
    Ping {
        /// Echoed in the reply.
        id: Option<u64>,
    },
}

/// A rejected request: the code, a human-readable reason, and the id if one could be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    /// Request id, when the request was JSON with a numeric id.
    pub id: Option<u64>,
    /// Stable error code.
    pub code: ErrorCode,
    /// Explanation naming the limit or field at fault.
    pub message: String,
}

/// A request's fields, each still JSON: read one by one so that a field of the wrong type is
/// a `bad_request` that keeps the request's `id`, not a parse failure of the whole text.
struct RawRequest {
    op: Option<serde_json::Value>,
    id: Option<serde_json::Value>,
    topic: Option<serde_json::Value>,
    prefix: Option<serde_json::Value>,
    since: Option<serde_json::Value>,
    last: Option<serde_json::Value>,
}

impl RawRequest {
    fn read(text: &str) -> Result<Self, RequestError> {
        let not_object = |message: String| RequestError {
            id: None,
            code: ErrorCode::BadJson,
            message,
        };
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| not_object(format!("request is not a JSON object: {e}")))?;
        let serde_json::Value::Object(mut map) = value else {
            return Err(not_object(format!(
                "request is not a JSON object but {}",
                json_kind(&value)
            )));
        };
        Ok(RawRequest {
            op: map.remove("op"),
            id: map.remove("id"),
            topic: map.remove("topic"),
            prefix: map.remove("prefix"),
            since: map.remove("since"),
            last: map.remove("last"),
        })
    }
}

/// "a number", "an array", ...: for error messages about a JSON value of the wrong type.
fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Parses and validates one text message from a client. `topic_limit` is `max_topic_bytes`.
pub fn parse_request(text: &str, topic_limit: usize) -> Result<Request, RequestError> {
    let raw = RawRequest::read(text)?;
    let fail = |id, code, message: String| RequestError { id, code, message };
    let id = match raw.id {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Number(n)) if n.as_u64().is_some() => n.as_u64(),
        Some(_) => {
            return Err(fail(
                None,
                ErrorCode::BadRequest,
                "\"id\" must be a non-negative integer".into(),
            ))
        }
    };
    let op = match raw.op {
        None | Some(serde_json::Value::Null) => {
            return Err(fail(id, ErrorCode::UnknownOp, "missing \"op\"".into()))
        }
        Some(serde_json::Value::String(op)) => op,
        Some(other) => {
            return Err(fail(
                id,
                ErrorCode::BadRequest,
                format!("\"op\" must be a string, not {}", json_kind(&other)),
            ))
        }
    };
    let text_field = |name: &str, value: &Option<serde_json::Value>| match value {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(fail(
            id,
            ErrorCode::BadRequest,
            format!("\"{name}\" must be a string, not {}", json_kind(other)),
        )),
    };
    let filter = || -> Result<Filter, RequestError> {
        let topic = text_field("topic", &raw.topic)?;
        let prefix = text_field("prefix", &raw.prefix)?;
        let filter = match (topic, prefix) {
            (Some(t), None) => Filter::Topic(t),
            (None, Some(p)) => Filter::Prefix(p),
            _ => {
                return Err(fail(
                    id,
                    ErrorCode::BadRequest,
                    format!("\"{op}\" needs exactly one of \"topic\" or \"prefix\""),
                ))
            }
        };
        validate_topic(filter.text().as_bytes(), topic_limit).map_err(|e| {
            let code = match e {
                TopicError::TooLong { .. } => ErrorCode::TopicTooLong,
                _ => ErrorCode::InvalidTopic,
            };
            fail(id, code, e.to_string())
        })?;
        Ok(filter)
    };
    let bad = |message: String| fail(id, ErrorCode::BadRequest, message);
    let history = || -> Result<Option<HistoryRequest>, RequestError> {
        let last = match &raw.last {
            None => None,
            Some(serde_json::Value::Number(n)) => match n.as_u64().map(u32::try_from) {
                Some(Ok(n)) => Some(n),
                _ => {
                    return Err(bad(
                        "\"last\" must be an integer from 0 to 4294967295".into()
                    ))
                }
            },
            Some(_) => return Err(bad("\"last\" must be an integer".into())),
        };
        let since = match &raw.since {
            None => None,
            Some(v) => {
                let p: JsonPosition = serde_json::from_value(v.clone()).map_err(|_| {
                    bad(r#""since" must be {"epoch":"<16 hex digits>","offset":<integer>}"#.into())
                })?;
                Some(Position::try_from(&p).map_err(|_| {
                    bad(format!(
                        "\"since.epoch\" {:?} is not 1 to 16 hex digits",
                        p.epoch
                    ))
                })?)
            }
        };
        if since.is_none() && last.is_none() {
            return Ok(None);
        }
        if !matches!(raw.prefix, None | Some(serde_json::Value::Null)) {
            return Err(bad(
                "history (\"since\"/\"last\") is per topic; use \"topic\", not \"prefix\"".into(),
            ));
        }
        Ok(Some(HistoryRequest { since, last }))
    };
    match op.as_str() {
        "subscribe" => {
            let filter = filter()?;
            Ok(Request::Subscribe {
                id,
                history: history()?,
                filter,
            })
        }
        "unsubscribe" => Ok(Request::Unsubscribe {
            id,
            filter: filter()?,
        }),
        "ping" => Ok(Request::Ping { id }),
        other => Err(fail(
            id,
            ErrorCode::UnknownOp,
            format!("unknown op {other:?}; expected subscribe, unsubscribe or ping"),
        )),
    }
}

/// The `history` part of a subscribe ack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryReply {
    /// Present when the request had `since`: whether every message after it follows.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub recovered: Option<bool>,
    /// Why `recovered` is false (see [`NotRecovered`]).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    /// How many history messages follow this ack, before live ones.
    pub replayed: u64,
    /// The topic's latest position on this worker when the ack was sent, if it has one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub position: Option<JsonPosition>,
}

/// A reply or push from the worker, as clients decode it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// First message on every connection.
    Welcome {
        /// Always [`SUBPROTOCOL`].
        protocol: String,
        /// The worker serving this connection.
        worker: String,
        /// This connection's id on that worker.
        connection: u64,
    },
    /// A request succeeded.
    Ack {
        /// The request's id.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        id: Option<u64>,
        /// The request's op.
        op: String,
        /// The subscribed topic, for topic filters.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        topic: Option<String>,
        /// The subscribed prefix, for prefix filters.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        prefix: Option<String>,
        /// What was done with a history request; exactly `replayed` messages follow.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        history: Option<HistoryReply>,
    },
    /// A request failed; the connection stays open.
    Error {
        /// The request's id, when it could be read.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        id: Option<u64>,
        /// Stable code, see [`ErrorCode`].
        code: String,
        /// Human-readable reason.
        message: String,
    },
    /// Messages of a topic were lost for good: offsets `from..=to` of `epoch` will never come.
    Gap {
        /// The topic.
        topic: String,
        /// The stream the lost messages belong to.
        epoch: String,
        /// First lost offset.
        from: u64,
        /// Last lost offset.
        to: u64,
    },
    /// The topic's stream restarted with a new epoch; positions of the old one are void.
    Reset {
        /// The topic.
        topic: String,
        /// The new epoch (16 hex digits).
        epoch: String,
    },
    /// Answer to `{"op":"ping"}`.
    Pong {
        /// The request's id.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        id: Option<u64>,
    },
    /// A published message.
    Message {
        /// Its topic.
        topic: String,
        /// Its position, absent for live-only messages.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        position: Option<JsonPosition>,
        /// Publisher time, microseconds since the Unix epoch, when stamped.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        ts: Option<u64>,
        /// The payload: embedded JSON, or a JSON string for non-JSON UTF-8 text.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        payload: Option<serde_json::Value>,
        /// The payload in standard base64, for payloads that are not UTF-8.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        payload_base64: Option<String>,
    },
}

impl ServerMessage {
    /// The ack for a subscribe/unsubscribe of `filter`.
    pub fn ack(id: Option<u64>, op: &str, filter: Option<&Filter>) -> Self {
        let (topic, prefix) = match filter {
            Some(Filter::Topic(t)) => (Some(t.clone()), None),
            Some(Filter::Prefix(p)) => (None, Some(p.clone())),
            None => (None, None),
        };
        ServerMessage::Ack {
            id,
            op: op.into(),
            topic,
            prefix,
            history: None,
        }
    }

    /// The error reply for a rejected request.
    pub fn error(e: &RequestError) -> Self {
        ServerMessage::Error {
            id: e.id,
            code: e.code.as_str().into(),
            message: e.message.clone(),
        }
    }

    /// Serialises to the JSON text sent on the wire.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server messages always serialise")
    }
}

/// Builds the JSON text of a `message` push for a published message. Called once per message,
/// never per subscriber. A JSON payload is embedded as is; other UTF-8 becomes a JSON string;
/// anything else goes base64-encoded in `payload_base64`.
pub fn encode_message(
    topic: &str,
    position: Option<Position>,
    published_at_us: Option<u64>,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = String::with_capacity(payload.len() + topic.len() + 96);
    out.push_str("{\"type\":\"message\",\"topic\":");
    out.push_str(&serde_json::to_string(topic).expect("str serialises"));
    if let Some(p) = position {
        let _ = write!(
            out,
            ",\"position\":{{\"epoch\":\"{}\",\"offset\":{}}}",
            p.epoch_hex(),
            p.offset
        );
    }
    if let Some(ts) = published_at_us {
        let _ = write!(out, ",\"ts\":{ts}");
    }
    match std::str::from_utf8(payload) {
        Ok(text) if serde_json::from_str::<&RawValue>(text).is_ok() => {
            out.push_str(",\"payload\":");
            out.push_str(text.trim());
        }
        Ok(text) => {
            out.push_str(",\"payload\":");
            out.push_str(&serde_json::to_string(text).expect("str serialises"));
        }
        Err(_) => {
            use base64::Engine as _;
            out.push_str(",\"payload_base64\":\"");
            base64::engine::general_purpose::STANDARD.encode_string(payload, &mut out);
            out.push('"');
        }
    }
    out.push('}');
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(text: &str) -> ErrorCode {
        parse_request(text, 16).unwrap_err().code
    }

    #[test]
    fn parses_each_op() {
        assert_eq!(
            parse_request(r#"{"op":"subscribe","id":1,"topic":"a.b"}"#, 16).unwrap(),
            Request::Subscribe {
                id: Some(1),
                filter: Filter::Topic("a.b".into()),
                history: None,
            }
        );
        assert_eq!(
            parse_request(
                r#"{"op":"subscribe","topic":"a","since":{"epoch":"00000000000000ff","offset":3},"last":10}"#,
                16
            )
            .unwrap(),
            Request::Subscribe {
                id: None,
                filter: Filter::Topic("a".into()),
                history: Some(HistoryRequest {
                    since: Some(Position {
                        epoch: 255,
                        offset: 3
                    }),
                    last: Some(10)
                }),
            }
        );
        assert_eq!(
            parse_request(r#"{"op":"unsubscribe","prefix":"a."}"#, 16).unwrap(),
            Request::Unsubscribe {
                id: None,
                filter: Filter::Prefix("a.".into())
            }
        );
        assert_eq!(
            parse_request(r#"{"op":"ping","id":9}"#, 16).unwrap(),
            Request::Ping { id: Some(9) }
        );
    }

    #[test]
    fn each_bad_request_has_its_code() {
        assert_eq!(code("not json"), ErrorCode::BadJson);
        assert_eq!(code("[1,2]"), ErrorCode::BadJson);
        assert_eq!(code(r#"{"id":1}"#), ErrorCode::UnknownOp);
        assert_eq!(
            code(r#"{"op":"publish","topic":"a"}"#),
            ErrorCode::UnknownOp
        );
        assert_eq!(code(r#"{"op":"subscribe"}"#), ErrorCode::BadRequest);
        assert_eq!(
            code(r#"{"op":"subscribe","topic":"a","prefix":"b"}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"op":"subscribe","topic":""}"#),
            ErrorCode::InvalidTopic
        );
        assert_eq!(
            code(r#"{"op":"subscribe","topic":"a\u0000"}"#),
            ErrorCode::InvalidTopic
        );
        assert_eq!(
            code(r#"{"op":"subscribe","topic":"0123456789abcdefX"}"#),
            ErrorCode::TopicTooLong
        );
        assert_eq!(code(r#"{"op":"ping","id":-1}"#), ErrorCode::BadRequest);
        for bad_history in [
            r#"{"op":"subscribe","prefix":"a","last":1}"#,
            r#"{"op":"subscribe","topic":"a","last":-1}"#,
            r#"{"op":"subscribe","topic":"a","last":"5"}"#,
            r#"{"op":"subscribe","topic":"a","last":99999999999}"#,
            r#"{"op":"subscribe","topic":"a","since":5}"#,
            r#"{"op":"subscribe","topic":"a","since":{"epoch":"xyz","offset":1}}"#,
            r#"{"op":"subscribe","topic":"a","since":{"epoch":"","offset":1}}"#,
            r#"{"op":"subscribe","topic":"a","since":{"epoch":"00000000000000001","offset":1}}"#,
            r#"{"op":"subscribe","topic":"a","since":{"epoch":"01"}}"#,
            r#"{"op":"subscribe","topic":"a","since":{"epoch":"+1","offset":1}}"#,
        ] {
            assert_eq!(code(bad_history), ErrorCode::BadRequest, "{bad_history}");
        }
        assert_eq!(code(r#"{"op":"ping","id":"x"}"#), ErrorCode::BadRequest);
    }

    #[test]
    fn errors_echo_the_id_when_readable() {
        let e = parse_request(r#"{"op":"nope","id":5}"#, 16).unwrap_err();
        assert_eq!(e.id, Some(5));
        assert!(e.message.contains("nope"));
    }

    #[test]
    fn fields_of_the_wrong_type_are_bad_requests_that_keep_the_id() {
        for (text, field) in [
            (r#"{"op":"subscribe","id":1,"topic":5}"#, "topic"),
            (r#"{"op":"subscribe","id":1,"prefix":["m."]}"#, "prefix"),
            (
                r#"{"op":"unsubscribe","id":1,"topic":{"name":"a"}}"#,
                "topic",
            ),
            (r#"{"op":7,"id":1}"#, "op"),
            (r#"{"op":true,"id":1,"topic":"a"}"#, "op"),
        ] {
            let e = parse_request(text, 16).unwrap_err();
            assert_eq!((e.code, e.id), (ErrorCode::BadRequest, Some(1)), "{text}");
            assert!(e.message.contains(field), "{text}: {}", e.message);
        }
        let e = parse_request("\"subscribe\"", 16).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadJson);
        assert!(e.message.contains("a string"), "{}", e.message);
        // null is the field's absence, as before.
        assert_eq!(
            parse_request(r#"{"op":"subscribe","topic":"a","prefix":null}"#, 16).unwrap(),
            Request::Subscribe {
                id: None,
                filter: Filter::Topic("a".into()),
                history: None
            }
        );
    }

    #[test]
    fn filters_match_exactly_or_by_prefix() {
        assert!(Filter::Topic("a.b".into()).matches("a.b"));
        assert!(!Filter::Topic("a.b".into()).matches("a.bc"));
        assert!(Filter::Prefix("a.".into()).matches("a.bc"));
        assert!(!Filter::Prefix("a.".into()).matches("b.a."));
    }

    fn decode(bytes: &[u8]) -> ServerMessage {
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn message_embeds_json_payloads_and_round_trips() {
        let p = Position {
            epoch: 0xabc,
            offset: 41,
        };
        let bytes = encode_message("m\"1", Some(p), Some(1234), br#" {"goal":1} "#);
        match decode(&bytes) {
            ServerMessage::Message {
                topic,
                position,
                ts,
                payload,
                payload_base64,
            } => {
                assert_eq!(topic, "m\"1");
                assert_eq!(position, Some(JsonPosition::from(p)));
                assert_eq!(ts, Some(1234));
                assert_eq!(payload.unwrap(), serde_json::json!({"goal": 1}));
                assert_eq!(payload_base64, None);
            }
            other => panic!("{other:?}"),
        }
    }

    /// Found by fuzzing: a number beyond f64 range is grammatical JSON and is embedded as is
    /// (JavaScript reads it as Infinity); the message stays valid JSON.
    #[test]
    fn out_of_range_numbers_stay_valid_json() {
        let bytes = encode_message("t", None, None, b"99999999999999999992E99999999");
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(
            text.ends_with(r#""payload":99999999999999999992E99999999}"#),
            "{text}"
        );
        assert!(serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_ok());
    }

    #[test]
    fn message_quotes_text_and_base64s_binary() {
        match decode(&encode_message("t", None, None, b"plain \"text\"")) {
            ServerMessage::Message {
                payload, position, ..
            } => {
                assert_eq!(payload.unwrap(), serde_json::json!("plain \"text\""));
                assert_eq!(position, None);
            }
            other => panic!("{other:?}"),
        }
        match decode(&encode_message("t", None, None, &[0xff, 0x00])) {
            ServerMessage::Message { payload_base64, .. } => {
                assert_eq!(payload_base64.as_deref(), Some("/wA="))
            }
            other => panic!("{other:?}"),
        }
    }
}
