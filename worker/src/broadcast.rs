//! One published message, encoded once for everyone. The JSON text and the plain frame are
//! built when the message arrives; each compressed variant (one per LZ77 window size a client
//! negotiated, in practice only 15) is deflated on first use and then shared: subscriber count
//! never changes the number of deflate calls.

use crate::metrics::Metrics;
use crate::ws::deflate::{self, MIN_DEFLATE_WINDOW_BITS};
use crate::ws::frame::{self, Opcode};
use bytes::Bytes;
use protocol::publish::Published;
use protocol::Position;
use std::sync::OnceLock;

/// How a connection receives data frames, fixed at its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Uncompressed text frames.
    Plain,
    /// permessage-deflate with at most this window (9..=15).
    Deflate {
        /// LZ77 window bits.
        window_bits: u8,
    },
}

impl Encoding {
    /// The encoding for a negotiated window limit: windows zlib cannot honour fall back to
    /// uncompressed frames (allowed by RFC 7692 for any message).
    pub fn deflate(window_bits: u8) -> Encoding {
        if window_bits < MIN_DEFLATE_WINDOW_BITS {
            Encoding::Plain
        } else {
            Encoding::Deflate { window_bits }
        }
    }
}

/// Outbound compression settings.
#[derive(Debug, Clone, Copy)]
pub struct Compression {
    /// Messages shorter than this go uncompressed.
    pub min_bytes: usize,
    /// zlib level 0..=9.
    pub level: u32,
}

/// A published message with its shared encodings.
pub struct Broadcast {
    /// The topic.
    pub topic: Box<str>,
    /// Publisher-stamped position, if any.
    pub position: Option<Position>,
    /// Publisher timestamp (µs since the Unix epoch), if any.
    pub published_at_us: Option<u64>,
    json_len: usize,
    plain: Bytes,
    deflated: [OnceLock<Bytes>; 7],
}

impl std::fmt::Debug for Broadcast {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broadcast")
            .field("topic", &self.topic)
            .field("position", &self.position)
            .finish_non_exhaustive()
    }
}

impl Broadcast {
    /// Encodes a published message as a `message` push (JSON text and its plain frame).
    pub fn new(topic: &str, p: &Published) -> Self {
        let json =
            protocol::client::encode_message(topic, p.position, p.published_at_us, &p.payload);
        Broadcast {
            topic: topic.into(),
            position: p.position,
            published_at_us: p.published_at_us,
            json_len: json.len(),
            plain: frame::encode(Opcode::Text, false, &json),
            deflated: Default::default(),
        }
    }

    /// A notice about a topic (gap, reset): any JSON text, sent like a message.
    pub fn notice(topic: &str, json: String) -> Self {
        Broadcast {
            topic: topic.into(),
            position: None,
            published_at_us: None,
            json_len: json.len(),
            plain: frame::encode(Opcode::Text, false, json.as_bytes()),
            deflated: Default::default(),
        }
    }

    /// Bytes of the encoded message (JSON text and plain frame; compressed variants not counted).
    pub fn encoded_len(&self) -> usize {
        self.plain.len()
    }

    /// The frame for a connection with `encoding`; deflates at most once per window size.
    pub fn frame(&self, encoding: Encoding, c: &Compression, metrics: &Metrics) -> Bytes {
        match encoding {
            Encoding::Deflate { window_bits } if self.json_len >= c.min_bytes => {
                let slot = &self.deflated[(window_bits - MIN_DEFLATE_WINDOW_BITS) as usize];
                slot.get_or_init(|| {
                    let json = &self.plain[self.plain.len() - self.json_len..];
                    let z = deflate::deflate(json, c.level, window_bits);
                    metrics.deflate_operations.inc();
                    metrics.compression_input_bytes.inc_by(json.len() as u64);
                    metrics.compression_output_bytes.inc_by(z.len() as u64);
                    frame::encode(Opcode::Text, true, &z)
                })
                .clone()
            }
            _ => self.plain.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::publish::Published;

    fn published(payload: &str) -> Published {
        Published {
            topic: Bytes::from_static(b"t"),
            position: None,
            published_at_us: None,
            payload: Bytes::copy_from_slice(payload.as_bytes()),
        }
    }

    #[test]
    fn deflates_once_per_window_and_shares_the_bytes() {
        let m = Metrics::new("t");
        let c = Compression {
            min_bytes: 10,
            level: 6,
        };
        let b = Broadcast::new("t", &published(&format!("\"{}\"", "goal ".repeat(100))));
        let enc = Encoding::deflate(15);
        let first = b.frame(enc, &c, &m);
        for _ in 0..100 {
            let again = b.frame(enc, &c, &m);
            assert_eq!(
                again.as_ptr(),
                first.as_ptr(),
                "same allocation, not a copy"
            );
        }
        assert_eq!(m.deflate_operations.get(), 1);
        assert_eq!(first[0], 0xC1, "FIN + RSV1 + text");
        b.frame(Encoding::deflate(10), &c, &m);
        assert_eq!(m.deflate_operations.get(), 2);
        assert_eq!(b.frame(Encoding::Plain, &c, &m)[0], 0x81);
    }

    #[test]
    fn small_messages_and_window_8_go_plain() {
        let m = Metrics::new("t");
        let c = Compression {
            min_bytes: 1000,
            level: 6,
        };
        let b = Broadcast::new("t", &published("1"));
        assert_eq!(b.frame(Encoding::deflate(15), &c, &m)[0], 0x81);
        assert_eq!(Encoding::deflate(8), Encoding::Plain);
        assert_eq!(m.deflate_operations.get(), 0);
    }
}
