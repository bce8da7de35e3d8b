//! One client connection, from accept to close, top to bottom in [`serve`]:
//! admission → TLS handshake (when configured) → request head → choose, connect and forward
//! (another worker on failure) → placed → relay → released. With `--demo-page`, a plain GET
//! for one of the [`crate::pages`] is answered after the request head instead.
//!
//! Until the upgrade is relayed, the client is answered by the proxy (see [`Reject`]); after
//! it, everything the worker says (its 101, or its own refusal) reaches the client untouched.

use crate::admission::Refusal;
use crate::forward;
use crate::pages::{self, Page};
use crate::place::{Choice, Mode};
use crate::reject::Reject;
use crate::relay;
use crate::request::{self, Head, HeadError};
use crate::server::Shared;
use crate::tls::ClientStream;
use rand::Rng;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::{timeout, timeout_at};
use tokio_util::sync::CancellationToken;

/// Serves one accepted client connection until it closes, or until `stop` (end of a drain).
pub async fn serve(tcp: TcpStream, peer: SocketAddr, shared: Arc<Shared>, stop: CancellationToken) {
    let cfg = &shared.config;
    shared.metrics.accepted.inc();
    let _ = tcp.set_nodelay(true);
    let mut client = ClientStream::Plain(tcp);

    // 1. Admission, before reading anything: the permit is this connection's slot.
    let _permit = match shared.admission.admit(Instant::now()) {
        Ok(permit) => permit,
        Err((refusal, retry_after)) => {
            let limit = match refusal {
                Refusal::Rate => format!("{}/s", cfg.accept_rate),
                Refusal::Connections => cfg.max_connections.to_string(),
            };
            let why = Reject::Admission {
                refusal,
                retry_after,
                limit,
            };
            return reject(&mut client, peer, &shared, why).await;
        }
    };
    // The TLS handshake and the request head share one deadline.
    let deadline = tokio::time::Instant::now() + cfg.handshake_timeout;

    // 2. The TLS handshake, when configured.
    if let Some(acceptor) = &shared.tls {
        client = match timeout_at(deadline, client.accept(acceptor)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(_)) | Err(_) => {
                shared
                    .metrics
                    .refused
                    .with_label_values(&["tls_handshake"])
                    .inc();
                tracing::debug!(%peer, "TLS handshake failed or timed out");
                return;
            }
        };
    }

    // 3. The request head, bounded in size and time.
    let reading = request::read_head(&mut client, cfg.max_request_bytes);
    let head = match timeout_at(deadline, reading).await {
        Ok(Ok(Some(head))) => head,
        Ok(Ok(None)) => return, // closed before a whole head: no one to answer
        Ok(Err(HeadError::NotUpgrade { target })) if cfg.demo_page => {
            return match pages::find(&target) {
                Some(page) => answer_page(&mut client, peer, &shared, page).await,
                None => {
                    let why = Reject::Head(HeadError::NotUpgrade { target });
                    reject(&mut client, peer, &shared, why).await
                }
            };
        }
        Ok(Err(e)) => return reject(&mut client, peer, &shared, Reject::Head(e)).await,
        Err(_) => {
            let why = Reject::HandshakeTimeout(cfg.handshake_timeout);
            return reject(&mut client, peer, &shared, why).await;
        }
    };

    // 4. Choose a worker, connect and forward the head; another worker on failure.
    let (mut worker, choice, mode) = match dial(&shared, &client, peer, head).await {
        Ok(placed) => placed,
        Err(why) => return reject(&mut client, peer, &shared, why).await,
    };

    // 5. Placed: it counts toward the worker's projected load until released.
    shared.placer.lock().connected(&choice.id, Instant::now());
    let mode_label = crate::metrics::mode_label(mode);
    shared
        .metrics
        .placements
        .with_label_values(&[&choice.id, mode_label])
        .inc();
    tracing::debug!(%peer, worker = %choice.id, mode = mode_label, "placed");

    // 6. Relay both ways until either side ends it (or the drain does).
    let (end, moved) = relay::relay(
        &mut client,
        &mut worker,
        &shared.relay,
        &shared.metrics.relay_bytes,
        &stop,
    )
    .await;

    // 7. Released.
    shared.placer.lock().released(&choice.id);
    shared
        .metrics
        .relays_ended
        .with_label_values(&[end.label()])
        .inc();
    tracing::debug!(
        %peer, worker = %choice.id, end = end.label(),
        to_worker = moved.to_worker, to_client = moved.to_client, "relay ended"
    );
}

