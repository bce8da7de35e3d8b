//! `loadgen`: WebSocket load for the side-by-side benchmarks, against pushfleet (worker or
//! proxy) and against servers without our envelope (nchan, Pushpin). Not a test: it prints
//! figures.
//!
//! ```text
//! loadgen run --target pushfleet --url ws://127.0.0.1:8000/ws --clients 12000 --topics 200 \
//!     --zipf 1.1 --ramp 2m --hold 1m --deflate --out s1.json
//! loadgen run --target raw --url 'ws://127.0.0.1:9080/sub/{topic}' --clients 10000 --topics 1
//! loadgen publish --target pushfleet --bind tcp://127.0.0.1:5599 --topics 1 --steps 50:10s,100:10s
//! loadgen publish --target nchan --url 'http://127.0.0.1:9080/pub/{topic}' --topics 1 --rate 50
//! loadgen publish --target pushpin --url http://127.0.0.1:5561/publish/ --topics 1 --rate 50
//! ```
//!
//! `run` spreads the clients over child processes (`--processes`, each holding at most
//! [`MAX_PER_PROCESS`] sockets: the machine allows 20,000 open files per process) and over
//! source addresses 127.0.0.1..127.0.0.K (`--source-ips`; about 28,000 ports per source and
//! destination). Clients arrive evenly over `--ramp`, stay `--hold` after the last arrival,
//! then leave. Each subscribes to one topic `t.<i>`, drawn from a Zipf distribution over
//! `--topics` (exponent `--zipf`; 0 is uniform), the same for every run with the same seed.
//!
//! Every second it prints progress (connected, failed, messages/s, p99 latency, gaps and
//! duplicates); at the end a summary, also written as JSON to `--out`, with a per-second
//! timeline and, for pushfleet (through our proxy or HAProxy), the worker each new connection
//! landed on (from the welcome message).
//!
//! Latency is from the publisher's timestamp to the client's read: pushfleet's envelope carries
//! it (`ts`) and the message's offset; for `raw` servers the payload itself starts
//! `{"seq":N,"ts":MICROS,` (what `publish` sends). Per client and topic, sequence numbers must
//! rise by one: a jump counts as a gap, a repeat as a duplicate. Compressed messages are
//! inflated once per distinct payload (the offer asks for `server_no_context_takeover`, so a
//! message's bytes are the same for every client); the client side thus stays cheap.
//!
//! Everything is bounded: connects and handshakes have timeouts, children stop at the end of
//! the hold (or are killed on Ctrl-C), and only 127.0.0.x is dialled.

use anyhow::{anyhow, bail, ensure, Context, Result};
use bytes::{Buf, BytesMut};
use clap::{Args, Parser, Subcommand, ValueEnum};
use harness::bench::feed::PayloadGen;
use harness::bench::hist::Hist;
use harness::bench::wire::{
    compressed_with, frame_bounds, message_header, payload_header, READ_BUF,
};
use harness::bench::{ms, thousands};
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;

/// Sockets one process holds at most (20,000 open files per process, minus a margin).
const MAX_PER_PROCESS: usize = 9_500;
/// Clients per source address before the next one (ports per source and destination ~28k).
const PER_SOURCE_IP: usize = 25_000;
/// Connect plus handshake, per client.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Parser, Debug)]
#[command(
    name = "loadgen",
    about = "WebSocket load for the benchmarks (pushfleet, nchan, Pushpin)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Connect clients, subscribe, count and time what arrives.
    Run(RunArgs),
    /// Publish benchmark messages at a fixed rate.
    Publish(PublishArgs),
    /// One process of `run` (started by `run`).
    #[command(hide = true)]
    Child(ChildArgs),
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// Our protocol: `{"op":"subscribe"}` after connecting, envelopes with `ts` and offsets.
    Pushfleet,
    /// One URL per topic (`{topic}` in `--url`), messages are the published payloads.
    Raw,
}

#[derive(Args, Debug, Clone)]
struct RunArgs {
    /// The server's protocol.
    #[arg(long, value_enum)]
    target: Target,
    /// `ws://127.0.0.x:PORT/PATH`; for `raw`, `{topic}` is replaced by each client's topic.
    #[arg(long)]
    url: String,
    /// Clients, over all processes.
    #[arg(long)]
    clients: usize,
    /// Topics `t.0` .. `t.<n-1>`; each client subscribes to one.
    #[arg(long, default_value_t = 1)]
    topics: usize,
    /// Zipf exponent of topic popularity (0: uniform; 1.1: a few hot topics, a long tail).
    #[arg(long, default_value_t = 0.0)]
    zipf: f64,
    /// Seed of the topic draw.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Offer permessage-deflate (with server_no_context_takeover).
    #[arg(long)]
    deflate: bool,
    /// Clients arrive evenly over this window.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    ramp: Duration,
    /// Clients stay this long after the last arrival.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    hold: Duration,
    /// Child processes [default: enough for at most 9,500 clients each].
    #[arg(long)]
    processes: Option<usize>,
    /// Source addresses 127.0.0.1 .. 127.0.0.K [default: one per 25,000 clients].
    #[arg(long)]
    source_ips: Option<usize>,
    /// Connects in flight per process.
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
    /// Pin child i to CPU list entry i % len with `taskset -c` (e.g. `1` or `1,2`).
    #[arg(long)]
    cpus: Option<String>,
    /// Write the summary as JSON here.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Prefix of progress lines.
    #[arg(long, default_value = "loadgen")]
    label: String,
}

