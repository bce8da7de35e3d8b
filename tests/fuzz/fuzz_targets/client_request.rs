//! The client request decoder and the message encoder on arbitrary input: replies must always
//! serialise, and encoded messages must always be valid JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::client::{encode_message, parse_request, ServerMessage};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(e) = parse_request(text, 32) {
            let _ = ServerMessage::error(&e).to_json();
        }
        let json = encode_message(text, None, Some(1), data);
        assert!(serde_json::from_slice::<serde::de::IgnoredAny>(&json).is_ok());
    } else {
        let json = encode_message("t", None, None, data);
        assert!(serde_json::from_slice::<serde::de::IgnoredAny>(&json).is_ok());
    }
});
