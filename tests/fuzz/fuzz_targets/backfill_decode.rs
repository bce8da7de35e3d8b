//! The peer history body decoder (`GET /history` answers) on arbitrary bytes: it must never
//! panic, and a body it accepts must survive a round trip — re-encoding every entry with
//! `begin` + `push_entry` gives a body of the same length that decodes to the same messages.
//!
//! The first input byte is the topic limit (0 to 255 bytes), the rest is the body.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use protocol::backfill;

fuzz_target!(|data: &[u8]| {
    let Some((&limit, body)) = data.split_first() else {
        return;
    };
    let topic_limit = usize::from(limit);
    let Ok(messages) = backfill::decode(Bytes::copy_from_slice(body), topic_limit) else {
        return;
    };
    let mut again = Vec::with_capacity(body.len());
    backfill::begin(&mut again);
    for m in &messages {
        let topic = std::str::from_utf8(&m.topic).expect("decoded topics are UTF-8");
        assert!(!topic.is_empty() && topic.len() <= topic_limit);
        let position = m.position.expect("history entries carry a position");
        backfill::push_entry(&mut again, topic, position, m.published_at_us, &m.payload);
    }
    // Every entry has a fixed-size frame around its topic and payload, so the sizes agree even
    // where the original meta carried ignored bytes (a time without its flag bit).
    assert_eq!(again.len(), body.len());
    let decoded = backfill::decode(Bytes::from(again), topic_limit)
        .expect("a re-encoded body decodes");
    assert_eq!(decoded, messages);
});
