//! Feeds arbitrary client bytes to the frame reader, in arbitrary chunkings, with and without
//! permessage-deflate: it must never panic, never return an event that breaks its invariants,
//! and never buffer past its limits.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use worker::ws::reader::{Event, Limits, Reader};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let limits = Limits {
        max_frame_bytes: 4096,
        max_message_bytes: 8192,
        max_decompressed_bytes: 16384,
    };
    let mut reader = Reader::new(limits, flags & 1 == 1);
    let chunk = 1 + (flags >> 1) as usize;
    let mut buf = BytesMut::new();
    for piece in rest.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match reader.next_event(&mut buf) {
                Ok(Some(Event::Text(t))) => assert!(t.len() <= limits.max_decompressed_bytes.max(limits.max_message_bytes)),
                Ok(Some(Event::Binary(b))) => assert!(b.len() <= limits.max_decompressed_bytes.max(limits.max_message_bytes)),
                Ok(Some(Event::Ping(p))) => assert!(p.len() <= 125),
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(v) => {
                    assert!(matches!(v.close_code(), 1002 | 1007 | 1009));
                    return;
                }
            }
        }
        assert!(reader.buffered_bytes() <= 2 * limits.max_message_bytes);
    }
});
