//! The AWS actuator: the fleet is an EC2 Auto Scaling group.
//!
//! - `set_desired`: SetDesiredCapacity, cooldown not honoured.
//! - Without a lifecycle hook, `drain_started` and `drain_progress` do nothing (the instance
//!   serves until drained), and `drained` is TerminateInstanceInAutoScalingGroup, decrementing
//!   the desired capacity.
//! - With a termination lifecycle hook, `drain_started` is TerminateInstanceInAutoScalingGroup
//!   decrementing the desired capacity: the group shrinks now and the hook holds the instance
//!   in `Terminating:Wait` while it drains. `drain_progress` is
//!   RecordLifecycleActionHeartbeat, and `drained` is CompleteLifecycleAction(CONTINUE).
//!
//! With a hook, its heartbeat timeout must exceed herald's heartbeat interval, or the group
//! terminates the instance mid-drain.
//!
//! Idempotence, since the control loop repeats calls: before terminating, the instance is
//! looked up (DescribeAutoScalingInstances). One that is in no group, in another group, or
//! already terminating or detaching is left alone and the call succeeds; this also keeps a
//! wrong instance id from terminating a machine of some other group, which
//! TerminateInstanceInAutoScalingGroup alone would do. The service's answer for the same
//! situation, met in a race, is success too: `ValidationError` "Instance Id not found". On
//! heartbeat or complete, "No active Lifecycle Action found" is success when the instance
//! turns out to be gone or leaving by itself; when it is still in service (drain_started never
//! terminated it) `drained` terminates it and fails, so that the repeated call completes the
//! hook. Any other error fails the call with the service's error code and message.
//!
//! At start, [`Aws::check_group`] compares herald's settings with the group: herald's bounds
//! must lie within MinSize..MaxSize (the service refuses a terminate-with-decrement below
//! MinSize and a desired capacity above MaxSize, which would leave a drained worker up and
//! empty), and the hook, when named, must exist for terminations with a heartbeat timeout
//! above herald's heartbeat interval (a misnamed hook would let the instance go mid-drain).
//!
//! Credentials come from the default chain (environment, profile, web identity, ECS, EC2
//! instance metadata); the region and endpoint may be overridden.

use super::{Actuator, ActuatorError, Target};
use aws_config::{BehaviorVersion, ConfigLoader};
use aws_sdk_autoscaling::config::timeout::TimeoutConfig;
use aws_sdk_autoscaling::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_autoscaling::Client;
use futures::future::BoxFuture;
use std::time::Duration;
use thiserror::Error;

/// Limit of one AWS call, all of the SDK's own retries included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Limit of one attempt of an AWS call.
pub const CALL_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Limit of connecting to the AWS endpoint.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The service's message for terminating an instance no group manages (any more).
const INSTANCE_NOT_FOUND: &str = "Instance Id not found";

/// The service's message for a heartbeat or completion when no hook holds the instance.
const NO_ACTIVE_LIFECYCLE_ACTION: &str = "No active Lifecycle Action found";

/// Which Auto Scaling group, and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsSettings {
    /// The Auto Scaling group of the workers.
    pub group: String,
    /// The group's termination lifecycle hook that holds instances while they drain.
    pub lifecycle_hook: Option<String>,
    /// The region, instead of the one from the environment or profile.
    pub region: Option<String>,
    /// The Auto Scaling endpoint, instead of the region's (a VPC endpoint, a test server).
    pub endpoint_url: Option<String>,
}

/// Why [`Aws::connect`] refused its settings.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AwsSettingsError {
    /// The group name is empty.
    #[error("aws: the Auto Scaling group name is empty")]
    EmptyGroup,
    /// The lifecycle hook name is given but empty.
    #[error("aws: the lifecycle hook name is empty; leave it out to use no hook")]
    EmptyHook,
    /// The region is given but empty.
    #[error("aws: the region is empty; leave it out to use the environment's")]
    EmptyRegion,
    /// The endpoint URL is not an http(s) URL with a host.
    #[error("aws: endpoint url {0:?} is not an http:// or https:// URL with a host")]
    BadEndpoint(String),
    /// Neither the settings nor the environment name a region.
    #[error("aws: no region; set one in the settings, AWS_REGION or the AWS profile")]
    NoRegion,
}

/// Herald's settings that the group must agree with (see [`Aws::check_group`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expectations {
    /// Herald's `min_workers`: the group's MinSize must not be above it.
    pub min_workers: u32,
    /// Herald's `max_workers`: the group's MaxSize must not be below it.
    pub max_workers: u32,
    /// Herald's `drain_heartbeat`: the hook's heartbeat timeout must be longer.
    pub drain_heartbeat: Duration,
}