#[derive(Args, Debug, Clone)]
struct ChildArgs {
    #[command(flatten)]
    run: RunArgs,
    /// This process's index.
    #[arg(long)]
    index: usize,
    /// Processes in all.
    #[arg(long)]
    of: usize,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum PubTarget {
    /// ZeroMQ PUB socket (workers connect to `--bind`).
    Pushfleet,
    /// HTTP POST of the payload to `--url` (`{topic}` replaced).
    Nchan,
    /// HTTP POST of `{"items":[...ws-message...]}` to Pushpin's publish API `--url`.
    Pushpin,
}

#[derive(Args, Debug, Clone)]
struct PublishArgs {
    #[arg(long, value_enum)]
    target: PubTarget,
    /// ZeroMQ endpoint to bind (pushfleet).
    #[arg(long, default_value = "tcp://127.0.0.1:5599")]
    bind: String,
    /// HTTP URL (nchan: with `{topic}`; Pushpin: its publish endpoint).
    #[arg(long)]
    url: Option<String>,
    /// Topics `t.0` .. `t.<n-1>`.
    #[arg(long, default_value_t = 1)]
    topics: usize,
    /// Zipf exponent of the share of messages per topic (0: round-robin).
    #[arg(long, default_value_t = 0.0)]
    zipf: f64,
    /// Messages per second over all topics.
    #[arg(long, required_unless_present = "steps")]
    rate: Option<f64>,
    /// How long to publish.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Several rates one after the other, `RATE:DURATION,...` (e.g. `100:10s,200:10s`), from
    /// one publisher (one epoch); each step's start and end, and how many of its messages
    /// went out within its duration, go to stdout as a JSON line.
    #[arg(long, value_parser = parse_steps, conflicts_with = "rate")]
    steps: Option<Steps>,
    /// Wait this long first (subscribers joining a ZeroMQ publisher).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    delay: Duration,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 500)]
    bytes: usize,
}

/// Publish steps: `(messages per second, how long)`.
#[derive(Debug, Clone)]
struct Steps(Vec<(f64, Duration)>);

fn parse_steps(text: &str) -> Result<Steps, String> {
    text.split(',')
        .map(|step| {
            let (rate, d) = step
                .split_once(':')
                .ok_or_else(|| format!("{step:?} is not RATE:DURATION"))?;
            let rate: f64 = rate
                .trim()
                .parse()
                .map_err(|_| format!("{rate:?} is not a rate"))?;
            if !(rate > 0.0 && rate.is_finite()) {
                return Err(format!("{rate} is not a positive rate"));
            }
            let d = humantime::parse_duration(d.trim()).map_err(|e| format!("{d:?}: {e}"))?;
            Ok((rate, d))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Steps)
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Run(args) => run(args),
        Cmd::Child(args) => child(args),
        Cmd::Publish(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(publish(args)),
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Topic index of each client: a Zipf draw over `topics`, fixed by `seed`.
fn topic_of(client: usize, topics: usize, zipf: f64, seed: u64) -> usize {
    if topics <= 1 {
        return 0;
    }
    let weights: Vec<f64> = (1..=topics).map(|k| 1.0 / (k as f64).powf(zipf)).collect();
    let total: f64 = weights.iter().sum();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (client as u64).wrapping_mul(0x9E37));
    let mut x = rng.random::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        if x < *w {
            return i;
        }
        x -= w;
    }
    topics - 1
}

fn source_ip(client: usize, ips: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (client % ips.max(1)) as u8))
}

/// `(host:port, path)` of a `ws://` URL; only 127.0.0.x hosts.
fn split_url(url: &str) -> Result<(SocketAddr, String)> {
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| anyhow!("{url}: only ws:// and http:// URLs"))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let addr: SocketAddr = authority
        .parse()
        .with_context(|| format!("{url}: the host must be 127.0.0.x:PORT"))?;
    ensure!(
        matches!(addr.ip(), IpAddr::V4(v4) if v4.octets()[..3] == [127, 0, 0]),
        "{url}: the load generator only dials 127.0.0.x"
    );
    Ok((
        addr,
        if path.is_empty() {
            "/".into()
        } else {
            path.into()
        },
    ))
}

