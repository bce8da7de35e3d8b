//! Turns bytes from a client into WebSocket events: frames are checked, unmasked, reassembled
//! from fragments, inflated and UTF-8 validated, each limit enforced as early as it can be.
//! Pure: no I/O, no clock, so it can be fuzzed and unit-tested byte by byte.

use super::deflate::{self, InflateError};
use super::frame::{self, HeaderError, Opcode};
use super::Violation;
use bytes::BytesMut;

/// Size limits on what a client sends.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most payload bytes in one frame.
    pub max_frame_bytes: usize,
    /// Most bytes of one message as received (all fragments).
    pub max_message_bytes: usize,
    /// Most bytes a compressed message may inflate to.
    pub max_decompressed_bytes: usize,
}

/// One thing a client said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A complete text message (valid UTF-8).
    Text(String),
    /// A complete binary message.
    Binary(Vec<u8>),
    /// A ping; answer with a pong carrying the same bytes.
    Ping(Vec<u8>),
    /// A pong.
    Pong,
    /// The client closes, with its code and reason when it gave one.
    Close(Option<(u16, String)>),
}

#[derive(Debug)]
struct Partial {
    opcode: Opcode,
    compressed: bool,
    data: Vec<u8>,
    /// Bytes of `data` known to be valid UTF-8 (uncompressed text only: fail fast).
    utf8_checked: usize,
}

/// Reassembles client frames into [`Event`]s.
#[derive(Debug)]
pub struct Reader {
    limits: Limits,
    deflate: bool,
    partial: Option<Partial>,
}

impl Reader {
    /// A reader for one connection; `deflate` is whether permessage-deflate was negotiated.
    pub fn new(limits: Limits, deflate: bool) -> Self {
        Reader {
            limits,
            deflate,
            partial: None,
        }
    }

    /// Bytes held for an unfinished fragmented message (for memory accounting).
    pub fn buffered_bytes(&self) -> usize {
        self.partial.as_ref().map_or(0, |p| p.data.capacity())
    }

    /// Takes the next event from the front of `buf`, consuming its bytes. `Ok(None)` means
    /// `buf` holds no complete frame yet (see [`Reader::frame_len_hint`]).
    pub fn next_event(&mut self, buf: &mut BytesMut) -> Result<Option<Event>, Violation> {
        loop {
            let Some(h) = frame::parse_header(buf, self.deflate, self.limits.max_frame_bytes)
                .map_err(header_violation)?
            else {
                return Ok(None);
            };
            if buf.len() < h.header_len + h.payload_len {
                return Ok(None);
            }
            let _ = buf.split_to(h.header_len);
            let mut payload = buf.split_to(h.payload_len);
            frame::unmask(&mut payload, h.mask);
            if h.opcode.is_control() {
                if h.rsv1 {
                    return Err(Violation::Protocol("control frames cannot be compressed"));
                }
                return control_event(h.opcode, &payload).map(Some);
            }
            if let Some(event) = self.data_frame(h.opcode, h.fin, h.rsv1, &payload)? {
                return Ok(Some(event));
            }
        }
    }

    /// How many bytes the frame at the front of `buf` needs in all, when its header is
    /// complete (lets the caller reserve once for large frames).
    pub fn frame_len_hint(&self, buf: &[u8]) -> Option<usize> {
        frame::parse_header(buf, self.deflate, self.limits.max_frame_bytes)
            .ok()
            .flatten()
            .map(|h| h.header_len + h.payload_len)
    }

    fn data_frame(
        &mut self,
        opcode: Opcode,
        fin: bool,
        rsv1: bool,
        payload: &[u8],
    ) -> Result<Option<Event>, Violation> {
        let limit = self.limits.max_message_bytes;
        match (opcode, self.partial.as_mut()) {
            (Opcode::Continuation, None) => Err(Violation::Protocol(
                "continuation frame without a message to continue",
            )),
            (Opcode::Continuation, Some(p)) => {
                if rsv1 {
                    return Err(Violation::Protocol("RSV1 set on a continuation frame"));
                }
                let total = p.data.len() + payload.len();
                if total > limit {
                    return Err(Violation::TooBig {
                        what: "message",
                        len: total as u64,
                        limit,
                    });
                }
                p.data.extend_from_slice(payload);
                check_utf8_prefix(p)?;
                if fin {
                    let p = self.partial.take().expect("partial exists");
                    self.finish(p.opcode, p.compressed, p.data).map(Some)
                } else {
                    Ok(None)
                }
            }
            (_, Some(_)) => Err(Violation::Protocol(
                "new data message before the previous one finished",
            )),
            (_, None) => {
                if payload.len() > limit {
                    return Err(Violation::TooBig {
                        what: "message",
                        len: payload.len() as u64,
                        limit,
                    });
                }
                if fin {
                    return self.finish(opcode, rsv1, payload.to_vec()).map(Some);
                }
                let mut p = Partial {
                    opcode,
                    compressed: rsv1,
                    data: payload.to_vec(),
                    utf8_checked: 0,
                };
                check_utf8_prefix(&mut p)?;
                self.partial = Some(p);
                Ok(None)
            }
        }
    }

