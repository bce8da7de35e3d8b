//! The edge proxy: places each new WebSocket connection on a worker by the load the workers
//! report through herald, then relays bytes. Being built: see the proxy issue.

pub mod admission;
pub mod place;
pub mod watch;