/// What the service says about the group and its hook, as far as [`disagreements`] needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupFacts {
    /// The group's MinSize.
    pub min_size: i32,
    /// The group's MaxSize.
    pub max_size: i32,
    /// The named hook's transition and heartbeat timeout in seconds; `None` if the group has
    /// no hook of that name.
    pub hook: Option<(String, i32)>,
}

/// The transition of a termination lifecycle hook.
const TERMINATING: &str = "autoscaling:EC2_INSTANCE_TERMINATING";

/// Every way the group and herald's settings disagree, each as one sentence; empty if none.
pub fn disagreements(
    group: &str,
    hook: Option<&str>,
    facts: &GroupFacts,
    want: &Expectations,
) -> Vec<String> {
    let mut out = Vec::new();
    if i64::from(want.min_workers) < i64::from(facts.min_size) {
        out.push(format!(
            "min_workers {} is below the group's MinSize {}: a scale-in under MinSize is refused \
             and the drained worker would stay up, empty (raise min_workers or lower MinSize)",
            want.min_workers, facts.min_size
        ));
    }
    if i64::from(want.max_workers) > i64::from(facts.max_size) {
        out.push(format!(
            "max_workers {} is above the group's MaxSize {}: a scale-out past MaxSize is refused \
             (lower max_workers or raise MaxSize)",
            want.max_workers, facts.max_size
        ));
    }
    if let Some(name) = hook {
        match &facts.hook {
            None => out.push(format!(
                "group {group} has no lifecycle hook {name:?}: instances would terminate \
                 mid-drain (fix aws_lifecycle_hook, or leave it out to drain before terminating)"
            )),
            Some((transition, _)) if transition != TERMINATING => out.push(format!(
                "lifecycle hook {name:?} is for {transition}, not {TERMINATING}"
            )),
            Some((_, timeout)) if i64::from(*timeout) <= want.drain_heartbeat.as_secs() as i64 => {
                out.push(format!(
                    "lifecycle hook {name:?} times out after {timeout} s, not longer than \
                     drain_heartbeat {:?}: instances would terminate between heartbeats",
                    want.drain_heartbeat
                ))
            }
            Some(_) => {}
        }
    }
    out
}

/// Scales an EC2 Auto Scaling group, optionally draining through a termination lifecycle hook.
#[derive(Debug, Clone)]
pub struct Aws {
    client: Client,
    group: String,
    hook: Option<String>,
}

/// Where an instance stands, as DescribeAutoScalingInstances says.
#[derive(Debug)]
enum Standing {
    /// No group manages it: terminated and gone, or never was.
    Gone,
    /// It belongs to a group other than ours.
    OtherGroup(String),
    /// It is in our group, in this lifecycle state (`InService`, `Terminating:Wait`, ...).
    Member(String),
}

impl Aws {
    /// Loads the default AWS configuration (credentials, region) with the settings' overrides.
    pub async fn connect(settings: AwsSettings) -> Result<Self, AwsSettingsError> {
        Self::connect_with(aws_config::defaults(BehaviorVersion::latest()), settings).await
    }

    /// Like [`Aws::connect`], from a loader the caller prepared (for example with static
    /// credentials).
    pub async fn connect_with(
        loader: ConfigLoader,
        settings: AwsSettings,
    ) -> Result<Self, AwsSettingsError> {
        check(&settings)?;
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .operation_attempt_timeout(CALL_ATTEMPT_TIMEOUT)
            .operation_timeout(CALL_TIMEOUT)
            .build();
        let mut loader = loader.timeout_config(timeouts);
        if let Some(region) = &settings.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(endpoint_url) = &settings.endpoint_url {
            loader = loader.endpoint_url(endpoint_url);
        }
        let config = loader.load().await;
        if config.region().is_none() {
            return Err(AwsSettingsError::NoRegion);
        }
        Self::from_client(Client::new(&config), settings)
    }

    /// An actuator on a client built elsewhere (tests); `region` and `endpoint_url` are ignored.
    pub fn from_client(client: Client, settings: AwsSettings) -> Result<Self, AwsSettingsError> {
        check(&settings)?;
        Ok(Aws {
            client,
            group: settings.group,
            hook: settings.lifecycle_hook,
        })
    }

