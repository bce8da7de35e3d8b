//! The webhook actuator: every call becomes an HTTP POST of a small JSON document to one
//! configured URL, for a system of the operator's own (a deploy tool, a chat bot, a custom
//! autoscaler) to act on.
//!
//! ```text
//! {"event": "set_desired" | "drain_started" | "drain_progress" | "drained",
//!  "desired": 5,                                          (set_desired, drain_started)
//!  "reason": "...",
//!  "worker": {"worker_id": "w-3", "instance_id": "i-0ab…" | null},   (the drain calls)
//!  "sent_at_ms": 1767225600000}                           (Unix time, milliseconds)
//! ```
//!
//! Plain `http://` only: an `https://` URL is refused at construction. Put the receiver, or a
//! TLS-originating proxy in front of it, where herald can reach it without TLS.
//!
//! Delivery: each attempt (connect, request, response head and error excerpt) has a timeout.
//! Connection errors, timeouts, 408, 429 and 5xx are retried, up to the configured number of
//! attempts, after a full-jitter exponential backoff; any other status fails the call at once
//! (asking again the same way will not help; the control loop repeats the call later anyway).
//! Any 2xx is success. A retried POST may reach the receiver twice, so receivers must be
//! idempotent, as every actuator is.

use super::{ActuatorError, Event, EventSink, Target};
use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HOST, USER_AGENT};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rand::Rng;
use serde::Serialize;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use thiserror::Error;
use tokio::net::TcpStream;
use tokio_util::task::AbortOnDropHandle;

/// Upper bound of [`WebhookSettings::attempts`].
pub const MAX_ATTEMPTS: u32 = 10;

/// How much of a failed response's body is quoted in the error, bytes.
pub const BODY_EXCERPT_BYTES: usize = 256;

/// How the webhook actuator reaches its receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookSettings {
    /// The `http://` URL every call is posted to (https is not supported).
    pub url: String,
    /// Attempts per call before it fails, 1 to 10 (default 3).
    pub attempts: u32,
    /// Time allowed for one attempt: connect, send, and read the response head (default 5 s).
    pub attempt_timeout: Duration,
    /// Backoff before the second attempt: the wait is random between zero and this, doubling
    /// for each further attempt (default 200 ms).
    pub backoff_base: Duration,
    /// Upper bound of one backoff wait (default 5 s).
    pub backoff_max: Duration,
}

