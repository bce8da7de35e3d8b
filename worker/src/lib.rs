//! The worker: holds long-lived client WebSockets and fans published messages out to them.
//!
//! ```text
//!  publishers ──ZeroMQ SUB──▶ upstream ──bounded queue──▶ hub (dispatcher)
//!                 ▲  (one task per endpoint)                │ encode once per message
//!                 │ wanted topics/prefixes (watch)           ▼ shared frame (Bytes)
//!                 └────────────── interest ◀── subscribe ── outbox (per connection, bounded)
//!                                                            │ batched vectored writes
//!  clients ◀──────────── WebSocket (pushfleet.v1) ◀─ conn ◀──┘
//! ```
//!
//! Modules in the order a message meets them:
//! - [`upstream`]: ZeroMQ SUB sockets, reconnection, decoding the publisher wire format.
//! - [`interest`]: which topics to subscribe to upstream (reference counts).
//! - [`hub`]: the subscription registry and fan-out.
//! - [`broadcast`]: one message's shared frames, deflated at most once per window size.
//! - [`outbox`]: a connection's bounded outbound queue (slow consumers are closed, 4001).
//! - [`conn`]: one connection's life: handshake, requests, writes, keepalive, close.
//! - [`ws`]: the WebSocket codec (handshake, frames, reassembly, permessage-deflate).
//! - [`drain`], [`admin`], [`metrics`], [`server`], [`config`]: running and operating it.
//!
//! Why our own WebSocket codec: tokio-tungstenite rejects frames with RSV1 set and has no
//! permessage-deflate, and a library writer owns each connection's framing, while fan-out needs
//! one pre-encoded (and pre-compressed) frame written as-is to many sockets. Handshake parsing
//! uses `httparse`; compression `flate2`.

pub mod admin;
pub mod broadcast;
pub mod config;
pub mod conn;
pub mod drain;
pub mod history;
pub mod hub;
pub mod interest;
pub mod metrics;
pub mod outbox;
pub mod peers;
pub mod server;
pub mod upstream;
pub mod ws;

pub use config::Config;
pub use server::{run, start, Worker, WorkerError};
