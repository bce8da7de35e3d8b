//! A raw WebSocket client for tests and load tools: it masks what it sends, reads server
//! frames (inflating compressed ones), and can send arbitrary or broken bytes on purpose.

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use bytes::{Buf, BytesMut};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A frame from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Opcode (1 text, 2 binary, 8 close, 9 ping, 10 pong).
    pub opcode: u8,
    /// Whether it was compressed on the wire (RSV1).
    pub compressed: bool,
    /// Payload, inflated when compressed.
    pub payload: Vec<u8>,
}

impl Frame {
    /// The close code of a close frame.
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == 8 && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

/// A connected client.
pub struct WsClient {
    stream: TcpStream,
    buf: BytesMut,
    /// The server's 101 response head.
    pub response: String,
    /// Whether permessage-deflate was negotiated.
    pub deflate: bool,
    /// How long reads wait before failing.
    pub read_timeout: Duration,
}

/// Writes an upgrade request and reads the response head; returns it and the stream.
pub async fn raw_upgrade(addr: SocketAddr, request: &str) -> Result<(String, TcpStream, BytesMut)> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(request.as_bytes()).await?;
    let mut buf = BytesMut::with_capacity(1024);
    let head = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
                buf.advance(end + 4);
                return anyhow::Ok(head);
            }
            if stream.read_buf(&mut buf).await? == 0 {
                return anyhow::Ok(String::from_utf8_lossy(&buf).into_owned());
            }
        }
    })
    .await
    .context("no HTTP response in time")??;
    Ok((head, stream, buf))
}

impl WsClient {
    /// Reads messages until the one at `offset` or later (skipping others and notices).
    pub async fn read_until(&mut self, offset: u64) -> Result<serde_json::Value> {
        loop {
            let m = self.recv_json().await?;
            if m["type"] == "message" && m["position"]["offset"].as_u64() >= Some(offset) {
                return Ok(m);
            }
        }
    }

    /// Connects to `path`, offering pushfleet.v1 and (if `deflate`) permessage-deflate.
    pub async fn connect(
        addr: SocketAddr,
        path: &str,
        deflate: bool,
        extra_headers: &[&str],
    ) -> Result<WsClient> {
        let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>());
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {}\r\n",
            protocol::client::SUBPROTOCOL
        );
        if deflate {
            req.push_str(
                "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
            );
        }
        for h in extra_headers {
            req.push_str(h);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        let (response, stream, buf) = raw_upgrade(addr, &req).await?;
        if !response.starts_with("HTTP/1.1 101") {
            bail!("upgrade refused: {response}");
        }
        let negotiated = response.to_ascii_lowercase().contains("permessage-deflate");
        Ok(WsClient {
            stream,
            buf,
            response,
            deflate: negotiated,
            read_timeout: Duration::from_secs(10),
        })
    }

    /// Sends one masked frame with first byte `b0` (FIN/RSV/opcode) and `payload`.
    pub async fn send_frame(&mut self, b0: u8, payload: &[u8]) -> Result<()> {
        let mut out = vec![b0];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let mask: [u8; 4] = rand::random();
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&out).await?;
        Ok(())
    }

    /// Sends raw bytes as they are.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).await?;
        Ok(())
    }

    /// Sends a text message (one frame, uncompressed).
    pub async fn send_text(&mut self, text: &str) -> Result<()> {
        self.send_frame(0x81, text.as_bytes()).await
    }

    /// Sends a JSON request.
    pub async fn send_json(&mut self, v: serde_json::Value) -> Result<()> {
        self.send_text(&v.to_string()).await
    }

    /// Reads the next frame (any opcode), within `read_timeout`.
    pub async fn recv_frame(&mut self) -> Result<Frame> {
        let timeout = self.read_timeout;
        tokio::time::timeout(timeout, self.read_frame())
            .await
            .with_context(|| format!("no frame within {timeout:?}"))?
    }

    async fn read_frame(&mut self) -> Result<Frame> {
        loop {
            if let Some(frame) = self.parse_frame()? {
                return Ok(frame);
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                bail!("connection closed by server (EOF)");
            }
        }
    }

    fn parse_frame(&mut self) -> Result<Option<Frame>> {
        let b = &self.buf[..];
        if b.len() < 2 {
            return Ok(None);
        }
        if b[1] & 0x80 != 0 {
            bail!("server frame is masked");
        }
        let (len, at) = match b[1] & 0x7F {
            126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into()?) as usize, 10),
            126 | 127 => return Ok(None),
            n => (n as usize, 2),
        };
        if b.len() < at + len {
            return Ok(None);
        }
        let (b0, compressed) = (b[0], b[0] & 0x40 != 0);
        if b0 & 0x80 == 0 {
            bail!("test client does not reassemble fragments");
        }
        self.buf.advance(at);
        let raw = self.buf.split_to(len);
        let payload = if compressed {
            worker::ws::deflate::inflate(&raw, 64 << 20)
                .map_err(|e| anyhow::anyhow!("server sent bad deflate data: {e:?}"))?
        } else {
            raw.to_vec()
        };
        Ok(Some(Frame {
            opcode: b0 & 0x0F,
            compressed,
            payload,
        }))
    }

    /// Reads frames until a text message, answering pings; parses it as JSON.
    pub async fn recv_json(&mut self) -> Result<serde_json::Value> {
        loop {
            let f = self.recv_frame().await?;
            match f.opcode {
                1 => return Ok(serde_json::from_slice(&f.payload)?),
                9 => self.send_frame(0x8A, &f.payload).await?,
                8 => bail!("closed with {:?}", f.close_code()),
                _ => {}
            }
        }
    }

    /// Reads until a close frame (skipping other frames), completes the close handshake as a
    /// well-behaved client does (echo the close, then FIN), and returns the code.
    pub async fn expect_close(&mut self) -> Result<u16> {
        loop {
            let f = self.recv_frame().await?;
            if f.opcode == 8 {
                let code = f.close_code().context("close frame without a code")?;
                let _ = self.send_frame(0x88, &code.to_be_bytes()).await;
                let _ = self.stream.shutdown().await;
                return Ok(code);
            }
        }
    }

    /// Subscribes to a topic and waits for the ack.
    pub async fn subscribe(&mut self, topic: &str) -> Result<()> {
        self.send_json(serde_json::json!({"op": "subscribe", "id": 1, "topic": topic}))
            .await?;
        let ack = self.recv_json().await?;
        if ack["type"] != "ack" {
            bail!("expected ack, got {ack}");
        }
        Ok(())
    }

    /// Sends a subscribe request with history (`since`/`last`), reads its ack and the
    /// `history.replayed` messages that follow it. Frames for other topics before the ack are
    /// skipped.
    pub async fn subscribe_history(
        &mut self,
        request: serde_json::Value,
    ) -> Result<(serde_json::Value, Vec<serde_json::Value>)> {
        let topic = request["topic"].clone();
        self.send_json(request).await?;
        let ack = loop {
            let m = self.recv_json().await?;
            match m["type"].as_str() {
                Some("ack") if m["topic"] == topic => break m,
                Some("error") => bail!("subscribe failed: {m}"),
                _ if m["topic"] == topic => bail!("{m} came before the ack"),
                _ => {}
            }
        };
        let n = ack["history"]["replayed"]
            .as_u64()
            .context("ack without history.replayed")?;
        let mut replayed = Vec::new();
        while (replayed.len() as u64) < n {
            let m = self.recv_json().await?;
            if m["topic"] == topic {
                replayed.push(m);
            }
        }
        Ok((ack, replayed))
    }

    /// The underlying stream (for tests that stop reading).
    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }
}