// ---------------------------------------------------------------------------------------------
// run: the coordinator

fn run(args: RunArgs) -> Result<()> {
    ensure!(args.clients > 0, "--clients must be at least 1");
    ensure!(args.topics > 0, "--topics must be at least 1");
    split_url(&args.url.replace("{topic}", "t.0"))?;
    let processes = args
        .processes
        .unwrap_or_else(|| args.clients.div_ceil(MAX_PER_PROCESS))
        .max(1);
    ensure!(
        args.clients.div_ceil(processes) <= MAX_PER_PROCESS,
        "{} clients over {processes} processes is more than {MAX_PER_PROCESS} sockets each \
         (20,000 open files per process): add --processes",
        args.clients
    );
    let ips = args
        .source_ips
        .unwrap_or_else(|| args.clients.div_ceil(PER_SOURCE_IP))
        .clamp(1, 254);
    let exe = std::env::current_exe()?;
    let cpus: Vec<String> = args
        .cpus
        .as_deref()
        .map(|c| c.split(',').map(str::to_string).collect())
        .unwrap_or_default();
    eprintln!(
        "[{}] {} clients ({:?}, deflate {}) over {processes} processes and {ips} source \
         addresses, {} topics (zipf {}), ramp {:?}, hold {:?}{}",
        args.label,
        thousands(args.clients as u64),
        args.target,
        if args.deflate { "offered" } else { "off" },
        args.topics,
        args.zipf,
        args.ramp,
        args.hold,
        if cpus.is_empty() {
            String::new()
        } else {
            format!(", children on CPUs {}", cpus.join(","))
        }
    );
    let (tx, rx) = std::sync::mpsc::channel::<(usize, String)>();
    let mut children = Vec::new();
    for i in 0..processes {
        let mut cmd = if cpus.is_empty() {
            Command::new(&exe)
        } else {
            let mut c = Command::new("taskset");
            c.args(["-c", &cpus[i % cpus.len()]]).arg(&exe);
            c
        };
        cmd.arg("child")
            .args(child_flags(&args, ips))
            .args(["--index", &i.to_string(), "--of", &processes.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().context("cannot start a loadgen child")?;
        let out = child.stdout.take().expect("piped");
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send((i, line)).is_err() {
                    return;
                }
            }
        });
        children.push(Killed(child));
    }
    drop(tx);
    let summary = collect(&args, processes, ips, rx)?;
    for mut c in children {
        let _ = c.0.wait();
    }
    let text = serde_json::to_string_pretty(&summary)?;
    if let Some(path) = &args.out {
        std::fs::write(path, &text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    print_summary(&args.label, &summary);
    Ok(())
}

/// A child process killed when dropped (Ctrl-C, an error), so none outlives the run.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn child_flags(a: &RunArgs, ips: usize) -> Vec<String> {
    let mut f = vec![
        "--target".into(),
        format!("{:?}", a.target).to_lowercase(),
        "--url".into(),
        a.url.clone(),
        "--clients".into(),
        a.clients.to_string(),
        "--topics".into(),
        a.topics.to_string(),
        "--zipf".into(),
        a.zipf.to_string(),
        "--seed".into(),
        a.seed.to_string(),
        "--ramp".into(),
        format!("{}ms", a.ramp.as_millis()),
        "--hold".into(),
        format!("{}ms", a.hold.as_millis()),
        "--source-ips".into(),
        ips.to_string(),
        "--concurrency".into(),
        a.concurrency.to_string(),
        "--label".into(),
        a.label.clone(),
    ];
    if a.deflate {
        f.push("--deflate".into());
    }
    f
}

/// The children's cumulative figures, merged.
#[derive(Default)]
struct Totals {
    connected: u64,
    failed: u64,
    closed: u64,
    messages: u64,
    gaps: u64,
    dups: u64,
    deflate: u64,
    bytes: u64,
    first_error: Option<String>,
    latency: Hist,
    handshake: Hist,
    by_worker: BTreeMap<String, u64>,
}

