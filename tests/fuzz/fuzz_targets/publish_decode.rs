//! The publisher wire-format decoder on arbitrary frames (the input is split into frames at
//! 0xFF bytes).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let frames: Vec<Bytes> = data.split(|b| *b == 0xFF).map(Bytes::copy_from_slice).collect();
    if let Ok(p) = protocol::publish::decode(&frames, 64) {
        assert!(!p.topic.is_empty() && p.topic.len() <= 64);
        assert!(std::str::from_utf8(&p.topic).is_ok());
    }
});
