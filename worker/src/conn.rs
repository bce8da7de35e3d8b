//! One client connection, from accept to close, top to bottom in [`serve`]:
//! handshake → register → loop (read requests, write queued frames in batches, keepalive,
//! timeouts) → close handshake → unregister.
//!
//! The loop owns both halves of the socket. Reads go through a stack buffer, so an idle
//! connection holds no read buffer at all. Writes take every frame queued in the outbox and
//! hand them to the kernel in one vectored write.

use crate::access::{self, AccessError, Grant};
use crate::broadcast::Encoding;
use crate::hub::{Command, Subscriber};
use crate::outbox::Outgoing;
use crate::server::Shared;
use crate::ws::frame::{self, Opcode};
use crate::ws::handshake::{self, Refusal, Upgrade};
use crate::ws::reader::{Event, Limits, Reader};
use crate::ws::{deflate, Violation};
use bytes::{Bytes, BytesMut};
use protocol::client::{
    close, parse_request, ErrorCode, Filter, Request, RequestError, ServerMessage, SUBPROTOCOL,
};
use std::collections::{HashSet, VecDeque};
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::time::sleep_until;

/// Which endpoint a connection is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// The `pushfleet.v1` protocol.
    Push,
    /// Echo every message back (conformance testing only).
    Echo,
}

/// Most frames handed to one vectored write.
const MAX_IOVECS: usize = 64;
/// Stack buffer for reads; frames larger than this are assembled in the connection's buffer.
const READ_CHUNK: usize = 16 * 1024;
/// Consecutive invalid requests tolerated before closing with 1008.
const MAX_CONSECUTIVE_ERRORS: u32 = 20;

/// Serves one accepted TCP connection until it closes.
pub async fn serve(mut stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let cfg = &shared.config;
    let _ = stream.set_nodelay(true);

    // 1. Handshake, bounded in size and time.
    let handshake = tokio::time::timeout(
        cfg.handshake_timeout,
        read_upgrade(&mut stream, cfg.max_handshake_bytes),
    );
    let (upgrade, leftover) = match handshake.await {
        Ok(Ok(Some(found))) => found,
        Ok(Ok(None)) => return, // closed before sending a request
        Ok(Err(refusal)) => return refuse(&mut stream, peer, &shared, refusal).await,
        Err(_) => return refuse(&mut stream, peer, &shared, Refusal::Timeout).await,
    };
    let (route, protocol) = match choose_route(&upgrade, cfg) {
        Ok(r) => r,
        Err(refusal) => return refuse(&mut stream, peer, &shared, refusal).await,
    };
    if !shared.access.origin_allowed(upgrade.origin.as_deref()) {
        let refusal = Refusal::ForbiddenOrigin(upgrade.origin.clone().unwrap_or_default());
        return refuse(&mut stream, peer, &shared, refusal).await;
    }
    if shared.draining.load(Ordering::Relaxed) {
        return refuse(&mut stream, peer, &shared, Refusal::Unavailable("draining")).await;
    }
    if shared.metrics.connections.get() as usize >= cfg.max_connections {
        let refusal = Refusal::Unavailable("max_connections reached");
        return refuse(&mut stream, peer, &shared, refusal).await;
    }
    let deflate = (!cfg.no_compression)
        .then(|| handshake::negotiate_deflate(&upgrade.extensions))
        .flatten();
    let response = handshake::accept_response(&upgrade.key, protocol, deflate.as_ref());
    if stream.write_all(&response).await.is_err() {
        return;
    }
    // The token is checked after the upgrade so that a browser sees the close code (an HTTP
    // refusal reaches its script as a bare 1006).
    let grant = match route {
        Route::Echo => Grant::everything(),
        Route::Push => {
            let token = access::presented_token(
                upgrade.query.as_deref(),
                upgrade.authorization.as_deref(),
                &upgrade.protocols,
            );
            match shared.access.authenticate(token.as_deref(), unix_now()) {
                Ok(grant) => grant,
                Err(e) => return refuse_token(stream, peer, &shared, &upgrade, &e).await,
            }
        }
    };
    let expires_at = grant.expires_at.map(|exp| {
        let left = exp
            .saturating_add(cfg.auth_leeway.as_secs())
            .saturating_sub(unix_now());
        Instant::now() + Duration::from_secs(left)
    });

    // 2. Register.
    let id = shared.next_connection_id.fetch_add(1, Ordering::Relaxed) + 1;
    let encoding = deflate.map_or(Encoding::Plain, |d| {
        Encoding::deflate(d.server_max_window_bits)
    });
    let sub = Arc::new(Subscriber::new(id, encoding, cfg.outbound_queue_bytes));
    shared.connections.lock().insert(id, sub.clone());
    shared.metrics.connections.inc();
    shared.metrics.connections_accepted.inc();
    if deflate.is_some() {
        shared.metrics.deflate_negotiated.inc();
    }
    let client = upgrade.forwarded_for.as_deref().unwrap_or("-");
    tracing::debug!(id, %peer, client, path = %upgrade.path, ?encoding,
        subject = conn_subject(&grant), "client connected");

    // 3. Serve until closed.
    let mut conn = Connection {
        shared: shared.clone(),
        sub: sub.clone(),
        route,
        reader: Reader::new(
            Limits {
                max_frame_bytes: cfg.max_frame_bytes,
                max_message_bytes: cfg.max_message_bytes,
                max_decompressed_bytes: cfg.max_decompressed_bytes,
            },
            deflate.is_some(),
        ),
        inbuf: BytesMut::from(&leftover[..]),
        input_broken: false,
        pending: VecDeque::new(),
        head_written: 0,
        filters: HashSet::new(),
        commands: Vec::new(),
        consecutive_errors: 0,
        closing: Closing::Open,
        grant,
        expires_at,
    };
    if route == Route::Push {
        conn.reply(&ServerMessage::Welcome {
            protocol: SUBPROTOCOL.into(),
            worker: shared.worker_id.clone(),
            connection: id,
        });
    }
    let (rd, wr) = stream.into_split();
    let code = conn.run(rd, wr).await;

    // 4. Unregister.
    sub.outbox.close();
    let filters = conn.filters.drain().collect();
    let _ = shared
        .hub
        .send(Command::Disconnected {
            sub_id: id,
            filters,
        })
        .await;
    shared.connections.lock().remove(&id);
    shared.metrics.connections.dec();
    let label = code.map_or_else(|| "none".to_string(), |c| c.to_string());
    shared
        .metrics
        .connections_closed
        .with_label_values(&[&label])
        .inc();
    tracing::debug!(id, %peer, code = %label, "client disconnected");
}

