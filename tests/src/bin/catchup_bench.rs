//! `catchup_bench`: measures what a reconnect storm costs when every client asks for history.
//!
//! It starts the release `worker` binary as a child process keeping history for `c.*`,
//! publishes H messages on each of T topics from an in-process ZeroMQ PUB, waits until the
//! worker holds them (`worker_history_messages`), connects C raw WebSocket clients at a bounded
//! rate (so the accept queue is not what is measured) and then lets every client subscribe at
//! once with `last: H`. It reports the time from the first subscribe until the last client had
//! its full history (and p50/p99 per client), replayed messages/s, worker CPU per replayed
//! message, worker memory, bytes on the wire per replayed message, and checks that every client
//! got exactly offsets `tail-H+1 ..= tail` (tail from its ack) and then live offsets without a
//! gap or a duplicate. With `--live-rate` the topics keep being published to throughout, so
//! history requests race live messages. It is a benchmark command, not a test, but it prints a
//! FAILED line and exits non-zero when any client saw a gap, a duplicate or a missing message.
//!
//! ```text
//! cargo build --release -p pushfleet-worker -p pushfleet-tests --bins
//! taskset -c 1 target/release/catchup_bench --worker-cpu 0
//! taskset -c 1 target/release/catchup_bench --worker-cpu 0 --clients 5000 --history 200
//! taskset -c 1 target/release/catchup_bench --worker-cpu 0 --live-rate 200
//! ```
//!
//! `--worker-cpu` pins the worker (via `taskset -c`); pin the bench itself (the client side) by
//! starting it under `taskset -c`, so the two do not compete for one core.
//!
//! Everything is bounded: every phase has a deadline, the worker child is killed when the bench
//! ends (errors and Ctrl-C included) and only 127.0.0.1 is used.

use anyhow::{bail, ensure, Context, Result};
use bytes::{Buf, BytesMut};
use clap::Parser;
use harness::bench::feed::{per_topic, PubThread};
use harness::bench::procfs::{machine_cpus, proc_cpu_ticks, proc_status_kib, CpuSample, CpuUse};
use harness::bench::scrape::{scrape, Scrape};
use harness::bench::wire::{compressed_header, frame_bounds, message_header, READ_BUF};
use harness::bench::worker_child::{worker_bin, WorkerChild};
use harness::bench::{ms, thousands, wait_connected, Connecting};
use harness::publisher::now_us;
use harness::WsClient;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Hard cap on clients: this process and the worker each hold one socket per client and may
/// open at most 20,000 files; the cap leaves room for both with margin.
const MAX_CLIENTS: usize = 9_000;

/// Topic `i` of the bench is `c.<i>`; the worker keeps history for `c.*`.
const TOPIC_PREFIX: &str = "c.";

/// A topic published to until the worker has it: proves the worker's upstream subscription is
/// in place before the history is published (ZeroMQ drops what is sent before). The worker
/// keeps one message of it, so the history figure stays exact.
const PROBE_TOPIC: &str = "c.probe";

#[derive(Parser, Debug, Clone)]
#[command(
    name = "catchup_bench",
    about = "Catch-up benchmark: C clients reconnect at once and each asks for the last H \
             messages of its topic. Pin the client side with `taskset -c 1 ...`."
)]
struct Args {
    /// The worker binary [default: `worker` next to this executable, i.e. target/release/worker].
    #[arg(long)]
    worker_bin: Option<PathBuf>,

    /// Pin the worker to these CPUs with `taskset -c` (e.g. `0` or `0-1`).
    #[arg(long)]
    worker_cpu: Option<String>,

    /// Clients (WebSocket connections); client i subscribes to topic i mod --topics. At most 9000.
    #[arg(long, default_value_t = 1000)]
    clients: usize,

    /// Messages of history per topic, and what every client asks for (`last`).
    #[arg(long, default_value_t = 1000)]
    history: u64,

    /// Topics, each with --history messages.
    #[arg(long, default_value_t = 1)]
    topics: usize,

    /// Clients do not offer permessage-deflate (and the worker runs with --no-compression).
    #[arg(long)]
    plain: bool,

    /// Keep publishing this many messages per second (in total, round-robin over the topics)
    /// while clients catch up, so history requests race live messages.
    #[arg(long)]
    live_rate: Option<u32>,

    /// With --live-rate: how long to keep publishing after the last client caught up, to
    /// check the live messages that follow a replay.
    #[arg(long, default_value_t = 2)]
    live_seconds_after: u64,

    /// Approximate size of each published JSON payload in bytes.
    #[arg(long, default_value_t = 500)]
    payload_bytes: usize,

    /// Messages per second while publishing the history (ZeroMQ drops past its queue bound).
    #[arg(long, default_value_t = 20_000)]
    fill_rate: u32,

    /// Most connection handshakes started per second.
    #[arg(long, default_value_t = 2000)]
    connect_rate: u32,

    /// Most connection handshakes in flight at once.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,

    /// Most time to connect all clients.
    #[arg(long, default_value_t = 120)]
    connect_timeout_seconds: u64,

    /// Most time from the first subscribe until every client has its history.
    #[arg(long, default_value_t = 120)]
    catchup_timeout_seconds: u64,

    /// Most time, after the last live publish, to wait for outstanding live messages.
    #[arg(long, default_value_t = 15)]
    drain_seconds: u64,

    /// The worker's --outbound-queue-bytes [default: the worker's own default].
    #[arg(long)]
    outbound_queue_bytes: Option<u64>,

    /// Keep the worker's log and announce file (they are in a temp directory, printed).
    #[arg(long)]
    keep_logs: bool,
}

