//! Admission control: a token bucket on new connections and a cap on concurrent ones. Over
//! either, the client gets HTTP 503 with a jittered `Retry-After` before any upgrade.
//!
//! THE API BELOW IS FIXED (the connection path calls it); the bodies are a first, naive
//! version to be replaced.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Admission limits.
#[derive(Debug, Clone)]
pub struct AdmissionSettings {
    /// New connections per second admitted on average.
    pub rate_per_s: f64,
    /// Burst: new connections admitted at once above the rate.
    pub burst: u32,
    /// Most connections open at once.
    pub max_connections: usize,
    /// `Retry-After` is drawn uniformly from this range, so refused clients come back spread
    /// out instead of together.
    pub retry_after: (Duration, Duration),
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Over the new-connection rate.
    Rate,
    /// Over the concurrent-connection cap.
    Connections,
}

impl Refusal {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Rate => "rate",
            Refusal::Connections => "connections",
        }
    }
}

/// Held for the life of an admitted connection; dropping it frees its slot.
#[derive(Debug)]
pub struct Permit {
    open: Arc<AtomicUsize>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Shared by every accept: `&self` methods, safe to call from many tasks.
#[derive(Debug)]
pub struct Admission {
    settings: AdmissionSettings,
    open: Arc<AtomicUsize>,
}

impl Admission {
    /// Admission with these limits.
    pub fn new(settings: AdmissionSettings) -> Self {
        Admission {
            settings,
            open: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Admits a new connection at `now`, or says why not and when to retry.
    pub fn admit(&self, now: Instant) -> Result<Permit, (Refusal, Duration)> {
        let _ = now;
        if self.open.fetch_add(1, Ordering::Relaxed) >= self.settings.max_connections {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return Err((Refusal::Connections, self.settings.retry_after.0));
        }
        Ok(Permit {
            open: self.open.clone(),
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}
