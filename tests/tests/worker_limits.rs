//! Every limit and bad input gets its own answer: an HTTP status before the upgrade, an error
//! code for a bad request, or a close code for a broken or oversized frame.

use anyhow::Result;
use harness::client::raw_upgrade;
use harness::{eventually, TestWorker, WsClient};
use protocol::client::close;
use serde_json::json;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn upgrade_request(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n")
}

async fn status_of(w: &TestWorker, request: &str) -> Result<u16> {
    let (head, _, _) = raw_upgrade(w.addr(), request).await?;
    Ok(head.split(' ').nth(1).unwrap_or("0").parse()?)
}

#[tokio::test]
async fn bad_handshakes_get_their_http_status() -> Result<()> {
    let w = TestWorker::start(|c| c.max_handshake_bytes = 2048).await?;
    assert_eq!(status_of(&w, &upgrade_request("/ws", "")).await?, 101);
    assert_eq!(status_of(&w, &upgrade_request("/nope", "")).await?, 404);
    let wrong_version = upgrade_request("/ws", "").replace("Version: 13", "Version: 8");
    assert_eq!(status_of(&w, &wrong_version).await?, 426);
    let plain_http = "GET /ws HTTP/1.1\r\nHost: x\r\n\r\n";
    assert_eq!(status_of(&w, plain_http).await?, 426);
    let post = upgrade_request("/ws", "").replacen("GET", "POST", 1);
    assert_eq!(status_of(&w, &post).await?, 405);
    let no_key = upgrade_request("/ws", "").replace(KEY, "bad");
    assert_eq!(status_of(&w, &no_key).await?, 400);
    let garbage = "\u{1}\u{2} nonsense\r\n\r\n";
    assert_eq!(status_of(&w, garbage).await?, 400);
    let huge = upgrade_request("/ws", &format!("X-Big: {}\r\n", "a".repeat(4000)));
    assert_eq!(status_of(&w, &huge).await?, 431);
    let other_protocol = upgrade_request("/ws", "Sec-WebSocket-Protocol: mqtt\r\n");
    assert_eq!(status_of(&w, &other_protocol).await?, 400);
    // The echo endpoint exists only when configured.
    assert_eq!(status_of(&w, &upgrade_request("/echo", "")).await?, 404);
    assert!(w.metric("worker_handshake_failures_total") >= 8.0);
    Ok(())
}

#[tokio::test]
async fn a_slowloris_handshake_gets_408() -> Result<()> {
    let w = TestWorker::start(|c| c.handshake_timeout = Duration::from_millis(300)).await?;
    let (head, _, _) = raw_upgrade(w.addr(), "GET /ws HTTP/1.1\r\nHost: x\r\n").await?;
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    Ok(())
}

#[tokio::test]
async fn bad_requests_get_error_codes_and_the_connection_stays() -> Result<()> {
    let w = TestWorker::start(|c| {
        c.max_subscriptions = 2;
        c.max_topic_bytes = 10;
    })
    .await?;
    let mut c = w.client(false).await?;
    let cases = [
        ("not json".to_string(), "bad_json"),
        (
            json!({"op": "publish", "topic": "a"}).to_string(),
            "unknown_op",
        ),
        (json!({"op": "subscribe"}).to_string(), "bad_request"),
        (
            json!({"op": "subscribe", "topic": "a\u{7}"}).to_string(),
            "invalid_topic",
        ),
        (
            json!({"op": "subscribe", "topic": "x".repeat(11)}).to_string(),
            "topic_too_long",
        ),
        (
            json!({"op": "unsubscribe", "topic": "never"}).to_string(),
            "not_subscribed",
        ),
    ];
    for (request, code) in cases {
        c.send_text(&request).await?;
        let reply = c.recv_json().await?;
        assert_eq!(reply["type"], "error", "{request}");
        assert_eq!(reply["code"], code, "{request}: {reply}");
    }
    c.subscribe("a").await?;
    c.send_json(json!({"op": "subscribe", "id": 7, "prefix": "b."}))
        .await?;
    assert_eq!(c.recv_json().await?["type"], "ack");
    c.send_json(json!({"op": "subscribe", "id": 8, "topic": "c"}))
        .await?;
    let reply = c.recv_json().await?;
    assert_eq!(reply["code"], "too_many_subscriptions");
    assert_eq!(reply["id"], 8);
    assert!(reply["message"]
        .as_str()
        .unwrap()
        .contains("max_subscriptions is 2"));
    c.send_json(json!({"op": "ping", "id": 9})).await?;
    assert_eq!(c.recv_json().await?, json!({"type": "pong", "id": 9}));
    assert_eq!(
        w.metric("worker_client_errors_total{code=\"bad_json\""),
        1.0
    );
    Ok(())
}

/// Frames to send, each as (first header byte, payload).
type Frames = Vec<(u8, Vec<u8>)>;

async fn close_code_after(w: &TestWorker, deflate: bool, send: &Frames) -> Result<u16> {
    let mut c = w.client(deflate).await?;
    for (b0, payload) in send {
        c.send_frame(*b0, payload).await?;
    }
    c.expect_close().await
}

