//! The publisher wire-format decoder on arbitrary frames (the input is split into frames at
//! 0xFF bytes): whatever it accepts, message or position check, has a valid topic, and a
//! check is three frames with an empty payload.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use protocol::publish::Inbound;

fuzz_target!(|data: &[u8]| {
    let frames: Vec<Bytes> = data.split(|b| *b == 0xFF).map(Bytes::copy_from_slice).collect();
    let topic = match protocol::publish::decode(&frames, 64) {
        Ok(Inbound::Message(p)) => p.topic,
        Ok(Inbound::Check { topic, .. }) => {
            assert!(frames.len() == 3 && frames[2].is_empty());
            topic
        }
        Err(_) => return,
    };
    assert!(!topic.is_empty() && topic.len() <= 64);
    assert!(std::str::from_utf8(&topic).is_ok());
});
