//! The edge proxy: places each new WebSocket connection on a worker by the load the workers
//! report through herald, then relays its bytes both ways without parsing them.
//!
//! ```text
//!  clients ──TCP──▶ server (accept loop) ──▶ conn::serve, one task per connection:
//!                                            1 admission   token bucket + cap → 503 Retry-After
//!                                            2 tls         handshake, when configured
//!                                            3 request     bounded head → 431 / 408 / 400
//!                                                          (--demo-page: a plain GET → page)
//!                                            4 dial        place::Placer::choose → connect →
//!                                                          forward (X-Forwarded-* or PROXY v2);
//!                                                          failed → another worker, then 502
//!                                            5 placed      Placer::connected
//!                                            6 relay       bytes both ways ──────────▶ worker
//!                                            7 released    Placer::released
//!  herald ──routing table (long poll)──▶ watch ──▶ Placer::update
//! ```
//!
//! Modules in the order a connection meets them:
//! - [`server`]: binds the ports, accepts, and runs the lifecycle (serve → drain → stop).
//! - [`conn`]: one connection's life, the phases above, top to bottom.
//! - [`admission`]: new-connection rate and concurrent-connection cap.
//! - [`tls`]: TLS toward clients, when configured.
//! - [`request`]: reading and checking the upgrade request head.
//! - [`pages`]: the demo page and JavaScript client, served to plain GETs with `--demo-page`.
//! - [`place`]: which worker takes the connection (pure: `now` and the rng passed in).
//! - [`forward`]: what the worker is told about the client (headers or PROXY v2).
//! - [`relay`]: bytes both ways, half-close, idle timeout.
//! - [`reject`]: every answer the proxy gives itself instead of relaying, in one place.
//! - [`watch`]: herald's routing table, long-polled into the placer.
//! - [`metrics`], [`admin`], [`config`]: operating it.

pub mod admin;
pub mod admission;
pub mod config;
pub mod conn;
pub mod forward;
pub mod metrics;
pub mod pages;
pub mod place;
pub mod reject;
pub mod relay;
pub mod request;
pub mod server;
pub mod tls;
pub mod watch;

pub use config::Config;
pub use server::{run, start, Proxy, ProxyError};
