//! The worker's metrics, read from its admin port (`GET /metrics`).

use crate::{http_request, metric_value};
use anyhow::{ensure, Result};
use std::net::SocketAddr;

/// One Prometheus text exposition of the worker.
pub struct Scrape(String);

impl Scrape {
    /// The value of a sample, summed over label sets (see [`metric_value`]).
    pub fn get(&self, name: &str) -> f64 {
        metric_value(&self.0, name)
    }

    /// How much `name` moved from `earlier` to this scrape.
    pub fn delta(&self, earlier: &Scrape, name: &str) -> f64 {
        self.get(name) - earlier.get(name)
    }
}

/// Fetches the worker's metrics from its admin address.
pub async fn scrape(admin: SocketAddr) -> Result<Scrape> {
    let (status, body) = http_request(admin, "GET", "/metrics").await?;
    ensure!(status == 200, "GET /metrics answered {status}");
    Ok(Scrape(body))
}