fn main() -> std::process::ExitCode {
    match bench_main() {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("catchup_bench: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs the bench; `Ok(false)` when it ran but a client's messages were wrong or incomplete.
fn bench_main() -> Result<bool> {
    let args = Args::parse();
    ensure!(
        (1..=MAX_CLIENTS).contains(&args.clients),
        "--clients must be 1..={MAX_CLIENTS}: this process and the worker each hold one socket \
         per client and may open at most 20,000 files (got {})",
        args.clients
    );
    ensure!(args.history >= 1, "--history must be at least 1");
    ensure!(args.topics >= 1, "--topics must be at least 1");
    ensure!(args.fill_rate >= 1, "--fill-rate must be at least 1");
    ensure!(args.connect_rate >= 1, "--connect-rate must be at least 1");
    ensure!(
        args.connect_concurrency >= 1,
        "--connect-concurrency must be at least 1"
    );
    ensure!(
        args.live_rate.is_none_or(|r| r >= 1),
        "--live-rate must be at least 1"
    );
    harness::bench::ensure_open_files(args.clients, "clients")?;
    let outcome = harness::bench::block_on(run(&args))?;
    print_outcome(&args, &outcome);
    let failures = outcome.failures(&args);
    if failures.is_empty() {
        println!(
            "verdict                  OK: every client got offsets tail-{}+1..=tail{}, without a \
             gap, a duplicate or a missing message",
            args.history,
            if args.live_rate.is_some() {
                ", then live offsets up to the last published"
            } else {
                ""
            }
        );
        Ok(true)
    } else {
        println!("verdict                  FAILED: {}", failures.join("; "));
        eprintln!("catchup_bench: FAILED: {}", failures.join("; "));
        Ok(false)
    }
}

// ---------------------------------------------------------------------------------------------
// The run: fill history, connect, storm, (live), drain.

/// What the run measured.
struct Outcome {
    negotiated_deflate: usize,
    fill_time: Duration,
    history_held: u64,
    connect_time: Duration,
    /// From the first subscribe sent to the last client having its history (client clocks).
    catchup_span: Duration,
    /// From the first subscribe sent to the last one (the clients share the bench's CPUs).
    subscribe_spread: Duration,
    /// Every client had its history within the deadline.
    complete: bool,
    /// Per client: subscribe sent -> last history message received, in µs (caught-up ones).
    client_catchup_us: Vec<u64>,
    /// Over the storm window (go -> the bench saw the last client caught up).
    wall: Duration,
    cpu: CpuUse,
    worker_threads: Option<u64>,
    metrics: StormMetrics,
    rss_start_kib: u64,
    rss_filled_kib: u64,
    rss_idle_kib: u64,
    rss_storm_peak_kib: u64,
    rss_after_kib: u64,
    rss_settled_kib: u64,
    rss_hwm_kib: u64,
    client_inflations: u64,
    message_json_bytes: u64,
    live: Option<LiveOutcome>,
    check: Check,
}

/// The live traffic of a `--live-rate` run.
struct LiveOutcome {
    published: u64,
    elapsed: Duration,
    max_lag: Duration,
    received_in_storm: u64,
    received_total: u64,
    drained: bool,
    latency_p50_ms: u64,
    latency_p99_ms: u64,
    latency_max_ms: u64,
}

/// Worker counters over the storm window.
#[derive(Debug, Clone, Copy, Default)]
struct StormMetrics {
    replayed: f64,
    live_deliveries: f64,
    bytes_written: f64,
    frames_written: f64,
    socket_writes: f64,
    deflate_operations: f64,
    history_requests: f64,
    history_requests_last: f64,
    slow_closes: f64,
    dropped: f64,
    closed: f64,
}

impl StormMetrics {
    fn between(a: &Scrape, b: &Scrape) -> Self {
        StormMetrics {
            replayed: b.delta(a, "worker_replayed_messages_total"),
            live_deliveries: b.delta(a, "worker_fanout_deliveries_total"),
            bytes_written: b.delta(a, "worker_bytes_written_total"),
            frames_written: b.delta(a, "worker_frames_written_total"),
            socket_writes: b.delta(a, "worker_socket_writes_total"),
            deflate_operations: b.delta(a, "worker_deflate_operations_total"),
            history_requests: b.delta(a, "worker_history_requests_total"),
            history_requests_last: b.delta(a, r#"worker_history_requests_total{outcome="last""#),
            slow_closes: b.delta(a, "worker_slow_client_closes_total"),
            dropped: b.delta(a, "worker_dropped_deliveries_total"),
            closed: b.delta(a, "worker_connections_closed_total"),
        }
    }
}

async fn run(args: &Args) -> Result<Outcome> {
    let bin = worker_bin(args.worker_bin.as_deref())?;
    let clk_tck = harness::bench::print_setup("catchup_bench", &bin, args.worker_cpu.as_deref());
    let deflate = !args.plain;
    let label = if deflate { "deflate" } else { "plain" };
    let (n, h) = (args.clients, args.history);
    let topics: Vec<String> = (0..args.topics)
        .map(|i| format!("{TOPIC_PREFIX}{i}"))
        .collect();

    let feed = PubThread::start(args.payload_bytes).await?;
    let worker_args = worker_args(args, &feed.endpoint);
    let (worker, ws_addr, admin) = WorkerChild::launch(
        &bin,
        args.worker_cpu.as_deref(),
        "catchup_bench",
        label,
        &worker_args,
    )
    .await?;
    let rss_start_kib = proc_status_kib(worker.pid, "VmRSS")?;

    let (fill_time, history_held) = fill_history(args, &feed, admin, &topics, label)
        .await
        .with_context(|| worker.log_hint())?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_filled_kib = proc_status_kib(worker.pid, "VmRSS")?;
    eprintln!(
        "[{label}] worker holds {history_held} history messages after {:.2}s; RSS {:.1} MiB \
         ({:.1} MiB at start)",
        fill_time.as_secs_f64(),
        rss_filled_kib as f64 / 1024.0,
        rss_start_kib as f64 / 1024.0
    );

    // Connect every client; they wait for the storm before subscribing.
    // The clients' payload cache holds every history message (each is replayed to many).
    let fill_count = h as usize * args.topics;
    let shared = Arc::new(Shared::new(n, fill_count.max(1024)));
    let go = CancellationToken::new();
    let stop = CancellationToken::new();
    let _stop_on_exit = stop.clone().drop_guard();
    let plan = Arc::new(ClientPlan {
        addr: ws_addr,
        deflate,
        topics: topics.clone(),
        last: h,
        connect_sem: Semaphore::new(args.connect_concurrency),
        connect_start: tokio::time::Instant::now(),
        connect_interval: Duration::from_secs_f64(1.0 / f64::from(args.connect_rate)),
    });
    let connect_started = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|id| {
            tokio::spawn(client(
                id,
                plan.clone(),
                shared.clone(),
                go.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let connecting = Connecting {
        connected: &shared.connected,
        errors: &shared.errors,
        first_error: &|| shared.first_error(),
    };
    let timeout = Duration::from_secs(args.connect_timeout_seconds);
    wait_connected(
        connecting,
        args.clients,
        "client(s)",
        connect_started,
        timeout,
        label,
    )
    .await?;
    let connect_time = connect_started.elapsed();
    let negotiated_deflate = shared.negotiated.load(Ordering::Acquire);
    eprintln!(
        "[{label}] connected {n} in {:.2}s ({:.0}/s), deflate negotiated by {negotiated_deflate}",
        connect_time.as_secs_f64(),
        n as f64 / connect_time.as_secs_f64()
    );
    harness::eventually(
        Duration::from_secs(10),
        "worker reports every connection",
        || async move {
            scrape(admin)
                .await
                .is_ok_and(|m| m.get("worker_connections") as usize == n)
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_idle_kib = proc_status_kib(worker.pid, "VmRSS")?;

    // Live traffic, flowing before the storm so that requests race it.
    let live_stop = CancellationToken::new();
    let live = match args.live_rate {
        Some(rate) => {
            let before = scrape(admin).await?.get("worker_upstream_messages_total");
            let run = feed.run(&topics, f64::from(rate), None, live_stop.clone());
            harness::eventually(
                Duration::from_secs(10),
                "live messages reach the worker",
                || async move {
                    scrape(admin)
                        .await
                        .is_ok_and(|m| m.get("worker_upstream_messages_total") > before)
                },
            )
            .await?;
            eprintln!("[{label}] live: {rate} msg/s over {} topic(s)", args.topics);
            Some(run)
        }
        None => None,
    };

    // The storm: every client subscribes with `last: H` at once.
    let expected_history = n as u64 * h;
    eprintln!(
        "[{label}] storm: {n} clients subscribe with last {h} ({} history messages)",
        thousands(expected_history)
    );
    let m0 = scrape(admin).await?;
    let cpu0 = CpuSample::take(worker.pid)?;
    let t_go = Instant::now();
    go.cancel();
    let (complete, mut rss_storm_peak_kib) = await_catch_up(
        &shared,
        &worker,
        t_go,
        &cpu0,
        rss_idle_kib,
        args,
        label,
        clk_tck,
    )
    .await;
    let wall = t_go.elapsed();
    let cpu = CpuSample::take(worker.pid)?.since(&cpu0, clk_tck);
    let m1 = scrape(admin).await?;
    let rss_after_kib = proc_status_kib(worker.pid, "VmRSS")?;
    rss_storm_peak_kib = rss_storm_peak_kib.max(rss_after_kib);
    let worker_threads = proc_status_kib(worker.pid, "Threads").ok();
    let live_in_storm = shared.live_received.load(Ordering::Acquire);
    let storm_end = Instant::now();

    // Live traffic after the storm, then every client must reach the topic's last offset.
    let mut final_tails = vec![h - 1; args.topics];
    let live = match live {
        Some(run) => {
            if complete {
                eprintln!(
                    "[{label}] live: {} more second(s) after the storm",
                    args.live_seconds_after
                );
                tokio::time::sleep(Duration::from_secs(args.live_seconds_after)).await;
            }
            live_stop.cancel();
            let report = run.await??;
            for (i, tail) in final_tails.iter_mut().enumerate() {
                *tail += per_topic(report.published, args.topics, i);
            }
            let drained = drain(&shared, &final_tails, args, label).await;
            let (p50, p99, max) = shared.live_latency.summary();
            Some(LiveOutcome {
                published: report.published,
                elapsed: report.elapsed,
                max_lag: report.max_lag,
                received_in_storm: live_in_storm,
                received_total: shared.live_received.load(Ordering::Acquire),
                drained,
                latency_p50_ms: p50,
                latency_p99_ms: p99,
                latency_max_ms: max,
            })
        }
        None => None,
    };
    // Memory the worker keeps once the replay is written (queues that do not shrink show here).
    let settle_at = storm_end + Duration::from_secs(2);
    tokio::time::sleep_until(settle_at.into()).await;
    let rss_settled_kib = proc_status_kib(worker.pid, "VmRSS")?;
    let rss_hwm_kib = proc_status_kib(worker.pid, "VmHWM")?;

    // Tear down: stop the clients (they hold their sockets until now), then the worker.
    let last_offsets: Vec<Option<u64>> = shared
        .last_offset
        .iter()
        .map(|a| Some(a.load(Ordering::Acquire)).filter(|&o| o != u64::MAX))
        .collect();
    stop.cancel();
    let mut reports = Vec::with_capacity(n);
    let join = async {
        for t in tasks {
            if let Ok(r) = t.await {
                reports.push(r);
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(30), join)
        .await
        .is_err()
    {
        eprintln!("[{label}] warning: client tasks did not stop within 30 s");
    }
    worker.stop(args.keep_logs);
    drop(feed);

    let mut check = Check {
        clients: n,
        reported: reports.len(),
        errors: shared.errors.load(Ordering::Acquire),
        first_error: shared.first_error(),
        first_unexpected: shared.first_unexpected(),
        ..Check::default()
    };
    let mut client_catchup_us = Vec::with_capacity(n);
    let (mut first_sub, mut last_sub, mut last_caught) = (u64::MAX, 0u64, 0u64);
    for r in &reports {
        check.add(r, h, final_tails[r.id % args.topics], last_offsets[r.id]);
        if r.subscribed_us > 0 {
            first_sub = first_sub.min(r.subscribed_us);
            last_sub = last_sub.max(r.subscribed_us);
        }
        if r.caught_up_us > 0 {
            client_catchup_us.push(r.caught_up_us.saturating_sub(r.subscribed_us));
            last_caught = last_caught.max(r.caught_up_us);
        }
    }
    client_catchup_us.sort_unstable();
    Ok(Outcome {
        negotiated_deflate,
        fill_time,
        history_held,
        connect_time,
        catchup_span: Duration::from_micros(last_caught.saturating_sub(first_sub).max(1)),
        subscribe_spread: Duration::from_micros(last_sub.saturating_sub(first_sub)),
        complete,
        client_catchup_us,
        wall,
        cpu,
        worker_threads,
        metrics: StormMetrics::between(&m0, &m1),
        rss_start_kib,
        rss_filled_kib,
        rss_idle_kib,
        rss_storm_peak_kib,
        rss_after_kib,
        rss_settled_kib,
        rss_hwm_kib,
        client_inflations: shared.inflations.load(Ordering::Acquire),
        message_json_bytes: shared.message_json_bytes.load(Ordering::Acquire),
        live,
        check,
    })
}

/// The worker's flags besides ports: the feed, history for the bench topics, replay limit.
fn worker_args(args: &Args, endpoint: &str) -> Vec<String> {
    let h = args.history;
    // The worker keeps exactly H messages per topic (and one of the probe topic), with room to
    // spare in bytes so that nothing of the history is evicted by size.
    let per_topic_bytes = (h as usize)
        .saturating_mul(3 * args.payload_bytes + 1024)
        .max(8 << 20);
    let total_bytes = per_topic_bytes
        .saturating_mul(args.topics)
        .saturating_add(16 << 20)
        .max(256 << 20);
    let mut worker_args = vec![
        "--publisher".to_string(),
        endpoint.to_string(),
        "--history".to_string(),
        format!("{PROBE_TOPIC},messages=1"),
        "--history".to_string(),
        format!("{TOPIC_PREFIX}*,messages={h},bytes={per_topic_bytes}"),
        "--history-max-bytes".to_string(),
        total_bytes.to_string(),
        "--max-replay".to_string(),
        h.to_string(),
    ];
    if args.plain {
        worker_args.push("--no-compression".to_string());
    }
    if let Some(bytes) = args.outbound_queue_bytes {
        worker_args.push("--outbound-queue-bytes".to_string());
        worker_args.push(bytes.to_string());
    }
    worker_args
}

/// Publishes H messages on every topic once the worker's upstream subscription is in place,
/// and waits until the worker holds them all; returns how long that took and what it holds.
async fn fill_history(
    args: &Args,
    feed: &PubThread,
    admin: SocketAddr,
    topics: &[String],
    label: &str,
) -> Result<(Duration, u64)> {
    let h = args.history;
    // Probe: publish slowly on the probe topic until the worker keeps it; from then on the
    // upstream subscription to `c.` is in place (the worker subscribes in sorted order, `c.`
    // before `c.probe`). A message lost anyway shows in the count the fill waits for.
    let probe_stop = CancellationToken::new();
    let probe = feed.run(&[PROBE_TOPIC.to_string()], 50.0, None, probe_stop.clone());
    let probed = harness::eventually(
        Duration::from_secs(30),
        "the worker keeps a probe message (upstream subscription in place)",
        || async move {
            scrape(admin)
                .await
                .is_ok_and(|m| m.get("worker_history_messages") >= 1.0)
        },
    )
    .await;
    probe_stop.cancel();
    probe.await??;
    probed?;

    // Fill the history.
    let fill_count = h * args.topics as u64;
    let want_held = fill_count + 1;
    eprintln!(
        "[{label}] history: {} messages ({} topic(s) x {h}) at {} msg/s",
        thousands(fill_count),
        args.topics,
        args.fill_rate
    );
    let fill_started = Instant::now();
    let fill_within = Duration::from_secs_f64(fill_count as f64 / f64::from(args.fill_rate))
        + Duration::from_secs(30);
    tokio::time::timeout(
        fill_within,
        feed.run(
            topics,
            f64::from(args.fill_rate),
            Some(fill_count),
            CancellationToken::new(),
        ),
    )
    .await
    .context("publishing the history timed out")???;
    let held = harness::eventually(
        Duration::from_secs(30),
        "the worker holds the whole history",
        || async move {
            scrape(admin)
                .await
                .is_ok_and(|m| m.get("worker_history_messages") >= want_held as f64)
        },
    )
    .await;
    let history_held = scrape(admin).await?.get("worker_history_messages") as u64;
    held.with_context(|| {
        format!(
            "the worker holds {history_held} history messages, want {want_held} ({fill_count} \
             plus the probe): messages were lost on the way (try a lower --fill-rate)"
        )
    })?;
    Ok((fill_started.elapsed(), history_held))
}

/// Waits (bounded) until every client has its history or gave up, with progress on stderr;
/// returns whether all clients caught up, and the worker's peak RSS meanwhile.
#[allow(clippy::too_many_arguments)]
async fn await_catch_up(
    shared: &Shared,
    worker: &WorkerChild,
    t_go: Instant,
    cpu0: &CpuSample,
    mut rss_storm_peak_kib: u64,
    args: &Args,
    label: &str,
    clk_tck: f64,
) -> (bool, u64) {
    let n = args.clients;
    let expected_history = n as u64 * args.history;
    let catchup_deadline = t_go + Duration::from_secs(args.catchup_timeout_seconds);
    let mut next_tick = t_go + Duration::from_secs(1);
    let mut next_rss = t_go;
    let mut last = (t_go, 0u64, cpu0.worker_ticks());
    let complete = loop {
        let caught = shared.caught_up.load(Ordering::Acquire);
        let gave_up = shared.gave_up.load(Ordering::Acquire);
        if caught + gave_up >= n {
            break gave_up == 0;
        }
        let now = Instant::now();
        if now >= catchup_deadline {
            eprintln!(
                "[{label}] warning: {} of {n} clients without their full history after {}s",
                n - caught,
                args.catchup_timeout_seconds
            );
            break false;
        }
        if now >= next_rss {
            next_rss += Duration::from_millis(50);
            if let Ok(rss) = proc_status_kib(worker.pid, "VmRSS") {
                rss_storm_peak_kib = rss_storm_peak_kib.max(rss);
            }
        }
        if now >= next_tick {
            next_tick += Duration::from_secs(1);
            let got = shared.replayed_received.load(Ordering::Acquire);
            let cpu = proc_cpu_ticks(&worker.pid.to_string()).unwrap_or(last.2);
            let dt = now.duration_since(last.0).as_secs_f64();
            eprintln!(
                "[{label}] t={:>5.1}s caught up {caught:>5}/{n}  history {:>12} / {} ({:>9}/s)  \
                 worker CPU {:>5.1}%  RSS {:.1} MiB",
                now.duration_since(t_go).as_secs_f64(),
                thousands(got),
                thousands(expected_history),
                thousands(((got - last.1) as f64 / dt) as u64),
                (cpu - last.2) as f64 / clk_tck / dt * 100.0,
                rss_storm_peak_kib as f64 / 1024.0,
            );
            last = (now, got, cpu);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    (complete, rss_storm_peak_kib)
}

/// Waits (bounded) until every client still connected has its topic's last offset.
async fn drain(shared: &Shared, final_tails: &[u64], args: &Args, label: &str) -> bool {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.drain_seconds);
    let mut next_report = started + Duration::from_secs(2);
    loop {
        let behind = shared
            .last_offset
            .iter()
            .enumerate()
            .filter(|(id, last)| {
                let last = last.load(Ordering::Acquire);
                !shared.failed[*id].load(Ordering::Acquire)
                    && (last == u64::MAX || last < final_tails[id % final_tails.len()])
            })
            .count();
        if behind == 0 {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            eprintln!(
                "[{label}] warning: {behind} client(s) without the last live message {}s after \
                 the last publish",
                args.drain_seconds
            );
            return false;
        }
        if now >= next_report {
            next_report += Duration::from_secs(1);
            eprintln!("[{label}] drain: {behind} client(s) still behind the last live message");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Clients.

/// What every client does, the same for all.
struct ClientPlan {
    addr: SocketAddr,
    deflate: bool,
    topics: Vec<String>,
    /// The `last` every client asks for.
    last: u64,
    connect_sem: Semaphore,
    /// Client `id` starts its handshake at `connect_start + id * connect_interval`.
    connect_start: tokio::time::Instant,
    connect_interval: Duration,
}

/// State shared by every client task.
struct Shared {
    connected: AtomicUsize,
    negotiated: AtomicUsize,
    caught_up: AtomicUsize,
    /// Clients that failed before they had their history.
    gave_up: AtomicUsize,
    replayed_received: AtomicU64,
    live_received: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    first_unexpected: Mutex<Option<String>>,
    /// Per client: the highest offset received (`u64::MAX` until the first).
    last_offset: Vec<AtomicU64>,
    /// Per client: it failed (so it is not waited for).
    failed: Vec<std::sync::atomic::AtomicBool>,
    /// Compressed payloads the clients inflated (see `compressed_header`).
    inflations: AtomicU64,
    /// Payloads `compressed_header` remembers per thread and generation.
    cache_generation: usize,
    message_json_bytes: AtomicU64,
    live_latency: LiveLatency,
}

impl Shared {
    fn new(clients: usize, cache_generation: usize) -> Self {
        Shared {
            connected: AtomicUsize::new(0),
            negotiated: AtomicUsize::new(0),
            caught_up: AtomicUsize::new(0),
            gave_up: AtomicUsize::new(0),
            replayed_received: AtomicU64::new(0),
            live_received: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            first_error: Mutex::new(None),
            first_unexpected: Mutex::new(None),
            last_offset: (0..clients).map(|_| AtomicU64::new(u64::MAX)).collect(),
            failed: (0..clients)
                .map(|_| std::sync::atomic::AtomicBool::new(false))
                .collect(),
            inflations: AtomicU64::new(0),
            cache_generation,
            message_json_bytes: AtomicU64::new(0),
            live_latency: LiveLatency::new(),
        }
    }

    fn first_error(&self) -> Option<String> {
        self.first_error.lock().expect("not poisoned").clone()
    }

    fn first_unexpected(&self) -> Option<String> {
        self.first_unexpected.lock().expect("not poisoned").clone()
    }
}

/// What one client saw.
#[derive(Debug, Default)]
struct ClientReport {
    id: usize,
    /// When it sent its subscribe (µs since the epoch; 0: never).
    subscribed_us: u64,
    /// When the last history message arrived (0: never).
    caught_up_us: u64,
    /// `history.replayed` of its ack (None: no ack).
    replayed: Option<u64>,
    sequence: Option<Sequence>,
    /// Text frames that were neither the ack nor a message.
    unexpected: u64,
    failed: bool,
}

async fn client(
    id: usize,
    plan: Arc<ClientPlan>,
    shared: Arc<Shared>,
    go: CancellationToken,
    stop: CancellationToken,
) -> ClientReport {
    let mut report = ClientReport {
        id,
        ..ClientReport::default()
    };
    if let Err(e) = client_inner(id, &plan, &shared, &go, &stop, &mut report).await {
        if !stop.is_cancelled() {
            report.failed = true;
            shared.failed[id].store(true, Ordering::Release);
            shared.errors.fetch_add(1, Ordering::AcqRel);
            if report.caught_up_us == 0 {
                shared.gave_up.fetch_add(1, Ordering::AcqRel);
            }
            let mut first = shared.first_error.lock().expect("not poisoned");
            first.get_or_insert_with(|| format!("client {id}: {e:#}"));
        }
    }
    report
}

async fn client_inner(
    id: usize,
    plan: &ClientPlan,
    shared: &Shared,
    go: &CancellationToken,
    stop: &CancellationToken,
    report: &mut ClientReport,
) -> Result<()> {
    let topic = &plan.topics[id % plan.topics.len()];
    tokio::time::sleep_until(plan.connect_start + plan.connect_interval * id as u32).await;
    let permit = plan.connect_sem.acquire().await?;
    let mut c = tokio::time::timeout(Duration::from_secs(30), async {
        let mut c = WsClient::connect(plan.addr, "/ws", plan.deflate, &[]).await?;
        let welcome = c.recv_json().await?;
        ensure!(
            welcome["type"] == "welcome",
            "expected welcome, got {welcome}"
        );
        anyhow::Ok(c)
    })
    .await
    .context("connect timed out after 30 s")??;
    drop(permit);
    ensure!(
        c.deflate == plan.deflate,
        "permessage-deflate negotiated: {}, wanted {}",
        c.deflate,
        plan.deflate
    );
    if c.deflate {
        shared.negotiated.fetch_add(1, Ordering::AcqRel);
    }
    shared.connected.fetch_add(1, Ordering::AcqRel);
    tokio::select! {
        _ = go.cancelled() => {}
        _ = stop.cancelled() => return Ok(()),
    }
    report.subscribed_us = now_us();
    c.send_json(serde_json::json!({"op": "subscribe", "id": 1, "topic": topic, "last": plan.last}))
        .await?;
    // The worker sends nothing unasked after the welcome, so WsClient's read buffer is empty:
    // from here the socket is read directly, in large chunks, parsing every frame in a chunk
    // at once (the bench's own cost per message stays far below the worker's).
    let mut buf = BytesMut::with_capacity(READ_BUF);
    let mut pongs: Vec<Vec<u8>> = Vec::new();
    loop {
        if buf.capacity() - buf.len() < READ_BUF / 4 {
            buf.reserve(READ_BUF);
        }
        let n = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            r = c.stream().read_buf(&mut buf) => r?,
        };
        if n == 0 {
            bail!("connection closed by the worker (EOF)");
        }
        let now = now_us();
        let (mut history, mut live) = (0u64, 0u64);
        while let Some((b0, at, len)) = frame_bounds(&buf)? {
            ensure!(b0 & 0x80 != 0, "fragmented frame from the worker");
            let payload = &buf[at..at + len];
            let compressed = b0 & 0x40 != 0;
            match b0 & 0x0F {
                1 => {
                    let header = match (&report.sequence, compressed) {
                        (None, _) => None,
                        (Some(_), true) => {
                            compressed_header(payload, &shared.inflations, shared.cache_generation)?
                        }
                        (Some(_), false) => {
                            message_header(payload).map(|(o, ts)| (o, ts, payload.len()))
                        }
                    };
                    match (header, report.sequence.as_mut()) {
                        (Some((offset, ts, json_len)), Some(seq)) => {
                            if seq.message(offset) {
                                history += 1;
                            } else {
                                live += 1;
                                shared.live_latency.record(now.saturating_sub(ts));
                            }
                            if shared.message_json_bytes.load(Ordering::Relaxed) == 0 {
                                shared
                                    .message_json_bytes
                                    .store(json_len as u64, Ordering::Relaxed);
                            }
                        }
                        _ => text_frame(payload, compressed, topic, shared, report)?,
                    }
                }
                8 => {
                    let code =
                        (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                    bail!("worker closed the connection with {code:?}");
                }
                9 => pongs.push(payload.to_vec()),
                _ => {}
            }
            buf.advance(at + len);
        }
        if history > 0 {
            shared
                .replayed_received
                .fetch_add(history, Ordering::AcqRel);
        }
        if live > 0 {
            shared.live_received.fetch_add(live, Ordering::AcqRel);
        }
        if let Some(seq) = &report.sequence {
            if let Some(l) = seq.last {
                shared.last_offset[id].store(l, Ordering::Release);
            }
            if report.caught_up_us == 0 && seq.caught_up() {
                report.caught_up_us = now;
                shared.caught_up.fetch_add(1, Ordering::AcqRel);
            }
        }
        for p in pongs.drain(..) {
            c.send_frame(0x8A, &p).await?;
        }
    }
    Ok(())
}

/// A text frame that is not a message push: the ack (which starts the sequence), an error
/// (fatal) or anything else (counted as unexpected: a gap or reset notice, a message before
/// the ack).
fn text_frame(
    payload: &[u8],
    compressed: bool,
    topic: &str,
    shared: &Shared,
    report: &mut ClientReport,
) -> Result<()> {
    let json = if compressed {
        worker::ws::deflate::inflate(payload, 64 << 20)
            .map_err(|e| anyhow::anyhow!("bad deflate data from the worker: {e:?}"))?
    } else {
        payload.to_vec()
    };
    let v: serde_json::Value =
        serde_json::from_slice(&json).context("a text frame that is not JSON")?;
    match v["type"].as_str() {
        Some("ack") if report.sequence.is_none() && v["topic"] == topic => {
            let replayed = v["history"]["replayed"]
                .as_u64()
                .with_context(|| format!("ack without history.replayed: {v}"))?;
            let tail = v["history"]["position"]["offset"].as_u64();
            ensure!(
                replayed == 0 || tail.is_some(),
                "ack replays {replayed} messages but has no position: {v}"
            );
            report.replayed = Some(replayed);
            report.sequence = Some(Sequence::after_ack(replayed, tail));
        }
        Some("error") => bail!("subscribe failed: {v}"),
        _ => {
            report.unexpected += 1;
            let mut first = shared.first_unexpected.lock().expect("not poisoned");
            first.get_or_insert_with(|| {
                let text = v.to_string();
                text.chars().take(200).collect()
            });
        }
    }
    Ok(())
}

/// One client's check of the offsets it receives. The ack says `replayed` messages up to
/// `tail` follow: they must be exactly `tail-replayed+1 ..= tail`, and then live ones
/// `tail+1, tail+2, ...` — one contiguous run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Sequence {
    /// The offset expected next (None: the ack had no position; the first message sets it).
    next: Option<u64>,
    /// The topic's last offset when the ack was sent.
    tail: Option<u64>,
    /// The last history message (the tail, unless nothing is replayed).
    history_end: Option<u64>,
    /// The highest offset received.
    last: Option<u64>,
    /// Jumps forward (each may skip several messages).
    gaps: u64,
    /// Messages skipped by those jumps.
    missing: u64,
    /// Offsets received again or out of order.
    dups: u64,
}

impl Sequence {
    fn after_ack(replayed: u64, tail: Option<u64>) -> Sequence {
        Sequence {
            next: tail.map(|t| (t + 1).saturating_sub(replayed)),
            tail,
            history_end: tail.filter(|_| replayed > 0),
            ..Sequence::default()
        }
    }

    /// Records a message; true if it is a history message (at or before the ack's tail).
    fn message(&mut self, offset: u64) -> bool {
        match self.next {
            Some(n) if offset > n => {
                self.gaps += 1;
                self.missing += offset - n;
            }
            Some(n) if offset < n => self.dups += 1,
            _ => {}
        }
        if self.next.is_none_or(|n| offset >= n) {
            self.next = Some(offset + 1);
        }
        self.last = self.last.max(Some(offset));
        self.tail.is_some_and(|t| offset <= t)
    }

    /// Whether the history (everything up to the ack's tail) has arrived.
    fn caught_up(&self) -> bool {
        self.history_end
            .is_none_or(|end| self.last.is_some_and(|l| l >= end))
    }
}

/// Publish-to-receive latency of live messages, in 1 ms buckets up to a minute.
struct LiveLatency {
    buckets: Vec<AtomicU64>,
}

impl LiveLatency {
    const MAX_MS: usize = 60_000;

    fn new() -> Self {
        LiveLatency {
            buckets: (0..=Self::MAX_MS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn record(&self, us: u64) {
        let ms = ((us / 1000) as usize).min(Self::MAX_MS);
        self.buckets[ms].fetch_add(1, Ordering::Relaxed);
    }

    /// (p50, p99, max) in ms, rounded up to the bucket's upper edge.
    fn summary(&self) -> (u64, u64, u64) {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Acquire))
            .collect();
        let total: u64 = counts.iter().sum();
        let at = |q: f64| -> u64 {
            let rank = ((q * total as f64).ceil() as u64).clamp(1, total.max(1));
            let mut seen = 0;
            for (ms, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return ms as u64 + 1;
                }
            }
            0
        };
        if total == 0 {
            return (0, 0, 0);
        }
        (at(0.50), at(0.99), at(1.0))
    }
}

// ---------------------------------------------------------------------------------------------
// The verdict.

/// Every client's checks, summed.
#[derive(Debug, Default)]
struct Check {
    clients: usize,
    reported: usize,
    errors: u64,
    first_error: Option<String>,
    first_unexpected: Option<String>,
    no_ack: u64,
    /// Clients whose ack replayed other than H messages.
    wrong_replay_count: u64,
    /// Messages short of H in those replays.
    replay_shortfall: u64,
    not_caught_up: u64,
    gaps: u64,
    missing: u64,
    dups: u64,
    unexpected: u64,
    /// Messages up to the topic's last offset a client never received.
    undelivered: u64,
    history_received: u64,
}

impl Check {
    fn add(&mut self, r: &ClientReport, h: u64, final_tail: u64, last_offset: Option<u64>) {
        self.unexpected += r.unexpected;
        match r.replayed {
            None => self.no_ack += 1,
            Some(n) if n != h => {
                self.wrong_replay_count += 1;
                self.replay_shortfall += h.saturating_sub(n);
            }
            Some(_) => {}
        }
        if r.caught_up_us == 0 {
            self.not_caught_up += 1;
        }
        if let Some(s) = &r.sequence {
            self.gaps += s.gaps;
            self.missing += s.missing;
            self.dups += s.dups;
            let first = s
                .tail
                .map(|t| (t + 1).saturating_sub(r.replayed.unwrap_or(0)));
            self.history_received += match (first, s.tail) {
                (Some(f), Some(t)) => s.last.map_or(0, |l| l.min(t) + 1).saturating_sub(f),
                _ => 0,
            };
        }
        let got_to = last_offset.or(r.sequence.and_then(|s| s.last));
        self.undelivered += match got_to {
            Some(l) => final_tail.saturating_sub(l),
            None => final_tail + 1,
        };
    }

    /// What went wrong, one phrase each; empty when every client got exactly what it should.
    fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        if self.reported < self.clients {
            f.push(format!(
                "{} client(s) did not report",
                self.clients - self.reported
            ));
        }
        if self.errors > 0 {
            f.push(format!(
                "{} client error(s) (first: {})",
                self.errors,
                self.first_error.as_deref().unwrap_or("?")
            ));
        }
        if self.no_ack > 0 {
            f.push(format!("{} client(s) got no ack", self.no_ack));
        }
        if self.wrong_replay_count > 0 {
            f.push(format!(
                "{} ack(s) replayed other than asked ({} messages short)",
                self.wrong_replay_count, self.replay_shortfall
            ));
        }
        if self.not_caught_up > 0 {
            f.push(format!(
                "{} client(s) without their full history",
                self.not_caught_up
            ));
        }
        if self.gaps > 0 {
            f.push(format!(
                "{} gap(s), {} message(s) missing",
                thousands(self.gaps),
                thousands(self.missing)
            ));
        }
        if self.dups > 0 {
            f.push(format!("{} duplicate(s)", thousands(self.dups)));
        }
        if self.undelivered > 0 {
            f.push(format!(
                "{} message(s) undelivered at the end",
                thousands(self.undelivered)
            ));
        }
        if self.unexpected > 0 {
            f.push(format!(
                "{} unexpected frame(s) (first: {})",
                self.unexpected,
                self.first_unexpected.as_deref().unwrap_or("?")
            ));
        }
        f
    }
}

impl Outcome {
    fn failures(&self, args: &Args) -> Vec<String> {
        let mut f = self.check.failures();
        if !self.complete && self.check.not_caught_up == 0 && self.check.errors == 0 {
            f.push(format!(
                "catch-up incomplete after {}s",
                args.catchup_timeout_seconds
            ));
        }
        if self.live.as_ref().is_some_and(|l| !l.drained) && self.check.undelivered == 0 {
            f.push("live messages outstanding at the end".to_string());
        }
        f
    }

    fn replayed(&self) -> f64 {
        self.metrics.replayed.max(1.0)
    }
}

// ---------------------------------------------------------------------------------------------
// Output.

fn pct(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b * 100.0
    } else {
        0.0
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn print_outcome(args: &Args, o: &Outcome) {
    let m = &o.metrics;
    let c = &o.check;
    let n = args.clients;
    let h = args.history;
    println!();
    println!(
        "== catch-up: {n} clients x last {h} on {} topic(s), {}, {}, ~{} B payload ==",
        args.topics,
        if args.plain { "plain" } else { "deflate" },
        match args.live_rate {
            Some(r) => format!("live {r} msg/s"),
            None => "no live traffic".to_string(),
        },
        args.payload_bytes
    );
    println!(
        "history                  {} messages published in {:.2} s; worker holds {} (with 1 probe)",
        thousands(h * args.topics as u64),
        o.fill_time.as_secs_f64(),
        thousands(o.history_held)
    );
    println!(
        "connect                  {n} in {:.2} s ({:.0}/s; at most {}/s, {} at once); \
         permessage-deflate negotiated by {}",
        o.connect_time.as_secs_f64(),
        n as f64 / o.connect_time.as_secs_f64(),
        args.connect_rate,
        args.connect_concurrency,
        o.negotiated_deflate
    );
    println!(
        "message                  {} B of JSON per message push",
        o.message_json_bytes
    );
    println!(
        "catch-up                 {} of {n} clients had their full history {:.3} s after the \
         first subscribe (the last subscribe was sent after {:.3} s){}",
        o.client_catchup_us.len(),
        o.catchup_span.as_secs_f64(),
        o.subscribe_spread.as_secs_f64(),
        if o.complete { "" } else { "  INCOMPLETE" }
    );
    let q = |p: f64| -> u64 {
        let v = &o.client_catchup_us;
        if v.is_empty() {
            return 0;
        }
        let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
        v[rank - 1]
    };
    println!(
        "per-client catch-up      p50 {}  p90 {}  p99 {}  max {}  (subscribe sent -> last history \
         message received)",
        ms(q(0.50)),
        ms(q(0.90)),
        ms(q(0.99)),
        ms(q(1.0))
    );
    println!(
        "replayed                 {} messages to clients ({} expected; worker replayed {}) = {} \
         msg/s",
        thousands(c.history_received),
        thousands(n as u64 * h),
        thousands(m.replayed as u64),
        thousands((c.history_received as f64 / o.catchup_span.as_secs_f64()) as u64)
    );
    if let Some(l) = &o.live {
        println!(
            "live                     {} msgs published in {:.2} s (max publisher lag {}); {} live \
             deliveries during the storm (worker fanned out {}), {} in all; publish->receive p50 \
             {} ms  p99 {} ms  max {} ms",
            l.published,
            l.elapsed.as_secs_f64(),
            ms(l.max_lag.as_micros() as u64),
            thousands(l.received_in_storm),
            thousands(m.live_deliveries as u64),
            thousands(l.received_total),
            l.latency_p50_ms,
            l.latency_p99_ms,
            l.latency_max_ms
        );
    }
    let cpu = &o.cpu;
    let wall = o.wall.as_secs_f64();
    let frames = m.replayed + m.live_deliveries;
    println!(
        "worker CPU               {:.2} s over {:.2} s ({:.1}% of one core, {} threads) = {:.3} µs \
         per replayed message ({:.0}% user, {:.0}% kernel){}",
        cpu.worker.as_secs_f64(),
        wall,
        pct(cpu.worker.as_secs_f64(), wall),
        o.worker_threads
            .map_or_else(|| "?".to_string(), |t| t.to_string()),
        cpu.worker.as_secs_f64() * 1e6 / o.replayed(),
        pct(cpu.worker_user.as_secs_f64(), cpu.worker.as_secs_f64()),
        100.0 - pct(cpu.worker_user.as_secs_f64(), cpu.worker.as_secs_f64()),
        if m.live_deliveries > 0.0 {
            format!(
                "; {:.3} µs per frame counting live deliveries",
                cpu.worker.as_secs_f64() * 1e6 / frames.max(1.0)
            )
        } else {
            String::new()
        }
    );
    println!(
        "bench (client) CPU       {:.2} s ({:.1}% of one core) = {:.3} µs per replayed message",
        cpu.bench.as_secs_f64(),
        pct(cpu.bench.as_secs_f64(), wall),
        cpu.bench.as_secs_f64() * 1e6 / o.replayed()
    );
    let other = cpu.other().as_secs_f64();
    let cpus = machine_cpus();
    println!(
        "machine CPU              {:.1}% busy of {cpus} CPUs; other processes used {other:.2} s \
         ({:.1}% of one core){}",
        pct(cpu.machine.as_secs_f64(), wall * cpus.max(1) as f64),
        pct(other, wall),
        if other > 0.1 * wall {
            "  (OTHER LOAD: figures are noisy)"
        } else {
            ""
        }
    );
    println!(
        "worker RSS               {} at start, {} with the history, {} idle with {n} connections \
         ({:.1} KiB per connection), peak {} during the storm, {} after it, {} 2 s later \
         (lifetime peak {})",
        mib(o.rss_start_kib),
        mib(o.rss_filled_kib),
        mib(o.rss_idle_kib),
        (o.rss_idle_kib as f64 - o.rss_filled_kib as f64) / n as f64,
        mib(o.rss_storm_peak_kib),
        mib(o.rss_after_kib),
        mib(o.rss_settled_kib),
        mib(o.rss_hwm_kib)
    );
    println!(
        "wire                     {:.1} B per replayed message (worker_bytes_written_total +{}{})",
        m.bytes_written / o.replayed(),
        thousands(m.bytes_written as u64),
        if m.live_deliveries > 0.0 {
            ", live deliveries and acks included"
        } else {
            ", acks included"
        }
    );
    println!(
        "socket writes            {} ({:.3} per replayed message, {:.2} frames per write)",
        thousands(m.socket_writes as u64),
        m.socket_writes / o.replayed(),
        m.frames_written / m.socket_writes.max(1.0)
    );
    if !args.plain {
        println!(
            "deflate operations       {} during the storm for {} history messages per client \
             (each message is compressed once: history on its first replay, live ones when \
             fanned out); clients inflated {} distinct payloads in all",
            m.deflate_operations,
            thousands(h),
            thousands(o.client_inflations)
        );
    }
    println!(
        "worker                   {} history requests ({} `last`), {} slow-consumer closes, {} \
         dropped deliveries, {} connections closed",
        m.history_requests, m.history_requests_last, m.slow_closes, m.dropped, m.closed
    );
    println!(
        "offsets per client       gaps {} (missing {}), dups {}, acks replaying other than {h}: \
         {}, undelivered at end {}, unexpected frames {}; client errors {}{}",
        c.gaps,
        c.missing,
        c.dups,
        c.wrong_replay_count,
        c.undelivered,
        c.unexpected,
        c.errors,
        c.first_error
            .as_deref()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_then_live_messages_is_one_contiguous_run() {
        let mut s = Sequence::after_ack(3, Some(9));
        assert!(!s.caught_up());
        assert!(s.message(7));
        assert!(s.message(8));
        assert!(s.message(9));
        assert!(s.caught_up());
        assert!(!s.message(10));
        assert!(!s.message(11));
        assert_eq!((s.gaps, s.missing, s.dups, s.last), (0, 0, 0, Some(11)));
    }

    #[test]
    fn gaps_and_duplicates_are_counted() {
        let mut s = Sequence::after_ack(3, Some(9));
        s.message(7);
        s.message(9); // 8 skipped
        s.message(9); // again
        s.message(8); // late
        s.message(12); // 10, 11 skipped
        assert_eq!((s.gaps, s.missing, s.dups), (2, 3, 2));
        assert_eq!(s.last, Some(12));
    }

    #[test]
    fn an_empty_replay_is_caught_up_at_once() {
        let s = Sequence::after_ack(0, Some(4));
        assert!(s.caught_up());
        let mut s = Sequence::after_ack(0, None);
        assert!(s.caught_up());
        assert!(!s.message(0), "without a tail everything is live");
        assert!(!s.message(1));
        assert_eq!(s.gaps + s.dups, 0);
    }

    #[test]
    fn the_check_counts_short_replays_and_undelivered_messages() {
        let mut seq = Sequence::after_ack(2, Some(9));
        seq.message(8);
        seq.message(9);
        let r = ClientReport {
            id: 0,
            subscribed_us: 1,
            caught_up_us: 2,
            replayed: Some(2),
            sequence: Some(seq),
            unexpected: 0,
            failed: false,
        };
        let mut c = Check {
            clients: 1,
            reported: 1,
            ..Check::default()
        };
        c.add(&r, 3, 11, Some(9));
        assert_eq!((c.wrong_replay_count, c.replay_shortfall), (1, 1));
        assert_eq!(c.undelivered, 2);
        assert_eq!(c.history_received, 2);
        assert_eq!(c.failures().len(), 2);
    }

    #[test]
    fn live_latency_percentiles() {
        let l = LiveLatency::new();
        for us in [500, 1_500, 1_700, 2_100, 90_000_000] {
            l.record(us);
        }
        assert_eq!(l.summary(), (2, 60_001, 60_001));
        assert_eq!(LiveLatency::new().summary(), (0, 0, 0));
    }
}
