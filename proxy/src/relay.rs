//! Relaying an upgraded connection: bytes both ways, as they come, until both sides have
//! closed (a half-close is passed on: the other direction keeps flowing), either side fails,
//! nothing moves for the idle timeout, or the proxy closes it at the end of a drain.
//!
//! Nothing after the upgrade is parsed: frames (compressed or not) pass byte for byte. Each
//! direction has one fixed buffer of `buffer_bytes`, allocated once per connection; that and
//! the two sockets are what an open connection costs.

use prometheus::IntCounter;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How relays behave.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// Buffer per direction, bytes.
    pub buffer_bytes: usize,
    /// Close after this long with no byte either way; `None`: never.
    pub idle_timeout: Option<Duration>,
}

/// How a relay ended.
#[derive(Debug)]
pub enum End {
    /// Both sides closed their sending halves.
    Closed,
    /// Reading or writing failed on one side (a reset, usually).
    Failed(io::Error),
    /// Nothing moved for the idle timeout.
    Idle,
    /// The proxy closed it (the drain timeout passed).
    Stopped,
}

impl End {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::Failed(_) => "failed",
            End::Idle => "idle_timeout",
            End::Stopped => "drain_timeout",
        }
    }
}

/// Bytes relayed, per direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moved {
    /// From the client to the worker.
    pub to_worker: u64,
    /// From the worker to the client.
    pub to_client: u64,
}

/// Where relayed bytes are counted: one counter per direction, shared by every connection.
#[derive(Debug, Clone)]
pub struct Counters {
    /// Bytes from clients to workers.
    pub to_worker: IntCounter,
    /// Bytes from workers to clients.
    pub to_client: IntCounter,
}

/// Relays between `client` and `worker` until the relay ends (see the module doc), or `stop`.
pub async fn relay<C, W>(
    client: &mut C,
    worker: &mut W,
    settings: &RelaySettings,
    counters: &Counters,
    stop: &CancellationToken,
) -> (End, Moved)
where
    C: AsyncRead + AsyncWrite + Unpin,
    W: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Activity::new();
    let mut client = Metered::new(client, &counters.to_worker, &activity);
    let mut worker = Metered::new(worker, &counters.to_client, &activity);
    let size = settings.buffer_bytes;
    let end = tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut worker, size, size) => {
            r.map_or_else(End::Failed, |_| End::Closed)
        }
        _ = activity.idle(settings.idle_timeout) => End::Idle,
        _ = stop.cancelled() => End::Stopped,
    };
    let moved = Moved {
        to_worker: client.read,
        to_client: worker.read,
    };
    (end, moved)
}

/// When bytes last moved, in milliseconds since the relay started (an atomic so both
/// directions can stamp it through shared references).
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Returns once nothing has moved for `timeout`; never when `None`.
    async fn idle(&self, timeout: Option<Duration>) {
        let Some(timeout) = timeout else {
            return std::future::pending().await;
        };
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// A socket whose reads are counted (in `read` and a shared counter) and stamp `activity`.
/// Counting reads per side covers both directions: what one side reads the other is written.
struct Metered<'a, S> {
    inner: &'a mut S,
    read: u64,
    counter: &'a IntCounter,
    activity: &'a Activity,
}

impl<'a, S> Metered<'a, S> {
    fn new(inner: &'a mut S, counter: &'a IntCounter, activity: &'a Activity) -> Self {
        Metered {
            inner,
            read: 0,
            counter,
            activity,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut *this.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            this.read += n;
            this.counter.inc_by(n);
            this.activity.touch();
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn counters() -> Counters {
        Counters {
            to_worker: IntCounter::new("to_worker", "t").unwrap(),
            to_client: IntCounter::new("to_client", "t").unwrap(),
        }
    }

    fn settings(idle: Option<Duration>) -> RelaySettings {
        RelaySettings {
            buffer_bytes: 512,
            idle_timeout: idle,
        }
    }

    #[tokio::test]
    async fn bytes_pass_both_ways_exactly_and_half_close_is_passed_on() {
        let (mut client, mut client_end) = tokio::io::duplex(16 * 1024);
        let (mut worker, mut worker_end) = tokio::io::duplex(16 * 1024);
        let c = counters();
        let stop = CancellationToken::new();
        let relay = tokio::spawn({
            let c = c.clone();
            async move { relay(&mut client_end, &mut worker_end, &settings(None), &c, &stop).await }
        });
        let upstream: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
        client.write_all(&upstream).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        worker.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, upstream, "the client's half-close reaches the worker");
        // The other direction still flows.
        let downstream: Vec<u8> = (0..=255u8).rev().cycle().take(3000).collect();
        worker.write_all(&downstream).await.unwrap();
        worker.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, downstream);
        let (end, moved) = relay.await.unwrap();
        assert!(matches!(end, End::Closed), "{end:?}");
        assert_eq!(
            moved,
            Moved {
                to_worker: 5000,
                to_client: 3000
            }
        );
        assert_eq!((c.to_worker.get(), c.to_client.get()), (5000, 3000));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_relay_ends_after_the_idle_timeout_and_traffic_postpones_it() {
        let (mut client, mut client_end) = tokio::io::duplex(16 * 1024);
        let (_worker, mut worker_end) = tokio::io::duplex(16 * 1024);
        let stop = CancellationToken::new();
        let started = Instant::now();
        let relay = tokio::spawn(async move {
            let s = settings(Some(Duration::from_secs(10)));
            relay(&mut client_end, &mut worker_end, &s, &counters(), &stop).await
        });
        tokio::time::sleep(Duration::from_secs(6)).await;
        client.write_all(b"x").await.unwrap();
        let (end, _) = relay.await.unwrap();
        assert!(matches!(end, End::Idle), "{end:?}");
        assert!(
            started.elapsed() >= Duration::from_secs(16),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn stopping_ends_the_relay() {
        let (_client, mut client_end) = tokio::io::duplex(16 * 1024);
        let (_worker, mut worker_end) = tokio::io::duplex(16 * 1024);
        let stop = CancellationToken::new();
        stop.cancel();
        let (end, _) = relay(
            &mut client_end,
            &mut worker_end,
            &settings(None),
            &counters(),
            &stop,
        )
        .await;
        assert!(matches!(end, End::Stopped));
    }
}