    /// Checks the group against herald's settings (see the module's documentation); fails with
    /// every disagreement, or with the service's error if the group cannot be described.
    pub async fn check_group(&self, want: &Expectations) -> Result<(), ActuatorError> {
        let action = "check_group";
        let group = self.describe_group(action).await?;
        let mut facts = GroupFacts {
            min_size: group.min_size().unwrap_or_default(),
            max_size: group.max_size().unwrap_or_default(),
            hook: None,
        };
        if let Some(name) = &self.hook {
            let hooks = self
                .client
                .describe_lifecycle_hooks()
                .auto_scaling_group_name(&self.group)
                .lifecycle_hook_names(name)
                .send()
                .await
                .map_err(|e| failure(action, e))?;
            facts.hook = hooks
                .lifecycle_hooks()
                .iter()
                .find(|h| h.lifecycle_hook_name() == Some(name))
                .map(|h| {
                    (
                        h.lifecycle_transition().unwrap_or_default().to_string(),
                        h.heartbeat_timeout().unwrap_or_default(),
                    )
                });
        }
        let problems = disagreements(&self.group, self.hook.as_deref(), &facts, want);
        if !problems.is_empty() {
            return Err(ActuatorError::Failed {
                actuator: "aws",
                action,
                message: problems.join("; "),
            });
        }
        tracing::info!(group = %self.group, min_size = facts.min_size, max_size = facts.max_size,
            hook = self.hook.as_deref().unwrap_or("-"),
            heartbeat_timeout_s = facts.hook.as_ref().map(|h| h.1), "aws: group checked");
        Ok(())
    }

    /// The group as DescribeAutoScalingGroups says, for `action`'s errors.
    async fn describe_group(
        &self,
        action: &'static str,
    ) -> Result<aws_sdk_autoscaling::types::AutoScalingGroup, ActuatorError> {
        let groups = self
            .client
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(&self.group)
            .send()
            .await
            .map_err(|e| failure(action, e))?;
        groups
            .auto_scaling_groups()
            .first()
            .cloned()
            .ok_or_else(|| ActuatorError::Failed {
                actuator: "aws",
                action,
                message: format!("Auto Scaling group {} not found", self.group),
            })
    }

    async fn set_capacity(&self, desired: u32, reason: &str) -> Result<(), ActuatorError> {
        let action = "set_desired";
        let capacity = i32::try_from(desired).map_err(|_| ActuatorError::Failed {
            actuator: "aws",
            action,
            message: format!("desired capacity {desired} is more than Auto Scaling accepts"),
        })?;
        // Herald only grows the group this way, and may not see instances still booting: never
        // lower a desired capacity someone (or an earlier herald) already raised, or the group
        // would pick its own victims.
        let current = self.describe_group(action).await?.desired_capacity();
        if current.is_some_and(|c| c >= capacity) {
            tracing::info!(group = %self.group, desired, current, reason,
                "aws: group already wants at least this many; left as it is");
            return Ok(());
        }
        self.client
            .set_desired_capacity()
            .auto_scaling_group_name(&self.group)
            .desired_capacity(capacity)
            .honor_cooldown(false)
            .send()
            .await
            .map_err(|e| failure(action, e))?;
        tracing::info!(group = %self.group, desired, reason, "aws: set desired capacity");
        Ok(())
    }

    /// Terminates `instance` through the group, decrementing its desired capacity, unless it
    /// is not ours to terminate or is already on its way out.
    async fn terminate(&self, action: &'static str, instance: &str) -> Result<(), ActuatorError> {
        let state = match self.standing(action, instance).await? {
            Standing::Member(state) if !is_leaving(&state) => state,
            standing => {
                self.log_left_alone(action, instance, &standing);
                return Ok(());
            }
        };
        let result = self
            .client
            .terminate_instance_in_auto_scaling_group()
            .instance_id(instance)
            .should_decrement_desired_capacity(true)
            .send()
            .await;
        match result {
            Ok(_) => {
                tracing::info!(group = %self.group, instance, state, action,
                    "aws: terminating instance, desired capacity decremented");
                Ok(())
            }
            Err(e) if is_validation(&e, INSTANCE_NOT_FOUND) => {
                tracing::info!(group = %self.group, instance, action,
                    "aws: instance already gone; nothing to terminate");
                Ok(())
            }
            Err(e) => Err(failure(action, e)),
        }
    }

