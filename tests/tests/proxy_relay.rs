//! The proxy's connection path with real workers (and, where the worker's view must be read
//! byte for byte, a stand-in worker that records what reaches it): placement on the static
//! `--worker` list, relaying, forwarding headers, retries, refusals and the SIGTERM drain.

use anyhow::{Context, Result};
use harness::client::raw_upgrade;
use harness::fleet::TestProxy;
use harness::{eventually, http_request, metric_value, Publisher, TestWorker};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(15);
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn upgrade_request(extra: &str) -> String {
    format!("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n")
}

/// The proxy's (or worker's) answer to `request`: its status and whole head.
async fn answer(addr: SocketAddr, request: &str) -> Result<(u16, String, String)> {
    let (head, mut stream, rest) = raw_upgrade(addr, request).await?;
    let status = head.split(' ').nth(1).unwrap_or("0").parse()?;
    let mut rest = rest.to_vec();
    // A refusal's body (whoever answered closes after it).
    if status != 101 {
        let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await;
    }
    Ok((status, head, String::from_utf8_lossy(&rest).into_owned()))
}

/// An address on which nothing listens (connections are refused).
async fn dead_address() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    Ok(l.local_addr()?)
}

/// One server frame exactly as it came off the wire.
async fn raw_frame(stream: &mut TcpStream) -> Result<Vec<u8>> {
    let read = async {
        let mut frame = vec![0u8; 2];
        stream.read_exact(&mut frame).await?;
        let extra = match frame[1] & 0x7F {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mut ext = vec![0u8; extra];
        stream.read_exact(&mut ext).await?;
        frame.extend_from_slice(&ext);
        let len = match extra {
            0 => (frame[1] & 0x7F) as usize,
            2 => u16::from_be_bytes([ext[0], ext[1]]) as usize,
            _ => u64::from_be_bytes(ext[..].try_into()?) as usize,
        };
        let mut payload = vec![0u8; len];
        stream.read_exact(&mut payload).await?;
        frame.extend_from_slice(&payload);
        anyhow::Ok(frame)
    };
    tokio::time::timeout(WAIT, read)
        .await
        .context("no frame in time")?
}

/// A stand-in worker: for each connection it sends what came before the end of the request
/// head (a PROXY v2 header included) to the channel, answers 101, then echoes every byte,
/// the ones that came with the head first.
async fn recording_worker() -> Result<(SocketAddr, mpsc::Receiver<Vec<u8>>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let end = loop {
                    // A PROXY v2 header has its own CRLFs: look for the head after it.
                    let from = if buf.starts_with(&proxy::forward::PROXY_V2_SIGNATURE)
                        && buf.len() >= 16
                    {
                        16 + u16::from_be_bytes([buf[14], buf[15]]) as usize
                    } else {
                        0
                    };
                    if let Some(i) = buf
                        .get(from..)
                        .and_then(|b| b.windows(4).position(|w| w == b"\r\n\r\n"))
                    {
                        break from + i + 4;
                    }
                    if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                        return;
                    }
                };
                let _ = tx.send(buf[..end].to_vec()).await;
                let answer = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
                let _ = s.write_all(answer.as_bytes()).await;
                let _ = s.write_all(&buf[end..]).await;
                let (mut rd, mut wr) = s.split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
            });
        }
    });
    Ok((addr, rx))
}

async fn recorded(rx: &mut mpsc::Receiver<Vec<u8>>) -> Result<Vec<u8>> {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .context("nothing reached the worker")?
        .context("worker gone")
}

