//! RFC 6455 frame headers: parsing client frames and encoding server frames.
//!
//! Server frames are never masked, so one encoded frame (`Bytes`) is byte-identical for every
//! connection that negotiated the same encoding: the fan-out path builds it once per message.

use bytes::{BufMut, Bytes, BytesMut};

/// Frame opcodes (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    /// Continues a fragmented message.
    Continuation,
    /// UTF-8 text.
    Text,
    /// Binary data.
    Binary,
    /// Connection close.
    Close,
    /// Ping.
    Ping,
    /// Pong.
    Pong,
}

impl Opcode {
    fn from_bits(bits: u8) -> Option<Opcode> {
        Some(match bits {
            0x0 => Opcode::Continuation,
            0x1 => Opcode::Text,
            0x2 => Opcode::Binary,
            0x8 => Opcode::Close,
            0x9 => Opcode::Ping,
            0xA => Opcode::Pong,
            _ => return None,
        })
    }

    fn bits(self) -> u8 {
        match self {
            Opcode::Continuation => 0x0,
            Opcode::Text => 0x1,
            Opcode::Binary => 0x2,
            Opcode::Close => 0x8,
            Opcode::Ping => 0x9,
            Opcode::Pong => 0xA,
        }
    }

    /// Close, ping and pong.
    pub fn is_control(self) -> bool {
        matches!(self, Opcode::Close | Opcode::Ping | Opcode::Pong)
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Last frame of its message.
    pub fin: bool,
    /// RSV1: the message is compressed (permessage-deflate), first frame only.
    pub rsv1: bool,
    /// The frame's opcode.
    pub opcode: Opcode,
    /// The client's masking key.
    pub mask: [u8; 4],
    /// Payload length in bytes.
    pub payload_len: usize,
    /// Header length in bytes (2 to 14).
    pub header_len: usize,
}

/// Why a frame header is invalid; each maps to a close code in [`super::Violation`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// RSV2/RSV3 set, or RSV1 set where no extension allows it.
    ReservedBits,
    /// An opcode RFC 6455 reserves.
    ReservedOpcode(u8),
    /// Client frames must be masked.
    Unmasked,
    /// Control frames carry at most 125 bytes and are never fragmented.
    BadControlFrame,
    /// Payload longer than the frame limit.
    TooBig {
        /// Declared payload length (saturated at `u64::MAX`).
        len: u64,
        /// The configured limit.
        limit: usize,
    },
}

/// Parses a client frame header from the start of `buf`. `Ok(None)` means more bytes are
/// needed. `rsv1_allowed` is whether permessage-deflate was negotiated; `max_payload` the
/// frame limit.
pub fn parse_header(
    buf: &[u8],
    rsv1_allowed: bool,
    max_payload: usize,
) -> Result<Option<Header>, HeaderError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    let fin = b0 & 0x80 != 0;
    let rsv1 = b0 & 0x40 != 0;
    if b0 & 0x30 != 0 || (rsv1 && !rsv1_allowed) {
        return Err(HeaderError::ReservedBits);
    }
    let opcode = Opcode::from_bits(b0 & 0x0F).ok_or(HeaderError::ReservedOpcode(b0 & 0x0F))?;
    if b1 & 0x80 == 0 {
        return Err(HeaderError::Unmasked);
    }
    let short = (b1 & 0x7F) as u64;
    if opcode.is_control() && (!fin || short > 125) {
        return Err(HeaderError::BadControlFrame);
    }
    let (len, ext) = match short {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 2)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            (
                u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes")),
                8,
            )
        }
        n => (n, 0),
    };
    if len > max_payload as u64 {
        return Err(HeaderError::TooBig {
            len,
            limit: max_payload,
        });
    }
    let header_len = 2 + ext + 4;
    if buf.len() < header_len {
        return Ok(None);
    }
    let mask = buf[2 + ext..header_len].try_into().expect("4 bytes");
    Ok(Some(Header {
        fin,
        rsv1,
        opcode,
        mask,
        payload_len: len as usize,
        header_len,
    }))
}

