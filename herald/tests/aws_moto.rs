//! The AWS actuator against moto's Auto Scaling emulation, a real HTTP server speaking the
//! service's protocol, started on 127.0.0.1 for the test. `bash tests/run.sh` installs it into
//! the workspace's `.venv`; elsewhere point `MOTO_SERVER` at a `moto_server` binary.

use aws_config::{BehaviorVersion, ConfigLoader, Region};
use aws_sdk_autoscaling::config::Credentials;
use aws_sdk_autoscaling::types::AutoScalingGroup;
use aws_sdk_autoscaling::Client;
use herald::actuator::aws::{Aws, AwsSettings, Expectations};
use herald::actuator::{Actuator, ActuatorError, Target};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const GROUP: &str = "pushfleet-workers";
const OTHER_GROUP: &str = "someone-elses-group";

/// How long moto may take to start listening.
const STARTUP_DEADLINE: Duration = Duration::from_secs(60);

/// A moto server on a free port of 127.0.0.1, killed when dropped.
struct Moto {
    child: Child,
    endpoint: String,
    log: PathBuf,
}

impl Moto {
    async fn start() -> Moto {
        let binary = std::env::var_os("MOTO_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
                workspace.join(".venv/bin/moto_server")
            });
        assert!(
            binary.exists(),
            "moto_server not found at {}: `bash tests/run.sh` installs it (moto[server] in the \
             workspace's .venv), or set MOTO_SERVER",
            binary.display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let log = std::env::temp_dir().join(format!("herald-moto-{}.log", std::process::id()));
        let child = Command::new(&binary)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("a log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let mut moto = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            log,
        };
        moto.wait_until_listening(port).await;
        moto
    }

