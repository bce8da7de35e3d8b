//! A connection's bounded outbound queue. Fan-out pushes shared frames in; the connection's
//! task takes them all at once and writes them in one vectored write. The bound counts encoded
//! bytes queued or taken but not yet written; passing it marks the outbox overflowed (the
//! connection then closes with 4001) and refuses further frames, so a slow client costs at most
//! `limit` bytes and never delays the fan-out to others.

use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::VecDeque;
use tokio::sync::Notify;

/// Queue slots kept after draining a backlog; larger queues give their storage back.
pub const SHRINK_ABOVE: usize = 64;

/// A frame waiting to be written, with the publish time it carries (for the latency metric).
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The encoded frame (shared with other connections).
    pub frame: Bytes,
    /// Publisher timestamp, µs since the Unix epoch, for data frames that have one.
    pub published_at_us: Option<u64>,
}

/// What happened to a pushed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Queued.
    Queued,
    /// Not queued: this push passed the bound; the outbox is now overflowed.
    Overflowed,
    /// Not queued: the outbox had already overflowed or closed.
    Refused,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Outgoing>,
    bytes: usize,
    overflowed: bool,
    closed: bool,
    close_request: Option<u16>,
}

/// What [`Outbox::take`] found besides frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Signals {
    /// The bound was passed: close with 4001.
    pub overflowed: bool,
    /// Someone (drain, shutdown) asked the connection to close with this code.
    pub close_request: Option<u16>,
}

/// See the module docs.
pub struct Outbox {
    state: Mutex<State>,
    notify: Notify,
    limit: usize,
}

impl Outbox {
    /// An empty outbox bounded at `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Outbox {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            limit,
        }
    }

    /// The bound, in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Queues a frame unless that would pass the bound.
    pub fn push(&self, item: Outgoing) -> Push {
        let mut s = self.state.lock();
        if s.overflowed || s.closed {
            return Push::Refused;
        }
        if s.bytes + item.frame.len() > self.limit {
            s.overflowed = true;
            drop(s);
            self.notify.notify_one();
            return Push::Overflowed;
        }
        s.bytes += item.frame.len();
        let was_empty = s.queue.is_empty();
        s.queue.push_back(item);
        drop(s);
        if was_empty {
            self.notify.notify_one();
        }
        Push::Queued
    }

    /// Moves every queued frame to `into`; returns the signals for the connection.
    pub fn take(&self, into: &mut VecDeque<Outgoing>) -> Signals {
        let mut s = self.state.lock();
        into.append(&mut s.queue);
        // After a backlog, give the storage back instead of keeping it for the connection's life.
        if s.queue.capacity() > SHRINK_ABOVE {
            s.queue = VecDeque::new();
        }
        Signals {
            overflowed: s.overflowed,
            close_request: s.close_request,
        }
    }

    /// Asks the connection to close with `code` once what is queued is written (drain).
    pub fn request_close(&self, code: u16) {
        self.state.lock().close_request.get_or_insert(code);
        self.notify.notify_one();
    }

    /// Records that `n` taken bytes reached the socket.
    pub fn written(&self, n: usize) {
        let mut s = self.state.lock();
        s.bytes = s.bytes.saturating_sub(n);
    }

    /// Refuses all further frames (the connection is closing).
    pub fn close(&self) {
        self.state.lock().closed = true;
    }

    /// Bytes queued or taken and not yet written.
    pub fn pending_bytes(&self) -> usize {
        self.state.lock().bytes
    }

    /// Resolves when a frame was queued into an empty outbox, the outbox overflowed or a
    /// close was requested.
    pub async fn ready(&self) {
        self.notify.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(n: usize) -> Outgoing {
        Outgoing {
            frame: Bytes::from(vec![0; n]),
            published_at_us: None,
        }
    }

    #[test]
    fn bound_counts_unwritten_bytes_and_overflow_is_sticky() {
        let o = Outbox::new(100);
        assert_eq!(o.push(item(60)), Push::Queued);
        let mut taken = VecDeque::new();
        assert!(!o.take(&mut taken).overflowed);
        assert_eq!(taken.len(), 1);
        // Taken but not written still counts.
        assert_eq!(o.push(item(50)), Push::Overflowed);
        assert_eq!(o.push(item(1)), Push::Refused);
        assert!(o.take(&mut taken).overflowed);
    }

    #[test]
    fn written_bytes_make_room() {
        let o = Outbox::new(100);
        assert_eq!(o.push(item(60)), Push::Queued);
        let mut taken = VecDeque::new();
        o.take(&mut taken);
        o.written(60);
        assert_eq!(o.push(item(100)), Push::Queued);
        assert_eq!(o.pending_bytes(), 100);
        o.close();
        assert_eq!(o.push(item(0)), Push::Refused);
    }

    #[test]
    fn storage_is_released_after_a_backlog() {
        let o = Outbox::new(usize::MAX);
        for _ in 0..10_000 {
            o.push(item(1));
        }
        let mut taken = VecDeque::new();
        o.take(&mut taken);
        assert_eq!(taken.len(), 10_000);
        assert!(o.state.lock().queue.capacity() <= SHRINK_ABOVE);
    }

    #[tokio::test]
    async fn ready_wakes_on_first_push() {
        let o = std::sync::Arc::new(Outbox::new(100));
        let waiter = tokio::spawn({
            let o = o.clone();
            async move { o.ready().await }
        });
        tokio::task::yield_now().await;
        o.push(item(1));
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
    }
}
