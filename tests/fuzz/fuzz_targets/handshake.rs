//! The upgrade request parser and permessage-deflate negotiation on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use worker::ws::handshake;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((upgrade, used))) = handshake::parse(data, 8192) {
        assert!(used <= data.len() && used <= 8192);
        if let Some(d) = handshake::negotiate_deflate(&upgrade.extensions) {
            assert!((8..=15).contains(&d.server_max_window_bits));
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = handshake::negotiate_deflate(text);
    }
});
