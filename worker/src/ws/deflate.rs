//! permessage-deflate (RFC 7692) message transforms, with no context carried between messages
//! in either direction (we always negotiate `server_no_context_takeover` and
//! `client_no_context_takeover`). That is what lets one compressed frame go to every
//! subscriber, and lets every connection share one thread-local inflater instead of holding
//! ~300 KiB of zlib state each.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use std::cell::RefCell;
use std::collections::HashMap;

/// The four bytes a sync flush ends with; stripped on send, appended on receive (§7.2.1).
const TAIL: [u8; 4] = [0x00, 0x00, 0xFF, 0xFF];

/// Smallest LZ77 window (bits) our deflater can honour; zlib cannot produce a raw stream
/// limited to 2^8. Connections that ask for `server_max_window_bits=8` get uncompressed
/// messages (RSV1 clear), which RFC 7692 always allows.
pub const MIN_DEFLATE_WINDOW_BITS: u8 = 9;

thread_local! {
    static DEFLATERS: RefCell<HashMap<(u32, u8), Compress>> = RefCell::new(HashMap::new());
    static INFLATER: RefCell<Decompress> = RefCell::new(Decompress::new_with_window_bits(false, 15));
}

/// Compresses one whole message as a permessage-deflate payload (tail stripped).
/// `window_bits` must be 9..=15.
pub fn deflate(message: &[u8], level: u32, window_bits: u8) -> Vec<u8> {
    debug_assert!((MIN_DEFLATE_WINDOW_BITS..=15).contains(&window_bits));
    DEFLATERS.with(|cell| {
        let mut map = cell.borrow_mut();
        let c = map.entry((level, window_bits)).or_insert_with(|| {
            Compress::new_with_window_bits(Compression::new(level), false, window_bits)
        });
        c.reset();
        let mut out = Vec::with_capacity(message.len() / 2 + 64);
        let mut consumed = 0usize;
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(out.capacity().max(64));
            }
            let before = c.total_in();
            c.compress_vec(&message[consumed..], &mut out, FlushCompress::Sync)
                .expect("deflate with a valid state cannot fail");
            consumed += (c.total_in() - before) as usize;
            // A sync flush is complete once all input is taken and output space remains.
            if consumed == message.len() && out.len() < out.capacity() {
                break;
            }
        }
        if out.ends_with(&TAIL) {
            out.truncate(out.len() - TAIL.len());
        }
        out
    })
}

/// Why a compressed client message could not be inflated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflateError {
    /// Not a valid deflate stream.
    Corrupt,
    /// It inflates to more than the limit; stopped before allocating past it.
    TooBig {
        /// `max_decompressed_bytes`.
        limit: usize,
    },
}

/// Inflates one whole compressed client message, refusing to produce more than `limit` bytes.
pub fn inflate(compressed: &[u8], limit: usize) -> Result<Vec<u8>, InflateError> {
    INFLATER.with(|cell| {
        let mut d = cell.borrow_mut();
        d.reset(false);
        let mut out = Vec::with_capacity((compressed.len() * 3).max(64).min(limit + 1));
        for input in [compressed, &TAIL[..]] {
            let mut pos = 0usize;
            loop {
                if out.len() == out.capacity() {
                    if out.len() > limit {
                        return Err(InflateError::TooBig { limit });
                    }
                    let grow = out.capacity().max(1024).min(limit + 1 - out.len());
                    out.reserve_exact(grow);
                }
                let (in0, out0) = (d.total_in(), out.len());
                let status = d
                    .decompress_vec(&input[pos..], &mut out, FlushDecompress::Sync)
                    .map_err(|_| InflateError::Corrupt)?;
                pos += (d.total_in() - in0) as usize;
                if out.len() > limit {
                    return Err(InflateError::TooBig { limit });
                }
                if status == Status::StreamEnd {
                    break;
                }
                let idle = d.total_in() == in0 && out.len() == out0;
                if pos == input.len() && out.len() < out.capacity() {
                    break;
                }
                if idle && out.len() < out.capacity() {
                    return Err(InflateError::Corrupt);
                }
            }
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips_with_every_window() {
        let text =
            br#"{"type":"message","topic":"match.1","payload":{"minute":12,"event":"goal"}}"#
                .repeat(50);
        for bits in MIN_DEFLATE_WINDOW_BITS..=15 {
            let z = deflate(&text, 6, bits);
            assert!(
                z.len() < text.len() / 4,
                "compresses: {} -> {}",
                text.len(),
                z.len()
            );
            assert!(!z.ends_with(&TAIL));
            assert_eq!(inflate(&z, 1 << 20).unwrap(), text);
        }
    }

    #[test]
    fn empty_message_round_trips() {
        let z = deflate(b"", 6, 15);
        assert_eq!(inflate(&z, 10).unwrap(), b"");
        assert_eq!(inflate(&[0x00], 10).unwrap(), b"");
    }

    #[test]
    fn bomb_is_stopped_at_the_limit() {
        let zeros = vec![0u8; 10 << 20];
        let z = deflate(&zeros, 9, 15);
        assert!(z.len() < 20_000);
        assert_eq!(
            inflate(&z, 1 << 20),
            Err(InflateError::TooBig { limit: 1 << 20 })
        );
        assert_eq!(inflate(&z, 10 << 20).unwrap().len(), 10 << 20);
    }

    #[test]
    fn garbage_is_corrupt() {
        assert_eq!(inflate(&[0xFF; 16], 1024), Err(InflateError::Corrupt));
    }

    #[test]
    fn exact_limit_is_allowed() {
        let data = vec![b'a'; 5000];
        let z = deflate(&data, 6, 15);
        assert_eq!(inflate(&z, 5000).unwrap(), data);
        assert_eq!(inflate(&z, 4999), Err(InflateError::TooBig { limit: 4999 }));
    }

    proptest! {
        #[test]
        fn any_bytes_round_trip(data in proptest::collection::vec(any::<u8>(), 0..5000), bits in 9u8..=15) {
            let z = deflate(&data, 6, bits);
            prop_assert_eq!(inflate(&z, data.len()).unwrap(), data);
        }

        #[test]
        fn inflate_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = inflate(&data, 4096);
        }
    }
}
