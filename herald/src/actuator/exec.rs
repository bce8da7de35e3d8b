//! The exec actuator: every call runs one configured program, for fleets scaled by a script
//! (a CLI of the cloud in use, a deploy tool).
//!
//! The program runs directly, without a shell: the configured command is the program and its
//! arguments, the same for every call. The call is described in environment variables, set
//! only when they apply (the others are removed, so a value inherited from herald's own
//! environment never reaches the program):
//!
//! - `PUSHFLEET_EVENT`: `set_desired`, `drain_started`, `drain_progress` or `drained`;
//! - `PUSHFLEET_DESIRED`: the fleet size (`set_desired`, `drain_started`);
//! - `PUSHFLEET_REASON`: a sentence saying why (every call);
//! - `PUSHFLEET_WORKER_ID`: the worker's id (the drain calls);
//! - `PUSHFLEET_INSTANCE_ID`: its cloud instance id (the drain calls, when the worker has one).
//!
//! The rest of herald's environment is inherited. Stdin is empty, stdout is discarded and the
//! last [`STDERR_TAIL_BYTES`] of stderr are quoted when the call fails. Exit status 0 is
//! success. At the timeout the program is killed (SIGKILL); processes it started are not, so a
//! script should `exec` its last long-running command.

use super::{ActuatorError, Event, EventSink};
use futures::future::BoxFuture;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use thiserror::Error;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, ChildStderr, Command};

/// How much of the end of the program's stderr is kept for the error message, bytes.
pub const STDERR_TAIL_BYTES: usize = 2048;

/// How long stderr is still read after the program exited: what it wrote is already in the
/// pipe, but a background process it left behind may hold the pipe open.
const STDERR_AFTER_EXIT: Duration = Duration::from_millis(200);

/// What the exec actuator runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecSettings {
    /// The program and its arguments; no shell is involved.
    pub command: Vec<String>,
    /// Time a call may take before the program is killed and the call fails (default 30 s).
    pub timeout: Duration,
}

impl ExecSettings {
    /// Settings for `command` with the default timeout.
    pub fn new(command: Vec<String>) -> Self {
        ExecSettings {
            command,
            timeout: Duration::from_secs(30),
        }
    }
}

/// Why [`Exec::new`] refused its settings.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ExecError {
    /// No program was given.
    #[error("exec command is empty; its first word must be the program to run")]
    EmptyCommand,
    /// The timeout is zero.
    #[error("exec timeout is zero; it must be more than zero")]
    ZeroTimeout,
}

/// Runs a configured program for every call, the call described in its environment.
#[derive(Debug)]
pub struct Exec {
    settings: ExecSettings,
}

impl Exec {
    /// Checks the settings; the program is not looked up until the first call.
    pub fn new(settings: ExecSettings) -> Result<Self, ExecError> {
        if settings.command.first().is_none_or(String::is_empty) {
            return Err(ExecError::EmptyCommand);
        }
        if settings.timeout.is_zero() {
            return Err(ExecError::ZeroTimeout);
        }
        Ok(Exec { settings })
    }