#[tokio::test]
async fn clients_through_the_proxy_are_welcomed_subscribe_and_receive() -> Result<()> {
    let mut publisher = Publisher::bind().await?;
    let mut workers = Vec::new();
    for i in 0..3 {
        let endpoint = publisher.endpoint.clone();
        workers.push(
            TestWorker::start(|c| {
                c.id = Some(format!("w{i}"));
                c.publishers = vec![endpoint];
            })
            .await?,
        );
    }
    let addrs: Vec<SocketAddr> = workers.iter().map(TestWorker::addr).collect();
    let p = TestProxy::start(&addrs, |_| {}).await?;
    let mut clients = Vec::new();
    for i in 0..6 {
        let mut c = p.client(i % 2 == 0).await?;
        c.subscribe("match.7").await?;
        clients.push(c);
    }
    for c in clients.iter_mut() {
        publisher.prime(c, "match.7").await?;
    }
    let goal = publisher
        .publish("match.7", br#"{"goal":"home"}"#)
        .await?
        .offset;
    for c in clients.iter_mut() {
        let m = c.read_until(goal).await?;
        assert_eq!(m["payload"]["goal"], "home");
    }
    let open: f64 = workers.iter().map(|w| w.metric("worker_connections")).sum();
    assert_eq!(open, 6.0, "every client is held by a worker");
    assert_eq!(p.metric("proxy_placements_total"), 6.0);
    assert_eq!(p.metric("proxy_placements_total{mode=\"static\""), 6.0);
    assert_eq!(p.metric("proxy_placement_mode{mode=\"static\"}"), 1.0);
    assert_eq!(p.metric("proxy_connections_active"), 6.0);
    assert!(p.metric("proxy_relay_bytes_total{direction=\"to_worker\"}") > 0.0);
    assert!(p.metric("proxy_relay_bytes_total{direction=\"to_client\"}") > 0.0);
    assert_eq!(p.metric("proxy_connect_retries_total"), 0.0);

    // A client leaving frees its slot and ends its relay.
    drop(clients.pop());
    eventually(WAIT, "relay ended and slot freed", || {
        let (ended, active) = (
            p.metric("proxy_relays_ended_total"),
            p.metric("proxy_connections_active"),
        );
        async move { ended == 1.0 && active == 5.0 }
    })
    .await
}

#[tokio::test]
async fn compressed_frames_arrive_byte_for_byte_as_the_worker_sent_them() -> Result<()> {
    let (mut publisher, w) = TestWorker::with_publisher(|c| c.compression_min_bytes = 64).await?;
    let p = TestProxy::start(&[w.addr()], |_| {}).await?;
    let mut direct = w.client(true).await?;
    let mut relayed = p.client(true).await?;
    assert!(
        relayed.deflate,
        "permessage-deflate negotiated through the proxy"
    );
    assert_eq!(
        relayed
            .response
            .lines()
            .find(|l| l.starts_with("Sec-WebSocket-Extensions")),
        direct
            .response
            .lines()
            .find(|l| l.starts_with("Sec-WebSocket-Extensions")),
        "the worker's 101 passes untouched"
    );
    direct.subscribe("big").await?;
    relayed.subscribe("big").await?;
    publisher.prime(&mut direct, "big").await?;
    // Everything before this marker is read by both: their read buffers are empty after it.
    let marker = publisher
        .publish("big", br#"{"marker":true}"#)
        .await?
        .offset;
    direct.read_until(marker).await?;
    relayed.read_until(marker).await?;

    let body = serde_json::json!({"text": "a long commentary line ".repeat(200)}).to_string();
    publisher.publish("big", body.as_bytes()).await?;
    let want = raw_frame(direct.stream()).await?;
    let got = raw_frame(relayed.stream()).await?;
    assert_eq!(want[0] & 0x40, 0x40, "the worker sent it compressed (RSV1)");
    assert!(want.len() < body.len(), "compressed");
    assert_eq!(
        got, want,
        "the relayed frame is the worker's frame, byte for byte"
    );
    Ok(())
}

#[tokio::test]
async fn the_worker_sees_the_client_in_x_forwarded_for_and_the_head_otherwise_unchanged(
) -> Result<()> {
    let (worker, mut heads) = recording_worker().await?;
    let p = TestProxy::start(&[worker], |_| {}).await?;
    let sent = upgrade_request(
        "X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\nX-Odd:  kept  as\tsent \r\n",
    );
    let (status, _, _) = answer(p.addr(), &sent).await?;
    assert_eq!(status, 101);
    let seen = String::from_utf8(recorded(&mut heads).await?)?;
    let want = upgrade_request(
        "X-Forwarded-For: 203.0.113.7, 127.0.0.1\r\nX-Odd:  kept  as\tsent \r\nX-Forwarded-Proto: http\r\n",
    );
    assert_eq!(seen, want);
    Ok(())
}

#[tokio::test]
async fn bytes_after_the_upgrade_pass_unchanged_both_ways() -> Result<()> {
    let (worker, mut heads) = recording_worker().await?;
    let p = TestProxy::start(&[worker], |c| c.relay_buffer_bytes = 1024).await?;
    let mut s = TcpStream::connect(p.addr()).await?;
    // Bytes right behind the head (in the same write) are forwarded too.
    let early: Vec<u8> = (0..=255u8).collect();
    let mut first = upgrade_request("").into_bytes();
    first.extend_from_slice(&early);
    s.write_all(&first).await?;
    recorded(&mut heads).await?;
    let response =
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
    let mut got = vec![0u8; response.len() + early.len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut got)).await??;
    assert_eq!(&got[..response.len()], response);
    assert_eq!(&got[response.len()..], &early[..]);

    // Much more than the relay buffer, every byte value, echoed back exactly.
    let bulk: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn({
        let bulk = bulk.clone();
        async move { wr.write_all(&bulk).await.map(|_| wr) }
    });
    let mut echoed = vec![0u8; bulk.len()];
    tokio::time::timeout(WAIT, rd.read_exact(&mut echoed)).await??;
    assert!(echoed == bulk, "echo differs");
    // A half-close reaches the worker, whose close comes back.
    let mut wr = writer.await??;
    wr.shutdown().await?;
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, rd.read_to_end(&mut rest)).await??;
    assert!(rest.is_empty());
    let moved = 256.0 + bulk.len() as f64;
    eventually(WAIT, "bytes counted both ways", || {
        let up = p.metric("proxy_relay_bytes_total{direction=\"to_worker\"}");
        let down = p.metric("proxy_relay_bytes_total{direction=\"to_client\"}");
        async move { up >= moved && down >= moved }
    })
    .await
}