/// Reads the upgrade request; returns it with any bytes that followed it.
async fn read_upgrade(
    stream: &mut TcpStream,
    max_bytes: usize,
) -> Result<Option<(Upgrade, Vec<u8>)>, Refusal> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let mut chunk = [0u8; 2048];
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| Refusal::Malformed(e.to_string()))?;
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(Refusal::Malformed("connection closed mid-request".into()))
            };
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some((upgrade, used)) = handshake::parse(&buf, max_bytes)? {
            return Ok(Some((upgrade, buf.split_off(used))));
        }
    }
}

fn choose_route<'a>(
    u: &Upgrade,
    cfg: &crate::config::Config,
) -> Result<(Route, Option<&'a str>), Refusal> {
    if u.path == cfg.ws_path {
        // A subprotocol carrying the access token is never selected, nor shown in a refusal.
        let offered: Vec<&str> = u
            .protocols
            .iter()
            .map(String::as_str)
            .filter(|p| !p.starts_with(access::BEARER_SUBPROTOCOL))
            .collect();
        if offered.is_empty() {
            return Ok((Route::Push, None));
        }
        return match offered.contains(&SUBPROTOCOL) {
            true => Ok((Route::Push, Some(SUBPROTOCOL))),
            false => Err(Refusal::UnsupportedSubprotocol(offered.join(", "))),
        };
    }
    if cfg.echo_path.as_deref() == Some(u.path.as_str()) {
        return Ok((Route::Echo, None));
    }
    Err(Refusal::NotFound(u.path.clone()))
}

async fn refuse(stream: &mut TcpStream, peer: SocketAddr, shared: &Shared, refusal: Refusal) {
    shared
        .metrics
        .handshake_failures
        .with_label_values(&[refusal.label()])
        .inc();
    tracing::debug!(%peer, reason = refusal.label(), ?refusal, "upgrade refused");
    let response = refusal.response();
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&response)).await;
    let _ = stream.shutdown().await;
}

