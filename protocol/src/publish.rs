//! The publisher wire format: how a backend hands a message to the workers over ZeroMQ PUB/SUB.
//!
//! A message is a ZeroMQ multipart message of two or three frames:
//!
//! ```text
//! [topic, payload]          any ZeroMQ publisher; delivered live, never replayed
//! [topic, meta, payload]    meta = 28 bytes, big-endian:
//!     0..2   magic  b"PF"
//!     2      version = 1
//!     3      flags  bit 0: epoch/offset present, bit 1: publish time present (others 0)
//!     4..12  epoch   u64
//!     12..20 offset  u64
//!     20..28 publish time, microseconds since the Unix epoch, u64
//! ```
//!
//! The topic comes first so that ZeroMQ's prefix filtering works on it. It is UTF-8, non-empty
//! and free of control characters.

use crate::position::Position;
use bytes::Bytes;
use thiserror::Error;

/// Length of the meta frame in bytes.
pub const META_LEN: usize = 28;
/// First two bytes of every meta frame.
pub const META_MAGIC: &[u8; 2] = b"PF";
/// The meta frame version this code writes and reads.
pub const META_VERSION: u8 = 1;
const FLAG_POSITION: u8 = 1;
const FLAG_TIME: u8 = 2;

/// One message as published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The topic, validated UTF-8.
    pub topic: Bytes,
    /// Stamped position, if the publisher stamps them.
    pub position: Option<Position>,
    /// Publisher clock at send time, microseconds since the Unix epoch.
    pub published_at_us: Option<u64>,
    /// The message body, passed to clients (embedded as JSON when it is JSON).
    pub payload: Bytes,
}

/// Why a ZeroMQ message is not a valid publication.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer than two frames.
    #[error("expected [topic, payload] or [topic, meta, payload], got {0} frame(s)")]
    TooFewFrames(usize),
    /// More than three frames.
    #[error("expected at most 3 frames, got {0}")]
    TooManyFrames(usize),
    /// The topic frame is invalid.
    #[error("invalid topic: {0}")]
    Topic(#[from] TopicError),
    /// The meta frame is malformed.
    #[error("invalid meta frame: {0}")]
    Meta(&'static str),
}

/// Why a topic (or topic prefix) is not acceptable.
#[derive(Debug, Error, PartialEq, Eq, Clone, Copy)]
pub enum TopicError {
    /// Zero bytes long.
    #[error("topic is empty")]
    Empty,
    /// Longer than the configured limit.
    #[error("topic is {len} bytes, limit is {limit}")]
    TooLong {
        /// Actual length in bytes.
        len: usize,
        /// The configured limit in bytes.
        limit: usize,
    },
    /// Not UTF-8.
    #[error("topic is not valid UTF-8")]
    NotUtf8,
    /// Contains a control character (including NUL).
    #[error("topic contains a control character")]
    ControlCharacter,
}

/// Checks a topic or prefix: non-empty, at most `limit` bytes, UTF-8, no control characters.
pub fn validate_topic(topic: &[u8], limit: usize) -> Result<&str, TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.len() > limit {
        return Err(TopicError::TooLong {
            len: topic.len(),
            limit,
        });
    }
    let text = std::str::from_utf8(topic).map_err(|_| TopicError::NotUtf8)?;
    if text.chars().any(char::is_control) {
        return Err(TopicError::ControlCharacter);
    }
    Ok(text)
}

/// Decodes the frames of one ZeroMQ message. `topic_limit` is the worker's max topic length.
pub fn decode(frames: &[Bytes], topic_limit: usize) -> Result<Published, DecodeError> {
    let (topic, meta, payload) = match frames {
        [topic, payload] => (topic, None, payload),
        [topic, meta, payload] => (topic, Some(meta), payload),
        _ if frames.len() < 2 => return Err(DecodeError::TooFewFrames(frames.len())),
        _ => return Err(DecodeError::TooManyFrames(frames.len())),
    };
    validate_topic(topic, topic_limit)?;
    let (position, published_at_us) = match meta {
        None => (None, None),
        Some(meta) => decode_meta(meta)?,
    };
    Ok(Published {
        topic: topic.clone(),
        position,
        published_at_us,
        payload: payload.clone(),
    })
}

