//! How workers hand history to each other: the body of the admin endpoint
//! `GET /history?topic=T[&epoch=E&from=N][&limit=L]`, content type [`CONTENT_TYPE`].
//!
//! ```text
//! body  = "PFH" 0x01 entry*
//! entry = topic_len u16 | topic | meta (28 bytes, the publisher meta frame) | payload_len u32 | payload
//! ```
//!
//! Integers are big-endian. Every entry carries a position (meta flag bit 0); entries of one
//! topic are in offset order. The format reuses the publisher meta frame so that a message
//! handed over by a peer is exactly what the publisher sent.

use crate::position::Position;
use crate::publish::{self, Inbound, Published};
use bytes::{Buf, Bytes};
use thiserror::Error;

/// Content type of a history body.
pub const CONTENT_TYPE: &str = "application/x-pushfleet-history";
/// First four bytes of every body.
pub const MAGIC: &[u8; 4] = b"PFH\x01";

/// Why a history body cannot be read.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BackfillError {
    /// The body does not start with [`MAGIC`].
    #[error("not a pushfleet history body (bad magic or version)")]
    Magic,
    /// The body ends inside an entry.
    #[error("history body truncated inside entry {0}")]
    Truncated(usize),
    /// An entry is not a valid positioned message.
    #[error("history entry {index} is invalid: {reason}")]
    Entry {
        /// Zero-based entry index.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
}

/// Starts a body.
pub fn begin(out: &mut Vec<u8>) {
    out.extend_from_slice(MAGIC);
}

/// Appends one entry to a body started with [`begin`].
pub fn push_entry(
    out: &mut Vec<u8>,
    topic: &str,
    position: Position,
    published_at_us: Option<u64>,
    payload: &[u8],
) {
    let topic_len = u16::try_from(topic.len()).expect("topics are at most 65535 bytes");
    let payload_len = u32::try_from(payload.len()).expect("payloads are under 4 GiB");
    out.extend_from_slice(&topic_len.to_be_bytes());
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(&publish::encode_meta(Some(position), published_at_us));
    out.extend_from_slice(&payload_len.to_be_bytes());
    out.extend_from_slice(payload);
}

/// Reads a body into positioned messages; payloads share the body's memory.
pub fn decode(mut body: Bytes, topic_limit: usize) -> Result<Vec<Published>, BackfillError> {
    if body.len() < MAGIC.len() || &body[..MAGIC.len()] != MAGIC {
        return Err(BackfillError::Magic);
    }
    body.advance(MAGIC.len());
    let mut out = Vec::new();
    while body.has_remaining() {
        let index = out.len();
        let take = |body: &mut Bytes, n: usize| {
            (body.remaining() >= n)
                .then(|| body.split_to(n))
                .ok_or(BackfillError::Truncated(index))
        };
        let topic_len = u16::from_be_bytes(take(&mut body, 2)?[..].try_into().expect("2"));
        let topic = take(&mut body, topic_len as usize)?;
        let meta = take(&mut body, publish::META_LEN)?;
        let payload_len = u32::from_be_bytes(take(&mut body, 4)?[..].try_into().expect("4"));
        let payload = take(&mut body, payload_len as usize)?;
        let invalid = |reason: String| BackfillError::Entry { index, reason };
        match publish::decode(&[topic, meta, payload], topic_limit) {
            Ok(Inbound::Message(p)) if p.position.is_some() => out.push(p),
            Ok(_) => return Err(invalid("no position, or a position check".into())),
            Err(e) => return Err(invalid(e.to_string())),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn entries_round_trip_and_share_memory() {
        let mut body = Vec::new();
        begin(&mut body);
        let p = |offset| Position { epoch: 7, offset };
        push_entry(&mut body, "m.1", p(0), Some(5), b"{\"a\":1}");
        push_entry(&mut body, "m.1", p(1), None, &[0xff, 0]);
        let got = decode(Bytes::from(body), 64).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(&got[0].topic[..], b"m.1");
        assert_eq!(got[0].position, Some(p(0)));
        assert_eq!(got[0].published_at_us, Some(5));
        assert_eq!(&got[1].payload[..], &[0xff, 0]);
        assert_eq!(got[1].published_at_us, None);
    }

    #[test]
    fn bad_bodies_are_rejected_with_reason() {
        assert_eq!(
            decode(Bytes::from_static(b"nope"), 64),
            Err(BackfillError::Magic)
        );
        assert_eq!(decode(Bytes::from_static(MAGIC), 64), Ok(vec![]));
        let mut body = Vec::new();
        begin(&mut body);
        push_entry(&mut body, "t", Position::default(), None, b"xyz");
        body.pop();
        assert_eq!(
            decode(Bytes::from(body), 64),
            Err(BackfillError::Truncated(0))
        );
        let mut body = Vec::new();
        begin(&mut body);
        push_entry(&mut body, "a\nb", Position::default(), None, b"x");
        assert!(matches!(
            decode(Bytes::from(body), 64),
            Err(BackfillError::Entry { index: 0, .. })
        ));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut body = MAGIC.to_vec();
            body.extend(bytes);
            let _ = decode(Bytes::from(body), 16);
        }
    }
}
