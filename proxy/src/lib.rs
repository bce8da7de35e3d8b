//! The edge proxy: places each new WebSocket connection on a worker by the load the workers
//! report through herald, then relays bytes. Not built yet: see the proxy issue. This crate
//! exists so the workspace has its final shape.
