//! The default actuator: decisions are logged and nothing else happens, so herald can be
//! watched on a fleet before it is given control.

use super::{Actuator, ActuatorError, Target};
use futures::future::BoxFuture;

/// Logs every call.
pub struct LogOnly;

impl Actuator for LogOnly {
    fn name(&self) -> &'static str {
        "log"
    }

    fn set_desired(&self, desired: u32, reason: &str) -> BoxFuture<'_, Result<(), ActuatorError>> {
        tracing::info!(desired, reason, "scale: desired workers (log only)");
        Box::pin(async { Ok(()) })
    }

    fn drain_started<'a>(
        &'a self,
        target: &'a Target,
        desired: u32,
    ) -> BoxFuture<'a, Result<(), ActuatorError>> {
        tracing::info!(worker = %target.worker_id, instance = ?target.instance_id, desired,
            "scale-in: draining worker (log only)");
        Box::pin(async { Ok(()) })
    }

    fn drain_progress<'a>(
        &'a self,
        target: &'a Target,
    ) -> BoxFuture<'a, Result<(), ActuatorError>> {
        tracing::debug!(worker = %target.worker_id, "scale-in: still draining (log only)");
        Box::pin(async { Ok(()) })
    }

    fn drained<'a>(&'a self, target: &'a Target) -> BoxFuture<'a, Result<(), ActuatorError>> {
        tracing::info!(worker = %target.worker_id, instance = ?target.instance_id,
            "scale-in: worker drained; it may be terminated (log only)");
        Box::pin(async { Ok(()) })
    }
}