    async fn heartbeat(&self, hook: &str, instance: &str) -> Result<(), ActuatorError> {
        let action = "drain_progress";
        let result = self
            .client
            .record_lifecycle_action_heartbeat()
            .auto_scaling_group_name(&self.group)
            .lifecycle_hook_name(hook)
            .instance_id(instance)
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_validation(&e, NO_ACTIVE_LIFECYCLE_ACTION) => {
                let Some(state) = self.not_held(action, instance).await? else {
                    return Ok(());
                };
                Err(ActuatorError::Failed {
                    actuator: "aws",
                    action,
                    message: format!(
                        "{} (the instance is {state}, not held by hook {hook})",
                        service_message(&e)
                    ),
                })
            }
            Err(e) => Err(failure(action, e)),
        }
    }

    async fn complete(&self, hook: &str, instance: &str) -> Result<(), ActuatorError> {
        let action = "drained";
        let result = self
            .client
            .complete_lifecycle_action()
            .auto_scaling_group_name(&self.group)
            .lifecycle_hook_name(hook)
            .instance_id(instance)
            .lifecycle_action_result("CONTINUE")
            .send()
            .await;
        match result {
            Ok(_) => {
                tracing::info!(group = %self.group, hook, instance,
                    "aws: lifecycle action completed; the instance terminates");
                Ok(())
            }
            Err(e) if is_validation(&e, NO_ACTIVE_LIFECYCLE_ACTION) => {
                let Some(state) = self.not_held(action, instance).await? else {
                    return Ok(());
                };
                let mut message = format!(
                    "{} (the instance is {state}, not held by hook {hook}",
                    service_message(&e)
                );
                if !state.ends_with(":Wait") {
                    // The hook never got it (drain_started's terminate did not happen):
                    // terminate it now; the next call completes the action that starts.
                    self.terminate(action, instance).await?;
                    message.push_str("; asked the group to terminate it");
                }
                message.push(')');
                Err(ActuatorError::Failed {
                    actuator: "aws",
                    action,
                    message,
                })
            }
            Err(e) => Err(failure(action, e)),
        }
    }

    /// After "No active Lifecycle Action found": `None` (logged) when the instance is gone,
    /// not ours, or leaving by itself, so there is nothing to heartbeat or complete; otherwise
    /// its state: in service (never terminated), or waiting in some other hook.
    async fn not_held(
        &self,
        action: &'static str,
        instance: &str,
    ) -> Result<Option<String>, ActuatorError> {
        match self.standing(action, instance).await? {
            Standing::Member(state) if !is_leaving(&state) || state.ends_with(":Wait") => {
                Ok(Some(state))
            }
            standing => {
                self.log_left_alone(action, instance, &standing);
                Ok(None)
            }
        }
    }

    async fn standing(
        &self,
        action: &'static str,
        instance: &str,
    ) -> Result<Standing, ActuatorError> {
        let output = self
            .client
            .describe_auto_scaling_instances()
            .instance_ids(instance)
            .send()
            .await
            .map_err(|e| failure(action, e))?;
        let Some(details) = output
            .auto_scaling_instances()
            .iter()
            .find(|d| d.instance_id() == Some(instance))
        else {
            return Ok(Standing::Gone);
        };
        let group = details.auto_scaling_group_name().unwrap_or_default();
        if group != self.group {
            return Ok(Standing::OtherGroup(group.to_owned()));
        }
        Ok(Standing::Member(
            details.lifecycle_state().unwrap_or_default().to_owned(),
        ))
    }

    fn log_left_alone(&self, action: &str, instance: &str, standing: &Standing) {
        let group = &self.group;
        match standing {
            Standing::Gone => tracing::info!(
                group,
                instance,
                action,
                "aws: instance is in no Auto Scaling group (already gone); nothing to do"
            ),
            Standing::OtherGroup(other) => tracing::warn!(
                group,
                instance,
                action,
                other,
                "aws: instance belongs to another Auto Scaling group; leaving it alone"
            ),
            Standing::Member(state) => tracing::info!(
                group,
                instance,
                action,
                state,
                "aws: instance is already leaving the group; nothing to do"
            ),
        }
    }
}

impl Actuator for Aws {
    fn name(&self) -> &'static str {
        "aws"
    }

    fn set_desired(&self, desired: u32, reason: &str) -> BoxFuture<'_, Result<(), ActuatorError>> {
        let reason = reason.to_owned();
        Box::pin(async move { self.set_capacity(desired, &reason).await })
    }

    fn drain_started<'a>(
        &'a self,
        target: &'a Target,
        desired: u32,
    ) -> BoxFuture<'a, Result<(), ActuatorError>> {
        Box::pin(async move {
            let instance = instance_of(target)?;
            if self.hook.is_none() {
                tracing::debug!(group = %self.group, instance, desired,
                    "aws: draining; without a lifecycle hook the instance stays until drained");
                return Ok(());
            }
            self.terminate("drain_started", instance).await
        })
    }

    fn drain_progress<'a>(
        &'a self,
        target: &'a Target,
    ) -> BoxFuture<'a, Result<(), ActuatorError>> {
        Box::pin(async move {
            let instance = instance_of(target)?;
            match &self.hook {
                Some(hook) => self.heartbeat(hook, instance).await,
                None => {
                    tracing::debug!(group = %self.group, instance, "aws: still draining");
                    Ok(())
                }
            }
        })
    }

    fn drained<'a>(&'a self, target: &'a Target) -> BoxFuture<'a, Result<(), ActuatorError>> {
        Box::pin(async move {
            let instance = instance_of(target)?;
            match &self.hook {
                Some(hook) => self.complete(hook, instance).await,
                None => self.terminate("drained", instance).await,
            }
        })
    }
}