fn collect(
    args: &RunArgs,
    processes: usize,
    ips: usize,
    rx: std::sync::mpsc::Receiver<(usize, String)>,
) -> Result<serde_json::Value> {
    let started = Instant::now();
    let deadline = args.ramp + args.hold + HANDSHAKE_TIMEOUT + Duration::from_secs(30);
    let mut last: Vec<serde_json::Value> = vec![serde_json::Value::Null; processes];
    let mut total = Totals::default();
    let mut second = Totals::default();
    let mut timeline = Vec::new();
    let mut done = 0;
    let mut next_tick = Instant::now() + Duration::from_secs(1);
    let (mut prev_messages, mut prev_connected) = (0u64, 0u64);
    while done < processes {
        let wait = next_tick.saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            Ok((i, line)) => {
                let v: serde_json::Value = serde_json::from_str(&line)
                    .with_context(|| format!("child {i} wrote {line:?}"))?;
                for (h, key) in [(&mut second.latency, "lat"), (&mut second.handshake, "hs")] {
                    if let Some(d) = Hist::from_json(&v[key]) {
                        h.merge(&d);
                    }
                }
                if let Some(m) = v["new_by_worker"].as_object() {
                    for (w, n) in m {
                        *second.by_worker.entry(w.clone()).or_default() += n.as_u64().unwrap_or(0);
                    }
                }
                if v["done"].as_bool() == Some(true) {
                    done += 1;
                }
                last[i] = v;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if Instant::now() >= next_tick || done == processes {
            next_tick += Duration::from_secs(1);
            let sum = |k: &str| last.iter().map(|v| v[k].as_u64().unwrap_or(0)).sum::<u64>();
            total.connected = sum("connected");
            total.failed = sum("failed");
            total.closed = sum("closed");
            total.messages = sum("messages");
            total.gaps = sum("gaps");
            total.dups = sum("dups");
            total.deflate = sum("deflate");
            total.bytes = sum("bytes");
            if total.first_error.is_none() {
                total.first_error = last
                    .iter()
                    .find_map(|v| v["first_error"].as_str().map(String::from));
            }
            total.latency.merge(&second.latency);
            total.handshake.merge(&second.handshake);
            for (w, n) in &second.by_worker {
                *total.by_worker.entry(w.clone()).or_default() += n;
            }
            let t = started.elapsed().as_secs_f64();
            eprintln!(
                "[{}] {:>5.0}s connected {}/{} (+{}/s) failed {} | {} msg/s p50 {} p99 {} | gaps {} dups {}",
                args.label,
                t,
                thousands(total.connected),
                thousands(args.clients as u64),
                total.connected.saturating_sub(prev_connected),
                total.failed,
                thousands(total.messages.saturating_sub(prev_messages)),
                ms(second.latency.quantile(0.5)),
                ms(second.latency.quantile(0.99)),
                total.gaps,
                total.dups,
            );
            timeline.push(serde_json::json!({
                "t": (t * 10.0).round() / 10.0,
                "unix": now_us() as f64 / 1e6,
                "connected": total.connected,
                "failed": total.failed,
                "messages": total.messages.saturating_sub(prev_messages),
                "p50_us": second.latency.quantile(0.5),
                "p99_us": second.latency.quantile(0.99),
                "new_by_worker": second.by_worker,
            }));
            prev_messages = total.messages;
            prev_connected = total.connected;
            second = Totals::default();
        }
        if started.elapsed() > deadline {
            bail!("children still running after {deadline:?}");
        }
    }
    let held = args.hold.as_secs_f64().max(1e-9);
    Ok(serde_json::json!({
        "target": format!("{:?}", args.target).to_lowercase(),
        "url": args.url,
        "clients": args.clients,
        "processes": processes,
        "source_ips": ips,
        "topics": args.topics,
        "zipf": args.zipf,
        "deflate_offered": args.deflate,
        "deflate_negotiated": total.deflate,
        "ramp_s": args.ramp.as_secs_f64(),
        "hold_s": args.hold.as_secs_f64(),
        "connected": total.connected,
        "failed": total.failed,
        "closed_by_server": total.closed,
        "first_error": total.first_error,
        "messages": total.messages,
        "bytes": total.bytes,
        "messages_per_s_hold": messages_during_hold(&timeline, args) / held,
        "gaps": total.gaps,
        "dups": total.dups,
        "latency_us": quantiles(&total.latency),
        "handshake_us": quantiles(&total.handshake),
        "connect_span_s": connect_span_s(&last),
        "by_worker": total.by_worker,
        "timeline": timeline,
    }))
}

/// From the first process's start to the last upgrade in any process, seconds (0 before any).
fn connect_span_s(last: &[serde_json::Value]) -> f64 {
    let started = last
        .iter()
        .filter_map(|v| v["started_unix_us"].as_u64())
        .min();
    let upgraded = last
        .iter()
        .filter_map(|v| v["last_upgrade_unix_us"].as_u64())
        .max();
    match (started, upgraded) {
        (Some(s), Some(u)) if u > s => (u - s) as f64 / 1e6,
        _ => 0.0,
    }
}

/// Messages in the timeline's seconds that fall in the hold (after the last arrival).
fn messages_during_hold(timeline: &[serde_json::Value], args: &RunArgs) -> f64 {
    let (from, to) = (
        args.ramp.as_secs_f64(),
        (args.ramp + args.hold).as_secs_f64(),
    );
    timeline
        .iter()
        .filter(|p| {
            let t = p["t"].as_f64().unwrap_or(0.0);
            t > from + 1.0 && t <= to + 0.5
        })
        .map(|p| p["messages"].as_f64().unwrap_or(0.0))
        .sum()
}

fn quantiles(h: &Hist) -> serde_json::Value {
    serde_json::json!({
        "count": h.total(),
        "p50": h.quantile(0.5),
        "p90": h.quantile(0.9),
        "p99": h.quantile(0.99),
        "p999": h.quantile(0.999),
        "max": h.max_us(),
    })
}

fn print_summary(label: &str, s: &serde_json::Value) {
    let q = |k: &str, p: &str| ms(s[k][p].as_u64().unwrap_or(0));
    eprintln!(
        "[{label}] done: {} connected, {} failed{}, {} messages ({:.0}/s in the hold), gaps {}, \
         dups {}; latency p50 {} p99 {} max {}; handshake p50 {} p99 {}",
        s["connected"],
        s["failed"],
        s["first_error"]
            .as_str()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default(),
        s["messages"],
        s["messages_per_s_hold"].as_f64().unwrap_or(0.0),
        s["gaps"],
        s["dups"],
        q("latency_us", "p50"),
        q("latency_us", "p99"),
        q("latency_us", "max"),
        q("handshake_us", "p50"),
        q("handshake_us", "p99"),
    );
}

// ---------------------------------------------------------------------------------------------
// child: one process of clients

/// One process's counters, reported every second.
#[derive(Default)]
struct Stats {
    connected: AtomicU64,
    failed: AtomicU64,
    closed: AtomicU64,
    messages: AtomicU64,
    gaps: AtomicU64,
    dups: AtomicU64,
    deflate: AtomicU64,
    bytes: AtomicU64,
    inflations: AtomicU64,
    /// Wall-clock µs when this process started and when its last client was upgraded: with
    /// `--ramp 0s`, the span is how long the burst of connections took.
    started_unix_us: AtomicU64,
    last_upgrade_unix_us: AtomicU64,
    first_error: Mutex<Option<String>>,
    latency: Mutex<Hist>,
    handshake: Mutex<Hist>,
    new_by_worker: Mutex<HashMap<String, u64>>,
}

impl Stats {
    fn fail(&self, e: &anyhow::Error) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.first_error
            .lock()
            .expect("not poisoned")
            .get_or_insert_with(|| format!("{e:#}"));
    }

    /// One JSON line: cumulative counters, and the histograms and placements since the last.
    fn report(&self, done: bool) -> String {
        let take = |h: &Mutex<Hist>| std::mem::take(&mut *h.lock().expect("not poisoned"));
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "connected": g(&self.connected),
            "failed": g(&self.failed),
            "closed": g(&self.closed),
            "messages": g(&self.messages),
            "gaps": g(&self.gaps),
            "dups": g(&self.dups),
            "deflate": g(&self.deflate),
            "bytes": g(&self.bytes),
            "first_error": *self.first_error.lock().expect("not poisoned"),
            "lat": take(&self.latency).to_json(),
            "hs": take(&self.handshake).to_json(),
            "new_by_worker": std::mem::take(&mut *self.new_by_worker.lock().expect("not poisoned")),
            "started_unix_us": g(&self.started_unix_us),
            "last_upgrade_unix_us": g(&self.last_upgrade_unix_us),
            "done": done,
        })
        .to_string()
    }
}