#[tokio::test]
async fn broken_and_oversized_frames_close_with_their_codes() -> Result<()> {
    let w = TestWorker::start(|c| {
        c.max_frame_bytes = 1000;
        c.max_message_bytes = 1500;
        c.max_decompressed_bytes = 10_000;
    })
    .await?;
    let cases: Vec<(&str, bool, Frames, u16)> = vec![
        (
            "oversized frame",
            false,
            vec![(0x81, vec![b' '; 1001])],
            close::MESSAGE_TOO_BIG,
        ),
        (
            "oversized message",
            false,
            vec![(0x01, vec![b' '; 1000]), (0x80, vec![b' '; 600])],
            close::MESSAGE_TOO_BIG,
        ),
        (
            "invalid UTF-8",
            false,
            vec![(0x81, vec![0xC3, 0x28])],
            close::INVALID_UTF8,
        ),
        (
            "binary on pushfleet.v1",
            false,
            vec![(0x82, vec![1, 2])],
            close::UNSUPPORTED_DATA,
        ),
        (
            "reserved opcode",
            false,
            vec![(0x83, vec![])],
            close::PROTOCOL_ERROR,
        ),
        (
            "RSV1 without deflate",
            false,
            vec![(0xC1, vec![0])],
            close::PROTOCOL_ERROR,
        ),
        (
            "stray continuation",
            false,
            vec![(0x80, vec![1])],
            close::PROTOCOL_ERROR,
        ),
        (
            "fragmented ping",
            false,
            vec![(0x09, vec![])],
            close::PROTOCOL_ERROR,
        ),
        (
            "deflate bomb",
            true,
            vec![(
                0xC1,
                worker::ws::deflate::deflate(&vec![b'a'; 1 << 20], 9, 15),
            )],
            close::MESSAGE_TOO_BIG,
        ),
        (
            "corrupt deflate",
            true,
            vec![(0xC1, vec![0xFF; 10])],
            close::INVALID_UTF8,
        ),
    ];
    for (what, deflate, frames, expected) in cases {
        let code = close_code_after(&w, deflate, &frames).await?;
        assert_eq!(code, expected, "{what}");
    }
    eventually(Duration::from_secs(10), "every connection closed", || {
        let open = w.metric("worker_connections");
        async move { open == 0.0 }
    })
    .await
}

#[tokio::test]
async fn compressed_requests_are_understood() -> Result<()> {
    let w = TestWorker::start(|_| {}).await?;
    let mut c = w.client(true).await?;
    let request = json!({"op": "ping", "id": 3}).to_string();
    c.send_frame(
        0xC1,
        &worker::ws::deflate::deflate(request.as_bytes(), 6, 15),
    )
    .await?;
    assert_eq!(c.recv_json().await?, json!({"type": "pong", "id": 3}));
    Ok(())
}

#[tokio::test]
async fn twenty_bad_requests_in_a_row_close_with_1008() -> Result<()> {
    let w = TestWorker::start(|_| {}).await?;
    let mut c = w.client(false).await?;
    for _ in 0..20 {
        c.send_text("{").await?;
    }
    assert_eq!(c.expect_close().await?, close::POLICY_VIOLATION);
    Ok(())
}

#[tokio::test]
async fn idle_and_keepalive_timeouts_have_their_codes() -> Result<()> {
    let w = TestWorker::start(|c| c.idle_timeout = Duration::from_millis(300)).await?;
    let mut c = w.client(false).await?;
    assert_eq!(c.expect_close().await?, close::IDLE_TIMEOUT);

    let w = TestWorker::start(|c| {
        c.ping_interval = Duration::from_millis(100);
        c.pong_timeout = Duration::from_millis(300);
    })
    .await?;
    let mut c = w.client(false).await?;
    // Read frames without answering pings.
    let code = loop {
        let f = c.recv_frame().await?;
        if f.opcode == 8 {
            break f.close_code();
        }
    };
    assert_eq!(code, Some(close::KEEPALIVE_TIMEOUT));

    // A client that answers pings stays connected past several ping intervals.
    let mut c = w.client(false).await?;
    for _ in 0..6 {
        let f = c.recv_frame().await?;
        assert_eq!(f.opcode, 9, "expected a ping, got {f:?}");
        c.send_frame(0x8A, &f.payload).await?;
    }
    c.send_json(json!({"op": "ping", "id": 1})).await?;
    assert_eq!(c.recv_json().await?["type"], "pong");
    Ok(())
}

#[tokio::test]
async fn max_connections_answers_503_before_the_upgrade() -> Result<()> {
    let w = TestWorker::start(|c| c.max_connections = 2).await?;
    let _a = w.client(false).await?;
    let _b = w.client(false).await?;
    let err = WsClient::connect(w.addr(), "/ws", false, &[])
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("503"), "{err}");
    assert!(err.to_string().contains("Retry-After"), "{err}");
    Ok(())
}

#[tokio::test]
async fn a_client_vanishing_mid_frame_is_cleaned_up() -> Result<()> {
    let w = TestWorker::start(|_| {}).await?;
    let mut c = w.client(false).await?;
    c.subscribe("t").await?;
    c.send_raw(&[0x81, 0xFE, 0x01]).await?;
    c.stream().shutdown().await?;
    drop(c);
    eventually(
        Duration::from_secs(10),
        "connection and subscription released",
        || {
            let (open, subs) = (
                w.metric("worker_connections"),
                w.metric("worker_subscriptions"),
            );
            async move { open == 0.0 && subs == 0.0 }
        },
    )
    .await
}