    async fn wait_until_listening(&mut self, port: u16) {
        let deadline = Instant::now() + STARTUP_DEADLINE;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("moto_server exited with {status}:\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not listen within {STARTUP_DEADLINE:?}:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A config loader with dummy static credentials, so no real credential source (and no
    /// instance metadata endpoint) is ever consulted.
    fn loader() -> ConfigLoader {
        let credentials = Credentials::new("testing", "testing", None, None, "moto-test");
        aws_config::defaults(BehaviorVersion::latest()).credentials_provider(credentials)
    }

    /// A plain SDK client on moto, to set the scene and look at the result.
    async fn client(&self) -> Client {
        let config = Self::loader()
            .region(Region::new("us-east-1"))
            .endpoint_url(&self.endpoint)
            .load()
            .await;
        Client::new(&config)
    }

    /// The actuator under test, connected the way herald connects it.
    async fn actuator(&self) -> Aws {
        let settings = AwsSettings {
            group: GROUP.into(),
            lifecycle_hook: None,
            region: Some("us-east-1".into()),
            endpoint_url: Some(self.endpoint.clone()),
        };
        Aws::connect_with(Self::loader(), settings)
            .await
            .expect("valid settings")
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

async fn create_launch_configuration(client: &Client) {
    client
        .create_launch_configuration()
        .launch_configuration_name("pushfleet-worker")
        .image_id("ami-12c6146b")
        .instance_type("t3.micro")
        .send()
        .await
        .expect("launch configuration created");
}

async fn create_group(client: &Client, name: &str, desired: i32) {
    client
        .create_auto_scaling_group()
        .auto_scaling_group_name(name)
        .launch_configuration_name("pushfleet-worker")
        .min_size(0)
        .max_size(10)
        .desired_capacity(desired)
        .availability_zones("us-east-1a")
        .send()
        .await
        .expect("group created");
}

async fn group(client: &Client, name: &str) -> AutoScalingGroup {
    let output = client
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(name)
        .send()
        .await
        .expect("groups described");
    output.auto_scaling_groups()[0].clone()
}

/// The group's desired capacity and the ids of its instances that are not leaving.
async fn capacity_and_members(client: &Client, name: &str) -> (i32, Vec<String>) {
    let group = group(client, name).await;
    let members = group
        .instances()
        .iter()
        .filter(|i| {
            !i.lifecycle_state()
                .is_some_and(|s| s.as_str().contains("Terminat"))
        })
        .filter_map(|i| i.instance_id().map(String::from))
        .collect();
    (group.desired_capacity().unwrap_or_default(), members)
}

fn target(instance_id: Option<&str>) -> Target {
    Target {
        worker_id: "w-1".into(),
        instance_id: instance_id.map(String::from),
    }
}

#[tokio::test]
async fn the_group_check_names_a_missing_hook_and_bounds_outside_the_group() {
    let moto = Moto::start().await;
    let client = moto.client().await;
    create_launch_configuration(&client).await;
    create_group(&client, GROUP, 0).await;
    client
        .put_lifecycle_hook()
        .auto_scaling_group_name(GROUP)
        .lifecycle_hook_name("pushfleet-drain")
        .lifecycle_transition("autoscaling:EC2_INSTANCE_TERMINATING")
        .heartbeat_timeout(900)
        .default_result("CONTINUE")
        .send()
        .await
        .expect("hook created");
    let with_hook = |hook: &str| {
        let settings = AwsSettings {
            group: GROUP.into(),
            lifecycle_hook: Some(hook.into()),
            region: Some("us-east-1".into()),
            endpoint_url: Some(moto.endpoint.clone()),
        };
        Aws::connect_with(Moto::loader(), settings)
    };
    let want = |max_workers| Expectations {
        min_workers: 1,
        max_workers,
        drain_heartbeat: Duration::from_secs(60),
    };
    let aws = with_hook("pushfleet-drain").await.expect("valid settings");
    aws.check_group(&want(10)).await.expect("the group agrees");

    let error = aws.check_group(&want(11)).await.unwrap_err().to_string();
    assert!(
        error.contains("max_workers 11 is above the group's MaxSize 10"),
        "{error}"
    );

    let misnamed = with_hook("pushfleet-drian").await.expect("valid settings");
    let error = misnamed
        .check_group(&want(10))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("no lifecycle hook \"pushfleet-drian\""),
        "{error}"
    );

    let nowhere = Aws::connect_with(
        Moto::loader(),
        AwsSettings {
            group: "no-such-group".into(),
            lifecycle_hook: None,
            region: Some("us-east-1".into()),
            endpoint_url: Some(moto.endpoint.clone()),
        },
    )
    .await
    .expect("valid settings");
    let error = nowhere
        .check_group(&want(10))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("Auto Scaling group no-such-group not found"),
        "{error}"
    );
}

#[tokio::test]
async fn scales_and_terminates_instances_of_its_group_only() {
    let moto = Moto::start().await;
    let client = moto.client().await;
    create_launch_configuration(&client).await;
    create_group(&client, GROUP, 2).await;
    create_group(&client, OTHER_GROUP, 1).await;
    let aws = moto.actuator().await;

    // Grow: the group's desired capacity follows and instances are launched.
    aws.set_desired(4, "utilisation above target")
        .await
        .unwrap();
    let (desired, members) = capacity_and_members(&client, GROUP).await;
    assert_eq!((desired, members.len()), (4, 4));

    // A drained worker's instance leaves the group, which shrinks with it.
    let victim = members[0].clone();
    aws.drained(&target(Some(&victim))).await.unwrap();
    let (desired, members) = capacity_and_members(&client, GROUP).await;
    assert_eq!(desired, 3);
    assert_eq!(members.len(), 3);
    assert!(!members.contains(&victim), "{victim} is still in service");

    // Repeating the call, or naming an instance no group knows, changes nothing and succeeds.
    aws.drained(&target(Some(&victim))).await.unwrap();
    aws.drained(&target(Some("i-0123456789abcdef0")))
        .await
        .unwrap();
    assert_eq!(
        capacity_and_members(&client, GROUP).await,
        (3, members.clone())
    );

    // An instance of another group is never terminated through this actuator.
    let (_, others) = capacity_and_members(&client, OTHER_GROUP).await;
    aws.drained(&target(Some(&others[0]))).await.unwrap();
    assert_eq!(
        capacity_and_members(&client, OTHER_GROUP).await,
        (1, others)
    );

    // A worker without an instance id cannot be acted on.
    let result = aws.drained(&target(None)).await;
    assert!(
        matches!(result, Err(ActuatorError::NoInstance(_, "aws"))),
        "{result:?}"
    );
    assert_eq!(capacity_and_members(&client, GROUP).await, (3, members));
}
