//! Access control end to end on a real worker: tokens presented each way a client can, the
//! close codes for missing, invalid and expired tokens (also expiring while connected), topic
//! permissions, anonymous topics, key rotation, the Origin allowlist, and a token carried
//! through the proxy.

use anyhow::Result;
use harness::client::raw_upgrade;
use harness::fleet::TestProxy;
use harness::{eventually, Publisher, TestWorker, WsClient};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use protocol::client::{close, TopicPattern};
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const SECRET_A: &[u8] = b"first-secret-first-secret-first-secret";
const SECRET_B: &[u8] = b"second-secret-second-secret-second-sec";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A secret file in a fresh temporary directory (removed with the test process's temp dir).
fn secret_file(secret: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "pushfleet-access-it-{}-{}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("secret");
    std::fs::write(&path, secret).unwrap();
    path
}

fn key(id: &str, secret: &[u8]) -> worker::access::KeySpec {
    format!(
        "id={id},alg=HS256,secret-file={}",
        secret_file(secret).display()
    )
    .parse()
    .unwrap()
}

fn token(kid: &str, secret: &[u8], claims: serde_json::Value) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(kid.into());
    encode(&header, &claims, &EncodingKey::from_secret(secret).unwrap()).unwrap()
}

fn fan_token(exp: u64) -> String {
    token(
        "a",
        SECRET_A,
        json!({"exp": exp, "sub": "fan-1", "topics": ["match.*"]}),
    )
}

/// A worker that requires tokens signed by key `a`.
async fn strict_worker() -> Result<TestWorker> {
    TestWorker::start(|c| {
        c.auth_keys = vec![key("a", SECRET_A)];
        c.auth_required = true;
        c.auth_leeway = Duration::ZERO;
    })
    .await
}

/// Connects with `header` (e.g. the bearer subprotocol) and reads the first frame: the
/// welcome (`Ok`), or the close code (`Err`).
async fn first_answer(w: &TestWorker, path: &str, header: &str) -> Result<Answer> {
    let headers: Vec<&str> = if header.is_empty() {
        vec![]
    } else {
        vec![header]
    };
    let mut c = WsClient::connect(w.addr(), path, false, &headers).await?;
    let f = c.recv_frame().await?;
    if f.opcode == 8 {
        return Ok(Answer::Closed(f.close_code().unwrap_or(0)));
    }
    let welcome: serde_json::Value = serde_json::from_slice(&f.payload)?;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    Ok(Answer::Welcomed(Box::new(c)))
}

enum Answer {
    Welcomed(Box<WsClient>),
    Closed(u16),
}

impl Answer {
    fn is_ok(&self) -> bool {
        matches!(self, Answer::Welcomed(_))
    }

    fn client(self) -> WsClient {
        match self {
            Answer::Welcomed(c) => *c,
            Answer::Closed(code) => panic!("closed with {code}, expected a welcome"),
        }
    }

    fn code(self) -> u16 {
        match self {
            Answer::Welcomed(_) => panic!("welcomed, expected a close"),
            Answer::Closed(code) => code,
        }
    }
}

fn bearer(t: &str) -> String {
    format!("Sec-WebSocket-Protocol: pushfleet.bearer.{t}")
}

#[tokio::test]
async fn tokens_are_checked_at_connect_with_a_close_code_for_each_failure() -> Result<()> {
    let w = strict_worker().await?;
    let valid = fan_token(now() + 600);
    // Each way of presenting a token.
    assert!(first_answer(&w, "/ws", &bearer(&valid)).await?.is_ok());
    let auth = format!("Authorization: Bearer {valid}");
    assert!(first_answer(&w, "/ws", &auth).await?.is_ok());
    let query = format!("/ws?access_token={valid}");
    assert!(first_answer(&w, &query, "").await?.is_ok());
    // The bearer subprotocol is never the one selected.
    let c = first_answer(&w, "/ws", &bearer(&valid)).await?.client();
    assert!(!c.response.contains("pushfleet.bearer"), "{}", c.response);
    assert!(c.response.contains("Sec-WebSocket-Protocol: pushfleet.v1"));

    let missing = first_answer(&w, "/ws", "").await?.code();
    assert_eq!(missing, close::UNAUTHORIZED);
    let forged = token("a", SECRET_B, json!({"exp": now() + 600, "topics": ["*"]}));
    let bad = first_answer(&w, "/ws", &bearer(&forged)).await?.code();
    assert_eq!(bad, close::UNAUTHORIZED);
    let unknown = token("zz", SECRET_A, json!({"exp": now() + 600}));
    let bad = first_answer(&w, "/ws", &bearer(&unknown)).await?.code();
    assert_eq!(bad, close::UNAUTHORIZED);
    let expired = first_answer(&w, "/ws", &bearer(&fan_token(now() - 5)))
        .await?
        .code();
    assert_eq!(expired, close::TOKEN_EXPIRED);
    for (reason, n) in [
        ("missing", 1.0),
        ("bad_signature", 1.0),
        ("unknown_key", 1.0),
        ("expired", 1.0),
    ] {
        let m = w.metric(&format!("worker_auth_failures_total{{reason=\"{reason}\""));
        assert_eq!(m, n, "{reason}");
    }
    Ok(())
}

