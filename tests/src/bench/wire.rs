//! Reading the worker's frames on the client side cheaply, so that a bench measures the
//! worker and not itself: a client reads its socket in large chunks, finds every complete
//! frame in the buffer ([`frame_bounds`]) and reads a message's offset from the fixed header
//! the worker writes before the payload ([`message_header`]). Compressed messages are inflated
//! once per distinct payload and thread ([`compressed_header`]).

use anyhow::{ensure, Result};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes a client reads at a time (its buffer grows for larger frames).
pub const READ_BUF: usize = 8 * 1024;

/// `(first byte, payload start, payload length)` of the first complete frame in `b`.
pub fn frame_bounds(b: &[u8]) -> Result<Option<(u8, usize, usize)>> {
    if b.len() < 2 {
        return Ok(None);
    }
    ensure!(b[1] & 0x80 == 0, "server frame is masked");
    let (len, at) = match b[1] & 0x7F {
        126 if b.len() >= 4 => (usize::from(u16::from_be_bytes([b[2], b[3]])), 4),
        127 if b.len() >= 10 => (
            usize::try_from(u64::from_be_bytes(b[2..10].try_into()?))?,
            10,
        ),
        126 | 127 => return Ok(None),
        n => (usize::from(n), 2),
    };
    Ok((b.len() >= at + len).then_some((b[0], at, len)))
}

/// `(offset, ts)` of a `message` push. Reads the fixed header the worker writes before the
/// payload; falls back to a full JSON parse.
pub fn message_header(json: &[u8]) -> Option<(u64, u64)> {
    if !json.starts_with(br#"{"type":"message""#) {
        return None;
    }
    let head = &json[..json.len().min(1024)];
    let fast = number_after(head, br#""offset":"#).zip(number_after(head, br#""ts":"#));
    fast.or_else(|| {
        let v: serde_json::Value = serde_json::from_slice(json).ok()?;
        Some((v["position"]["offset"].as_u64()?, v["ts"].as_u64()?))
    })
}

/// `(seq, ts)` of a benchmark payload as servers without an envelope deliver it: the JSON the
/// load generator publishes starts `{"seq":N,"ts":MICROS,`.
pub fn payload_header(json: &[u8]) -> Option<(u64, u64)> {
    if !json.starts_with(br#"{"seq":"#) {
        return None;
    }
    let head = &json[..json.len().min(64)];
    number_after(head, br#""seq":"#).zip(number_after(head, br#""ts":"#))
}

/// `(offset, ts, JSON length)` of a compressed `message` push.
///
/// Compress-once means every subscriber gets the very same bytes for a message, and inflating
/// is a pure function of them: each distinct compressed payload is inflated (and so checked)
/// once per runtime thread and its header remembered. A subscriber that got different bytes
/// misses the cache and is inflated on its own. This keeps the bench's CPU per delivery far
/// below the worker's. Misses are counted in `inflations`: they should be about one per message
/// per thread. The cache keeps between `generation` and twice as many payloads; make it hold
/// the messages clients may be receiving at once (all of a replayed history, say).
pub fn compressed_header(
    payload: &[u8],
    inflations: &AtomicU64,
    generation: usize,
) -> Result<Option<(u64, u64, usize)>> {
    compressed_with(payload, inflations, generation, message_header)
}

/// Like [`compressed_header`], reading the inflated JSON with `header` (for example
/// [`payload_header`] for servers that send the published payload as it is).
pub fn compressed_with(
    payload: &[u8],
    inflations: &AtomicU64,
    generation: usize,
    header: fn(&[u8]) -> Option<(u64, u64)>,
) -> Result<Option<(u64, u64, usize)>> {
    type Header = Option<(u64, u64, usize)>;
    thread_local! {
        // Two generations, so the cache stays bounded without forgetting messages in flight.
        static SEEN: std::cell::RefCell<[HashMap<Vec<u8>, Header, SampledHash>; 2]> =
            Default::default();
    }
    SEEN.with(|cell| {
        let mut seen = cell.borrow_mut();
        if let Some(h) = seen.iter().find_map(|g| g.get(payload)) {
            return Ok(*h);
        }
        inflations.fetch_add(1, Ordering::Relaxed);
        let json = worker::ws::deflate::inflate(payload, 64 << 20)
            .map_err(|e| anyhow::anyhow!("bad deflate data from the server: {e:?}"))?;
        let header = header(&json).map(|(o, ts)| (o, ts, json.len()));
        if seen[0].len() >= generation.max(1) {
            seen[1] = std::mem::take(&mut seen[0]);
        }
        seen[0].insert(payload.to_vec(), header);
        Ok(header)
    })
}

/// The hash of the payload cache: the length and a few dozen bytes from the start, middle
/// and end of a payload, so a lookup costs a short hash and one `memcmp` (hashing every byte
/// of every payload was the largest part of a client's CPU). Distinct payloads that sample
/// alike only share a bucket: the map still compares them in full.
type SampledHash = BuildHasherDefault<SampleHasher>;

#[derive(Default)]
struct SampleHasher(u64);

impl SampleHasher {
    fn mix(&mut self, v: u64) {
        self.0 = (self.0 ^ v)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(29);
    }
}

impl Hasher for SampleHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        const SAMPLE: usize = 24;
        self.mix(bytes.len() as u64);
        let mid = bytes.len() / 2;
        let parts = [
            &bytes[..bytes.len().min(SAMPLE)],
            &bytes[mid.saturating_sub(SAMPLE / 2)..(mid + SAMPLE / 2).min(bytes.len())],
            &bytes[bytes.len().saturating_sub(SAMPLE)..],
        ];
        for part in parts {
            for chunk in part.chunks(8) {
                let mut word = [0u8; 8];
                word[..chunk.len()].copy_from_slice(chunk);
                self.mix(u64::from_le_bytes(word));
            }
        }
    }

    fn write_usize(&mut self, n: usize) {
        self.mix(n as u64);
    }
}