impl WebhookSettings {
    /// Settings for `url` with the default attempts, timeout and backoff.
    pub fn new(url: impl Into<String>) -> Self {
        WebhookSettings {
            url: url.into(),
            attempts: 3,
            attempt_timeout: Duration::from_secs(5),
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// Why [`Webhook::new`] refused its settings.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum WebhookError {
    /// The URL does not parse or lacks a host.
    #[error("webhook url {url:?} is not usable: {reason}")]
    BadUrl {
        /// The URL as configured.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The URL is https, which this actuator does not speak.
    #[error("webhook url {0:?} is https; only http:// URLs are supported")]
    Https(String),
    /// `attempts` is outside 1..=[`MAX_ATTEMPTS`].
    #[error("webhook attempts is {0}; it must be between 1 and {MAX_ATTEMPTS}")]
    Attempts(u32),
    /// `attempt_timeout` is zero.
    #[error("webhook attempt timeout is zero; it must be more than zero")]
    ZeroTimeout,
}

/// Posts every call as JSON to a configured http:// URL, with retries.
#[derive(Debug)]
pub struct Webhook {
    settings: WebhookSettings,
    host: String,
    port: u16,
    /// The `Host` header: the URL's host, and its port when the URL names one.
    host_header: String,
    path_and_query: String,
}

impl Webhook {
    /// Checks the settings; no connection is made until the first call.
    pub fn new(settings: WebhookSettings) -> Result<Self, WebhookError> {
        let bad = |reason: &str| WebhookError::BadUrl {
            url: settings.url.clone(),
            reason: reason.to_owned(),
        };
        let uri: Uri = settings.url.parse().map_err(|e| bad(&format!("{e}")))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => return Err(WebhookError::Https(settings.url.clone())),
            _ => return Err(bad("the scheme must be http://")),
        }
        let authority = uri.authority().ok_or_else(|| bad("it has no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("credentials in the URL are not supported"));
        }
        if !(1..=MAX_ATTEMPTS).contains(&settings.attempts) {
            return Err(WebhookError::Attempts(settings.attempts));
        }
        if settings.attempt_timeout.is_zero() {
            return Err(WebhookError::ZeroTimeout);
        }
        // `host()` keeps an IPv6 literal's brackets; connecting wants the bare address.
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
        Ok(Webhook {
            host: host.to_owned(),
            port: authority.port_u16().unwrap_or(80),
            host_header: authority.as_str().to_owned(),
            path_and_query: path_and_query.to_owned(),
            settings,
        })
    }

    /// Posts `event`, retrying as the settings allow. The body is built now, so `sent_at_ms`
    /// is the time of the call and every attempt carries the same document.
    fn post(&self, event: Event<'_>) -> BoxFuture<'_, Result<(), ActuatorError>> {
        let body = Bytes::from(body_json(&event, unix_ms()));
        Box::pin(self.deliver(event.kind, body))
    }

    async fn deliver(&self, action: &'static str, body: Bytes) -> Result<(), ActuatorError> {
        let attempts = self.settings.attempts;
        let mut attempt = 1;
        // Bounded: `attempt` grows by one per pass and the loop ends at `attempts`.
        loop {
            let outcome =
                tokio::time::timeout(self.settings.attempt_timeout, self.attempt(body.clone()))
                    .await
                    .unwrap_or(Err(AttemptError::Timeout(self.settings.attempt_timeout)));
            let error = match outcome {
                Ok(()) => return Ok(()),
                Err(error) => error,
            };
            if !error.retryable() || attempt >= attempts {
                return Err(ActuatorError::Failed {
                    actuator: "webhook",
                    action,
                    message: format!(
                        "POST {}: {error} (attempt {attempt} of {attempts})",
                        self.settings.url
                    ),
                });
            }
            tracing::warn!(action, attempt, attempts, %error, "webhook attempt failed; retrying");
            let ceiling = backoff_ceiling(
                self.settings.backoff_base,
                self.settings.backoff_max,
                attempt,
            );
            tokio::time::sleep(full_jitter(ceiling)).await;
            attempt += 1;
        }
    }

    /// One attempt: a fresh connection, one request, the response status.
    async fn attempt(&self, body: Bytes) -> Result<(), AttemptError> {
        let transport = |what: &str, e: &dyn std::fmt::Display| {
            AttemptError::Transport(format!("{what} {}:{}: {e}", self.host, self.port))
        };
        let stream = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| transport("connect to", &e))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| transport("handshake with", &e))?;
        // The connection task ends with this attempt, timed out or not.
        let _connection = AbortOnDropHandle::new(tokio::spawn(connection));
        let request = Request::post(self.path_and_query.as_str())
            .header(HOST, self.host_header.as_str())
            .header(CONTENT_TYPE, "application/json")
            .header(
                USER_AGENT,
                concat!("pushfleet-herald/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(body))
            .map_err(|e| transport("request to", &e))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| transport("POST to", &e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        Err(AttemptError::Status(
            status,
            excerpt(response.into_body()).await,
        ))
    }
}

impl EventSink for Webhook {
    const NAME: &'static str = "webhook";

    fn send(&self, event: Event<'_>) -> BoxFuture<'_, Result<(), ActuatorError>> {
        self.post(event)
    }
}

/// Why one attempt failed.
#[derive(Debug)]
enum AttemptError {
    /// Connecting, writing or reading failed.
    Transport(String),
    /// The attempt took longer than its timeout.
    Timeout(Duration),
    /// The receiver answered with a status other than 2xx; the body excerpt follows.
    Status(StatusCode, String),
}

impl AttemptError {
    /// Whether another attempt may go differently: transport trouble, a timeout, 408, 429, 5xx.
    fn retryable(&self) -> bool {
        match self {
            AttemptError::Transport(_) | AttemptError::Timeout(_) => true,
            AttemptError::Status(status, _) => {
                status.is_server_error()
                    || *status == StatusCode::REQUEST_TIMEOUT
                    || *status == StatusCode::TOO_MANY_REQUESTS
            }
        }
    }
}

impl std::fmt::Display for AttemptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttemptError::Transport(what) => f.write_str(what),
            AttemptError::Timeout(limit) => {
                write!(f, "no response within the attempt timeout of {limit:?}")
            }
            AttemptError::Status(status, excerpt) if excerpt.is_empty() => {
                write!(f, "HTTP {status}")
            }
            AttemptError::Status(status, excerpt) => write!(f, "HTTP {status}: {excerpt}"),
        }
    }
}

/// The first [`BODY_EXCERPT_BYTES`] of a response body, as text for an error message.
async fn excerpt(mut body: Incoming) -> String {
    let mut bytes = Vec::new();
    // Bounded by the excerpt size and the end of the body; the attempt timeout covers a body
    // that trickles forever.
    while bytes.len() < BODY_EXCERPT_BYTES {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    bytes.extend_from_slice(data);
                }
            }
            Some(Err(_)) | None => break,
        }
    }
    bytes.truncate(BODY_EXCERPT_BYTES);
    String::from_utf8_lossy(&bytes).trim().to_owned()
}