fn check(settings: &AwsSettings) -> Result<(), AwsSettingsError> {
    if settings.group.is_empty() {
        return Err(AwsSettingsError::EmptyGroup);
    }
    if settings.lifecycle_hook.as_deref() == Some("") {
        return Err(AwsSettingsError::EmptyHook);
    }
    if settings.region.as_deref() == Some("") {
        return Err(AwsSettingsError::EmptyRegion);
    }
    if let Some(url) = &settings.endpoint_url {
        let uri = url.parse::<hyper::Uri>().ok();
        let scheme = uri.as_ref().and_then(|u| u.scheme_str());
        let has_host = uri
            .as_ref()
            .and_then(|u| u.host())
            .is_some_and(|h| !h.is_empty());
        if !matches!(scheme, Some("http" | "https")) || !has_host {
            return Err(AwsSettingsError::BadEndpoint(url.clone()));
        }
    }
    Ok(())
}

fn instance_of(target: &Target) -> Result<&str, ActuatorError> {
    target
        .instance_id
        .as_deref()
        .ok_or_else(|| ActuatorError::NoInstance(target.worker_id.clone(), "aws"))
}

/// Terminating, terminated, or being detached: on its way out of the group without us.
fn is_leaving(state: &str) -> bool {
    state.contains("Terminat") || state.starts_with("Detach")
}

/// Whether `error` is a `ValidationError` whose message contains `needle`.
fn is_validation(error: &impl ProvideErrorMetadata, needle: &str) -> bool {
    error.code() == Some("ValidationError") && error.message().is_some_and(|m| m.contains(needle))
}

/// The failure for `error`.
fn failure<E>(action: &'static str, error: SdkError<E>) -> ActuatorError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let message = service_message(&error);
    ActuatorError::Failed {
        actuator: "aws",
        action,
        message,
    }
}

/// The service's error code and message, or the whole chain of causes for an error that never
/// reached the service (no credentials, a timeout, a refused connection).
fn service_message<E>(error: &SdkError<E>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match error.code() {
        Some(code) => format!("{code}: {}", error.message().unwrap_or("(no message)")),
        None => DisplayErrorContext(error).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want() -> Expectations {
        Expectations {
            min_workers: 3,
            max_workers: 40,
            drain_heartbeat: Duration::from_secs(60),
        }
    }

    fn facts(min_size: i32, max_size: i32, hook: Option<(&str, i32)>) -> GroupFacts {
        GroupFacts {
            min_size,
            max_size,
            hook: hook.map(|(t, s)| (t.to_string(), s)),
        }
    }

    #[test]
    fn bounds_within_the_group_and_a_fitting_hook_agree() {
        let f = facts(3, 40, Some((TERMINATING, 900)));
        assert!(disagreements("g", Some("h"), &f, &want()).is_empty());
        // Herald may be stricter than the group.
        assert!(disagreements("g", None, &facts(1, 100, None), &want()).is_empty());
    }

    #[test]
    fn each_disagreement_is_named() {
        let f = facts(4, 30, None);
        let found = disagreements("g", Some("pushfleet-drain"), &f, &want());
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(found[0].starts_with("min_workers 3 is below the group's MinSize 4"));
        assert!(found[1].starts_with("max_workers 40 is above the group's MaxSize 30"));
        assert!(found[2].contains("no lifecycle hook \"pushfleet-drain\""));

        let launching = facts(3, 40, Some(("autoscaling:EC2_INSTANCE_LAUNCHING", 900)));
        let found = disagreements("g", Some("h"), &launching, &want());
        assert_eq!(found.len(), 1);
        assert!(found[0].contains("not autoscaling:EC2_INSTANCE_TERMINATING"));

        let short = facts(3, 40, Some((TERMINATING, 60)));
        let found = disagreements("g", Some("h"), &short, &want());
        assert_eq!(found.len(), 1);
        assert!(found[0].contains("times out after 60 s"), "{found:?}");
    }
}
