//! The AWS actuator's requests, checked against mocked Auto Scaling responses: the lifecycle
//! hook calls (which moto does not implement), error mapping and idempotence.
//!
//! Rules are matched in order and a request that matches no rule fails the test, so each test
//! also asserts that no other request was made.

use aws_sdk_autoscaling::error::ErrorMetadata;
use aws_sdk_autoscaling::operation::complete_lifecycle_action::{
    CompleteLifecycleActionError, CompleteLifecycleActionOutput,
};
use aws_sdk_autoscaling::operation::describe_auto_scaling_groups::DescribeAutoScalingGroupsOutput;
use aws_sdk_autoscaling::operation::describe_auto_scaling_instances::DescribeAutoScalingInstancesOutput;
use aws_sdk_autoscaling::operation::record_lifecycle_action_heartbeat::{
    RecordLifecycleActionHeartbeatError, RecordLifecycleActionHeartbeatOutput,
};
use aws_sdk_autoscaling::operation::set_desired_capacity::{
    SetDesiredCapacityError, SetDesiredCapacityOutput,
};
use aws_sdk_autoscaling::operation::terminate_instance_in_auto_scaling_group::{
    TerminateInstanceInAutoScalingGroupError, TerminateInstanceInAutoScalingGroupOutput,
};
use aws_sdk_autoscaling::types::error::ResourceContentionFault;
use aws_sdk_autoscaling::types::{AutoScalingGroup, AutoScalingInstanceDetails};
use aws_sdk_autoscaling::Client;
use aws_smithy_mocks::{mock, mock_client, Rule, RuleMode};
use herald::actuator::aws::{Aws, AwsSettings, AwsSettingsError};
use herald::actuator::{Actuator, ActuatorError, Target};

const GROUP: &str = "pushfleet-workers";
const HOOK: &str = "drain-before-terminate";
const INSTANCE: &str = "i-0123456789abcdef0";

fn settings(hook: Option<&str>) -> AwsSettings {
    AwsSettings {
        group: GROUP.into(),
        lifecycle_hook: hook.map(String::from),
        region: None,
        endpoint_url: None,
    }
}

/// An actuator whose client answers with `rules`, in order.
fn actuator(hook: Option<&str>, rules: &[&Rule]) -> Aws {
    let client: Client = mock_client!(aws_sdk_autoscaling, RuleMode::Sequential, rules);
    Aws::from_client(client, settings(hook)).unwrap()
}

fn target() -> Target {
    Target {
        worker_id: "w-7".into(),
        instance_id: Some(INSTANCE.into()),
    }
}

/// DescribeAutoScalingInstances of [`INSTANCE`], answering that it is in `group` in `state`
/// (or in no group).
fn describe(standing: Option<(&'static str, &'static str)>) -> Rule {
    mock!(Client::describe_auto_scaling_instances)
        .match_requests(|req| req.instance_ids() == [INSTANCE])
        .then_output(move || {
            let details = standing.map(|(group, state)| {
                AutoScalingInstanceDetails::builder()
                    .instance_id(INSTANCE)
                    .auto_scaling_group_name(group)
                    .lifecycle_state(state)
                    .build()
            });
            DescribeAutoScalingInstancesOutput::builder()
                .set_auto_scaling_instances(details.map(|d| vec![d]))
                .build()
        })
}

/// DescribeAutoScalingGroups of [`GROUP`], answering that it wants `desired` instances.
fn group_wants(desired: i32) -> Rule {
    mock!(Client::describe_auto_scaling_groups)
        .match_requests(|req| req.auto_scaling_group_names() == [GROUP])
        .then_output(move || {
            let group = AutoScalingGroup::builder()
                .auto_scaling_group_name(GROUP)
                .desired_capacity(desired)
                .min_size(0)
                .max_size(20)
                .build();
            DescribeAutoScalingGroupsOutput::builder()
                .auto_scaling_groups(group)
                .build()
        })
}

