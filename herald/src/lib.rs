//! Herald, the controller: collects the workers' load reports, tells proxies (and HAProxy)
//! where to place new connections, and decides the fleet's size.
//!
//! ```text
//!  workers ──POST /v1/reports──▶ api ──▶ control (fleet: score, smooth, trust, expire)
//!     ▲          reply: drain, peers  │        │ tick: scale decision, drains
//!     └───────────────────────────────┘        ├──▶ routing table (versioned) ──▶ GET /v1/table
//!                                              │                          (proxies, long poll)
//!                                              │                      └─▶ agent (HAProxy checks)
//!                                              └──▶ actuate ──▶ actuator: log | webhook | exec | aws
//! ```
//!
//! Modules in the order data meets them:
//! - [`api`]: the HTTP port (reports in, table and status out, metrics).
//! - [`score`]: one utilisation figure per report (the most used resource over its capacity)
//!   and the cost of one more connection (pure).
//! - [`fleet`]: every worker's smoothed utilisation, trust, slow start, expiry, weights (pure).
//! - [`scale`]: the decision engine: target tracking with windows, cooldowns and hysteresis;
//!   scale-in picks the fewest-connections worker (pure).
//! - [`control`]: the state that ties them together: decisions, drains, actuator calls due,
//!   table versions (pure; `now` passed in).
//! - [`actuate`] and [`actuator`]: carrying decisions out, level-triggered, with retries.
//! - [`agent`]: HAProxy's agent-check protocol, for users who keep HAProxy.
//! - [`status`], [`metrics`], [`server`], [`config`]: operating it.
//!
//! Two heralds fed the same reports decide the same thing: decisions depend only on reports
//! and time, and say "desired = N" rather than "add one".

pub mod actuate;
pub mod actuator;
pub mod agent;
pub mod api;
pub mod config;
pub mod control;
pub mod fleet;
pub mod metrics;
pub mod scale;
pub mod score;
pub mod server;
pub mod status;

pub use config::Config;
pub use server::{run, start, Herald, HeraldError};
