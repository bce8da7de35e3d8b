//! The WebSocket layer of the worker's data path, written for it (see the crate docs for why):
//!
//! - [`handshake`]: the HTTP/1.1 upgrade, subprotocol and permessage-deflate negotiation.
//! - [`frame`]: frame headers; parse client frames, encode server frames.
//! - [`reader`]: client bytes → events (reassembly, inflate, UTF-8, limits).
//! - [`deflate`]: per-message compression with no context takeover.
//!
//! Every protocol violation is a [`Violation`], mapped to its close code in one place.

pub mod deflate;
pub mod frame;
pub mod handshake;
pub mod reader;

use protocol::client::close;

/// A client broke the protocol or a limit; the connection closes with [`Violation::close_code`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// RFC 6455 framing rules (1002).
    Protocol(&'static str),
    /// Text that is not UTF-8 (1007).
    InvalidUtf8,
    /// A compressed message that does not inflate (1007).
    BadCompressedData,
    /// A frame, message or decompressed message over its limit (1009).
    TooBig {
        /// Which limit: "frame", "message" or "decompressed message".
        what: &'static str,
        /// How large it was (or at least is).
        len: u64,
        /// The limit in bytes.
        limit: usize,
    },
}

impl Violation {
    /// The close code this violation is answered with.
    pub fn close_code(&self) -> u16 {
        match self {
            Violation::Protocol(_) => close::PROTOCOL_ERROR,
            Violation::InvalidUtf8 | Violation::BadCompressedData => close::INVALID_UTF8,
            Violation::TooBig { .. } => close::MESSAGE_TOO_BIG,
        }
    }

    /// The close reason sent to the client (names the limit and value).
    pub fn reason(&self) -> String {
        match self {
            Violation::Protocol(why) => (*why).to_string(),
            Violation::InvalidUtf8 => "text is not valid UTF-8".into(),
            Violation::BadCompressedData => "compressed data does not inflate".into(),
            Violation::TooBig { what, len, limit } => {
                format!("{what} of {len} bytes exceeds limit {limit}")
            }
        }
    }
}
