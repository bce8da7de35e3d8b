//! The publisher wire format: how a backend hands a message to the workers over ZeroMQ PUB/SUB.
//!
//! A message is a ZeroMQ multipart message of two or three frames:
//!
//! ```text
//! [topic, payload]          any ZeroMQ publisher; delivered live, never replayed
//! [topic, meta, payload]    meta = 28 bytes, big-endian:
//!     0..2   magic  b"PF"
//!     2      version = 1
//!     3      flags  bit 0: epoch/offset present, bit 1: publish time present,
//!                   bit 2: position check (others 0)
//!     4..12  epoch   u64
//!     12..20 offset  u64
//!     20..28 publish time, microseconds since the Unix epoch, u64
//! ```
//!
//! A **position check** (flags bits 0 and 2, empty payload) is not a message: it says "the last
//! message I published on this topic is at this position". Publishers send one for each topic
//! that has been quiet for a while, so that a worker that lost the last message of a topic
//! that then went quiet notices the gap and repairs it. Workers never deliver checks to clients.
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
const FLAG_CHECK: u8 = 4;

/// What one ZeroMQ message from a publisher carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// A message for clients.
    Message(Published),
    /// A position check: `position` is the last message published on `topic`.
    Check {
        /// The topic, validated UTF-8.
        topic: Bytes,
        /// Position of the topic's latest message.
        position: Position,
    },
}

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
    /// A position check without a position or with a payload.
    #[error("invalid position check: {0}")]
    Check(&'static str),
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
pub fn decode(frames: &[Bytes], topic_limit: usize) -> Result<Inbound, DecodeError> {
    let (topic, meta, payload) = match frames {
        [topic, payload] => (topic, None, payload),
        [topic, meta, payload] => (topic, Some(meta), payload),
        _ if frames.len() < 2 => return Err(DecodeError::TooFewFrames(frames.len())),
        _ => return Err(DecodeError::TooManyFrames(frames.len())),
    };
    validate_topic(topic, topic_limit)?;
    let (position, published_at_us, check) = match meta {
        None => (None, None, false),
        Some(meta) => decode_meta(meta)?,
    };
    if check {
        let position = position.ok_or(DecodeError::Check("flag bit 0 (position) is not set"))?;
        if !payload.is_empty() {
            return Err(DecodeError::Check("the payload frame must be empty"));
        }
        return Ok(Inbound::Check {
            topic: topic.clone(),
            position,
        });
    }
    Ok(Inbound::Message(Published {
        topic: topic.clone(),
        position,
        published_at_us,
        payload: payload.clone(),
    }))
}

/// Decoded meta: position, publish time, position-check flag.
type Meta = (Option<Position>, Option<u64>, bool);

fn decode_meta(meta: &[u8]) -> Result<Meta, DecodeError> {
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
    if flags & !(FLAG_POSITION | FLAG_TIME | FLAG_CHECK) != 0 {
        return Err(DecodeError::Meta("unknown flag bits set"));
    }
    let word = |at: usize| u64::from_be_bytes(meta[at..at + 8].try_into().expect("8 bytes"));
    let position = (flags & FLAG_POSITION != 0).then(|| Position {
        epoch: word(4),
        offset: word(12),
    });
    let time = (flags & FLAG_TIME != 0).then(|| word(20));
    Ok((position, time, flags & FLAG_CHECK != 0))
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

/// Encodes the frames of a position check: `[topic, meta, empty payload]`.
pub fn encode_check(topic: &str, last: Position) -> [Bytes; 3] {
    let mut meta = encode_meta(Some(last), None);
    meta[3] |= FLAG_CHECK;
    [
        Bytes::copy_from_slice(topic.as_bytes()),
        Bytes::copy_from_slice(&meta),
        Bytes::new(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn b(s: &[u8]) -> Bytes {
        Bytes::copy_from_slice(s)
    }

    fn message(frames: &[Bytes], limit: usize) -> Result<Published, DecodeError> {
        match decode(frames, limit)? {
            Inbound::Message(m) => Ok(m),
            other => panic!("not a message: {other:?}"),
        }
    }

    #[test]
    fn position_checks_decode_and_need_a_position_and_no_payload() {
        let last = Position {
            epoch: 9,
            offset: 41,
        };
        let frames = encode_check("t", last);
        assert_eq!(
            decode(&frames, 8),
            Ok(Inbound::Check {
                topic: b(b"t"),
                position: last
            })
        );
        let mut with_payload = frames.clone();
        with_payload[2] = b(b"x");
        assert!(matches!(
            decode(&with_payload, 8),
            Err(DecodeError::Check(_))
        ));
        let mut meta = encode_meta(None, None);
        meta[3] |= FLAG_CHECK;
        assert!(matches!(
            decode(&[b(b"t"), b(&meta), Bytes::new()], 8),
            Err(DecodeError::Check(_))
        ));
    }

    #[test]
    fn two_frames_are_live_only() {
        let m = message(&[b(b"scores"), b(b"{}")], 256).unwrap();
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
        flags[3] = 0x80 | FLAG_POSITION;
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
            let m = message(&[b(b"topic"), b(&meta), b(b"payload")], 256).unwrap();
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