    /// Runs the program for `event`. The environment is built now, so the returned future
    /// borrows nothing of the caller's but `self`.
    fn run(&self, event: Event<'_>) -> BoxFuture<'_, Result<(), ActuatorError>> {
        let env = environment(&event);
        Box::pin(self.execute(event.kind, env))
    }

    async fn execute(
        &self,
        action: &'static str,
        env: Vec<(&'static str, Option<String>)>,
    ) -> Result<(), ActuatorError> {
        let program = &self.settings.command[0];
        let failed = |message: String| ActuatorError::Failed {
            actuator: "exec",
            action,
            message,
        };
        let mut command = Command::new(program);
        command
            .args(&self.settings.command[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // If the caller gives up on the call (shutdown), the program goes with it.
            .kill_on_drop(true);
        for (name, value) in env {
            match value {
                Some(value) => command.env(name, value),
                None => command.env_remove(name),
            };
        }
        let mut child = command
            .spawn()
            .map_err(|e| failed(format!("cannot start {program:?}: {e}")))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let limit = self.settings.timeout;
        match tokio::time::timeout(limit, wait_with_stderr(&mut child, stderr)).await {
            Ok((Ok(status), _)) if status.success() => Ok(()),
            Ok((Ok(status), stderr)) => Err(failed(with_stderr(
                format!("{program:?} ended with {status}"),
                &stderr,
            ))),
            Ok((Err(e), _)) => Err(failed(format!("waiting for {program:?}: {e}"))),
            Err(_) => {
                // SIGKILL, then reap it; an error means it exited in the meantime.
                let _ = child.kill().await;
                Err(failed(format!(
                    "{program:?} did not finish within the exec timeout of {limit:?}; killed it"
                )))
            }
        }
    }
}

impl EventSink for Exec {
    const NAME: &'static str = "exec";

    fn send(&self, event: Event<'_>) -> BoxFuture<'_, Result<(), ActuatorError>> {
        self.run(event)
    }
}

/// The `PUSHFLEET_*` variables for `event`: a value to set, or `None` to remove.
fn environment(event: &Event<'_>) -> Vec<(&'static str, Option<String>)> {
    let worker = event.target.map(|t| t.worker_id.clone());
    let instance = event.target.and_then(|t| t.instance_id.clone());
    vec![
        ("PUSHFLEET_EVENT", Some(event.kind.to_owned())),
        ("PUSHFLEET_DESIRED", event.desired.map(|d| d.to_string())),
        ("PUSHFLEET_REASON", Some(event.reason.to_owned())),
        ("PUSHFLEET_WORKER_ID", worker),
        ("PUSHFLEET_INSTANCE_ID", instance),
    ]
}

/// Waits for the program to exit while keeping the tail of its stderr. Unbounded by itself:
/// the caller's timeout bounds it.
async fn wait_with_stderr(
    child: &mut Child,
    mut stderr: ChildStderr,
) -> (std::io::Result<ExitStatus>, String) {
    let mut tail = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut open = true;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            read = stderr.read(&mut chunk), if open => match read {
                Ok(0) | Err(_) => open = false,
                Ok(n) => keep_tail(&mut tail, &chunk[..n]),
            },
        }
    };
    if open {
        let rest = async {
            while let Ok(n @ 1..) = stderr.read(&mut chunk).await {
                keep_tail(&mut tail, &chunk[..n]);
            }
        };
        let _ = tokio::time::timeout(STDERR_AFTER_EXIT, rest).await;
    }
    let start = tail.len().saturating_sub(STDERR_TAIL_BYTES);
    (
        status,
        String::from_utf8_lossy(&tail[start..]).trim().to_owned(),
    )
}

/// Appends `bytes` to `tail`, keeping at most twice [`STDERR_TAIL_BYTES`] (the last
/// [`STDERR_TAIL_BYTES`] are what counts).
fn keep_tail(tail: &mut Vec<u8>, bytes: &[u8]) {
    tail.extend_from_slice(bytes);
    if tail.len() > 2 * STDERR_TAIL_BYTES {
        tail.drain(..tail.len() - STDERR_TAIL_BYTES);
    }
}

fn with_stderr(message: String, stderr: &str) -> String {
    if stderr.is_empty() {
        message
    } else {
        format!("{message}; stderr: {stderr}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actuator::{Actuator, Target};
    use std::path::PathBuf;

    /// How long a test waits for a call that should end well before it.
    const DEADLINE: Duration = Duration::from_secs(20);

    /// A file in the temp directory, named after the test, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(test: &str) -> Self {
            let name = format!("herald-exec-{test}-{}", std::process::id());
            let path = std::env::temp_dir().join(name);
            let _ = std::fs::remove_file(&path);
            Scratch(path)
        }

        fn path(&self) -> String {
            self.0.to_str().unwrap().to_owned()
        }

        fn read(&self) -> String {
            std::fs::read_to_string(&self.0).unwrap_or_default()
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// An exec actuator running `script` with `/bin/sh -c`; `$1` is `arg`.
    fn sh(script: &str, arg: &str, timeout: Duration) -> Exec {
        let command = ["/bin/sh", "-c", script, "sh", arg]
            .map(String::from)
            .to_vec();
        Exec::new(ExecSettings { command, timeout }).unwrap()
    }

    fn failure_message(result: Result<(), ActuatorError>) -> String {
        match result {
            Err(ActuatorError::Failed {
                actuator: "exec",
                message,
                ..
            }) => message,
            other => panic!("expected an exec failure, got {other:?}"),
        }
    }

    async fn within_deadline<T>(call: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(DEADLINE, call)
            .await
            .expect("the call ended in time")
    }

    #[tokio::test]
    async fn the_call_is_described_in_the_environment() {
        let out = Scratch::new("env");
        // `cat` ends at once because stdin is empty.
        let script = r#"cat; env | grep '^PUSHFLEET_' | sort > "$1""#;
        let exec = sh(script, &out.path(), DEADLINE);

        let target = Target {
            worker_id: "w-3".into(),
            instance_id: Some("i-0abc".into()),
        };
        within_deadline(exec.drain_started(&target, 4))
            .await
            .unwrap();
        assert_eq!(
            out.read(),
            "PUSHFLEET_DESIRED=4\n\
             PUSHFLEET_EVENT=drain_started\n\
             PUSHFLEET_INSTANCE_ID=i-0abc\n\
             PUSHFLEET_REASON=scale in: the worker was chosen to leave and is draining\n\
             PUSHFLEET_WORKER_ID=w-3\n"
        );

        within_deadline(exec.set_desired(6, "utilisation 0.9"))
            .await
            .unwrap();
        assert_eq!(
            out.read(),
            "PUSHFLEET_DESIRED=6\nPUSHFLEET_EVENT=set_desired\nPUSHFLEET_REASON=utilisation 0.9\n"
        );

        let no_instance = Target {
            worker_id: "w-5".into(),
            instance_id: None,
        };
        within_deadline(exec.drained(&no_instance)).await.unwrap();
        let env = out.read();
        assert!(env.contains("PUSHFLEET_EVENT=drained\n"), "{env}");
        assert!(env.contains("PUSHFLEET_WORKER_ID=w-5\n"), "{env}");
        assert!(!env.contains("PUSHFLEET_INSTANCE_ID") && !env.contains("PUSHFLEET_DESIRED"));
    }

    #[tokio::test]
    async fn a_non_zero_exit_fails_with_the_status_and_stderr() {
        let script = r#"echo "starting" >&2; echo "no capacity in $1" >&2; exit 3"#;
        let exec = sh(script, "us-east-1a", DEADLINE);

        let message = failure_message(within_deadline(exec.set_desired(9, "load")).await);

        assert!(message.contains("ended with exit status: 3"), "{message}");
        assert!(
            message.ends_with("stderr: starting\nno capacity in us-east-1a"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn only_the_tail_of_a_long_stderr_is_kept() {
        let script = r#"i=0; while [ $i -lt 2000 ]; do echo "line $i of noise" >&2; i=$((i+1)); done
            echo "the actual problem" >&2; exit 1"#;
        let exec = sh(script, "", DEADLINE);

        let message = failure_message(within_deadline(exec.set_desired(9, "load")).await);

        assert!(
            message.ends_with("line 1999 of noise\nthe actual problem"),
            "{message}"
        );
        assert!(
            message.len() <= STDERR_TAIL_BYTES + 100,
            "{} bytes",
            message.len()
        );
    }

    #[tokio::test]
    async fn the_timeout_kills_the_program() {
        let pid_file = Scratch::new("timeout");
        let exec = sh(
            r#"echo $$ > "$1"; exec sleep 60"#,
            &pid_file.path(),
            Duration::from_millis(500),
        );

        let message = failure_message(within_deadline(exec.set_desired(9, "load")).await);

        assert!(
            message.contains("did not finish within the exec timeout of 500ms"),
            "{message}"
        );
        // Killed and reaped: its process entry is gone. (An empty file means it was killed
        // before it could even write its pid.)
        let pid = pid_file.read();
        if !pid.trim().is_empty() {
            let entry = format!("/proc/{}", pid.trim());
            assert!(
                !std::path::Path::new(&entry).exists(),
                "{entry} still exists"
            );
        }
    }

    #[tokio::test]
    async fn a_background_process_holding_stderr_does_not_hold_the_call() {
        // The background `sleep` inherits stderr and outlives the script by seconds.
        let exec = sh(
            "sleep 4 & echo done >&2; exit 0",
            "",
            Duration::from_secs(2),
        );

        within_deadline(exec.set_desired(9, "load")).await.unwrap();
    }

    #[tokio::test]
    async fn a_missing_program_fails_the_call() {
        let command = vec!["/nonexistent/scale-fleet".to_owned()];
        let exec = Exec::new(ExecSettings::new(command)).unwrap();

        let message = failure_message(exec.set_desired(2, "load").await);

        assert!(
            message.starts_with("cannot start \"/nonexistent/scale-fleet\""),
            "{message}"
        );
    }

    #[test]
    fn construction_refuses_bad_settings() {
        assert_eq!(
            Exec::new(ExecSettings::new(vec![])).unwrap_err(),
            ExecError::EmptyCommand
        );
        let blank = ExecSettings::new(vec![String::new(), "x".into()]);
        assert_eq!(Exec::new(blank).unwrap_err(), ExecError::EmptyCommand);
        let instant = ExecSettings {
            timeout: Duration::ZERO,
            ..ExecSettings::new(vec!["true".into()])
        };
        assert_eq!(Exec::new(instant).unwrap_err(), ExecError::ZeroTimeout);
    }

    #[test]
    fn the_stderr_tail_stays_bounded() {
        let mut tail = Vec::new();
        for i in 0..10_000u32 {
            keep_tail(&mut tail, format!("{i}\n").as_bytes());
            assert!(tail.len() <= 2 * STDERR_TAIL_BYTES);
        }
        assert!(tail.ends_with(b"9998\n9999\n"));
    }
}
