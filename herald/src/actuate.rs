//! Drives the actuator from the control state: asks [`Control::due_calls`] what the world
//! should be told, makes the calls one at a time, and notes successes. A failed call is
//! retried with exponential backoff (1 s doubling to 60 s) for as long as the state still
//! wants it: level-triggered, so a herald restart or a lost call repairs itself.

use crate::actuator::Actuator;
use crate::control::{Call, Control};
use crate::metrics::Metrics;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// First retry delay of a failed call.
const RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest retry delay.
const RETRY_MAX: Duration = Duration::from_secs(60);
/// How often due calls are looked for without a wake-up.
const POLL: Duration = Duration::from_secs(1);

/// Runs until `stop`; `wake` is notified when a decision is made.
pub async fn run(
    control: Arc<Mutex<Control>>,
    actuator: Arc<dyn Actuator>,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut retry: HashMap<String, (Instant, Duration)> = HashMap::new();
    loop {
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(POLL) => {}
            _ = stop.cancelled() => return,
        }
        let calls = control.lock().due_calls(Instant::now());
        let wanted: Vec<String> = calls.iter().map(key).collect();
        retry.retain(|k, _| wanted.contains(k));
        for call in calls {
            let k = key(&call);
            if retry.get(&k).is_some_and(|(at, _)| Instant::now() < *at) {
                continue;
            }
            let (action, result) = tokio::select! {
                r = make(actuator.as_ref(), &call) => r,
                _ = stop.cancelled() => return,
            };
            match result {
                Ok(()) => {
                    metrics
                        .actuator_calls
                        .with_label_values(&[action, "ok"])
                        .inc();
                    retry.remove(&k);
                    control
                        .lock()
                        .call_done(&call, Instant::now(), crate::server::unix_ms());
                }
                Err(e) => {
                    metrics
                        .actuator_calls
                        .with_label_values(&[action, "failed"])
                        .inc();
                    let delay = retry
                        .get(&k)
                        .map_or(RETRY_MIN, |(_, d)| (*d * 2).min(RETRY_MAX));
                    tracing::warn!(actuator = actuator.name(), action, error = %e,
                        retry_in = ?delay, "actuator call failed; will retry");
                    retry.insert(k, (Instant::now() + delay, delay));
                }
            }
        }
    }
}

/// A call's identity for retries: the action and its worker.
fn key(call: &Call) -> String {
    match call {
        Call::SetDesired(..) => "set_desired".into(),
        Call::DrainStarted(t, _) => format!("drain_started/{}", t.worker_id),
        Call::DrainProgress(t) => format!("drain_progress/{}", t.worker_id),
        Call::Drained(t) => format!("drained/{}", t.worker_id),
    }
}

async fn make(
    actuator: &dyn Actuator,
    call: &Call,
) -> (&'static str, Result<(), crate::actuator::ActuatorError>) {
    match call {
        Call::SetDesired(n, reason) => ("set_desired", actuator.set_desired(*n, reason).await),
        Call::DrainStarted(t, desired) => {
            ("drain_started", actuator.drain_started(t, *desired).await)
        }
        Call::DrainProgress(t) => ("drain_progress", actuator.drain_progress(t).await),
        Call::Drained(t) => ("drained", actuator.drained(t).await),
    }
}