fn terminate_with_decrement() -> Rule {
    mock!(Client::terminate_instance_in_auto_scaling_group)
        .match_requests(|req| {
            req.instance_id() == Some(INSTANCE)
                && req.should_decrement_desired_capacity() == Some(true)
        })
        .then_output(|| TerminateInstanceInAutoScalingGroupOutput::builder().build())
}

fn validation_error(message: &str) -> ErrorMetadata {
    ErrorMetadata::builder()
        .code("ValidationError")
        .message(message)
        .build()
}

fn no_active_action() -> ErrorMetadata {
    validation_error(&format!(
        "No active Lifecycle Action found with instance ID {INSTANCE}"
    ))
}

fn failure_message(result: Result<(), ActuatorError>) -> (&'static str, String) {
    match result {
        Err(ActuatorError::Failed {
            actuator: "aws",
            action,
            message,
        }) => (action, message),
        other => panic!("expected an aws failure, got {other:?}"),
    }
}

#[tokio::test]
async fn set_desired_sets_the_capacity_without_honouring_cooldown() {
    let rule = mock!(Client::set_desired_capacity)
        .match_requests(|req| {
            req.auto_scaling_group_name() == Some(GROUP)
                && req.desired_capacity() == Some(6)
                && req.honor_cooldown() == Some(false)
        })
        .then_output(|| SetDesiredCapacityOutput::builder().build());
    let group = group_wants(4);
    let aws = actuator(None, &[&group, &rule]);

    aws.set_desired(6, "utilisation above target")
        .await
        .unwrap();

    assert_eq!(rule.num_calls(), 1);
}

/// Herald may not see instances still booting: it never lowers a desired capacity.
#[tokio::test]
async fn set_desired_never_lowers_the_group() {
    let group = group_wants(9);
    let set = mock!(Client::set_desired_capacity)
        .then_output(|| SetDesiredCapacityOutput::builder().build());
    let aws = actuator(None, &[&group, &set]);

    aws.set_desired(6, "utilisation above target")
        .await
        .unwrap();

    assert_eq!(group.num_calls(), 1);
    assert_eq!(set.num_calls(), 0);
}

#[tokio::test]
async fn with_a_hook_drain_started_terminates_with_decrement() {
    let describe = describe(Some((GROUP, "InService")));
    let terminate = terminate_with_decrement();
    let aws = actuator(Some(HOOK), &[&describe, &terminate]);

    aws.drain_started(&target(), 4).await.unwrap();

    assert_eq!(terminate.num_calls(), 1);
}

#[tokio::test]
async fn with_a_hook_drain_progress_records_a_heartbeat() {
    let heartbeat = mock!(Client::record_lifecycle_action_heartbeat)
        .match_requests(|req| {
            req.auto_scaling_group_name() == Some(GROUP)
                && req.lifecycle_hook_name() == Some(HOOK)
                && req.instance_id() == Some(INSTANCE)
        })
        .then_output(|| RecordLifecycleActionHeartbeatOutput::builder().build());
    let aws = actuator(Some(HOOK), &[&heartbeat]);

    aws.drain_progress(&target()).await.unwrap();

    assert_eq!(heartbeat.num_calls(), 1);
}

#[tokio::test]
async fn with_a_hook_drained_completes_the_action_with_continue() {
    let complete = mock!(Client::complete_lifecycle_action)
        .match_requests(|req| {
            req.auto_scaling_group_name() == Some(GROUP)
                && req.lifecycle_hook_name() == Some(HOOK)
                && req.instance_id() == Some(INSTANCE)
                && req.lifecycle_action_result() == Some("CONTINUE")
        })
        .then_output(|| CompleteLifecycleActionOutput::builder().build());
    let aws = actuator(Some(HOOK), &[&complete]);

    aws.drained(&target()).await.unwrap();

    assert_eq!(complete.num_calls(), 1);
}

