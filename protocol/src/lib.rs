//! Everything that crosses a process boundary in pushfleet, in one versioned place.
//!
//! ```text
//!  backend ──[publish: ZeroMQ multipart]──▶ worker ──[client: JSON over WebSocket]──▶ browser
//!                                             │ ▲ [load: report / reply, JSON over HTTP]
//!                                             ▼ │
//!                       proxy ◀──[routing: table, long poll]── herald
//!                                (config: TOML file < env < CLI, for every binary)
//! ```
//!
//! - [`publish`]: the publisher wire format, `[topic, payload]` or `[topic, meta, payload]`,
//!   and position checks.
//! - [`position`]: `Position { epoch, offset }`, stamped by the publisher.
//! - [`client`]: the client protocol (`pushfleet.v1` subprotocol): requests, replies, error
//!   codes and WebSocket close codes.
//! - [`backfill`]: how workers hand history to each other (admin `GET /history` bodies).
//! - [`load`]: the load report each worker sends herald, and herald's reply (drain, peers).
//! - [`routing`]: the routing table herald publishes to proxies.
//! - [`layered`]: loads a clap configuration from a TOML file, environment and flags.
//! - `process` (feature `process`): logging and signal handling shared by the binaries.
//!
//! The human-readable specification is `protocol/PROTOCOL.md`; the tests here keep the two in
//! step.

pub mod backfill;
pub mod client;
pub mod layered;
pub mod load;
pub mod position;
#[cfg(feature = "process")]
pub mod process;
pub mod publish;
pub mod routing;

pub use position::Position;

/// The fenced block after `<!-- example: NAME -->` in a specification text (for tests that
/// keep PROTOCOL.md's examples valid).
#[cfg(test)]
pub(crate) fn spec_example(spec: &str, name: &str) -> String {
    let marker = format!("<!-- example: {name} -->");
    let after = &spec[spec.find(&marker).expect("example marker") + marker.len()..];
    let body = &after[after.find("```").expect("fence") + 3..];
    let body = &body[body.find('\n').expect("fence line") + 1..];
    body[..body.find("```").expect("closing fence")].to_string()
}