#[tokio::test]
async fn proxy_v2_mode_sends_the_header_first_and_the_head_unchanged() -> Result<()> {
    let (worker, mut heads) = recording_worker().await?;
    let p = TestProxy::start(&[worker], |c| {
        c.forwarded = proxy::config::Forwarded::ProxyV2
    })
    .await?;
    let mut s = TcpStream::connect(p.addr()).await?;
    let client = s.local_addr()?;
    let request = upgrade_request("X-Forwarded-For: 203.0.113.7\r\n");
    s.write_all(request.as_bytes()).await?;
    let seen = recorded(&mut heads).await?;
    let mut want = proxy::forward::PROXY_V2_SIGNATURE.to_vec();
    want.extend_from_slice(&[0x21, 0x11, 0, 12, 127, 0, 0, 1, 127, 0, 0, 1]);
    want.extend_from_slice(&client.port().to_be_bytes());
    want.extend_from_slice(&p.addr().port().to_be_bytes());
    assert_eq!(
        &seen[..28],
        &want[..],
        "PROXY v2: TCP over IPv4, client then proxy"
    );
    assert_eq!(&seen[28..], request.as_bytes(), "the head goes as sent");
    Ok(())
}

#[tokio::test]
async fn a_worker_that_refuses_is_skipped_and_the_client_still_placed() -> Result<()> {
    let w = TestWorker::start(|_| {}).await?;
    let dead = dead_address().await?;
    let p = TestProxy::start(&[dead, w.addr()], |_| {}).await?;
    // Whichever the placer tries first, every client ends up on the live worker.
    let mut clients = Vec::new();
    while p.metric("proxy_connect_retries_total") < 1.0 {
        anyhow::ensure!(clients.len() < 40, "the dead worker was never tried");
        clients.push(p.client(false).await?);
    }
    assert_eq!(w.metric("worker_connections"), clients.len() as f64);
    let failures = format!("proxy_connect_failures_total{{worker=\"{dead}\"}}");
    assert!(p.metric(&failures) >= 1.0);
    assert_eq!(p.metric("proxy_refused_total"), 0.0);
    Ok(())
}

#[tokio::test]
async fn all_workers_down_gets_502() -> Result<()> {
    let (a, b) = (dead_address().await?, dead_address().await?);
    let p = TestProxy::start(&[a, b], |_| {}).await?;
    let (status, head, body) = answer(p.addr(), &upgrade_request("")).await?;
    assert_eq!(status, 502, "{head}{body}");
    assert!(head.contains("Connection: close"), "{head}");
    assert!(body.contains("2 tried"), "{body}");
    assert_eq!(
        p.metric("proxy_refused_total{reason=\"upstream_failed\"}"),
        1.0
    );
    assert_eq!(p.metric("proxy_connect_failures_total"), 2.0);
    assert_eq!(p.metric("proxy_connect_retries_total"), 1.0);
    Ok(())
}

