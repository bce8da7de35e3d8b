//! Herald, the controller. Not finished: see the herald issue.

pub mod actuator;
pub mod agent;
pub mod config;
pub mod control;
pub mod fleet;
pub mod metrics;
pub mod scale;
pub mod score;