fn child(a: ChildArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(child_run(a))
}

async fn child_run(a: ChildArgs) -> Result<()> {
    let r = &a.run;
    let stats = Arc::new(Stats::default());
    stats.started_unix_us.store(now_us(), Ordering::Relaxed);
    let start = Instant::now();
    let end = start + r.ramp + r.hold;
    let mine: Vec<usize> = (a.index..r.clients).step_by(a.of).collect();
    let gate = Arc::new(Semaphore::new(r.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let report = {
        let stats = stats.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                println!("{}", stats.report(false));
                let _ = std::io::stdout().flush();
            }
        })
    };
    for c in mine {
        let at = start + r.ramp.mul_f64(c as f64 / r.clients as f64);
        let topic = format!("t.{}", topic_of(c, r.topics, r.zipf, r.seed));
        let (stats, gate, args) = (stats.clone(), gate.clone(), r.clone());
        tasks.spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            if let Err(e) = client(&args, c, &topic, end, &stats, &gate).await {
                stats.fail(&e);
            }
        });
    }
    let limit = end + HANDSHAKE_TIMEOUT + Duration::from_secs(5);
    let _ = tokio::time::timeout_at(limit.into(), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    report.abort();
    println!("{}", stats.report(true));
    let _ = std::io::stdout().flush();
    Ok(())
}