#[tokio::test]
async fn over_max_connections_gets_503_with_retry_after_until_a_slot_frees() -> Result<()> {
    let w = TestWorker::start(|_| {}).await?;
    let p = TestProxy::start(&[w.addr()], |c| {
        c.max_connections = 1;
        c.retry_after_min = Duration::from_secs(2);
        c.retry_after_max = Duration::from_secs(4);
    })
    .await?;
    let first = p.client(false).await?;
    let (status, head, body) = answer(p.addr(), &upgrade_request("")).await?;
    assert_eq!(status, 503, "{head}{body}");
    let retry_after: u64 = head
        .lines()
        .find_map(|l| l.strip_prefix("Retry-After: "))
        .context("Retry-After header")?
        .trim()
        .parse()?;
    assert!((2..=4).contains(&retry_after), "{retry_after}");
    assert!(head.contains("Connection: close"), "{head}");
    assert!(body.contains("--max-connections (1)"), "{body}");
    assert_eq!(p.metric("proxy_refused_total{reason=\"connections\"}"), 1.0);
    assert_eq!(
        w.metric("worker_connections"),
        1.0,
        "the refused one never reached a worker"
    );

    drop(first);
    eventually(WAIT, "the slot is free again", || {
        let active = p.metric("proxy_connections_active");
        async move { active == 0.0 }
    })
    .await?;
    p.client(false).await?;
    Ok(())
}

#[tokio::test]
async fn requests_the_proxy_cannot_relay_get_431_or_400_saying_why() -> Result<()> {
    let w = TestWorker::start(|_| {}).await?;
    let p = TestProxy::start(&[w.addr()], |c| c.max_request_bytes = 1024).await?;
    let huge = upgrade_request(&format!("X-Big: {}\r\n", "a".repeat(2000)));
    let (status, _, body) = answer(p.addr(), &huge).await?;
    assert_eq!(status, 431, "{body}");
    assert!(body.contains("--max-request-bytes (1024 bytes)"), "{body}");

    let plain = "GET /ws HTTP/1.1\r\nHost: x\r\n\r\n";
    let (status, _, body) = answer(p.addr(), plain).await?;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("missing header Upgrade: websocket"), "{body}");
    let post = upgrade_request("").replacen("GET", "POST", 1);
    let (status, _, body) = answer(p.addr(), &post).await?;
    assert_eq!(status, 400, "{body}");

    assert_eq!(
        p.metric("proxy_refused_total{reason=\"request_too_large\"}"),
        1.0
    );
    assert_eq!(p.metric("proxy_refused_total{reason=\"bad_request\"}"), 2.0);
    assert_eq!(
        w.metric("worker_connections_accepted_total"),
        0.0,
        "nothing reached the worker"
    );
    // A request the worker refuses (wrong version) gets the worker's own answer.
    let old = upgrade_request("").replace("Version: 13", "Version: 8");
    let (status, head, _) = answer(p.addr(), &old).await?;
    assert_eq!(status, 426, "{head}");
    assert!(head.contains("Sec-WebSocket-Version: 13"), "{head}");
    Ok(())
}

#[tokio::test]
async fn with_demo_page_plain_gets_of_the_page_and_client_are_answered_and_nothing_else(
) -> Result<()> {
    let w = TestWorker::start(|_| {}).await?;
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    let off = TestProxy::start(&[w.addr()], |_| {}).await?;
    let (status, _, _) = answer(off.addr(), &get("/")).await?;
    assert_eq!(status, 400, "no pages without --demo-page");

    let p = TestProxy::start(&[w.addr()], |c| c.demo_page = true).await?;
    let (status, head, body) = answer(p.addr(), &get("/?matches=5")).await?;
    assert_eq!(status, 200, "{head}");
    assert!(head.contains("Content-Type: text/html"), "{head}");
    assert!(body.contains("/pushfleet.js"), "the page loads the client");
    let (status, head, body) = answer(p.addr(), &get("/pushfleet.js")).await?;
    assert_eq!(status, 200, "{head}");
    assert!(head.contains("Content-Type: text/javascript"), "{head}");
    assert!(body.contains("export class PushfleetClient"));
    let (status, _, body) = answer(p.addr(), &get("/../../etc/passwd")).await?;
    assert_eq!(status, 400, "{body}");
    // Upgrades are relayed as always.
    let mut c = p.client(true).await?;
    c.subscribe("match.1").await?;
    assert_eq!(p.metric("proxy_pages_served_total"), 2.0);
    assert_eq!(p.metric("proxy_refused_total{reason=\"bad_request\"}"), 1.0);
    Ok(())
}

