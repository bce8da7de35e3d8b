//! Relaying an upgraded connection: bytes both ways, as they come, until both sides have
//! closed (a half-close is passed on: the other direction keeps flowing), either side fails,
//! nothing moves for the idle timeout, or the proxy closes it at the end of a drain.
//!
//! Nothing after the upgrade is parsed: frames (compressed or not) pass byte for byte. Reads go
//! into one scratch buffer per runtime thread (at most `buffer_bytes` at a time) and are written
//! on at once; only bytes the other side cannot take yet are kept, in a buffer of that
//! connection's, freed once they are written. So an idle connection, or one whose reader keeps
//! up, costs its task and its two sockets and no buffer: most of a fleet's connections, most of
//! the time. (`tokio::io::copy_bidirectional` holds two buffers for the connection's life.)

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
    /// Most bytes read from one side at a time, and so most kept for a side that is slow.
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
    let size = settings.buffer_bytes.max(1);
    let mut up = Direction::default();
    let mut down = Direction::default();
    let both = std::future::poll_fn(|cx| {
        let a = up.poll(cx, &mut client, &mut worker, size)?;
        let b = down.poll(cx, &mut worker, &mut client, size)?;
        if a.is_ready() && b.is_ready() {
            Poll::Ready(Ok::<(), io::Error>(()))
        } else {
            Poll::Pending
        }
    });
    let end = tokio::select! {
        r = both => r.map_or_else(End::Failed, |_| End::Closed),
        _ = activity.idle(settings.idle_timeout) => End::Idle,
        _ = stop.cancelled() => End::Stopped,
    };
    let moved = Moved {
        to_worker: client.read,
        to_client: worker.read,
    };
    (end, moved)
}

thread_local! {
    /// Where every relay on this thread reads: bytes stay in it only within one poll.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One direction of a relay: what was read and not yet written, and how far it got.
#[derive(Default)]
struct Direction {
    /// Bytes the writer has not taken yet; empty (and unallocated) while it keeps up.
    held: Vec<u8>,
    /// How much of `held` is written.
    at: usize,
    /// Something was written since the last flush.
    unflushed: bool,
    /// The reader reached its end.
    eof: bool,
    /// The writer's sending half is shut after that end: this direction is done.
    done: bool,
}

impl Direction {
    /// Moves bytes from `from` to `to` until one of them has to wait (Pending) or this
    /// direction is done: `from` ended and `to` was shut down (Ready).
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
        to: &mut W,
        size: usize,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if self.at < self.held.len() {
                let n =
                    std::task::ready!(Pin::new(&mut *to).poll_write(cx, &self.held[self.at..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.unflushed = true;
                self.at += n;
                if self.at == self.held.len() {
                    self.held = Vec::new();
                    self.at = 0;
                }
                continue;
            }
            if self.eof {
                std::task::ready!(Pin::new(&mut *to).poll_shutdown(cx))?;
                self.done = true;
                continue;
            }
            let read = SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                if scratch.len() < size {
                    scratch.resize(size, 0);
                }
                let mut buf = ReadBuf::new(&mut scratch[..size]);
                match Pin::new(&mut *from).poll_read(cx, &mut buf) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) => {
                        let n = buf.filled().len();
                        if n == 0 {
                            self.eof = true;
                            return Poll::Ready(Ok(()));
                        }
                        // Straight on to the writer; only what it does not take is kept.
                        let written = match Pin::new(&mut *to).poll_write(cx, &scratch[..n]) {
                            Poll::Ready(Ok(0)) => {
                                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()))
                            }
                            Poll::Ready(Ok(w)) => w,
                            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                            Poll::Pending => 0,
                        };
                        if written > 0 {
                            self.unflushed = true;
                        }
                        if written < n {
                            self.held.extend_from_slice(&scratch[written..n]);
                        }
                        Poll::Ready(Ok(()))
                    }
                }
            });
            match read {
                Poll::Ready(r) => r?,
                Poll::Pending => {
                    // Nothing more to read for now: push out what the writer buffers.
                    if self.unflushed {
                        std::task::ready!(Pin::new(&mut *to).poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
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

    /// Sides that take a few bytes at a time: what they cannot take yet is kept and follows in
    /// order, both directions at once.
    #[tokio::test]
    async fn a_slow_side_gets_every_byte_in_order() {
        let (client, mut client_end) = tokio::io::duplex(97);
        let (worker, mut worker_end) = tokio::io::duplex(61);
        let stop = CancellationToken::new();
        let relay = tokio::spawn(async move {
            relay(
                &mut client_end,
                &mut worker_end,
                &settings(None),
                &counters(),
                &stop,
            )
            .await
        });
        let up: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let down: Vec<u8> = (0..80_000u32).map(|i| (i * 13 % 241) as u8).collect();
        let side = |mut s: tokio::io::DuplexStream, send: Vec<u8>| async move {
            let (mut rd, mut wr) = tokio::io::split(&mut s);
            let (sent, got) = tokio::join!(
                async {
                    wr.write_all(&send).await?;
                    wr.shutdown().await
                },
                async {
                    let mut got = Vec::new();
                    rd.read_to_end(&mut got).await.map(|_| got)
                }
            );
            sent.map(|_| got.unwrap())
        };
        let (at_worker, at_client) =
            tokio::join!(side(worker, down.clone()), side(client, up.clone()));
        assert!(at_worker.unwrap() == up, "client to worker differs");
        assert!(at_client.unwrap() == down, "worker to client differs");
        let (end, moved) = relay.await.unwrap();
        assert!(matches!(end, End::Closed), "{end:?}");
        assert_eq!(
            moved,
            Moved {
                to_worker: 100_000,
                to_client: 80_000
            }
        );
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