/// The decimal number right after the first `key` in `hay`.
fn number_after(hay: &[u8], key: &[u8]) -> Option<u64> {
    let at = (0..=hay.len().checked_sub(key.len())?)
        .find(|&i| hay[i..i + key.len()].iter().zip(key).all(|(a, b)| a == b))?
        + key.len();
    let digits = hay[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&hay[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_message_header() {
        let json = protocol::client::encode_message(
            "t\"ts\":1",
            Some(protocol::Position {
                epoch: 9,
                offset: 42,
            }),
            Some(1234),
            br#"{"ts":5,"offset":6}"#,
        );
        assert_eq!(message_header(&json), Some((42, 1234)));
        assert_eq!(message_header(br#"{"type":"ack"}"#), None);
    }

    #[test]
    fn reads_the_payload_header() {
        assert_eq!(
            payload_header(br#"{"seq":12,"ts":1763900000123456,"x":"y"}"#),
            Some((12, 1763900000123456))
        );
        assert_eq!(payload_header(br#"{"type":"message"}"#), None);
    }

    #[test]
    fn finds_complete_frames_only() {
        assert_eq!(frame_bounds(&[0x81]).unwrap(), None);
        assert_eq!(frame_bounds(&[0x81, 3, b'a', b'b']).unwrap(), None);
        assert_eq!(
            frame_bounds(&[0x81, 3, b'a', b'b', b'c', 0x89]).unwrap(),
            Some((0x81, 2, 3))
        );
        let mut long = vec![0xC1, 126, 0x01, 0x00];
        long.resize(4 + 256, 0);
        assert_eq!(frame_bounds(&long).unwrap(), Some((0xC1, 4, 256)));
        assert!(frame_bounds(&[0x81, 0x83, 0, 0, 0, 0, 1, 2, 3]).is_err());
    }

    #[test]
    fn inflates_each_distinct_payload_once() {
        let json = protocol::client::encode_message(
            "t",
            Some(protocol::Position {
                epoch: 1,
                offset: 7,
            }),
            Some(99),
            br#"{"a":1}"#,
        );
        let z = worker::ws::deflate::deflate(&json, 6, 15);
        let inflations = AtomicU64::new(0);
        for _ in 0..3 {
            let h = compressed_header(&z, &inflations, 16).unwrap();
            assert_eq!(h, Some((7, 99, json.len())));
        }
        assert_eq!(inflations.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn payloads_that_sample_alike_stay_apart() {
        let mut map: HashMap<Vec<u8>, u32, SampledHash> = HashMap::default();
        let mut a = vec![7u8; 400];
        let mut b = a.clone();
        a[100] = 1;
        b[100] = 2;
        map.insert(a.clone(), 1);
        map.insert(b.clone(), 2);
        assert_eq!(map.get(&a[..]), Some(&1));
        assert_eq!(map.get(&b[..]), Some(&2));
        assert_eq!(map.get(&[7u8; 400][..]), None);
    }
}
