//! What the worker is told about the client, in the first bytes sent to it: the request head
//! with `X-Forwarded-For` / `X-Forwarded-Proto` edited in, or a PROXY protocol v2 header
//! before the unchanged head. Either way every other byte goes as the client sent it (no
//! header is re-serialised), followed by whatever the client sent after the head.

use crate::config::Forwarded;
use crate::request::Head;
use std::net::{IpAddr, SocketAddr};

/// The PROXY protocol v2 signature (the spec's section 2.2).
pub const PROXY_V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The bytes to send to the worker for this client: see the module doc. `client` is the
/// client's address, `local` the proxy's address it connected to, `proto` the scheme it used
/// (`http` or `https`).
pub fn first_bytes(
    how: Forwarded,
    head: &Head,
    client: SocketAddr,
    local: SocketAddr,
    proto: &str,
) -> Vec<u8> {
    match how {
        Forwarded::Headers => with_forwarded_headers(head, client.ip(), proto),
        Forwarded::ProxyV2 => {
            let mut out = proxy_v2_header(client, local);
            out.extend_from_slice(&head.bytes);
            out
        }
        Forwarded::None => head.bytes.clone(),
    }
}

/// The head with `client` appended to `X-Forwarded-For` (or the header added) and
/// `X-Forwarded-Proto: proto` replacing any the client sent (it cannot be trusted to say how
/// it reached us).
pub fn with_forwarded_headers(head: &Head, client: IpAddr, proto: &str) -> Vec<u8> {
    let client = client.to_canonical();
    let mut added = format!("X-Forwarded-Proto: {proto}\r\n");
    // Edits as (range replaced, replacement), applied in order of position.
    let mut edits: Vec<(std::ops::Range<usize>, String)> = head
        .forwarded_proto_lines
        .iter()
        .map(|line| (line.clone(), String::new()))
        .collect();
    match head.forwarded_for_end {
        Some((end, true)) => edits.push((end..end, format!(" {client}"))),
        Some((end, false)) => edits.push((end..end, format!(", {client}"))),
        None => added.insert_str(0, &format!("X-Forwarded-For: {client}\r\n")),
    }
    edits.push((head.blank_line_at..head.blank_line_at, added));
    edits.sort_by_key(|(range, _)| range.start);

    let mut out = Vec::with_capacity(head.bytes.len() + 80);
    let mut at = 0;
    for (range, replacement) in edits {
        out.extend_from_slice(&head.bytes[at..range.start]);
        out.extend_from_slice(replacement.as_bytes());
        at = range.end;
    }
    out.extend_from_slice(&head.bytes[at..]);
    out
}