#[tokio::test]
async fn a_slow_request_head_gets_408() -> Result<()> {
    let w = TestWorker::start(|_| {}).await?;
    let p = TestProxy::start(&[w.addr()], |c| {
        c.handshake_timeout = Duration::from_millis(300)
    })
    .await?;
    let (status, head, body) = answer(p.addr(), "GET /ws HTTP/1.1\r\nHost: x\r\n").await?;
    assert_eq!(status, 408, "{head}");
    assert!(body.contains("--handshake-timeout (300ms)"), "{body}");
    assert_eq!(
        p.metric("proxy_refused_total{reason=\"handshake_timeout\"}"),
        1.0
    );
    Ok(())
}

#[tokio::test]
async fn sigterm_fails_readyz_at_once_and_accepts_through_the_unready_grace() -> Result<()> {
    let w = TestWorker::start(|_| {}).await?;
    let grace = Duration::from_millis(1500);
    let p = TestProxy::start(&[w.addr()], |c| {
        c.unready_grace = grace;
        c.drain_timeout = Duration::from_millis(200);
    })
    .await?;
    let admin = p.proxy.admin_addr;
    assert_eq!(http_request(admin, "GET", "/readyz").await?.0, 200);
    let sigterm = Instant::now();
    p.shutdown.cancel();
    eventually(WAIT, "/readyz failing", || async move {
        http_request(admin, "GET", "/readyz")
            .await
            .is_ok_and(|r| r.0 == 503)
    })
    .await?;
    // Load balancers have not noticed yet: a client arriving now is still relayed.
    let mut c = p.client(false).await?;
    c.subscribe("t").await?;
    assert!(sigterm.elapsed() < grace, "checked within the grace");
    let addr = p.addr();
    eventually(
        WAIT,
        "new connections refused after the grace",
        || async move { TcpStream::connect(addr).await.is_err() },
    )
    .await?;
    assert!(sigterm.elapsed() >= grace, "refused before the grace ended");
    Ok(())
}

#[tokio::test]
async fn sigterm_stops_accepting_and_keeps_open_relays_until_the_drain_timeout() -> Result<()> {
    let (mut publisher, w) = TestWorker::with_publisher(|_| {}).await?;
    let drain_timeout = Duration::from_millis(1500);
    let p = TestProxy::start(&[w.addr()], |c| c.drain_timeout = drain_timeout).await?;
    let mut c = p.client(false).await?;
    c.subscribe("t").await?;
    publisher.prime(&mut c, "t").await?;

    let TestProxy { proxy, shutdown } = p;
    let (addr, shared) = (proxy.ws_addr, proxy.shared.clone());
    let stopped = tokio::spawn(proxy.wait());
    let sigterm = Instant::now();
    shutdown.cancel();
    eventually(WAIT, "new connections refused", || async move {
        TcpStream::connect(addr).await.is_err()
    })
    .await?;
    // The open relay still carries messages.
    let offset = publisher
        .publish("t", br#"{"during":"drain"}"#)
        .await?
        .offset;
    let m = c.read_until(offset).await?;
    assert_eq!(m["payload"]["during"], "drain");
    assert!(
        sigterm.elapsed() < drain_timeout,
        "checked within the drain"
    );
    // Then the drain timeout closes it.
    let err = loop {
        match c.recv_frame().await {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    let closed_after = sigterm.elapsed();
    assert!(
        closed_after >= drain_timeout,
        "closed after {closed_after:?}: {err}"
    );
    tokio::time::timeout(WAIT, stopped).await??;
    let ended = metric_value(
        &shared.render_metrics(),
        "proxy_relays_ended_total{end=\"drain_timeout\"}",
    );
    assert_eq!(ended, 1.0);
    Ok(())
}