    fn finish(&self, opcode: Opcode, compressed: bool, data: Vec<u8>) -> Result<Event, Violation> {
        let data = if compressed {
            deflate::inflate(&data, self.limits.max_decompressed_bytes).map_err(|e| match e {
                InflateError::Corrupt => Violation::BadCompressedData,
                InflateError::TooBig { limit } => Violation::TooBig {
                    what: "decompressed message",
                    len: limit as u64 + 1,
                    limit,
                },
            })?
        } else {
            data
        };
        match opcode {
            Opcode::Text => String::from_utf8(data)
                .map(Event::Text)
                .map_err(|_| Violation::InvalidUtf8),
            _ => Ok(Event::Binary(data)),
        }
    }
}

/// For uncompressed text, fails as soon as the bytes so far cannot be a UTF-8 prefix.
fn check_utf8_prefix(p: &mut Partial) -> Result<(), Violation> {
    if p.opcode != Opcode::Text || p.compressed {
        return Ok(());
    }
    match std::str::from_utf8(&p.data[p.utf8_checked..]) {
        Ok(_) => p.utf8_checked = p.data.len(),
        Err(e) if e.error_len().is_none() => p.utf8_checked += e.valid_up_to(),
        Err(_) => return Err(Violation::InvalidUtf8),
    }
    Ok(())
}

fn control_event(opcode: Opcode, payload: &[u8]) -> Result<Event, Violation> {
    match opcode {
        Opcode::Ping => Ok(Event::Ping(payload.to_vec())),
        Opcode::Pong => Ok(Event::Pong),
        _ => match payload {
            [] => Ok(Event::Close(None)),
            [_] => Err(Violation::Protocol("close frame with a 1-byte payload")),
            [hi, lo, reason @ ..] => {
                let code = u16::from_be_bytes([*hi, *lo]);
                if !valid_close_code(code) {
                    return Err(Violation::Protocol("invalid close code"));
                }
                let reason = std::str::from_utf8(reason).map_err(|_| Violation::InvalidUtf8)?;
                Ok(Event::Close(Some((code, reason.to_owned()))))
            }
        },
    }
}

/// Close codes a client may send (RFC 6455 §7.4; 1012-1014 are server-side only).
fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

