//! Scaling actuators: how herald's decisions reach the world. Chosen by configuration
//! (`--actuator`): [`log`] (default: decisions are only logged), [`webhook`] (HTTP POST of JSON,
//! with retries), [`exec`] (runs a command), [`aws`] (EC2 Auto Scaling).
//!
//! The control loop calls an actuator from one task, one call at a time, and repeats a call
//! that failed (level-triggered: it keeps asking for the state it wants). Every call is
//! idempotent on the actuator's side.
//!
//! The calls, in a worker's scale-in life:
//! 1. [`Actuator::drain_started`]: herald chose the worker (fewest connections) and told it to
//!    drain. AWS with a termination lifecycle hook: TerminateInstanceInAutoScalingGroup with
//!    decrement, so the group shrinks now and the hook holds the instance while it drains.
//! 2. [`Actuator::drain_progress`]: every heartbeat interval while it drains. AWS with a hook:
//!    RecordLifecycleActionHeartbeat.
//! 3. [`Actuator::drained`]: it has no connections left (or the drain timed out). AWS with a
//!    hook: CompleteLifecycleAction(CONTINUE); without one: TerminateInstanceInAutoScalingGroup
//!    with decrement.
//!
//! [`Actuator::set_desired`] is only ever called to grow the fleet: shrinking goes through the
//! drain above, so that the cloud never picks a victim of its own.

pub mod aws;
pub mod exec;
pub mod log;
pub mod webhook;

use futures::future::BoxFuture;
use serde::Serialize;
use thiserror::Error;

/// The worker an actuator call is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Target {
    /// The worker's id.
    pub worker_id: String,
    /// Its cloud instance id, when it reported one.
    pub instance_id: Option<String>,
}

/// Why an actuator call failed; the control loop logs it, counts it and tries again later.
#[derive(Debug, Error)]
pub enum ActuatorError {
    /// The worker has no instance id, and the actuator needs one.
    #[error("worker {0} reported no instance id; the {1} actuator cannot act on it")]
    NoInstance(String, &'static str),
    /// The call was made and failed.
    #[error("{actuator} {action} failed: {message}")]
    Failed {
        /// The actuator's name.
        actuator: &'static str,
        /// The call.
        action: &'static str,
        /// What went wrong, as specific as the actuator can say.
        message: String,
    },
}

/// One actuator call as the webhook and exec actuators describe it to the outside world: an
/// event name, the fleet size when it applies, a human reason and the worker when it applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event<'a> {
    /// `set_desired`, `drain_started`, `drain_progress` or `drained`; also the `action` of
    /// [`ActuatorError::Failed`].
    pub kind: &'static str,
    /// The fleet size the call asks for (`set_desired`, `drain_started`).
    pub desired: Option<u32>,
    /// Why: the engine's reason for `set_desired`, a fixed sentence for the drain calls.
    pub reason: &'a str,
    /// The worker the call is about (the drain calls).
    pub target: Option<&'a Target>,
}

impl<'a> Event<'a> {
    /// The event of [`Actuator::set_desired`].
    pub fn set_desired(desired: u32, reason: &'a str) -> Self {
        Event {
            kind: "set_desired",
            desired: Some(desired),
            reason,
            target: None,
        }
    }

    /// The event of [`Actuator::drain_started`].
    pub fn drain_started(target: &'a Target, desired: u32) -> Self {
        Event {
            kind: "drain_started",
            desired: Some(desired),
            reason: "scale in: the worker was chosen to leave and is draining",
            target: Some(target),
        }
    }

    /// The event of [`Actuator::drain_progress`].
    pub fn drain_progress(target: &'a Target) -> Self {
        Event {
            kind: "drain_progress",
            desired: None,
            reason: "scale in: the worker is still draining",
            target: Some(target),
        }
    }

    /// The event of [`Actuator::drained`].
    pub fn drained(target: &'a Target) -> Self {
        Event {
            kind: "drained",
            desired: None,
            reason:
                "scale in: the worker has drained (no connections left, or the drain timed out)",
            target: Some(target),
        }
    }
}

/// An actuator that tells the outside world of every call as one [`Event`] (webhook, exec):
/// every such type is an [`Actuator`].
pub trait EventSink: Send + Sync {
    /// The actuator's name in logs and metrics.
    const NAME: &'static str;

    /// Delivers one event; the returned future borrows nothing of the event.
    fn send(&self, event: Event<'_>) -> BoxFuture<'_, Result<(), ActuatorError>>;
}

impl<T: EventSink> Actuator for T {
    fn name(&self) -> &'static str {
        T::NAME
    }

    fn set_desired(&self, desired: u32, reason: &str) -> BoxFuture<'_, Result<(), ActuatorError>> {
        self.send(Event::set_desired(desired, reason))
    }

    fn drain_started<'a>(
        &'a self,
        target: &'a Target,
        desired: u32,
    ) -> BoxFuture<'a, Result<(), ActuatorError>> {
        self.send(Event::drain_started(target, desired))
    }

    fn drain_progress<'a>(
        &'a self,
        target: &'a Target,
    ) -> BoxFuture<'a, Result<(), ActuatorError>> {
        self.send(Event::drain_progress(target))
    }

    fn drained<'a>(&'a self, target: &'a Target) -> BoxFuture<'a, Result<(), ActuatorError>> {
        self.send(Event::drained(target))
    }
}

/// Carries out scale decisions. Implementations must be idempotent: a call may be repeated.
pub trait Actuator: Send + Sync {
    /// The actuator's name in logs and metrics (`log`, `webhook`, `exec`, `aws`).
    fn name(&self) -> &'static str;

    /// The fleet should have `desired` workers (only called to grow it).
    fn set_desired(&self, desired: u32, reason: &str) -> BoxFuture<'_, Result<(), ActuatorError>>;

    /// Herald started draining `target` to remove it; `desired` is the fleet size without it.
    fn drain_started<'a>(
        &'a self,
        target: &'a Target,
        desired: u32,
    ) -> BoxFuture<'a, Result<(), ActuatorError>>;

    /// `target` is still draining (called every heartbeat interval).
    fn drain_progress<'a>(&'a self, target: &'a Target)
        -> BoxFuture<'a, Result<(), ActuatorError>>;

    /// `target` has no connections left: remove it.
    fn drained<'a>(&'a self, target: &'a Target) -> BoxFuture<'a, Result<(), ActuatorError>>;
}