#[tokio::test]
async fn a_token_allows_its_topics_only() -> Result<()> {
    let w = strict_worker().await?;
    let mut c = first_answer(&w, "/ws", &bearer(&fan_token(now() + 600)))
        .await?
        .client();
    c.subscribe("match.1").await?;
    c.send_json(json!({"op": "subscribe", "id": 2, "prefix": "match."}))
        .await?;
    assert_eq!(c.recv_json().await?["type"], "ack");
    for (n, request) in [
        json!({"op": "subscribe", "id": 3, "topic": "admin.audit"}),
        json!({"op": "subscribe", "id": 4, "prefix": "m"}),
        json!({"op": "subscribe", "id": 5, "prefix": "match"}),
    ]
    .into_iter()
    .enumerate()
    {
        c.send_json(request.clone()).await?;
        let reply = c.recv_json().await?;
        assert_eq!(reply["type"], "error", "{request}: {reply}");
        assert_eq!(reply["code"], "forbidden", "{request}: {reply}");
        assert_eq!(reply["id"], 3 + n as u64);
    }
    // The connection stays, with what it was allowed.
    c.subscribe("match.2").await?;
    Ok(())
}

#[tokio::test]
async fn a_token_that_expires_while_connected_closes_the_connection_with_4402() -> Result<()> {
    let w = strict_worker().await?;
    let mut c = first_answer(&w, "/ws", &bearer(&fan_token(now() + 2)))
        .await?
        .client();
    c.subscribe("match.1").await?;
    c.read_timeout = Duration::from_secs(10);
    assert_eq!(c.expect_close().await?, close::TOKEN_EXPIRED);
    eventually(Duration::from_secs(5), "the expiry counted", || async {
        w.metric("worker_auth_failures_total{reason=\"expired\"") == 1.0
    })
    .await
}

#[tokio::test]
async fn without_a_token_anonymous_topics_only_and_a_bad_token_is_never_downgraded() -> Result<()> {
    let w = TestWorker::start(|c| {
        c.auth_keys = vec![key("a", SECRET_A)];
        c.anonymous_topics = vec![TopicPattern::parse("public.*", "test").unwrap()];
    })
    .await?;
    let mut anonymous = first_answer(&w, "/ws", "").await?.client();
    anonymous.subscribe("public.scores").await?;
    anonymous
        .send_json(json!({"op": "subscribe", "id": 9, "topic": "match.1"}))
        .await?;
    assert_eq!(anonymous.recv_json().await?["code"], "forbidden");
    let mut fan = first_answer(&w, "/ws", &bearer(&fan_token(now() + 600)))
        .await?
        .client();
    fan.subscribe("match.1").await?;
    fan.subscribe("public.scores").await?;
    let garbage = first_answer(&w, "/ws", &bearer("not.a.token")).await?;
    assert_eq!(garbage.code(), close::UNAUTHORIZED);
    Ok(())
}

#[tokio::test]
async fn two_keys_rotate_and_a_removed_key_stops_verifying() -> Result<()> {
    let both = TestWorker::start(|c| {
        c.auth_keys = vec![key("a", SECRET_A), key("b", SECRET_B)];
        c.auth_required = true;
    })
    .await?;
    let old = fan_token(now() + 600);
    let new = token(
        "b",
        SECRET_B,
        json!({"exp": now() + 600, "topics": ["match.*"]}),
    );
    assert!(first_answer(&both, "/ws", &bearer(&old)).await?.is_ok());
    assert!(first_answer(&both, "/ws", &bearer(&new)).await?.is_ok());
    let rotated = TestWorker::start(|c| {
        c.auth_keys = vec![key("b", SECRET_B)];
        c.auth_required = true;
    })
    .await?;
    assert!(first_answer(&rotated, "/ws", &bearer(&new)).await?.is_ok());
    let refused = first_answer(&rotated, "/ws", &bearer(&old)).await?;
    assert_eq!(refused.code(), close::UNAUTHORIZED);
    Ok(())
}

#[tokio::test]
async fn origins_off_the_allowlist_get_403_before_the_upgrade() -> Result<()> {
    let w = TestWorker::start(|c| {
        c.allowed_origins = vec![
            "https://app.example.com".into(),
            "https://*.fans.example".into(),
        ];
    })
    .await?;
    let status = |origin: &str| {
        let header = if origin.is_empty() {
            String::new()
        } else {
            format!("Origin: {origin}\r\n")
        };
        let request = format!("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{header}\r\n");
        let addr = w.addr();
        async move {
            let (head, _, _) = raw_upgrade(addr, &request).await?;
            anyhow::Ok(head)
        }
    };
    let evil = status("https://evil.example").await?;
    assert!(evil.starts_with("HTTP/1.1 403"), "{evil}");
    assert!(status("https://app.example.com")
        .await?
        .starts_with("HTTP/1.1 101"));
    assert!(status("https://tv.fans.example")
        .await?
        .starts_with("HTTP/1.1 101"));
    assert!(status("").await?.starts_with("HTTP/1.1 101"));
    assert_eq!(
        w.metric("worker_handshake_failures_total{reason=\"forbidden_origin\""),
        1.0
    );
    Ok(())
}

#[tokio::test]
async fn a_token_passes_through_the_proxy_and_messages_follow() -> Result<()> {
    let mut publisher = Publisher::bind().await?;
    let endpoint = publisher.endpoint.clone();
    let w = TestWorker::start(|c| {
        c.publishers = vec![endpoint];
        c.auth_keys = vec![key("a", SECRET_A)];
        c.auth_required = true;
    })
    .await?;
    let proxy = TestProxy::start(&[w.addr()], |_| {}).await?;
    let valid = bearer(&fan_token(now() + 600));
    let mut c = WsClient::connect(proxy.addr(), "/ws", true, &[&valid]).await?;
    assert_eq!(c.recv_json().await?["type"], "welcome");
    c.subscribe("match.1").await?;
    publisher.prime(&mut c, "match.1").await?;
    let mut refused = WsClient::connect(proxy.addr(), "/ws", false, &[]).await?;
    assert_eq!(refused.expect_close().await?, close::UNAUTHORIZED);
    Ok(())
}
