//! An in-process ZeroMQ publisher that stamps positions in the publisher wire format.

use anyhow::Result;
use bytes::Bytes;
use protocol::{publish, Position};
use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};
use zeromq::{Socket, SocketSend, ZmqMessage};

/// A PUB socket bound to a loopback port.
pub struct Publisher {
    socket: zeromq::PubSocket,
    /// The endpoint workers connect to.
    pub endpoint: String,
    /// This publisher's epoch.
    pub epoch: u64,
    offsets: HashMap<String, u64>,
}

impl Publisher {
    /// Binds a PUB socket on 127.0.0.1, port 0.
    pub async fn bind() -> Result<Publisher> {
        let mut socket = zeromq::PubSocket::new();
        let endpoint = socket.bind("tcp://127.0.0.1:0").await?.to_string();
        Ok(Publisher {
            socket,
            endpoint,
            epoch: rand::random(),
            offsets: HashMap::new(),
        })
    }

    /// Publishes `[topic, meta, payload]` with the next position of `topic` and the current
    /// time; returns the position.
    pub async fn publish(&mut self, topic: &str, payload: &[u8]) -> Result<Position> {
        let offset = self.offsets.entry(topic.to_string()).or_insert(0);
        let position = Position {
            epoch: self.epoch,
            offset: *offset,
        };
        *offset += 1;
        let meta = publish::encode_meta(Some(position), Some(now_us()));
        self.send(vec![
            Bytes::copy_from_slice(topic.as_bytes()),
            Bytes::copy_from_slice(&meta),
            Bytes::copy_from_slice(payload),
        ])
        .await?;
        Ok(position)
    }

    /// Sends raw frames.
    pub async fn send(&mut self, frames: Vec<Bytes>) -> Result<()> {
        let msg = ZmqMessage::try_from(frames).map_err(|_| anyhow::anyhow!("empty message"))?;
        self.socket.send(msg).await?;
        Ok(())
    }
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