/// The JSON document for `event`, stamped `sent_at_ms`.
fn body_json(event: &Event<'_>, sent_at_ms: u64) -> Vec<u8> {
    #[derive(Serialize)]
    struct Body<'a> {
        event: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        desired: Option<u32>,
        reason: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        worker: Option<&'a Target>,
        sent_at_ms: u64,
    }
    let body = Body {
        event: event.kind,
        desired: event.desired,
        reason: event.reason,
        worker: event.target,
        sent_at_ms,
    };
    serde_json::to_vec(&body).expect("a struct of strings and numbers serialises")
}

fn unix_ms() -> u64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}

/// The longest wait before retry number `retry` (1 = before the second attempt):
/// `base * 2^(retry - 1)`, at most `max`.
fn backoff_ceiling(base: Duration, max: Duration, retry: u32) -> Duration {
    let factor = 2u32.saturating_pow(retry.saturating_sub(1));
    base.saturating_mul(factor).min(max)
}

/// Full jitter: a uniformly random wait between zero and `ceiling`, so that retries from
/// several callers spread out instead of arriving together.
fn full_jitter(ceiling: Duration) -> Duration {
    let ceiling_ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::rng().random_range(0..=ceiling_ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actuator::{Actuator, Target};
    use hyper::service::service_fn;
    use hyper::Response;
    use serde_json::{json, Value};
    use std::collections::VecDeque;
    use std::sync::Arc;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;
    use tokio::task::JoinSet;

    /// How long a test waits for something that should happen at once.
    const DEADLINE: Duration = Duration::from_secs(10);

    /// A webhook receiver on 127.0.0.1:0 answering with scripted statuses (then 200) and
    /// handing every posted body to the test.
    struct Receiver {
        url: String,
        bodies: mpsc::UnboundedReceiver<Value>,
        _server: AbortOnDropHandle<()>,
    }

    async fn start_receiver(script: &[(u16, &'static str)]) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/hooks/scale?team=a",
            listener.local_addr().unwrap()
        );
        let script = Arc::new(parking_lot::Mutex::new(
            script.iter().copied().collect::<VecDeque<_>>(),
        ));
        let (tx, bodies) = mpsc::unbounded_channel();
        let server = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (script, tx) = (script.clone(), tx.clone());
                let service = service_fn(move |request: Request<Incoming>| {
                    let (script, tx) = (script.clone(), tx.clone());
                    async move {
                        assert_eq!(request.method(), hyper::Method::POST);
                        assert_eq!(request.uri(), "/hooks/scale?team=a");
                        assert_eq!(request.headers()[CONTENT_TYPE], "application/json");
                        let body = request.into_body().collect().await?.to_bytes();
                        tx.send(serde_json::from_slice::<Value>(&body).unwrap())
                            .unwrap();
                        let (status, text) = script.lock().pop_front().unwrap_or((200, "ok"));
                        let mut response = Response::new(Full::new(Bytes::from(text)));
                        *response.status_mut() = StatusCode::from_u16(status).unwrap();
                        Ok::<_, hyper::Error>(response)
                    }
                });
                connections.spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        Receiver {
            url,
            bodies,
            _server: AbortOnDropHandle::new(server),
        }
    }

    impl Receiver {
        async fn next_body(&mut self) -> Value {
            tokio::time::timeout(DEADLINE, self.bodies.recv())
                .await
                .expect("the receiver got a POST in time")
                .unwrap()
        }

        fn posts_so_far(&mut self) -> usize {
            std::iter::from_fn(|| self.bodies.try_recv().ok()).count()
        }
    }

    fn fast(url: &str) -> WebhookSettings {
        WebhookSettings {
            attempt_timeout: Duration::from_millis(500),
            backoff_base: Duration::from_millis(5),
            backoff_max: Duration::from_millis(20),
            ..WebhookSettings::new(url)
        }
    }

    fn target() -> Target {
        Target {
            worker_id: "w-3".into(),
            instance_id: Some("i-0abc".into()),
        }
    }

    fn failure_message(result: Result<(), ActuatorError>) -> String {
        match result {
            Err(ActuatorError::Failed {
                actuator: "webhook",
                message,
                ..
            }) => message,
            other => panic!("expected a webhook failure, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn posts_one_json_document_per_call() {
        let mut receiver = start_receiver(&[]).await;
        let webhook = Webhook::new(fast(&receiver.url)).unwrap();
        let before = unix_ms();

        webhook
            .set_desired(5, "utilisation 0.91 above 0.80")
            .await
            .unwrap();
        let body = receiver.next_body().await;
        let sent_at_ms = body["sent_at_ms"].as_u64().unwrap();
        assert!(sent_at_ms >= before && sent_at_ms <= unix_ms());
        assert_eq!(
            body,
            json!({"event": "set_desired", "desired": 5, "reason": "utilisation 0.91 above 0.80",
                   "sent_at_ms": sent_at_ms})
        );

        webhook.drain_started(&target(), 4).await.unwrap();
        let body = receiver.next_body().await;
        assert_eq!(body["event"], "drain_started");
        assert_eq!(body["desired"], 4);
        assert_eq!(
            body["worker"],
            json!({"worker_id": "w-3", "instance_id": "i-0abc"})
        );
        assert!(body["reason"].as_str().unwrap().contains("draining"));

        let no_instance = Target {
            worker_id: "w-4".into(),
            instance_id: None,
        };
        webhook.drain_progress(&no_instance).await.unwrap();
        let body = receiver.next_body().await;
        assert_eq!(body["event"], "drain_progress");
        assert_eq!(body.get("desired"), None);
        assert_eq!(
            body["worker"],
            json!({"worker_id": "w-4", "instance_id": null})
        );

        webhook.drained(&target()).await.unwrap();
        assert_eq!(receiver.next_body().await["event"], "drained");
    }

    #[tokio::test]
    async fn retries_after_a_server_error_and_then_succeeds() {
        let mut receiver = start_receiver(&[(500, "busy"), (503, "still busy")]).await;
        let webhook = Webhook::new(fast(&receiver.url)).unwrap();

        webhook.drained(&target()).await.unwrap();

        let first = receiver.next_body().await;
        assert_eq!(
            receiver.next_body().await,
            first,
            "a retry posts the same document"
        );
        assert_eq!(receiver.next_body().await, first);
        assert_eq!(receiver.posts_so_far(), 0);
    }

    #[tokio::test]
    async fn fails_with_status_and_body_after_all_attempts() {
        let long_body: &'static str = "overloaded, try later. ".repeat(50).leak();
        let mut receiver = start_receiver(&[(500, long_body); 5]).await;
        let webhook = Webhook::new(fast(&receiver.url)).unwrap();

        let message = failure_message(webhook.set_desired(7, "load").await);

        assert!(message.contains("HTTP 500 Internal Server Error: overloaded, try later."));
        assert!(message.contains("attempt 3 of 3"), "{message}");
        assert!(
            message.len() < BODY_EXCERPT_BYTES + 200,
            "the excerpt is bounded: {message}"
        );
        for _ in 0..3 {
            receiver.next_body().await;
        }
        assert_eq!(receiver.posts_so_far(), 0, "no fourth attempt");
    }

    #[tokio::test]
    async fn a_client_error_is_not_retried() {
        let mut receiver = start_receiver(&[(400, "unknown event")]).await;
        let webhook = Webhook::new(fast(&receiver.url)).unwrap();

        let message = failure_message(webhook.drain_progress(&target()).await);

        assert!(
            message.contains("HTTP 400 Bad Request: unknown event"),
            "{message}"
        );
        assert!(message.contains("attempt 1 of 3"), "{message}");
        receiver.next_body().await;
        assert_eq!(receiver.posts_so_far(), 0);
    }

    #[tokio::test]
    async fn an_attempt_that_gets_no_response_times_out() {
        // Accepts connections and never answers.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let (accepted_tx, mut accepted) = mpsc::unbounded_channel();
        let _silent = AbortOnDropHandle::new(tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                accepted_tx.send(stream).unwrap();
            }
        }));
        let settings = WebhookSettings {
            attempts: 2,
            attempt_timeout: Duration::from_millis(100),
            ..fast(&url)
        };
        let webhook = Webhook::new(settings).unwrap();

        let result = tokio::time::timeout(DEADLINE, webhook.set_desired(3, "load")).await;
        let message = failure_message(result.expect("the timeout bounds the call"));

        assert!(
            message.contains("no response within the attempt timeout of 100ms"),
            "{message}"
        );
        assert!(message.contains("attempt 2 of 2"), "{message}");
        for _ in 0..2 {
            let connection = tokio::time::timeout(DEADLINE, accepted.recv()).await;
            assert!(connection.is_ok(), "one connection per attempt");
        }
        assert!(accepted.try_recv().is_err(), "no third attempt");
    }

    #[tokio::test]
    async fn a_refused_connection_fails_after_all_attempts() {
        let port = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let webhook = Webhook::new(fast(&format!("http://127.0.0.1:{port}/"))).unwrap();

        let message = failure_message(webhook.set_desired(3, "load").await);

        assert!(
            message.contains(&format!("connect to 127.0.0.1:{port}")),
            "{message}"
        );
        assert!(message.contains("attempt 3 of 3"), "{message}");
    }

    #[test]
    fn construction_refuses_bad_settings() {
        let https = WebhookSettings::new("https://hooks.example.com/scale");
        assert_eq!(
            Webhook::new(https).unwrap_err(),
            WebhookError::Https("https://hooks.example.com/scale".into())
        );
        for url in [
            "not a url",
            "ftp://example.com/",
            "/relative",
            "http://user:pw@host/",
        ] {
            let error = Webhook::new(WebhookSettings::new(url)).unwrap_err();
            assert!(
                matches!(error, WebhookError::BadUrl { .. }),
                "{url}: {error}"
            );
        }
        let zero = WebhookSettings {
            attempts: 0,
            ..WebhookSettings::new("http://h/")
        };
        assert_eq!(Webhook::new(zero).unwrap_err(), WebhookError::Attempts(0));
        let many = WebhookSettings {
            attempts: 11,
            ..WebhookSettings::new("http://h/")
        };
        assert_eq!(Webhook::new(many).unwrap_err(), WebhookError::Attempts(11));
        let instant = WebhookSettings {
            attempt_timeout: Duration::ZERO,
            ..WebhookSettings::new("http://h/")
        };
        assert_eq!(
            Webhook::new(instant).unwrap_err(),
            WebhookError::ZeroTimeout
        );
    }

    #[test]
    fn url_parts() {
        let webhook = Webhook::new(WebhookSettings::new("http://[::1]:8080")).unwrap();
        assert_eq!((webhook.host.as_str(), webhook.port), ("::1", 8080));
        assert_eq!(webhook.host_header, "[::1]:8080");
        assert_eq!(webhook.path_and_query, "/");
        let webhook = Webhook::new(WebhookSettings::new("http://hooks.internal/a?b=c")).unwrap();
        assert_eq!(
            (webhook.host.as_str(), webhook.port),
            ("hooks.internal", 80)
        );
        assert_eq!(webhook.path_and_query, "/a?b=c");
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let (base, max) = (Duration::from_millis(200), Duration::from_secs(5));
        let ceilings: Vec<_> = (1..=7)
            .map(|retry| backoff_ceiling(base, max, retry))
            .collect();
        let ms: Vec<_> = ceilings.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(backoff_ceiling(base, max, 200), max, "no overflow");
        for _ in 0..100 {
            assert!(full_jitter(Duration::from_millis(30)) <= Duration::from_millis(30));
        }
        assert_eq!(full_jitter(Duration::ZERO), Duration::ZERO);
    }
}