/// One client: connect from its source address, upgrade, subscribe, read until `end`.
async fn client(
    a: &RunArgs,
    c: usize,
    topic: &str,
    end: Instant,
    stats: &Stats,
    gate: &Semaphore,
) -> Result<()> {
    let url = a.url.replace("{topic}", topic);
    let (addr, path) = split_url(&url)?;
    let (mut stream, leftover, deflate, began) = {
        let _permit = gate.acquire().await?;
        // Connect plus upgrade, from the moment a slot is free: waiting for one of this
        // process's `--concurrency` slots is the generator's limit, not the server's.
        let began = Instant::now();
        let (stream, leftover, deflate) = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            connect(
                addr,
                &path,
                source_ip(c, a.source_ips.unwrap_or(1)),
                a.deflate,
            ),
        )
        .await
        .map_err(|_| anyhow!("no upgrade within {HANDSHAKE_TIMEOUT:?}"))??;
        (stream, leftover, deflate, began)
    };
    stats
        .handshake
        .lock()
        .expect("not poisoned")
        .record(began.elapsed().as_micros() as u64);
    stats.connected.fetch_add(1, Ordering::Relaxed);
    stats
        .last_upgrade_unix_us
        .fetch_max(now_us(), Ordering::Relaxed);
    if deflate {
        stats.deflate.fetch_add(1, Ordering::Relaxed);
    }
    if a.target == Target::Pushfleet {
        let sub = format!(r#"{{"op":"subscribe","id":1,"topic":"{topic}"}}"#);
        stream.write_all(&masked(0x81, sub.as_bytes())).await?;
    }
    let result = tokio::time::timeout_at(
        end.into(),
        read_loop(a.target, &mut stream, leftover, stats),
    )
    .await;
    match result {
        Err(_) => Ok(()), // the hold is over
        Ok(Ok(())) => {
            stats.closed.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        Ok(Err(e)) => Err(e),
    }
}

/// TCP connect from `source`, the upgrade request, and the 101; returns the stream, bytes read
/// past the response head, and whether permessage-deflate was agreed.
async fn connect(
    addr: SocketAddr,
    path: &str,
    source: IpAddr,
    deflate: bool,
) -> Result<(TcpStream, BytesMut, bool)> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let mut stream = socket
        .connect(addr)
        .await
        .with_context(|| format!("connect {addr} from {source}"))?;
    stream.set_nodelay(true)?;
    let key = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        rand::random::<[u8; 16]>(),
    );
    let offer = if deflate {
        "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover\r\n"
    } else {
        ""
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nOrigin: http://{addr}\r\n{offer}\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buf = BytesMut::with_capacity(READ_BUF);
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        ensure!(buf.len() < 16 * 1024, "response head over 16 KiB");
        ensure!(
            stream.read_buf(&mut buf).await? > 0,
            "closed before the upgrade"
        );
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status = head.split_whitespace().nth(1).unwrap_or("");
    ensure!(
        status == "101",
        "upgrade refused: {}",
        head.lines().next().unwrap_or("")
    );
    let ext = head
        .lines()
        .find(|l| {
            l.to_ascii_lowercase()
                .starts_with("sec-websocket-extensions:")
        })
        .map(str::to_ascii_lowercase);
    let agreed = ext
        .as_deref()
        .is_some_and(|e| e.contains("permessage-deflate"));
    if agreed {
        ensure!(
            ext.as_deref()
                .is_some_and(|e| e.contains("server_no_context_takeover")),
            "the server keeps its compression context ({}): each client's bytes would differ \
             and could not be inflated once per message",
            ext.unwrap_or_default()
        );
    }
    buf.advance(head_end);
    Ok((stream, buf, agreed))
}

/// A masked client frame.
fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask: [u8; 4] = rand::random();
    let mut f = vec![first];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Reads frames until the server closes; answers pings; counts and times messages.