/// XORs `data` with the masking key (RFC 6455 §5.3), eight bytes at a time.
pub fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let v = u64::from_ne_bytes((&*chunk).try_into().expect("8 bytes")) ^ wide;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// Appends an unmasked server frame header for a final frame to `out`.
pub fn put_header(out: &mut BytesMut, opcode: Opcode, rsv1: bool, payload_len: usize) {
    out.put_u8(0x80 | if rsv1 { 0x40 } else { 0 } | opcode.bits());
    match payload_len {
        n if n < 126 => out.put_u8(n as u8),
        n if n <= u16::MAX as usize => {
            out.put_u8(126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(127);
            out.put_u64(n as u64);
        }
    }
}

/// Encodes one complete unmasked server frame.
pub fn encode(opcode: Opcode, rsv1: bool, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 10);
    put_header(&mut out, opcode, rsv1, payload.len());
    out.extend_from_slice(payload);
    out.freeze()
}

/// Encodes a close frame with `code` and a reason truncated to fit 125 bytes on a char boundary.
pub fn encode_close(code: u16, reason: &str) -> Bytes {
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut payload = Vec::with_capacity(2 + cut);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    encode(Opcode::Close, false, &payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_frame(b0: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut v = vec![b0];
        match payload.len() {
            n if n < 126 => v.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                v.push(0x80 | 126);
                v.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                v.push(0x80 | 127);
                v.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        v.extend_from_slice(&mask);
        let mut p = payload.to_vec();
        unmask(&mut p, mask);
        v.extend_from_slice(&p);
        v
    }

    #[test]
    fn parses_each_length_form_and_waits_for_more() {
        for len in [0usize, 125, 126, 65535, 65536] {
            let payload = vec![7u8; len];
            let f = client_frame(0x81, &payload, [1, 2, 3, 4]);
            let h = parse_header(&f, false, 1 << 20).unwrap().unwrap();
            assert_eq!(h.payload_len, len);
            assert_eq!(h.header_len + len, f.len());
            assert_eq!(h.opcode, Opcode::Text);
            for cut in 0..h.header_len {
                assert_eq!(parse_header(&f[..cut], false, 1 << 20), Ok(None));
            }
        }
    }

    #[test]
    fn rejects_each_bad_header() {
        let m = [0, 0, 0, 0];
        let e =
            |b0, p: &[u8], rsv1_ok, limit| parse_header(&client_frame(b0, p, m), rsv1_ok, limit);
        assert_eq!(e(0xA1, b"", true, 10), Err(HeaderError::ReservedBits));
        assert_eq!(e(0xC1, b"", false, 10), Err(HeaderError::ReservedBits));
        assert!(e(0xC1, b"", true, 10).unwrap().unwrap().rsv1);
        assert_eq!(e(0x83, b"", false, 10), Err(HeaderError::ReservedOpcode(3)));
        assert_eq!(
            e(0x8B, b"", false, 10),
            Err(HeaderError::ReservedOpcode(0xB))
        );
        assert_eq!(e(0x09, b"", false, 10), Err(HeaderError::BadControlFrame));
        assert_eq!(
            e(0x89, &[0; 126], false, 200),
            Err(HeaderError::BadControlFrame)
        );
        assert_eq!(
            e(0x82, &[0; 11], false, 10),
            Err(HeaderError::TooBig { len: 11, limit: 10 })
        );
        assert_eq!(
            parse_header(&[0x81, 0x05, 0, 0, 0, 0], false, 10),
            Err(HeaderError::Unmasked)
        );
        let mut huge = vec![0x82, 0xFF];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(
            parse_header(&huge, false, 10),
            Err(HeaderError::TooBig {
                len: u64::MAX,
                limit: 10
            })
        );
    }

    #[test]
    fn unmask_matches_bytewise_xor() {
        let mask = [0x12, 0x34, 0x56, 0x78];
        for len in 0..40 {
            let data: Vec<u8> = (0..len as u8).collect();
            let mut fast = data.clone();
            unmask(&mut fast, mask);
            let slow: Vec<u8> = data
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            assert_eq!(fast, slow);
        }
    }

    #[test]
    fn encodes_server_frames_unmasked() {
        assert_eq!(
            &encode(Opcode::Text, false, b"hi")[..],
            &[0x81, 2, b'h', b'i']
        );
        assert_eq!(
            &encode(Opcode::Text, true, &[0; 200])[..4],
            &[0xC1, 126, 0, 200]
        );
        let big = encode(Opcode::Binary, false, &vec![0; 70_000]);
        assert_eq!(&big[..2], &[0x82, 127]);
        assert_eq!(big.len(), 70_000 + 10);
        let close = encode_close(1009, &"é".repeat(100));
        assert!(close.len() <= 127);
        assert!(std::str::from_utf8(&close[4..]).is_ok());
    }
}