fn header_violation(e: HeaderError) -> Violation {
    match e {
        HeaderError::ReservedBits => Violation::Protocol("reserved bits set"),
        HeaderError::ReservedOpcode(_) => Violation::Protocol("reserved opcode"),
        HeaderError::Unmasked => Violation::Protocol("client frames must be masked"),
        HeaderError::BadControlFrame => {
            Violation::Protocol("control frame fragmented or over 125 bytes")
        }
        HeaderError::TooBig { len, limit } => Violation::TooBig {
            what: "frame",
            len,
            limit,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::client::close;

    fn limits() -> Limits {
        Limits {
            max_frame_bytes: 1000,
            max_message_bytes: 2000,
            max_decompressed_bytes: 4000,
        }
    }

    fn frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [9, 8, 7, 6];
        let mut v = vec![b0];
        if payload.len() < 126 {
            v.push(0x80 | payload.len() as u8);
        } else {
            v.push(0x80 | 126);
            v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        v.extend_from_slice(&mask);
        let mut p = payload.to_vec();
        frame::unmask(&mut p, mask);
        v.extend(p);
        v
    }

    fn run(deflate: bool, bytes: &[u8]) -> Vec<Result<Event, u16>> {
        let mut r = Reader::new(limits(), deflate);
        let mut buf = BytesMut::from(bytes);
        let mut out = vec![];
        loop {
            match r.next_event(&mut buf) {
                Ok(Some(e)) => out.push(Ok(e)),
                Ok(None) => return out,
                Err(v) => {
                    out.push(Err(v.close_code()));
                    return out;
                }
            }
        }
    }

    #[test]
    fn reassembles_fragments_and_interleaved_control_frames() {
        let mut bytes = frame(0x01, b"hel");
        bytes.extend(frame(0x89, b"p"));
        bytes.extend(frame(0x80, b"lo"));
        assert_eq!(
            run(false, &bytes),
            vec![
                Ok(Event::Ping(b"p".to_vec())),
                Ok(Event::Text("hello".into()))
            ]
        );
    }

    #[test]
    fn byte_at_a_time_gives_the_same_events() {
        let mut bytes = frame(0x01, "héllo wörld".as_bytes());
        bytes.extend(frame(0x80, b"!"));
        bytes.extend(frame(0x82, &[1, 2, 3]));
        let mut r = Reader::new(limits(), false);
        let mut buf = BytesMut::new();
        let mut events = vec![];
        for b in bytes {
            buf.extend_from_slice(&[b]);
            while let Some(e) = r.next_event(&mut buf).unwrap() {
                events.push(e);
            }
        }
        assert_eq!(
            events,
            vec![
                Event::Text("héllo wörld!".into()),
                Event::Binary(vec![1, 2, 3])
            ]
        );
    }

    #[test]
    fn each_violation_has_its_close_code() {
        assert_eq!(
            run(false, &frame(0x80, b"x")),
            vec![Err(close::PROTOCOL_ERROR)]
        );
        let mut two_starts = frame(0x01, b"a");
        two_starts.extend(frame(0x81, b"b"));
        assert_eq!(run(false, &two_starts), vec![Err(close::PROTOCOL_ERROR)]);
        assert_eq!(
            run(false, &frame(0x81, &[0xC3, 0x28])),
            vec![Err(close::INVALID_UTF8)]
        );
        // Fail fast: the bad byte is in the first fragment, no FIN yet.
        assert_eq!(
            run(false, &frame(0x01, &[b'a', 0xFF])),
            vec![Err(close::INVALID_UTF8)]
        );
        assert_eq!(
            run(false, &frame(0x82, &[0; 1001])),
            vec![Err(close::MESSAGE_TOO_BIG)]
        );
        let mut long = frame(0x02, &[0; 1000]);
        long.extend(frame(0x00, &[0; 1000]));
        long.extend(frame(0x80, &[0; 1]));
        assert_eq!(run(false, &long), vec![Err(close::MESSAGE_TOO_BIG)]);
        assert_eq!(
            run(false, &frame(0x88, &[3])),
            vec![Err(close::PROTOCOL_ERROR)]
        );
        assert_eq!(
            run(false, &frame(0x88, &[0x03, 0xED])),
            vec![Err(close::PROTOCOL_ERROR)]
        );
        assert_eq!(
            run(false, &frame(0x88, &[0x03, 0xE8, 0xFF])),
            vec![Err(close::INVALID_UTF8)]
        );
        assert_eq!(
            run(false, &frame(0xC1, b"x")),
            vec![Err(close::PROTOCOL_ERROR)]
        );
    }

    #[test]
    fn close_frames_carry_code_and_reason() {
        assert_eq!(run(false, &frame(0x88, &[])), vec![Ok(Event::Close(None))]);
        let mut p = 4999u16.to_be_bytes().to_vec();
        p.extend_from_slice("bye ✓".as_bytes());
        assert_eq!(
            run(false, &frame(0x88, &p)),
            vec![Ok(Event::Close(Some((4999, "bye ✓".into()))))]
        );
    }

    #[test]
    fn compressed_messages_inflate_and_bombs_stop_at_the_limit() {
        let z = deflate::deflate(b"compressed hello", 6, 15);
        assert_eq!(
            run(true, &frame(0xC1, &z)),
            vec![Ok(Event::Text("compressed hello".into()))]
        );
        let (a, b) = z.split_at(3);
        let mut frag = frame(0x41, a);
        frag.extend(frame(0x80, b));
        assert_eq!(
            run(true, &frag),
            vec![Ok(Event::Text("compressed hello".into()))]
        );
        let bomb = deflate::deflate(&[b'a'; 100_000], 9, 15);
        assert!(bomb.len() < 1000);
        assert_eq!(
            run(true, &frame(0xC1, &bomb)),
            vec![Err(close::MESSAGE_TOO_BIG)]
        );
        assert_eq!(
            run(true, &frame(0xC1, &[0xFF; 8])),
            vec![Err(close::INVALID_UTF8)]
        );
        let mut rsv_cont = frame(0x41, a);
        rsv_cont.extend(frame(0xC0, b));
        assert_eq!(run(true, &rsv_cont), vec![Err(close::PROTOCOL_ERROR)]);
    }
}