#[tokio::test]
async fn without_a_hook_only_drained_acts() {
    let describe = describe(Some((GROUP, "InService")));
    let terminate = terminate_with_decrement();
    let aws = actuator(None, &[&describe, &terminate]);

    aws.drain_started(&target(), 4).await.unwrap();
    aws.drain_progress(&target()).await.unwrap();
    assert_eq!(describe.num_calls(), 0, "no request before drained");

    aws.drained(&target()).await.unwrap();
    assert_eq!(terminate.num_calls(), 1);
}

#[tokio::test]
async fn completing_for_an_instance_that_is_gone_succeeds() {
    let complete = mock!(Client::complete_lifecycle_action)
        .then_error(|| CompleteLifecycleActionError::generic(no_active_action()));
    let describe = describe(None);
    let aws = actuator(Some(HOOK), &[&complete, &describe]);

    aws.drained(&target()).await.unwrap();

    assert_eq!(describe.num_calls(), 1);
}

#[tokio::test]
async fn completing_for_an_instance_the_hook_never_held_terminates_it_and_fails() {
    let complete = mock!(Client::complete_lifecycle_action)
        .then_error(|| CompleteLifecycleActionError::generic(no_active_action()));
    let first_look = describe(Some((GROUP, "InService")));
    let second_look = describe(Some((GROUP, "InService")));
    let terminate = terminate_with_decrement();
    let aws = actuator(
        Some(HOOK),
        &[&complete, &first_look, &second_look, &terminate],
    );

    let (action, message) = failure_message(aws.drained(&target()).await);

    assert_eq!(action, "drained");
    assert!(
        message.starts_with("ValidationError: No active Lifecycle Action found"),
        "{message}"
    );
    assert!(message.contains("the instance is InService"), "{message}");
    assert!(
        message.contains("asked the group to terminate it"),
        "{message}"
    );
    assert_eq!(terminate.num_calls(), 1);
}

#[tokio::test]
async fn completing_for_an_instance_waiting_in_another_hook_fails() {
    let complete = mock!(Client::complete_lifecycle_action)
        .then_error(|| CompleteLifecycleActionError::generic(no_active_action()));
    let describe = describe(Some((GROUP, "Terminating:Wait")));
    let aws = actuator(Some(HOOK), &[&complete, &describe]);

    let (_, message) = failure_message(aws.drained(&target()).await);

    assert!(
        message.contains(&format!(
            "the instance is Terminating:Wait, not held by hook {HOOK}"
        )),
        "{message}"
    );
}

#[tokio::test]
async fn a_heartbeat_for_an_instance_already_terminating_succeeds() {
    let heartbeat = mock!(Client::record_lifecycle_action_heartbeat)
        .then_error(|| RecordLifecycleActionHeartbeatError::generic(no_active_action()));
    let describe = describe(Some((GROUP, "Terminating:Proceed")));
    let aws = actuator(Some(HOOK), &[&heartbeat, &describe]);

    aws.drain_progress(&target()).await.unwrap();
}

#[tokio::test]
async fn a_heartbeat_for_an_instance_in_service_fails() {
    let heartbeat = mock!(Client::record_lifecycle_action_heartbeat)
        .then_error(|| RecordLifecycleActionHeartbeatError::generic(no_active_action()));
    let describe = describe(Some((GROUP, "InService")));
    let aws = actuator(Some(HOOK), &[&heartbeat, &describe]);

    let (action, message) = failure_message(aws.drain_progress(&target()).await);

    assert_eq!(action, "drain_progress");
    assert!(
        message.contains("No active Lifecycle Action found"),
        "{message}"
    );
    assert!(message.contains("InService"), "{message}");
}

#[tokio::test]
async fn terminate_leaves_alone_instances_that_are_leaving_or_not_ours() {
    for standing in [
        None,
        Some(("someone-elses-group", "InService")),
        Some((GROUP, "Terminating:Wait")),
    ] {
        let describe = describe(standing);
        let aws = actuator(Some(HOOK), &[&describe]);

        aws.drain_started(&target(), 4).await.unwrap();

        assert_eq!(describe.num_calls(), 1, "{standing:?}");
    }
}