/// Closes a just-upgraded connection whose token was refused, with its close code and reason.
async fn refuse_token(
    mut stream: TcpStream,
    peer: SocketAddr,
    shared: &Shared,
    upgrade: &Upgrade,
    e: &AccessError,
) {
    shared
        .metrics
        .auth_failures
        .with_label_values(&[e.label()])
        .inc();
    let client = upgrade.forwarded_for.as_deref().unwrap_or("-");
    tracing::debug!(%peer, client, reason = e.label(), error = %e, "access token refused");
    let frame = frame::encode_close(e.close_code(), &e.to_string());
    let cfg = &shared.config;
    if tokio::time::timeout(cfg.close_timeout, stream.write_all(&frame))
        .await
        .is_ok_and(|r| r.is_ok())
    {
        let _ = stream.shutdown().await;
        let (rd, _wr) = stream.into_split();
        linger(rd, cfg.close_timeout).await;
    }
}

fn conn_subject(grant: &Grant) -> &str {
    grant.subject.as_deref().unwrap_or("-")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Where the close handshake stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closing {
    /// Not closing.
    Open,
    /// Our close frame is queued; waiting for the client's (or EOF) until `deadline`.
    Sent { code: u16, deadline: Instant },
    /// Close frames exchanged, or we give up waiting: flush, send FIN, stop.
    Done { code: Option<u16> },
}

struct Connection {
    shared: Arc<Shared>,
    sub: Arc<Subscriber>,
    route: Route,
    reader: Reader,
    inbuf: BytesMut,
    /// Input after a protocol violation is discarded unparsed.
    input_broken: bool,
    /// Frames taken from the outbox, in order; the first may be partly written.
    pending: VecDeque<Outgoing>,
    head_written: usize,
    filters: HashSet<Filter>,
    /// Requests for the hub, sent once the current input is processed.
    commands: Vec<Command>,
    consecutive_errors: u32,
    closing: Closing,
    /// What the connection's token (or anonymous access) allows.
    grant: Grant,
    /// When the token expires: the connection is closed with 4402 then.
    expires_at: Option<Instant>,
}

impl Connection {
    /// The loop; returns the close code sent or received, if any.
    async fn run(&mut self, rd: OwnedReadHalf, mut wr: OwnedWriteHalf) -> Option<u16> {
        let cfg = self.shared.config.clone();
        let now = Instant::now();
        let mut last_heard = now;
        let mut next_ping = now + cfg.ping_interval;
        let mut awaiting_pong: Option<Instant> = None;
        let timer = sleep_until(now.into());
        tokio::pin!(timer);

        // Bytes that arrived together with the handshake.
        if !self.inbuf.is_empty() && self.process_input() {
            awaiting_pong = None;
        }
        loop {
            // Hand requests to the hub; a full hub queue pauses this connection's reading.
            for command in self.commands.drain(..) {
                let _ = self.shared.hub.send(command).await;
            }
            // New frames and signals from fan-out and drain.
            let signals = self.sub.outbox.take(&mut self.pending);
            if self.closing == Closing::Open {
                if signals.overflowed {
                    self.shared.metrics.slow_client_closes.inc();
                    self.drop_unstarted();
                    let reason =
                        format!("outbound queue passed {} bytes", cfg.outbound_queue_bytes);
                    self.start_close(close::SLOW_CONSUMER, &reason);
                } else if let Some(code) = signals.close_request {
                    self.start_close(code, "worker draining; reconnect");
                }
            }
            if let Closing::Done { code } = self.closing {
                let _ = tokio::time::timeout(cfg.close_timeout, self.flush(&mut wr)).await;
                let _ = wr.shutdown().await;
                linger(rd, cfg.close_timeout).await;
                return code;
            }

            let deadline = match self.closing {
                Closing::Sent { deadline, .. } => deadline,
                _ => {
                    let mut d = (last_heard + cfg.idle_timeout).min(next_ping);
                    if let Some(sent) = awaiting_pong {
                        d = d.min(sent + cfg.pong_timeout);
                    }
                    if let Some(expiry) = self.expires_at {
                        d = d.min(expiry);
                    }
                    d
                }
            };
            if timer.deadline() != deadline.into() {
                timer.as_mut().reset(deadline.into());
            }

            tokio::select! {
                r = rd.readable() => {
                    if r.is_err() {
                        return None;
                    }
                    match read_available(&rd, &mut self.inbuf, &self.reader) {
                        Ok(0) => {
                            // EOF: a client that vanished without a close frame, or the end of
                            // a close handshake.
                            return match self.closing {
                                Closing::Open => None,
                                Closing::Sent { code, .. } | Closing::Done { code: Some(code) } => Some(code),
                                Closing::Done { code: None } => None,
                            };
                        }
                        Ok(_) => {
                            last_heard = Instant::now();
                            if self.process_input() {
                                awaiting_pong = None;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(_) => return None,
                    }
                }
                w = write_batch(&mut wr, &self.pending, self.head_written), if !self.pending.is_empty() => {
                    match w {
                        Ok(n) => self.advance(n),
                        Err(_) => return None,
                    }
                }
                _ = self.sub.outbox.ready() => {}
                _ = &mut timer => {
                    let now = Instant::now();
                    match self.closing {
                        Closing::Sent { code, .. } => self.closing = Closing::Done { code: Some(code) },
                        _ if self.expires_at.is_some_and(|e| now >= e) => {
                            self.expires_at = None;
                            self.shared.metrics.auth_failures.with_label_values(&["expired"]).inc();
                            self.start_close(close::TOKEN_EXPIRED, "access token expired; reconnect with a new one");
                        }
                        _ if now >= last_heard + cfg.idle_timeout => {
                            let reason = format!("no frame for {}", humantime::format_duration(cfg.idle_timeout));
                            self.start_close(close::IDLE_TIMEOUT, &reason);
                        }
                        _ if awaiting_pong.is_some_and(|sent| now >= sent + cfg.pong_timeout) => {
                            let reason = format!("no pong within {}", humantime::format_duration(cfg.pong_timeout));
                            self.start_close(close::KEEPALIVE_TIMEOUT, &reason);
                        }
                        _ if now >= next_ping => {
                            next_ping = now + cfg.ping_interval;
                            awaiting_pong.get_or_insert(now);
                            self.push_frame(frame::encode(Opcode::Ping, false, b""));
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    /// Handles every complete frame in the input buffer; returns whether a pong was seen.
    fn process_input(&mut self) -> bool {
        let mut pong = false;
        if self.input_broken {
            self.inbuf.clear();
            return false;
        }
        loop {
            let event = match self.reader.next_event(&mut self.inbuf) {
                Ok(Some(event)) => event,
                Ok(None) => break,
                Err(violation) => {
                    self.violation(violation);
                    break;
                }
            };
            match (event, self.closing) {
                (Event::Pong, _) => pong = true,
                (Event::Close(theirs), Closing::Open) => {
                    // Echo their code (RFC 6455 §5.5.1), then finish.
                    let code = theirs.map_or(close::NORMAL, |(c, _)| c);
                    self.queue_close_frame(code, "");
                    self.closing = Closing::Done { code: Some(code) };
                    break;
                }
                (Event::Close(_), Closing::Sent { code, .. }) => {
                    self.closing = Closing::Done { code: Some(code) };
                    break;
                }
                (_, Closing::Sent { .. } | Closing::Done { .. }) => {} // closing: ignore data
                (Event::Ping(data), Closing::Open) => {
                    self.push_frame(frame::encode(Opcode::Pong, false, &data))
                }
                (Event::Text(text), Closing::Open) => match self.route {
                    Route::Push => self.handle_request(&text),
                    Route::Echo => self.echo(Opcode::Text, text.as_bytes()),
                },
                (Event::Binary(data), Closing::Open) => match self.route {
                    Route::Push => self.start_close(
                        close::UNSUPPORTED_DATA,
                        "binary messages are not part of pushfleet.v1",
                    ),
                    Route::Echo => self.echo(Opcode::Binary, &data),
                },
            }
        }
        // An idle connection keeps no read buffer.
        if self.inbuf.is_empty() && self.inbuf.capacity() > 0 {
            self.inbuf = BytesMut::new();
        }
        pong
    }

    fn violation(&mut self, v: Violation) {
        self.input_broken = true;
        self.inbuf.clear();
        tracing::debug!(id = self.sub.id, violation = ?v, "client broke the protocol");
        if self.closing == Closing::Open {
            self.start_close(v.close_code(), &v.reason());
        }
        // No further client frames can be trusted: stop as soon as ours is written.
        if let Closing::Sent { code, .. } = self.closing {
            self.closing = Closing::Done { code: Some(code) };
        }
    }

    fn handle_request(&mut self, text: &str) {
        let cfg = &self.shared.config;
        let request = match parse_request(text, cfg.max_topic_bytes) {
            Ok(r) => r,
            Err(e) => return self.request_failed(&e),
        };
        self.consecutive_errors = 0;
        match request {
            Request::Subscribe {
                id,
                filter,
                history,
            } => {
                if !self.grant.allows(&filter) {
                    let e = RequestError {
                        id,
                        code: ErrorCode::Forbidden,
                        message: format!(
                            "{} {:?} is not allowed for this connection's access token",
                            match filter {
                                Filter::Topic(_) => "topic",
                                Filter::Prefix(_) => "prefix",
                            },
                            filter.text()
                        ),
                    };
                    return self.request_failed(&e);
                }
                if self.filters.contains(&filter) {
                    if history.is_some() {
                        let e = RequestError {
                            id,
                            code: ErrorCode::AlreadySubscribed,
                            message: format!(
                                "already subscribed to {:?}; unsubscribe before asking for its history",
                                filter.text()
                            ),
                        };
                        return self.request_failed(&e);
                    }
                    // Idempotent: acknowledged again.
                    return self.reply(&ServerMessage::ack(id, "subscribe", Some(&filter)));
                }
                if self.filters.len() >= cfg.max_subscriptions {
                    let e = RequestError {
                        id,
                        code: ErrorCode::TooManySubscriptions,
                        message: format!(
                            "connection holds {} subscriptions; max_subscriptions is {}",
                            self.filters.len(),
                            cfg.max_subscriptions
                        ),
                    };
                    return self.request_failed(&e);
                }
                self.filters.insert(filter.clone());
                // The hub acknowledges, after any history, in stream order.
                self.commands.push(Command::Subscribe {
                    sub: self.sub.clone(),
                    id,
                    filter,
                    history,
                });
            }
            Request::Unsubscribe { id, filter } => {
                if !self.filters.remove(&filter) {
                    let e = RequestError {
                        id,
                        code: ErrorCode::NotSubscribed,
                        message: format!("not subscribed to {:?}", filter.text()),
                    };
                    return self.request_failed(&e);
                }
                self.commands.push(Command::Unsubscribe {
                    sub: self.sub.clone(),
                    id,
                    filter,
                });
            }
            Request::Ping { id } => self.reply(&ServerMessage::Pong { id }),
        }
    }

    fn request_failed(&mut self, e: &RequestError) {
        self.shared
            .metrics
            .client_errors
            .with_label_values(&[e.code.as_str()])
            .inc();
        self.reply(&ServerMessage::error(e));
        self.consecutive_errors += 1;
        if self.consecutive_errors >= MAX_CONSECUTIVE_ERRORS {
            let reason = format!("{MAX_CONSECUTIVE_ERRORS} invalid requests in a row");
            self.start_close(close::POLICY_VIOLATION, &reason);
        }
    }

    fn echo(&mut self, opcode: Opcode, data: &[u8]) {
        let frame = match self.sub.encoding {
            Encoding::Deflate { window_bits } => {
                let level = self.shared.config.compression_level;
                frame::encode(opcode, true, &deflate::deflate(data, level, window_bits))
            }
            Encoding::Plain => frame::encode(opcode, false, data),
        };
        self.push_frame(frame);
    }

    fn reply(&mut self, message: &ServerMessage) {
        self.push_frame(frame::encode(
            Opcode::Text,
            false,
            message.to_json().as_bytes(),
        ));
    }

    /// Queues a frame of this connection's own (reply, pong, close) behind the fan-out frames.
    fn push_frame(&mut self, frame: Bytes) {
        let _ = self.sub.outbox.push(Outgoing {
            frame,
            published_at_us: None,
        });
    }

    /// Queues our close frame after what is already queued, then waits for the client's.
    fn start_close(&mut self, code: u16, reason: &str) {
        self.queue_close_frame(code, reason);
        let deadline = Instant::now() + self.shared.config.close_timeout;
        self.closing = Closing::Sent { code, deadline };
    }

    /// Puts the close frame last in the write queue and closes the outbox, so nothing follows
    /// it. It goes straight to the write queue: an overflowed outbox refuses frames.
    fn queue_close_frame(&mut self, code: u16, reason: &str) {
        self.sub.outbox.take(&mut self.pending);
        self.sub.outbox.close();
        self.pending.push_back(Outgoing {
            frame: frame::encode_close(code, reason),
            published_at_us: None,
        });
    }

    /// Drops queued frames that have not started going out (the first may be half written).
    fn drop_unstarted(&mut self) {
        let keep = usize::from(self.head_written > 0);
        let dropped: usize = self.pending.iter().skip(keep).map(|o| o.frame.len()).sum();
        self.pending.truncate(keep);
        self.sub.outbox.written(dropped);
    }

    /// Accounts for `n` bytes written from the front of the queue.
    fn advance(&mut self, mut n: usize) {
        let metrics = &self.shared.metrics;
        metrics.bytes_written.inc_by(n as u64);
        metrics.write_calls.inc();
        self.sub.outbox.written(n);
        let now_us = unix_micros();
        let mut frames = 0;
        while n > 0 {
            let head = self.pending.front().expect("wrote more than was pending");
            let rest = head.frame.len() - self.head_written;
            if n < rest {
                self.head_written += n;
                break;
            }
            n -= rest;
            self.head_written = 0;
            let done = self.pending.pop_front().expect("front exists");
            frames += 1;
            if let Some(at) = done.published_at_us {
                metrics
                    .publish_to_socket
                    .observe(now_us.saturating_sub(at) as f64 / 1e6);
            }
        }
        // One shared-counter update per write, not per frame.
        metrics.frames_written.inc_by(frames);
        if self.pending.is_empty() && self.pending.capacity() > crate::outbox::SHRINK_ABOVE {
            self.pending = VecDeque::new();
        }
    }

    /// Writes everything pending.
    async fn flush(&mut self, wr: &mut OwnedWriteHalf) -> io::Result<()> {
        while !self.pending.is_empty() {
            let n = write_batch(wr, &self.pending, self.head_written).await?;
            self.advance(n);
        }
        Ok(())
    }
}

/// One vectored write of up to [`MAX_IOVECS`] queued frames.
async fn write_batch(
    wr: &mut OwnedWriteHalf,
    pending: &VecDeque<Outgoing>,
    head_written: usize,
) -> io::Result<usize> {
    let mut slices: [IoSlice<'_>; MAX_IOVECS] = [IoSlice::new(&[]); MAX_IOVECS];
    let mut count = 0;
    for (i, o) in pending.iter().take(MAX_IOVECS).enumerate() {
        let skip = if i == 0 { head_written } else { 0 };
        slices[count] = IoSlice::new(&o.frame[skip..]);
        count += 1;
    }
    let n = wr.write_vectored(&slices[..count]).await?;
    if n == 0 {
        return Err(io::ErrorKind::WriteZero.into());
    }
    Ok(n)
}

/// Reads what the socket has without waiting. Small reads land in a stack buffer and only what
/// remains of an unfinished frame is kept, so idle connections hold no read buffer.
fn read_available(rd: &OwnedReadHalf, inbuf: &mut BytesMut, reader: &Reader) -> io::Result<usize> {
    let mut chunk = [0u8; READ_CHUNK];
    let mut total = 0;
    loop {
        if let Some(need) = reader.frame_len_hint(inbuf) {
            inbuf.reserve(need.saturating_sub(inbuf.len()));
        }
        match rd.try_read(&mut chunk) {
            Ok(0) if total == 0 => return Ok(0),
            Ok(0) => return Ok(total),
            Ok(n) => {
                inbuf.extend_from_slice(&chunk[..n]);
                total += n;
                if n < READ_CHUNK || total >= 4 * READ_CHUNK {
                    return Ok(total);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && total > 0 => return Ok(total),
            Err(e) => return Err(e),
        }
    }
}

/// After our FIN: reads and discards until the client closes too, so the kernel does not
/// reset the connection while our last frames are in flight.
async fn linger(mut rd: OwnedReadHalf, timeout: Duration) {
    let drain = async {
        let mut sink = [0u8; 4096];
        let mut budget = 1usize << 20;
        while budget > 0 {
            match rd.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(n) => budget = budget.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(timeout, drain).await;
}

fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