/// A PROXY protocol v2 header for a TCP connection from `client` to `local`: signature,
/// version 2 with command PROXY (0x21), TCP over IPv4 (0x11, 12 address bytes) or IPv6 (0x21,
/// 36 bytes; an IPv4 address beside an IPv6 one is written IPv4-mapped), then source and
/// destination addresses and ports, big-endian.
pub fn proxy_v2_header(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (src, dst) = (client.ip().to_canonical(), local.ip().to_canonical());
    let mut out = Vec::with_capacity(16 + 36);
    out.extend_from_slice(&PROXY_V2_SIGNATURE);
    out.push(0x21);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        _ => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(src).octets());
            out.extend_from_slice(&v6(dst).octets());
        }
    }
    out.extend_from_slice(&client.port().to_be_bytes());
    out.extend_from_slice(&local.port().to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request;

    const UPGRADE: &str = "GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";

    /// The head of `UPGRADE` plus `extra` headers, followed by `after` (frames).
    fn head(extra: &str, after: &[u8]) -> Head {
        let mut bytes = format!("{UPGRADE}{extra}\r\n").into_bytes();
        let parsed = request::parse(&bytes, 8192).unwrap().unwrap();
        bytes.extend_from_slice(after);
        Head { bytes, ..parsed }
    }

    fn rewritten(extra: &str, client: &str) -> String {
        let ip = client.parse().unwrap();
        String::from_utf8(with_forwarded_headers(&head(extra, b""), ip, "http")).unwrap()
    }

    #[test]
    fn forwarded_headers_are_added_before_the_blank_line() {
        assert_eq!(
            rewritten("", "10.1.2.3"),
            format!("{UPGRADE}X-Forwarded-For: 10.1.2.3\r\nX-Forwarded-Proto: http\r\n\r\n")
        );
        assert_eq!(
            rewritten("", "::ffff:10.1.2.3"),
            format!("{UPGRADE}X-Forwarded-For: 10.1.2.3\r\nX-Forwarded-Proto: http\r\n\r\n"),
            "IPv4-mapped addresses are written as IPv4"
        );
        assert!(rewritten("", "2001:db8::1").contains("X-Forwarded-For: 2001:db8::1\r\n"));
    }

    #[test]
    fn an_existing_forwarded_for_gets_the_client_appended_in_place() {
        let out = rewritten(
            "X-Forwarded-For: 203.0.113.7\r\nOrigin: o\r\nX-Forwarded-For: 198.51.100.2 \r\n",
            "10.0.0.9",
        );
        let want = format!("{UPGRADE}X-Forwarded-For: 203.0.113.7\r\nOrigin: o\r\nX-Forwarded-For: 198.51.100.2, 10.0.0.9 \r\nX-Forwarded-Proto: http\r\n\r\n");
        assert_eq!(out, want);
        let out = rewritten("X-Forwarded-For:\r\n", "10.0.0.9");
        assert!(out.contains("X-Forwarded-For: 10.0.0.9\r\n"), "{out}");
    }

    #[test]
    fn a_client_forwarded_proto_is_replaced_and_nothing_else_moves() {
        let out = rewritten(
            "x-forwarded-proto: https\r\nX-Odd:  spaced\tvalue \r\nX-Forwarded-Proto: https\r\n",
            "10.0.0.9",
        );
        let want = format!("{UPGRADE}X-Odd:  spaced\tvalue \r\nX-Forwarded-For: 10.0.0.9\r\nX-Forwarded-Proto: http\r\n\r\n");
        assert_eq!(out, want);
    }

    #[test]
    fn bytes_after_the_head_follow_it_unchanged() {
        let frames = [0xC1, 0x85, 1, 2, 3, 4, 0xFF, 0x00, 0x0D, 0x0A, 0x0A];
        let h = head("", &frames);
        let out = with_forwarded_headers(&h, "10.0.0.9".parse().unwrap(), "http");
        assert!(out.ends_with(&frames));
        let client = "10.0.0.9:4000".parse().unwrap();
        let local = "10.0.0.1:8000".parse().unwrap();
        assert_eq!(
            first_bytes(Forwarded::None, &h, client, local, "http"),
            h.bytes
        );
        let v2 = first_bytes(Forwarded::ProxyV2, &h, client, local, "http");
        assert_eq!(&v2[28..], &h.bytes[..], "PROXY v2: the head goes unchanged");
    }

    #[test]
    fn proxy_v2_over_ipv4_is_28_bytes_as_the_spec_lays_them_out() {
        let header = proxy_v2_header(
            "192.0.2.10:51000".parse().unwrap(),
            "198.51.100.1:443".parse().unwrap(),
        );
        let mut want = vec![
            0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54,
            0x0A, // signature
            0x21, // version 2, command PROXY
            0x11, // AF_INET, STREAM
            0x00, 0x0C, // 12 address bytes follow
            192, 0, 2, 10, // source address
            198, 51, 100, 1, // destination address
        ];
        want.extend_from_slice(&51000u16.to_be_bytes());
        want.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(header, want);
        assert_eq!(header.len(), 16 + 12);
    }

    #[test]
    fn proxy_v2_over_ipv6_is_52_bytes_and_maps_a_lone_ipv4_address() {
        let client: SocketAddr = "[2001:db8::7]:40000".parse().unwrap();
        let header = proxy_v2_header(client, "[2001:db8::1]:8000".parse().unwrap());
        assert_eq!(header.len(), 16 + 36);
        assert_eq!(&header[..12], &PROXY_V2_SIGNATURE);
        assert_eq!(header[12..16], [0x21, 0x21, 0x00, 0x24]);
        let ip = |at: usize| {
            std::net::Ipv6Addr::from(<[u8; 16]>::try_from(&header[at..at + 16]).unwrap())
        };
        assert_eq!(ip(16), "2001:db8::7".parse::<std::net::Ipv6Addr>().unwrap());
        assert_eq!(ip(32), "2001:db8::1".parse::<std::net::Ipv6Addr>().unwrap());
        assert_eq!(header[48..50], 40000u16.to_be_bytes());
        assert_eq!(header[50..52], 8000u16.to_be_bytes());

        let mixed = proxy_v2_header(
            "10.0.0.9:1".parse().unwrap(),
            "[2001:db8::1]:2".parse().unwrap(),
        );
        assert_eq!(mixed[13], 0x21);
        assert_eq!(ip_of(&mixed[16..32]), "::ffff:10.0.0.9");
        // An IPv4 client seen on a dual-stack socket is plain IPv4 again.
        let mapped = proxy_v2_header(
            "[::ffff:10.0.0.9]:1".parse().unwrap(),
            "[::ffff:10.0.0.1]:2".parse().unwrap(),
        );
        assert_eq!(mapped[13], 0x11);
        assert_eq!(mapped[16..24], [10, 0, 0, 9, 10, 0, 0, 1]);
    }

    fn ip_of(bytes: &[u8]) -> String {
        std::net::Ipv6Addr::from(<[u8; 16]>::try_from(bytes).unwrap()).to_string()
    }
}
