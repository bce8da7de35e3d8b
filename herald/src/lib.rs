//! The controller: collects the workers' load reports, publishes routing weights to proxies and
//! decides the fleet's size. Not built yet: see the herald issue. This crate exists so the
//! workspace has its final shape.