fn decode_meta(meta: &[u8]) -> Result<(Option<Position>, Option<u64>), DecodeError> {
    if meta.len() != META_LEN {
        return Err(DecodeError::Meta("meta frame must be 28 bytes"));
    }
    if &meta[0..2] != META_MAGIC {
        return Err(DecodeError::Meta("meta frame must start with \"PF\""));
    }
    if meta[2] != META_VERSION {
        return Err(DecodeError::Meta("unsupported meta version (expected 1)"));
    }
    let flags = meta[3];
    if flags & !(FLAG_POSITION | FLAG_TIME) != 0 {
        return Err(DecodeError::Meta("unknown flag bits set"));
    }
    let word = |at: usize| u64::from_be_bytes(meta[at..at + 8].try_into().expect("8 bytes"));
    let position = (flags & FLAG_POSITION != 0).then(|| Position {
        epoch: word(4),
        offset: word(12),
    });
    let time = (flags & FLAG_TIME != 0).then(|| word(20));
    Ok((position, time))
}

/// Encodes a meta frame (what a publisher sends as the second of three frames).
pub fn encode_meta(position: Option<Position>, published_at_us: Option<u64>) -> [u8; META_LEN] {
    let mut meta = [0u8; META_LEN];
    meta[0..2].copy_from_slice(META_MAGIC);
    meta[2] = META_VERSION;
    if let Some(p) = position {
        meta[3] |= FLAG_POSITION;
        meta[4..12].copy_from_slice(&p.epoch.to_be_bytes());
        meta[12..20].copy_from_slice(&p.offset.to_be_bytes());
    }
    if let Some(t) = published_at_us {
        meta[3] |= FLAG_TIME;
        meta[20..28].copy_from_slice(&t.to_be_bytes());
    }
    meta
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn b(s: &[u8]) -> Bytes {
        Bytes::copy_from_slice(s)
    }

    #[test]
    fn two_frames_are_live_only() {
        let m = decode(&[b(b"scores"), b(b"{}")], 256).unwrap();
        assert_eq!(&m.topic[..], b"scores");
        assert_eq!(m.position, None);
        assert_eq!(m.published_at_us, None);
        assert_eq!(&m.payload[..], b"{}");
    }

    #[test]
    fn frame_counts_outside_two_and_three_are_rejected() {
        assert_eq!(decode(&[b(b"t")], 256), Err(DecodeError::TooFewFrames(1)));
        assert_eq!(decode(&[], 256), Err(DecodeError::TooFewFrames(0)));
        let four = vec![b(b"t"); 4];
        assert_eq!(decode(&four, 256), Err(DecodeError::TooManyFrames(4)));
    }

    #[test]
    fn bad_topics_are_rejected_with_reason() {
        let p = b(b"x");
        assert_eq!(
            decode(&[b(b""), p.clone()], 8),
            Err(DecodeError::Topic(TopicError::Empty))
        );
        assert_eq!(
            decode(&[b(b"123456789"), p.clone()], 8),
            Err(DecodeError::Topic(TopicError::TooLong { len: 9, limit: 8 }))
        );
        assert_eq!(
            decode(&[b(&[0xff, 0xfe]), p.clone()], 8),
            Err(DecodeError::Topic(TopicError::NotUtf8))
        );
        assert_eq!(
            decode(&[b(b"a\nb"), p], 8),
            Err(DecodeError::Topic(TopicError::ControlCharacter))
        );
    }

    #[test]
    fn malformed_meta_is_rejected() {
        let good = encode_meta(
            Some(Position {
                epoch: 1,
                offset: 2,
            }),
            Some(3),
        );
        let mut short = good.to_vec();
        short.pop();
        let mut magic = good;
        magic[0] = b'X';
        let mut version = good;
        version[2] = 9;
        let mut flags = good;
        flags[3] = 0x80;
        for bad in [short, magic.to_vec(), version.to_vec(), flags.to_vec()] {
            let r = decode(&[b(b"t"), Bytes::from(bad), b(b"p")], 8);
            assert!(matches!(r, Err(DecodeError::Meta(_))), "{r:?}");
        }
    }

    proptest! {
        #[test]
        fn meta_round_trips(epoch: u64, offset: u64, time: u64, has_pos: bool, has_time: bool) {
            let pos = has_pos.then_some(Position { epoch, offset });
            let t = has_time.then_some(time);
            let meta = encode_meta(pos, t);
            let m = decode(&[b(b"topic"), b(&meta), b(b"payload")], 256).unwrap();
            prop_assert_eq!(m.position, pos);
            prop_assert_eq!(m.published_at_us, t);
        }

        #[test]
        fn decode_never_panics(frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..5)) {
            let frames: Vec<Bytes> = frames.into_iter().map(Bytes::from).collect();
            let _ = decode(&frames, 16);
        }
    }
}
