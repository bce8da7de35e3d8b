//! An in-process ZeroMQ publisher for tests. It stamps positions with the publisher library's
//! [`Stamper`] (so offsets per topic are 0, 1, 2, ... like a real publisher's), and it can
//! misbehave on purpose to exercise workers: explicit positions ([`Publisher::publish_at`]),
//! lost messages ([`Publisher::stamp_only`]), position checks on demand
//! ([`Publisher::check`], [`Publisher::check_at`]) and restarts ([`Publisher::restart`]).

use ::publisher::Stamper;
use anyhow::{Context, Result};
use bytes::Bytes;
use protocol::{publish, Position};
use std::time::Instant;
use zeromq::{Socket, SocketSend, ZmqMessage};

/// A PUB socket bound to a loopback port.
pub struct Publisher {
    socket: zeromq::PubSocket,
    /// The endpoint workers connect to.
    pub endpoint: String,
    /// This publisher's epoch (read it; change it with [`Publisher::restart`]).
    pub epoch: u64,
    stamper: Stamper,
}

impl Publisher {
    /// Publishes `topic` messages until `c` sees one (ZeroMQ's slow joiner: a subscription
    /// takes a moment to reach the publisher), within 15 s. Returns the offset of the first one
    /// received.
    pub async fn prime(&mut self, c: &mut crate::WsClient, topic: &str) -> Result<u64> {
        let deadline = Instant::now() + std::time::Duration::from_secs(15);
        let patience =
            std::mem::replace(&mut c.read_timeout, std::time::Duration::from_millis(100));
        let result = loop {
            self.publish(topic, br#"{"prime":true}"#).await?;
            if let Ok(m) = c.recv_json().await {
                anyhow::ensure!(m["topic"] == topic, "unexpected {m}");
                break m["position"]["offset"]
                    .as_u64()
                    .context("a primed message has a position");
            }
            if Instant::now() >= deadline {
                break Err(anyhow::anyhow!("subscription never reached the publisher"));
            }
        };
        c.read_timeout = patience;
        result
    }

    /// Binds a PUB socket on 127.0.0.1, port 0, with a random epoch.
    pub async fn bind() -> Result<Publisher> {
        Publisher::bind_to("tcp://127.0.0.1:0").await
    }

    /// Binds a PUB socket on `endpoint` (e.g. `tcp://127.0.0.1:5599`), with a random epoch.
    pub async fn bind_to(endpoint: &str) -> Result<Publisher> {
        let mut socket = zeromq::PubSocket::new();
        let endpoint = socket.bind(endpoint).await?.to_string();
        let epoch = rand::random();
        Ok(Publisher {
            socket,
            endpoint,
            epoch,
            stamper: Stamper::new(epoch),
        })
    }

    /// Publishes `[topic, meta, payload]` with the next position of `topic` and the current
    /// time; returns the position.
    pub async fn publish(&mut self, topic: &str, payload: &[u8]) -> Result<Position> {
        let position = self.stamp_only(topic);
        self.publish_at(topic, position, payload).await?;
        Ok(position)
    }

    /// Publishes `[topic, meta, payload]` with exactly `position` (any epoch and offset, e.g.
    /// to skip or repeat offsets). The topic's own counter does not move.
    pub async fn publish_at(
        &mut self,
        topic: &str,
        position: Position,
        payload: &[u8],
    ) -> Result<()> {
        let meta = publish::encode_meta(Some(position), Some(now_us()));
        self.send(vec![
            Bytes::copy_from_slice(topic.as_bytes()),
            Bytes::copy_from_slice(&meta),
            Bytes::copy_from_slice(payload),
        ])
        .await
    }

    /// Takes the next position of `topic` without sending anything: to workers, a message
    /// lost between publisher and worker. Returns the position skipped.
    pub fn stamp_only(&mut self, topic: &str) -> Position {
        self.stamper.stamp(topic, Instant::now())
    }

    /// The position of the last message stamped on `topic` (sent or not), if any.
    pub fn last(&self, topic: &str) -> Option<Position> {
        self.stamper.last(topic)
    }

    /// Sends a position check carrying the last position stamped on `topic` (sent or not);
    /// fails if nothing was stamped on it since the publisher started or restarted.
    pub async fn check(&mut self, topic: &str) -> Result<()> {
        let last = self
            .stamper
            .last(topic)
            .with_context(|| format!("no message stamped on {topic:?} yet: nothing to check"))?;
        self.check_at(topic, last).await
    }

    /// Sends a position check carrying exactly `position` (the counterpart of
    /// [`Publisher::publish_at`]); the topic's own counter does not move.
    pub async fn check_at(&mut self, topic: &str, position: Position) -> Result<()> {
        self.send(publish::encode_check(topic, position).into())
            .await
    }

    /// Simulates a publisher restart on the same socket: `epoch` becomes the epoch and every
    /// topic starts again at offset 0.
    pub fn restart(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.stamper.restart(epoch);
    }

    /// Sends raw frames.
    pub async fn send(&mut self, frames: Vec<Bytes>) -> Result<()> {
        let msg = ZmqMessage::try_from(frames).map_err(|_| anyhow::anyhow!("empty message"))?;
        self.socket.send(msg).await?;
        Ok(())
    }
}

/// Microseconds since the Unix epoch.
pub use ::publisher::now_us;

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::publish::Inbound;
    use std::time::Duration;
    use zeromq::SocketRecv;

