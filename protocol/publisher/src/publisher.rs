//! A ZeroMQ PUB socket that stamps positions and sends position checks.
//!
//! Frames are built once per message as `bytes::Bytes`; the PUB socket shares them between
//! subscribers. A PUB socket never blocks: with no subscriber, or a subscriber whose queue is
//! full, ZeroMQ drops the message (workers repair the gap from the positions).

use crate::stamp::Stamper;
use bytes::Bytes;
use protocol::publish::{self, TopicError};
use protocol::Position;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use thiserror::Error;
use zeromq::{Socket, SocketSend, ZmqError, ZmqMessage};

/// How a [`Publisher`] stamps, checks and validates.
#[derive(Debug, Clone)]
pub struct Options {
    /// The stream's epoch; a random u64 by default, so a restarted publisher starts a new one.
    pub epoch: u64,
    /// Also stamp the publish time (microseconds since the Unix epoch) in each meta frame.
    pub stamp_time: bool,
    /// Send a position check for a topic quiet this long, and again every interval while it
    /// stays quiet; `None` sends none (workers then notice a lost last message only when the
    /// topic's next message arrives).
    pub check_interval: Option<Duration>,
    /// Most bytes of a topic; a longer one is rejected (workers drop them, 256 by default).
    pub max_topic_bytes: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            epoch: rand::random(),
            stamp_time: true,
            check_interval: Some(Duration::from_secs(1)),
            max_topic_bytes: 256,
        }
    }
}

/// Why a publisher could not start or send.
#[derive(Debug, Error)]
pub enum PublishError {
    /// The topic would be dropped by every worker; nothing was sent and no offset was used.
    #[error("invalid topic {topic:?}: {source}")]
    Topic {
        /// The topic as given (cut to 64 characters).
        topic: String,
        /// Which rule it breaks.
        source: TopicError,
    },
    /// Binding an endpoint failed (address in use, bad endpoint, ...).
    #[error("cannot bind {endpoint}: {source}")]
    Bind {
        /// The endpoint as given.
        endpoint: String,
        /// The ZeroMQ error.
        source: ZmqError,
    },
    /// Connecting to an endpoint failed (nothing listening within the connect timeout, ...).
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        /// The endpoint as given.
        endpoint: String,
        /// The ZeroMQ error.
        source: ZmqError,
    },
    /// The socket refused a message.
    #[error("send failed: {0}")]
    Send(#[source] ZmqError),
}

/// A PUB socket plus the [`Stamper`] of its stream.
///
/// Sending only queues frames; dropping the publisher discards what is still queued. End with
/// [`close`](Self::close) to give the last frames time to go out.
pub struct Publisher {
    socket: zeromq::PubSocket,
    stamper: Stamper,
    endpoints: Vec<String>,
    options: Options,
}

impl Publisher {
    /// A publisher with no endpoint yet; add some with [`bind`](Self::bind) and
    /// [`connect`](Self::connect). Must be called inside a Tokio runtime.
    pub fn new(options: Options) -> Publisher {
        Publisher {
            socket: zeromq::PubSocket::new(),
            stamper: Stamper::new(options.epoch),
            endpoints: Vec::new(),
            options,
        }
    }

    /// Binds `endpoint` (e.g. `tcp://127.0.0.1:0` for a free port); returns the bound
    /// endpoint with its real port.
    pub async fn bind(&mut self, endpoint: &str) -> Result<String, PublishError> {
        let bound = self
            .socket
            .bind(endpoint)
            .await
            .map_err(|source| PublishError::Bind {
                endpoint: endpoint.to_owned(),
                source,
            })?
            .to_string();
        self.endpoints.push(bound.clone());
        Ok(bound)
    }

    /// Connects to `endpoint` (a SUB or XSUB that binds). The peer must be listening now:
    /// this ZeroMQ implementation gives up after its connect timeout.
    pub async fn connect(&mut self, endpoint: &str) -> Result<(), PublishError> {
        self.socket
            .connect(endpoint)
            .await
            .map_err(|source| PublishError::Connect {
                endpoint: endpoint.to_owned(),
                source,
            })?;
        self.endpoints.push(endpoint.to_owned());
        Ok(())
    }