async fn read_loop(
    target: Target,
    stream: &mut TcpStream,
    mut buf: BytesMut,
    stats: &Stats,
) -> Result<()> {
    let header: fn(&[u8]) -> Option<(u64, u64)> = match target {
        Target::Pushfleet => message_header,
        Target::Raw => payload_header,
    };
    let mut last_seq: Option<u64> = None;
    let mut welcomed = target != Target::Pushfleet;
    let mut latencies = Vec::with_capacity(64);
    loop {
        while let Some((first, at, len)) = frame_bounds(&buf)? {
            let payload = &buf[at..at + len];
            let opcode = first & 0x0F;
            ensure!(first & 0x80 != 0, "fragmented messages are not expected");
            match opcode {
                0x1 | 0x2 => {
                    let h = if first & 0x40 != 0 {
                        compressed_with(payload, &stats.inflations, 4096, header)?
                            .map(|(s, t, _)| (s, t))
                    } else {
                        header(payload)
                    };
                    if let Some((seq, ts)) = h {
                        stats.messages.fetch_add(1, Ordering::Relaxed);
                        latencies.push(now_us().saturating_sub(ts));
                        match last_seq {
                            Some(l) if seq == l + 1 => {}
                            Some(l) if seq > l + 1 => {
                                stats.gaps.fetch_add(seq - l - 1, Ordering::Relaxed);
                            }
                            Some(_) => {
                                stats.dups.fetch_add(1, Ordering::Relaxed);
                            }
                            None => {}
                        }
                        last_seq = Some(seq.max(last_seq.unwrap_or(0)));
                    } else if !welcomed && first & 0x40 == 0 {
                        welcomed = note_welcome(payload, stats);
                    }
                }
                0x8 => return Ok(()),
                0x9 => stream.write_all(&masked(0x8A, payload)).await?,
                _ => {}
            }
            stats.bytes.fetch_add((at + len) as u64, Ordering::Relaxed);
            buf.advance(at + len);
        }
        if !latencies.is_empty() {
            let mut h = stats.latency.lock().expect("not poisoned");
            for l in latencies.drain(..) {
                h.record(l);
            }
        }
        if buf.capacity() - buf.len() < READ_BUF / 2 {
            buf.reserve(READ_BUF);
        }
        if stream.read_buf(&mut buf).await? == 0 {
            bail!("connection ended without a close frame");
        }
    }
}

/// Counts the worker named by a pushfleet welcome; true once it was one.
fn note_welcome(json: &[u8], stats: &Stats) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(json) else {
        return false;
    };
    if v["type"] != "welcome" {
        return false;
    }
    let worker = v["worker"].as_str().unwrap_or("?").to_string();
    *stats
        .new_by_worker
        .lock()
        .expect("not poisoned")
        .entry(worker)
        .or_default() += 1;
    true
}

// ---------------------------------------------------------------------------------------------
// publish

async fn publish(a: PublishArgs) -> Result<()> {
    let steps = match (&a.steps, a.rate) {
        (Some(s), _) => s.0.clone(),
        (None, Some(rate)) => {
            ensure!(rate > 0.0 && rate.is_finite(), "--rate must be positive");
            vec![(rate, a.duration)]
        }
        (None, None) => bail!("give --rate or --steps"),
    };
    ensure!(a.topics > 0, "--topics must be at least 1");
    let mut sink = match a.target {
        PubTarget::Pushfleet => Sink::Zmq(Box::new(harness::Publisher::bind_to(&a.bind).await?)),
        PubTarget::Nchan | PubTarget::Pushpin => {
            let url = a.url.clone().ok_or_else(|| anyhow!("--url is required"))?;
            let (addr, _) = split_url(&url.replace("{topic}", "t.0"))?;
            Sink::Http {
                url,
                addr,
                pushpin: a.target == PubTarget::Pushpin,
            }
        }
    };
    tokio::time::sleep(a.delay).await;
    let weights: Vec<f64> = (1..=a.topics)
        .map(|k| 1.0 / (k as f64).powf(a.zipf))
        .collect();
    let mut feed = Feed {
        payloads: PayloadGen::new(a.bytes.saturating_sub(40)),
        seq: vec![0; a.topics],
        credit: vec![0.0; a.topics],
        total_weight: weights.iter().sum(),
        weights,
    };
    for (i, (rate, duration)) in steps.iter().enumerate() {
        let started_unix = now_us() as f64 / 1e6;
        let n = (rate * duration.as_secs_f64()).round() as u64;
        let (sent, late) = feed.step(&mut sink, *rate, n, *duration).await?;
        println!(
            "{}",
            serde_json::json!({"step": i, "rate": rate, "messages": n, "sent": sent,
                "start_unix": started_unix, "end_unix": now_us() as f64 / 1e6,
                "max_late_us": late.as_micros() as u64})
        );
        let _ = std::io::stdout().flush();
    }
    Ok(())
}

/// What `publish` sends: payloads, each topic's next sequence number, and the weighted
/// round-robin that spreads messages over topics in a steady order.
struct Feed {
    payloads: PayloadGen,
    seq: Vec<u64>,
    credit: Vec<f64>,
    weights: Vec<f64>,
    total_weight: f64,
}