    const WAIT: Duration = Duration::from_secs(10);

    /// A subscriber that has seen a probe from `p`, so nothing sent after this is lost to
    /// the slow-joiner window.
    async fn subscriber(p: &mut Publisher) -> Result<zeromq::SubSocket> {
        let mut sub = zeromq::SubSocket::new();
        tokio::time::timeout(WAIT, sub.connect(&p.endpoint)).await??;
        sub.subscribe("").await?;
        let deadline = Instant::now() + WAIT;
        loop {
            anyhow::ensure!(Instant::now() < deadline, "no probe arrived");
            p.send(vec![Bytes::from("probe"), Bytes::from("{}")])
                .await?;
            if let Ok(m) = tokio::time::timeout(Duration::from_millis(100), sub.recv()).await {
                if m?.get(0).is_some_and(|t| &t[..] == b"probe") {
                    return Ok(sub);
                }
            }
        }
    }

    /// The next publication that is not a probe.
    async fn next(sub: &mut zeromq::SubSocket) -> Result<Inbound> {
        loop {
            let frames = tokio::time::timeout(WAIT, sub.recv()).await??.into_vec();
            if &frames[0][..] != b"probe" {
                return Ok(publish::decode(&frames, 256)?);
            }
        }
    }

    fn message_position(inbound: Inbound) -> Option<Position> {
        match inbound {
            Inbound::Message(m) => m.position,
            Inbound::Check { .. } => panic!("expected a message, got {inbound:?}"),
        }
    }

    #[tokio::test]
    async fn stamps_skips_checks_and_restarts_like_a_publisher() -> Result<()> {
        let mut p = Publisher::bind().await?;
        let mut sub = subscriber(&mut p).await?;
        let epoch = p.epoch;
        let at = |epoch, offset| Position { epoch, offset };

        assert!(p.check("t").await.is_err(), "nothing stamped yet");
        assert_eq!(p.publish("t", b"0").await?, at(epoch, 0));
        assert_eq!(message_position(next(&mut sub).await?), Some(at(epoch, 0)));

        // A lost message: offset 1 is used but never sent; the check names it.
        assert_eq!(p.stamp_only("t"), at(epoch, 1));
        assert_eq!(p.last("t"), Some(at(epoch, 1)));
        p.check("t").await?;
        let check = next(&mut sub).await?;
        let expected = Inbound::Check {
            topic: Bytes::from("t"),
            position: at(epoch, 1),
        };
        assert_eq!(check, expected);
        assert_eq!(p.publish("t", b"2").await?, at(epoch, 2));
        assert_eq!(message_position(next(&mut sub).await?), Some(at(epoch, 2)));

        // An explicit position does not move the counter.
        p.publish_at("t", at(epoch, 1), b"again").await?;
        assert_eq!(message_position(next(&mut sub).await?), Some(at(epoch, 1)));
        assert_eq!(p.last("t"), Some(at(epoch, 2)));

        p.check_at("t", at(epoch, 7)).await?;
        let check = next(&mut sub).await?;
        assert!(matches!(check, Inbound::Check { position, .. } if position == at(epoch, 7)));

        // A restart: new epoch, offsets from 0, old topics forgotten.
        p.restart(epoch.wrapping_add(1));
        assert_eq!(p.epoch, epoch.wrapping_add(1));
        assert_eq!(p.last("t"), None);
        assert_eq!(p.publish("t", b"new").await?, at(epoch.wrapping_add(1), 0));
        assert_eq!(
            message_position(next(&mut sub).await?),
            Some(at(epoch.wrapping_add(1), 0))
        );
        Ok(())
    }
}