#[tokio::test]
async fn an_instance_gone_between_look_and_terminate_is_success() {
    let describe = describe(Some((GROUP, "InService")));
    let terminate = mock!(Client::terminate_instance_in_auto_scaling_group).then_error(|| {
        TerminateInstanceInAutoScalingGroupError::generic(validation_error(&format!(
            "Instance Id not found - No managed instance found for instance ID: {INSTANCE}"
        )))
    });
    let aws = actuator(None, &[&describe, &terminate]);

    aws.drained(&target()).await.unwrap();

    assert_eq!(terminate.num_calls(), 1);
}

#[tokio::test]
async fn a_service_error_fails_with_its_code_and_message() {
    let rule = mock!(Client::set_desired_capacity).then_error(|| {
        SetDesiredCapacityError::ResourceContentionFault(
            ResourceContentionFault::builder()
                .message("You already have a pending update to an Auto Scaling resource")
                .meta(
                    ErrorMetadata::builder()
                        .code("ResourceContention")
                        .message("You already have a pending update to an Auto Scaling resource")
                        .build(),
                )
                .build(),
        )
    });
    let group = group_wants(4);
    let aws = actuator(None, &[&group, &rule]);

    let (action, message) = failure_message(aws.set_desired(8, "load").await);

    assert_eq!(action, "set_desired");
    assert_eq!(
        message,
        "ResourceContention: You already have a pending update to an Auto Scaling resource"
    );
}

#[tokio::test]
async fn an_unrelated_validation_error_on_terminate_fails() {
    let describe = describe(Some((GROUP, "InService")));
    let terminate = mock!(Client::terminate_instance_in_auto_scaling_group).then_error(|| {
        TerminateInstanceInAutoScalingGroupError::generic(validation_error(
            "Instance i-0123456789abcdef0 is protected from scale in",
        ))
    });
    let aws = actuator(None, &[&describe, &terminate]);

    let (_, message) = failure_message(aws.drained(&target()).await);

    assert_eq!(
        message,
        "ValidationError: Instance i-0123456789abcdef0 is protected from scale in"
    );
}

#[tokio::test]
async fn drain_calls_need_an_instance_id() {
    let no_instance = Target {
        worker_id: "w-9".into(),
        instance_id: None,
    };
    for hook in [None, Some(HOOK)] {
        let aws = actuator(hook, &[]);
        let results = [
            aws.drain_started(&no_instance, 3).await,
            aws.drain_progress(&no_instance).await,
            aws.drained(&no_instance).await,
        ];
        for result in results {
            assert!(
                matches!(&result, Err(ActuatorError::NoInstance(worker, "aws")) if worker == "w-9"),
                "{result:?}"
            );
        }
    }
}

#[test]
fn bad_settings_are_refused() {
    let no_rules: &[&Rule] = &[];
    let client: Client = mock_client!(aws_sdk_autoscaling, no_rules);
    let refused = |settings: AwsSettings| Aws::from_client(client.clone(), settings).unwrap_err();
    assert_eq!(
        refused(AwsSettings {
            group: String::new(),
            ..settings(None)
        }),
        AwsSettingsError::EmptyGroup
    );
    assert_eq!(refused(settings(Some(""))), AwsSettingsError::EmptyHook);
    assert_eq!(
        refused(AwsSettings {
            region: Some(String::new()),
            ..settings(None)
        }),
        AwsSettingsError::EmptyRegion
    );
    for url in ["localhost:4566", "ftp://example.com", "not a url"] {
        assert_eq!(
            refused(AwsSettings {
                endpoint_url: Some(url.into()),
                ..settings(None)
            }),
            AwsSettingsError::BadEndpoint(url.into())
        );
    }
}