/// Chooses a worker, connects to it and sends it the first bytes (see [`forward`]), within
/// `--connect-timeout`; on failure marks it failed and tries another, at most
/// `--connect-attempts` different workers.
async fn dial(
    shared: &Shared,
    client: &ClientStream,
    peer: SocketAddr,
    head: Head,
) -> Result<(TcpStream, Choice, Mode), Reject> {
    let cfg = &shared.config;
    let local = client.tcp().local_addr().unwrap_or(cfg.listen);
    let first = forward::first_bytes(cfg.forwarded, &head, peer, local, client.proto());
    drop(head);
    let mut tried: Vec<Arc<str>> = Vec::new();
    while tried.len() < cfg.connect_attempts as usize {
        let Some((choice, mode)) = choose(shared, &tried) else {
            break;
        };
        if !tried.is_empty() {
            shared.metrics.connect_retries.inc();
        }
        let error = match timeout(cfg.connect_timeout, connect(&choice.address, &first)).await {
            Ok(Ok(worker)) => {
                shared
                    .metrics
                    .relay_bytes
                    .to_worker
                    .inc_by(first.len() as u64);
                return Ok((worker, choice, mode));
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!(
                "no answer within --connect-timeout ({:?})",
                cfg.connect_timeout
            ),
        };
        tracing::warn!(worker = %choice.id, address = %choice.address, %error, "cannot reach worker");
        shared.placer.lock().failed(&choice.id, Instant::now());
        shared
            .metrics
            .connect_failures
            .with_label_values(&[&choice.id])
            .inc();
        tried.push(choice.id);
    }
    if tried.is_empty() {
        let (min, max) = (cfg.retry_after_min, cfg.retry_after_max);
        let retry_after = rand::rng().random_range(min..=max);
        return Err(Reject::NoWorker { retry_after });
    }
    Err(Reject::UpstreamFailed {
        attempts: tried.len() as u32,
    })
}

/// One placement decision, timed; the placer's lock is held for the choice only.
fn choose(shared: &Shared, tried: &[Arc<str>]) -> Option<(Choice, Mode)> {
    let started = Instant::now();
    let choice = shared
        .placer
        .lock()
        .choose(started, &mut rand::rng(), tried);
    let elapsed = started.elapsed().as_secs_f64();
    shared.metrics.choice_seconds.observe(elapsed);
    choice
}

async fn connect(address: &str, first: &[u8]) -> io::Result<TcpStream> {
    let mut worker = TcpStream::connect(address).await?;
    worker.set_nodelay(true)?;
    worker.write_all(first).await?;
    Ok(worker)
}

/// Answers a plain GET with one of the proxy's own pages and closes.
async fn answer_page(client: &mut ClientStream, peer: SocketAddr, shared: &Shared, page: &Page) {
    shared.metrics.pages_served.inc();
    tracing::debug!(%peer, path = page.path, "page served");
    answer(client, shared, &page.response()).await;
}

/// Answers `why` (unless the client is still to do its TLS handshake), counts it and closes.
async fn reject(client: &mut ClientStream, peer: SocketAddr, shared: &Shared, why: Reject) {
    shared
        .metrics
        .refused
        .with_label_values(&[why.label()])
        .inc();
    tracing::debug!(%peer, reason = why.label(), "refused");
    let can_answer = shared.tls.is_none() || matches!(client, ClientStream::Tls(_));
    if can_answer {
        answer(client, shared, &why.response()).await;
    } else {
        discard_unread(client.tcp(), shared.config.max_request_bytes);
    }
}

/// Writes the proxy's own whole HTTP `response` and closes, the write bounded by
/// `--handshake-timeout`.
async fn answer(client: &mut ClientStream, shared: &Shared, response: &[u8]) {
    let write = async {
        client.write_all(response).await?;
        client.shutdown().await
    };
    let _ = timeout(shared.config.handshake_timeout, write).await;
    discard_unread(client.tcp(), shared.config.max_request_bytes);
}

/// Reads and drops what the client has already sent, without waiting: closing a socket with
/// unread input resets the connection, and a reset can destroy the answer before the client
/// reads it.
fn discard_unread(client: &TcpStream, max_bytes: usize) {
    let mut scratch = [0u8; 4096];
    let mut discarded = 0;
    while discarded < max_bytes {
        match client.try_read(&mut scratch) {
            Ok(0) | Err(_) => return,
            Ok(n) => discarded += n,
        }
    }
}