    /// The first endpoint bound or connected.
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoints.first().map(String::as_str)
    }

    /// Every endpoint bound or connected, in order.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The epoch of every position this publisher stamps.
    pub fn epoch(&self) -> u64 {
        self.stamper.epoch()
    }

    /// The options this publisher runs with.
    pub fn options(&self) -> &Options {
        &self.options
    }

    /// The stamper (e.g. for [`Stamper::last`]).
    pub fn stamper(&self) -> &Stamper {
        &self.stamper
    }

    /// Sends `[topic, meta, payload]` with the topic's next position (and the publish time
    /// unless disabled); returns the position.
    ///
    /// Once the topic is valid the offset is used even if the send fails: reusing it could
    /// give two messages one position, while a skipped offset is a gap workers repair.
    pub async fn publish(
        &mut self,
        topic: &str,
        payload: impl Into<Bytes>,
    ) -> Result<Position, PublishError> {
        self.validate(topic)?;
        let position = self.stamper.stamp(topic, Instant::now());
        let time = self.options.stamp_time.then(now_us);
        let meta = publish::encode_meta(Some(position), time);
        self.send([
            Bytes::copy_from_slice(topic.as_bytes()),
            Bytes::copy_from_slice(&meta),
            payload.into(),
        ])
        .await?;
        Ok(position)
    }

    /// Sends a live-only `[topic, payload]`: no position, never replayed, no offset used.
    pub async fn publish_live(
        &mut self,
        topic: &str,
        payload: impl Into<Bytes>,
    ) -> Result<(), PublishError> {
        self.validate(topic)?;
        self.send([Bytes::copy_from_slice(topic.as_bytes()), payload.into()])
            .await
    }

    /// Sends a position check for every topic quiet for the check interval at `now` (none if
    /// checks are disabled); returns how many were sent. Call it often (a tenth of the
    /// interval is plenty): a check goes out at the first call after the topic is due. Await
    /// it to completion (not as a `select!` branch): topics count as checked before sending.
    pub async fn send_due_checks(&mut self, now: Instant) -> Result<usize, PublishError> {
        match self.options.check_interval {
            Some(interval) => self.send_checks(now, interval).await,
            None => Ok(0),
        }
    }

    /// Sends a position check for every topic at once (e.g. before exiting, so workers learn
    /// the final positions); returns how many were sent. Sent even if checks are disabled.
    pub async fn send_all_checks(&mut self) -> Result<usize, PublishError> {
        self.send_checks(Instant::now(), Duration::ZERO).await
    }

    /// Waits `linger` so that queued frames reach subscribers (ZeroMQ PUB has no flush),
    /// then closes the socket.
    pub async fn close(self, linger: Duration) {
        tokio::time::sleep(linger).await;
        self.socket.close().await;
    }

    async fn send_checks(
        &mut self,
        now: Instant,
        interval: Duration,
    ) -> Result<usize, PublishError> {
        let due = self.stamper.due_checks(now, interval);
        for (topic, last) in &due {
            self.send(publish::encode_check(topic, *last)).await?;
        }
        Ok(due.len())
    }

    async fn send<const N: usize>(&mut self, frames: [Bytes; N]) -> Result<(), PublishError> {
        let mut message = ZmqMessage::from(frames[0].clone());
        for frame in frames.into_iter().skip(1) {
            message.push_back(frame);
        }
        self.socket.send(message).await.map_err(PublishError::Send)
    }

    fn validate(&self, topic: &str) -> Result<(), PublishError> {
        publish::validate_topic(topic.as_bytes(), self.options.max_topic_bytes)
            .map(drop)
            .map_err(|source| PublishError::Topic {
                topic: topic.chars().take(64).collect(),
                source,
            })
    }
}

/// Microseconds since the Unix epoch (the meta frame's clock); 0 if the clock is before 1970.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same bytes are asserted by tests/interop/test_publisher_format.py, so the Python
    /// example publisher and this one cannot drift apart.
    #[test]
    fn check_frames_match_the_vector_shared_with_the_python_publisher() {
        let last = Position {
            epoch: 0x0102_0304_0506_0708,
            offset: 9,
        };
        let [topic, meta, payload] = publish::encode_check("t", last);
        assert_eq!(&topic[..], b"t");
        let expected =
            b"PF\x01\x05\x01\x02\x03\x04\x05\x06\x07\x08\0\0\0\0\0\0\0\x09\0\0\0\0\0\0\0\0";
        assert_eq!(&meta[..], &expected[..]);
        assert!(payload.is_empty());
    }

    #[tokio::test]
    async fn invalid_topics_are_rejected_without_using_an_offset() {
        let mut p = Publisher::new(Options {
            max_topic_bytes: 4,
            ..Options::default()
        });
        for bad in ["", "12345", "a\nb"] {
            let err = p.publish(bad, "x").await.unwrap_err();
            assert!(matches!(err, PublishError::Topic { .. }), "{err}");
            assert!(p.publish_live(bad, "x").await.is_err());
        }
        let err = p.publish("12345", "x").await.unwrap_err().to_string();
        assert_eq!(err, "invalid topic \"12345\": topic is 5 bytes, limit is 4");
        assert_eq!(p.stamper().topic_count(), 0);
        assert_eq!(p.publish("ok", "x").await.unwrap().offset, 0);
    }

    #[tokio::test]
    async fn publish_without_subscribers_still_stamps() {
        let mut p = Publisher::new(Options {
            epoch: 42,
            ..Options::default()
        });
        let endpoint = p.bind("tcp://127.0.0.1:0").await.unwrap();
        assert!(endpoint.starts_with("tcp://127.0.0.1:"), "{endpoint}");
        assert!(!endpoint.ends_with(":0"), "{endpoint}");
        assert_eq!(p.endpoint(), Some(endpoint.as_str()));
        assert_eq!(p.epoch(), 42);
        for offset in 0..3 {
            let position = p.publish("t", "x").await.unwrap();
            assert_eq!(position, Position { epoch: 42, offset });
        }
        p.publish_live("t", "y").await.unwrap();
        assert_eq!(p.stamper().last("t").unwrap().offset, 2);
        assert_eq!(p.send_all_checks().await.unwrap(), 1);
    }

    #[tokio::test]
    async fn disabled_checks_send_nothing() {
        let mut p = Publisher::new(Options {
            check_interval: None,
            ..Options::default()
        });
        p.publish("t", "x").await.unwrap();
        let later = Instant::now() + Duration::from_secs(3600);
        assert_eq!(p.send_due_checks(later).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn binding_a_bad_endpoint_names_it() {
        let mut p = Publisher::new(Options::default());
        let err = p.bind("nonsense").await.unwrap_err().to_string();
        assert!(err.starts_with("cannot bind nonsense: "), "{err}");
    }
}
