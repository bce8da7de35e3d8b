//! The worker: holds long-lived client WebSockets, keeps recent history per topic, fans
//! published messages out to them, and reports its load to herald.
//!
//! ```text
//!  publishers ──ZeroMQ SUB──▶ upstream ──bounded queue──▶ hub (one task) ◀── commands ── conn
//!                 ▲  (one task per endpoint)               │ history: order, dedup, holes
//!                 │                                        │ ◀── peers (fetch history) ──▶ other
//!                 │ wanted topics/prefixes (watch)          │ encode once per message    workers
//!                 └────────────── interest ◀── subscribe ── ▼ shared frame (Bytes)
//!                                                 outbox (per connection, bounded)
//!                                                            │ batched vectored writes
//!  clients ◀──────────── WebSocket (pushfleet.v1) ◀─ conn ◀──┘
//!
//!  report (every interval): metrics, /proc, outboxes ──POST /v1/reports──▶ herald
//!     ◀── reply: drain → drain (staggered closes);  peers → peers (the hub's fetch list)
//! ```
//!
//! Modules in the order a message meets them:
//! - [`upstream`]: ZeroMQ SUB sockets, reconnection, decoding the publisher wire format.
//! - [`interest`]: which topics to subscribe to upstream (reference counts).
//! - [`hub`]: one task owning subscriptions, history and fan-out; history replies are
//!   race-free because messages and requests go through it in one order.
//! - [`history`]: per-topic streams: order, duplicates, holes, fills, catch-up and resume
//!   (pure logic); [`peers`]: fetching history from other workers (configured, and those
//!   herald names).
//! - [`broadcast`]: one message's shared frames, deflated at most once per window size.
//! - [`outbox`]: a connection's bounded outbound queue (slow consumers are closed, 4001).
//! - [`conn`]: one connection's life: handshake, requests, writes, keepalive, close;
//!   [`access`]: who may connect (Origin, access tokens) and subscribe to what.
//! - [`ws`]: the WebSocket codec (handshake, frames, reassembly, permessage-deflate).
//! - [`report`]: the load report sent to herald every interval, and its reply (drain, peers).
//! - [`drain`], [`admin`], [`metrics`], [`server`], [`config`]: running and operating it
//!   (the admin port also serves `GET /history` to peers).
//!
//! Why our own WebSocket codec: tokio-tungstenite rejects frames with RSV1 set and has no
//! permessage-deflate, and a library writer owns each connection's framing, while fan-out needs
//! one pre-encoded (and pre-compressed) frame written as-is to many sockets. Handshake parsing
//! uses `httparse`; compression `flate2`.

pub mod access;
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
pub mod report;
pub mod server;
pub mod upstream;
pub mod ws;

pub use config::Config;
pub use server::{run, start, Worker, WorkerError};