impl Feed {
    /// Publishes `n` messages at `rate`, for at most `duration`: a server that takes each
    /// message slower than the rate (an HTTP publish that answers after delivering) gets fewer,
    /// and the step still ends on time. Returns how many were sent and how late the worst was.
    async fn step(
        &mut self,
        sink: &mut Sink,
        rate: f64,
        n: u64,
        duration: Duration,
    ) -> Result<(u64, Duration)> {
        let start = Instant::now();
        let deadline = start + duration;
        let mut late = Duration::ZERO;
        let mut next_report = start + Duration::from_secs(1);
        let mut sent = 0;
        for k in 0..n {
            let due = start + Duration::from_secs_f64(k as f64 / rate);
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            if due > now {
                tokio::time::sleep_until(due.into()).await;
            } else {
                late = late.max(now - due);
            }
            for (c, w) in self.credit.iter_mut().zip(&self.weights) {
                *c += w;
            }
            let t = (0..self.seq.len())
                .max_by(|x, y| self.credit[*x].total_cmp(&self.credit[*y]))
                .expect("topics");
            self.credit[t] -= self.total_weight;
            let body = format!(
                r#"{{"seq":{},"ts":{},"data":{}}}"#,
                self.seq[t],
                now_us(),
                self.payloads.next_payload()
            );
            self.seq[t] += 1;
            sink.send(&format!("t.{t}"), &body).await?;
            sent += 1;
            if Instant::now() >= next_report {
                next_report += Duration::from_secs(1);
                eprintln!(
                    "[publish] {rate}/s: {}/{} messages, at most {} late",
                    thousands(k + 1),
                    thousands(n),
                    ms(late.as_micros() as u64)
                );
            }
        }
        eprintln!(
            "[publish] {rate}/s done: {} of {} messages over {} topics in {:.1}s (target \
             {:.1}s), at most {} late",
            thousands(sent),
            thousands(n),
            self.seq.len(),
            start.elapsed().as_secs_f64(),
            n as f64 / rate,
            ms(late.as_micros() as u64)
        );
        Ok((sent, late))
    }
}

enum Sink {
    Zmq(Box<harness::Publisher>),
    Http {
        url: String,
        addr: SocketAddr,
        pushpin: bool,
    },
}

impl Sink {
    async fn send(&mut self, topic: &str, body: &str) -> Result<()> {
        match self {
            Sink::Zmq(p) => {
                p.publish(topic, body.as_bytes()).await?;
            }
            Sink::Http { url, addr, pushpin } => {
                let (target, payload) = if *pushpin {
                    let item = serde_json::json!({"items": [{"channel": topic,
                        "formats": {"ws-message": {"content": body}}}]});
                    (url.clone(), item.to_string())
                } else {
                    (url.replace("{topic}", topic), body.to_string())
                };
                let (_, path) = split_url(&target)?;
                let request = hyper::Request::post(path)
                    .header("host", addr.to_string())
                    .header("content-type", "application/json")
                    .body(http_body_util::Full::new(bytes::Bytes::from(payload)))?;
                let (status, reply) =
                    protocol::process::http_call(&addr.to_string(), request, 64 * 1024)
                        .await
                        .map_err(|e| anyhow!("publish to {target}: {e}"))?;
                ensure!(
                    status.is_success(),
                    "publish to {target}: {status} {}",
                    String::from_utf8_lossy(&reply)
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_follow_zipf_and_stay_put() {
        let mut counts = [0usize; 10];
        for c in 0..10_000 {
            counts[topic_of(c, 10, 1.1, 7)] += 1;
        }
        assert!(counts[0] > 3 * counts[9], "{counts:?}");
        assert_eq!(topic_of(42, 10, 1.1, 7), topic_of(42, 10, 1.1, 7));
        let uniform: Vec<usize> = (0..1000).map(|c| topic_of(c, 4, 0.0, 1)).collect();
        assert!((0..4).all(|t| uniform.iter().filter(|x| **x == t).count() > 150));
    }

    #[test]
    fn steps_parse_and_refuse_nonsense() {
        let s = parse_steps("100:10s, 200:1m").unwrap().0;
        assert_eq!(
            s,
            vec![
                (100.0, Duration::from_secs(10)),
                (200.0, Duration::from_secs(60))
            ]
        );
        assert!(parse_steps("100").is_err());
        assert!(parse_steps("0:1s").is_err());
        assert!(parse_steps("x:1s").is_err());
        assert!(parse_steps("5:soon").is_err());
    }

    #[test]
    fn urls_must_be_loopback() {
        assert!(split_url("ws://127.0.0.1:8000/ws").is_ok());
        assert_eq!(split_url("ws://127.0.0.3:80").unwrap().1, "/");
        assert!(split_url("ws://10.0.0.1:80/ws").is_err());
        assert!(split_url("wss://127.0.0.1:80/ws").is_err());
    }

    #[test]
    fn client_frames_are_masked() {
        let f = masked(0x81, b"hello");
        assert_eq!(f[1], 0x80 | 5);
        let mask = &f[2..6];
        let text: Vec<u8> = f[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        assert_eq!(text, b"hello");
    }
}
