//! The `pushfleet-publish` binary against a real ZeroMQ subscriber on loopback: positions are
//! contiguous per topic in the announced epoch, quiet topics get position checks carrying
//! their last position, and every way of stopping ends with a final round of checks.
//!
//! Every wait has a deadline. ZeroMQ PUB drops what it sends before a subscriber has
//! connected (the slow joiner), so each test either synchronises with a probe message first
//! or accepts joining the stream in the middle.

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use protocol::publish::{self, Inbound};
use protocol::Position;
use std::collections::HashMap;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::time::{timeout, Instant};
use zeromq::{Socket, SocketRecv};

const WAIT: Duration = Duration::from_secs(10);

/// A running `pushfleet-publish`, killed on drop.
struct Cli {
    child: Child,
    stdin: Option<ChildStdin>,
    _stdout: Lines<BufReader<ChildStdout>>,
    stderr: Arc<Mutex<String>>,
    endpoint: String,
    epoch: u64,
}

impl Cli {
    /// Starts the binary bound on a free loopback port and reads its `bound`/`epoch` lines.
    async fn start(args: &[&str]) -> Result<Cli> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pushfleet-publish"))
            .args(["--bind", "tcp://127.0.0.1:0", "--linger", "200ms"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting pushfleet-publish")?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_lines = BufReader::new(child.stderr.take().context("stderr")?).lines();
        let sink = stderr.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = err_lines.next_line().await {
                let mut text = sink.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let mut next = async || -> Result<String> {
            let line = timeout(WAIT, stdout.next_line())
                .await
                .context("no line on stdout")??;
            line.context("stdout closed before the announce lines")
        };
        let bound = next().await?;
        let epoch = next().await?;
        let endpoint = bound
            .strip_prefix("bound ")
            .context(bound.clone())?
            .to_owned();
        let epoch_hex = epoch.strip_prefix("epoch ").context(epoch.clone())?;
        ensure!(
            epoch_hex.len() == 16,
            "epoch is not 16 hex digits: {epoch_hex}"
        );
        let epoch = u64::from_str_radix(epoch_hex, 16)?;
        ensure!(!endpoint.ends_with(":0"), "port 0 announced: {endpoint}");
        Ok(Cli {
            stdin: child.stdin.take(),
            child,
            _stdout: stdout,
            stderr,
            endpoint,
            epoch,
        })
    }

    async fn write(&mut self, text: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("stdin already closed")?;
        let write = async {
            stdin.write_all(text.as_bytes()).await?;
            stdin.flush().await
        };
        timeout(WAIT, write)
            .await
            .context("stdin write blocked")??;
        Ok(())
    }

    async fn wait(&mut self) -> Result<ExitStatus> {
        timeout(WAIT, self.child.wait())
            .await
            .context("publisher did not exit")?
            .map_err(Into::into)
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Runs `test`; on failure prints what the publisher logged.
    async fn scenario(mut self, test: impl AsyncFnOnce(&mut Cli) -> Result<()>) -> Result<()> {
        let result = test(&mut self).await;
        if result.is_err() {
            eprintln!("pushfleet-publish stderr:\n{}", self.stderr());
        }
        result
    }
}

/// A SUB socket subscribed to everything.
struct Subscriber(zeromq::SubSocket);

impl Subscriber {
    async fn connect(endpoint: &str) -> Result<Subscriber> {
        let mut socket = zeromq::SubSocket::new();
        timeout(WAIT, socket.connect(endpoint)).await??;
        timeout(WAIT, socket.subscribe("")).await??;
        Ok(Subscriber(socket))
    }

    /// The next publication, decoded, or `None` after `within`.
    async fn recv(&mut self, within: Duration) -> Result<Option<Inbound>> {
        match timeout(within, self.0.recv()).await {
            Err(_) => Ok(None),
            Ok(message) => {
                let frames: Vec<Bytes> = message?.into_vec();
                Ok(Some(publish::decode(&frames, 256)?))
            }
        }
    }
}

/// What a subscriber saw, per topic.
#[derive(Default)]
struct Seen {
    /// Positions and payloads of the messages, in arrival order.
    messages: HashMap<String, Vec<(Position, Bytes)>>,
    /// Positions carried by the position checks, in arrival order.
    checks: HashMap<String, Vec<Position>>,
}

impl Seen {
    /// Records one publication; a check must carry the last position seen on its topic
    /// (one PUB socket to one subscriber keeps order).
    fn record(&mut self, inbound: Inbound) -> Result<()> {
        match inbound {
            Inbound::Message(m) => {
                let topic = String::from_utf8(m.topic.to_vec())?;
                let position = m.position.context("message without a position")?;
                let messages = self.messages.entry(topic.clone()).or_default();
                if let Some((last, _)) = messages.last() {
                    ensure!(
                        position.epoch == last.epoch && position.offset == last.offset + 1,
                        "{topic}: {position:?} after {last:?}"
                    );
                }
                messages.push((position, m.payload));
            }
            Inbound::Check { topic, position } => {
                let topic = String::from_utf8(topic.to_vec())?;
                if let Some((last, _)) = self.messages.get(&topic).and_then(|m| m.last()) {
                    ensure!(
                        position == *last,
                        "{topic}: check {position:?}, last {last:?}"
                    );
                }
                self.checks.entry(topic).or_default().push(position);
            }
        }
        Ok(())
    }

    fn count(&self, topic: &str) -> usize {
        self.messages.get(topic).map_or(0, Vec::len)
    }

    fn checks(&self, topic: &str) -> &[Position] {
        self.checks.get(topic).map_or(&[], Vec::as_slice)
    }

    /// Receives until `done` holds, failing after `within`.
    async fn until(
        &mut self,
        sub: &mut Subscriber,
        within: Duration,
        what: &str,
        done: impl Fn(&Seen) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + within;
        while !done(self) {
            let left = deadline.saturating_duration_since(Instant::now());
            match sub.recv(left).await? {
                Some(inbound) => self.record(inbound)?,
                None => bail!(
                    "timed out after {within:?} waiting for {what}; seen {} messages {:?}, checks {:?}",
                    self.messages.values().map(Vec::len).sum::<usize>(),
                    self.messages.iter().map(|(t, m)| (t, m.first().map(|f| f.0), m.last().map(|l| l.0))).collect::<Vec<_>>(),
                    self.checks
                ),
            }
        }
        Ok(())
    }
}

fn at(epoch: u64, offset: u64) -> Position {
    Position { epoch, offset }
}

#[tokio::test]
async fn stdin_lines_are_stamped_contiguously_and_quiet_topics_get_repeated_checks() -> Result<()> {
    let cli = Cli::start(&["--stdin", "--check-interval", "200ms"]).await?;
    cli.scenario(async |cli| {
        let mut sub = Subscriber::connect(&cli.endpoint).await?;
        let mut seen = Seen::default();
        // Probe until the subscription has reached the publisher (bounded by the deadline).
        let mut lines_written = 0u64;
        let deadline = Instant::now() + WAIT;
        while seen.count("probe") == 0 {
            ensure!(Instant::now() < deadline, "no probe message arrived");
            cli.write("probe\t{}\n").await?;
            lines_written += 1;
            if let Some(inbound) = sub.recv(Duration::from_millis(100)).await? {
                seen.record(inbound)?;
            }
        }

        let mut input = String::new();
        for i in 0..50 {
            input.push_str(&format!("a\t{{\"n\":{i}}}\n"));
            if i < 30 {
                input.push_str(&format!("b\tb-{i}\n"));
            }
            if i == 10 {
                input.push_str("a line without a tab\n");
                input.push_str("\u{1}bad\tcontrol character in the topic\n");
            }
        }
        cli.write(&input).await?;
        // Lines 1..=lines_written were probes; a has 11 lines and b 11 before the bad ones.
        let no_tab_line = lines_written + 23;
        seen.until(&mut sub, WAIT, "every message", |s| {
            s.count("a") == 50 && s.count("b") == 30
        })
        .await?;
        let epoch = cli.epoch;
        let a = &seen.messages["a"];
        for (i, (position, payload)) in a.iter().enumerate() {
            assert_eq!(*position, at(epoch, i as u64));
            assert_eq!(&payload[..], format!("{{\"n\":{i}}}").as_bytes());
        }
        assert_eq!(seen.messages["b"][29], (at(epoch, 29), Bytes::from("b-29")));

        // Quiet now: each topic gets a check with its last position, and again while quiet.
        seen.until(&mut sub, WAIT, "two checks per quiet topic", |s| {
            s.checks("a").len() >= 2 && s.checks("b").len() >= 2
        })
        .await?;
        assert!(seen.checks("a").iter().all(|p| *p == at(epoch, 49)));
        assert!(seen.checks("b").iter().all(|p| *p == at(epoch, 29)));
        assert_eq!((seen.count("a"), seen.count("b")), (50, 30));

        cli.stdin = None; // end of input: final checks, linger, exit
        let status = cli.wait().await?;
        assert!(status.success(), "{status}");
        let log = cli.stderr();
        assert!(
            log.contains(&format!(
                "line {no_tab_line}: no tab between topic and payload"
            )),
            "{log}"
        );
        let control_line = no_tab_line + 1;
        assert!(
            log.contains(&format!(
                "line {control_line}: invalid topic: topic contains a control"
            )),
            "{log}"
        );
        assert!(log.contains("2 bad lines skipped"), "{log}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn generated_messages_are_contiguous_json_and_end_with_a_final_round_of_checks() -> Result<()>
{
    // A long check interval: the only checks are the final round after --count.
    let args = [
        "--topic", "x", "--topic", "y", "--rate", "200", "--count", "300",
    ];
    let cli = Cli::start(&[&args[..], &["--check-interval", "1h"]].concat()).await?;
    cli.scenario(async |cli| {
        // Joining after the start: the stream is checked from the first message seen.
        let mut sub = Subscriber::connect(&cli.endpoint).await?;
        let mut seen = Seen::default();
        seen.until(&mut sub, WAIT, "the final checks", |s| {
            !s.checks("x").is_empty() && !s.checks("y").is_empty()
        })
        .await?;
        for topic in ["x", "y"] {
            let messages = &seen.messages[topic];
            assert!(messages.len() > 100, "{topic}: only {}", messages.len());
            for (position, payload) in messages {
                assert_eq!(position.epoch, cli.epoch);
                let body: serde_json::Value = serde_json::from_slice(payload)?;
                assert_eq!(body["topic"], topic);
                assert_eq!(body["seq"], position.offset);
                assert!(body["sent_at_us"].as_u64().unwrap() > 0);
            }
            assert_eq!(messages.last().unwrap().0, at(cli.epoch, 299));
            assert_eq!(seen.checks(topic), [at(cli.epoch, 299)]);
        }
        let status = cli.wait().await?;
        assert!(status.success(), "{status}");
        assert!(cli
            .stderr()
            .contains("done: 600 messages, 2 position checks"));
        Ok(())
    })
    .await
}

#[tokio::test]
async fn sigterm_stops_after_a_final_round_of_checks() -> Result<()> {
    let args = ["--topic", "z", "--rate", "100", "--check-interval", "1h"];
    let cli = Cli::start(&args).await?;
    cli.scenario(async |cli| {
        let mut sub = Subscriber::connect(&cli.endpoint).await?;
        let mut seen = Seen::default();
        seen.until(&mut sub, WAIT, "a few messages", |s| s.count("z") >= 5)
            .await?;
        let pid = cli.child.id().context("no pid")?;
        let kill = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        ensure!(kill.success(), "kill -TERM failed");
        // The check carries the last message's position (checked in `record`).
        seen.until(&mut sub, WAIT, "the final check", |s| {
            !s.checks("z").is_empty()
        })
        .await?;
        let status = cli.wait().await?;
        assert!(status.success(), "{status}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn bad_flags_exit_with_usage_status() -> Result<()> {
    let bin = env!("CARGO_BIN_EXE_pushfleet-publish");
    for args in [
        &["--bind", "tcp://127.0.0.1:0"][..],
        &["--topic", "t"],
        &[
            "--bind",
            "tcp://127.0.0.1:0",
            "--stdin",
            "--topic",
            "a",
            "--topic",
            "b",
        ],
        &[
            "--bind",
            "tcp://127.0.0.1:0",
            "--topic",
            "t",
            "--epoch",
            "xyz",
        ],
    ] {
        let out = timeout(WAIT, Command::new(bin).args(args).output()).await??;
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty());
    }
    Ok(())
}
