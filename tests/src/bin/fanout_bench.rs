//! `fanout_bench`: measures the worker's fan-out of one hot topic to many WebSocket subscribers,
//! with permessage-deflate (compressed once per message) and without.
//!
//! It starts the release `worker` binary as a child process, publishes from an in-process
//! ZeroMQ PUB socket, connects N raw WebSocket subscribers from this process and reports
//! deliveries/s, worker CPU per delivery, publish-to-receive latency, worker RSS per connection
//! and bytes on the wire per delivery. It is a benchmark command, not a test:
//!
//! ```text
//! cargo build --release -p pushfleet-worker --bin worker
//! taskset -c 1 cargo run --release -p pushfleet-tests --bin fanout_bench -- \
//!     --worker-cpu 0 --subscribers 2000 --rate 200 --seconds 10
//! ```
//!
//! `--worker-cpu` pins the worker (via `taskset -c`); pin the bench itself (the client side)
//! by starting it under `taskset -c` as above, so the two do not compete for one core. Without
//! `--worker-cpu` the worker inherits the bench's CPU affinity.
//!
//! Everything is bounded: every phase has a deadline, the worker child is killed when the bench
//! ends (errors and Ctrl-C included) and only 127.0.0.1 is used.

use anyhow::{bail, ensure, Context, Result};
use bytes::{Buf, BytesMut};
use clap::{Parser, ValueEnum};
use harness::{http_request, metric_value, WsClient};
use rand::{Rng, SeedableRng};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;

/// Hard cap on subscribers: this process and the worker each hold one socket per subscriber
/// and may open at most 20,000 files.
const MAX_SUBSCRIBERS: usize = 18_000;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "fanout_bench",
    about = "Fan-out benchmark: one hot topic, N WebSocket subscribers, with and without \
             permessage-deflate. Pin the client side with `taskset -c 1 cargo run ...`."
)]
struct Args {
    /// The worker binary [default: `worker` next to this executable, i.e. target/release/worker].
    #[arg(long)]
    worker_bin: Option<PathBuf>,

    /// Pin the worker to these CPUs with `taskset -c` (e.g. `0` or `0-1`).
    #[arg(long)]
    worker_cpu: Option<String>,

    /// Which scenarios to run.
    #[arg(long, value_enum, default_value_t = Mode::Both)]
    mode: Mode,

    /// Subscribers (WebSocket connections), all on the same hot topic; at most 18000.
    #[arg(long, default_value_t = 2000)]
    subscribers: usize,

    /// Messages published per second during the measurement window (and warm-up).
    #[arg(long, default_value_t = 200)]
    rate: u32,

    /// Length of the measurement window in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,

    /// Warm-up before the window, in seconds, at the same rate.
    #[arg(long, default_value_t = 2)]
    warmup_seconds: u64,

    /// Approximate size of each published JSON payload in bytes.
    #[arg(long, default_value_t = 500)]
    payload_bytes: usize,

    /// The hot topic.
    #[arg(long, default_value = "football.match.4711.live")]
    topic: String,

    /// Most connection handshakes in flight at once.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,

    /// Most time to connect and subscribe all subscribers.
    #[arg(long, default_value_t = 120)]
    connect_timeout_seconds: u64,

    /// Most time, after the last publish, to wait for outstanding deliveries.
    #[arg(long, default_value_t = 15)]
    drain_seconds: u64,

    /// Keep the worker's log and announce file (they are in a temp directory, printed).
    #[arg(long)]
    keep_logs: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Clients offer permessage-deflate; the worker compresses each message once.
    Deflate,
    /// The worker runs with --no-compression; clients offer nothing.
    Plain,
    /// Deflate, then plain, then a comparison table.
    Both,
}

fn main() -> std::process::ExitCode {
    match bench_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fanout_bench: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn bench_main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        args.subscribers >= 1 && args.subscribers <= MAX_SUBSCRIBERS,
        "--subscribers must be 1..={MAX_SUBSCRIBERS}: this process and the worker each hold one \
         socket per subscriber and may open at most 20,000 files (got {})",
        args.subscribers
    );
    ensure!(args.rate >= 1, "--rate must be at least 1");
    ensure!(args.seconds >= 1, "--seconds must be at least 1");
    ensure!(
        args.connect_concurrency >= 1,
        "--connect-concurrency must be at least 1"
    );
    let need = args.subscribers as u64 + 256;
    if let Some(limit) = open_files_limit() {
        ensure!(
            limit >= need,
            "open files limit is {limit}, need about {need} for {} subscribers: raise `ulimit -n` \
             or use fewer subscribers",
            args.subscribers
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        tokio::select! {
            r = run(args) => r,
            _ = tokio::signal::ctrl_c() => bail!("interrupted; worker stopped"),
        }
    })?;
    // Subscriber tasks still holding sockets are dropped with the runtime.
    runtime.shutdown_timeout(Duration::from_secs(5));
    Ok(())
}

async fn run(args: Args) -> Result<()> {
    let worker_bin = match &args.worker_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("current exe has no directory")?
            .join("worker"),
    };
    ensure!(
        worker_bin.is_file(),
        "worker binary {} not found; build it with `cargo build --release -p pushfleet-worker \
         --bin worker` or pass --worker-bin",
        worker_bin.display()
    );
    let clk_tck = clock_ticks_per_second();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!(
        "fanout_bench: worker {}, bench CPUs {} ({threads} runtime threads), worker CPUs {}, \
         CLK_TCK {clk_tck}",
        worker_bin.display(),
        cpus_allowed("self").unwrap_or_else(|| "?".into()),
        args.worker_cpu.as_deref().unwrap_or("inherited"),
    );
    if args.worker_cpu.is_none() {
        eprintln!(
            "fanout_bench: note: without --worker-cpu the worker shares the bench's CPUs; \
             results then mix client and worker load"
        );
    }
    let scenarios: &[bool] = match args.mode {
        Mode::Deflate => &[true],
        Mode::Plain => &[false],
        Mode::Both => &[true, false],
    };
    let mut outcomes = Vec::new();
    for &deflate in scenarios {
        let outcome = run_scenario(&args, &worker_bin, deflate, clk_tck).await?;
        print_outcome(&args, &outcome);
        outcomes.push(outcome);
    }
    if outcomes.len() > 1 {
        print_comparison(&outcomes);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// One scenario.

/// What one scenario measured.
struct Outcome {
    label: &'static str,
    subscribers: usize,
    negotiated_deflate: usize,
    connect_time: Duration,
    published: u64,
    publish_elapsed: Duration,
    max_publish_lag: Duration,
    expected: u64,
    delivered: u64,
    deliver_span: Duration,
    complete: bool,
    latency: Percentiles,
    stats: SubStats,
    sub_errors: u64,
    first_sub_error: Option<String>,
    worker_cpu: Duration,
    /// The user-space part of `worker_cpu` (the rest is kernel time).
    worker_user: Duration,
    bench_cpu: Duration,
    /// CPU time all processes used over the window (from /proc/stat).
    machine_busy: Duration,
    machine_cpus: usize,
    wall: Duration,
    worker_threads: Option<u64>,
    rss_before_kib: u64,
    rss_idle_kib: u64,
    rss_after_kib: u64,
    rss_settled_kib: u64,
    rss_peak_kib: u64,
    metrics: MetricsDelta,
    message_json_bytes: u64,
    /// Distinct compressed payloads the subscribers inflated during the window.
    client_inflations: u64,
    bench_threads: usize,
}

impl Outcome {
    fn deliveries_per_sec(&self) -> f64 {
        self.delivered as f64 / self.deliver_span.as_secs_f64().max(1e-9)
    }
    /// Deliveries the worker queued in the window: the denominator of worker-side figures
    /// (equal to `delivered` when the subscribers kept up).
    fn worker_deliveries(&self) -> f64 {
        self.metrics.fanout_deliveries.max(1.0)
    }
    fn cpu_us_per_delivery(&self) -> f64 {
        self.worker_cpu.as_secs_f64() * 1e6 / self.worker_deliveries()
    }
    fn rss_per_conn_kib(&self) -> f64 {
        (self.rss_idle_kib as f64 - self.rss_before_kib as f64) / self.subscribers as f64
    }
    fn wire_bytes_per_delivery(&self) -> f64 {
        self.metrics.bytes_written / self.worker_deliveries()
    }
}

async fn run_scenario(
    args: &Args,
    worker_bin: &Path,
    deflate: bool,
    clk_tck: f64,
) -> Result<Outcome> {
    let label = if deflate { "deflate" } else { "plain" };
    let n = args.subscribers;
    eprintln!(
        "\n[{label}] starting worker{}",
        if deflate {
            ""
        } else {
            " with --no-compression"
        }
    );
    let publisher = PubThread::start(args.topic.clone(), args.payload_bytes).await?;
    let worker = WorkerProc::start(args, worker_bin, &publisher.endpoint, deflate, label)?;
    let (ws_addr, admin) = worker
        .wait_announce(Duration::from_secs(15))
        .await
        .with_context(|| worker.log_hint())?;
    eprintln!(
        "[{label}] worker pid {} ws {ws_addr} admin {admin} CPUs {} log {}",
        worker.pid,
        cpus_allowed(&worker.pid.to_string()).unwrap_or_else(|| "?".into()),
        worker.log_path.display()
    );
    let upstream_up = harness::eventually(
        Duration::from_secs(10),
        "upstream connected",
        || async move {
            scrape(admin)
                .await
                .is_ok_and(|m| m.get("worker_upstream_connected") >= 1.0)
        },
    )
    .await;
    if let Err(e) = upstream_up {
        eprintln!("[{label}] warning: {e}; continuing (priming waits for messages)");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_before_kib = proc_status_kib(worker.pid, "VmRSS")?;

    // Connect and subscribe.
    let shared = Arc::new(Shared::new());
    let stop = CancellationToken::new();
    let _stop_on_exit = stop.clone().drop_guard();
    let connect_sem = Arc::new(Semaphore::new(args.connect_concurrency));
    let connect_started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        tasks.push(tokio::spawn(subscriber(
            ws_addr,
            deflate,
            args.topic.clone(),
            shared.clone(),
            connect_sem.clone(),
            stop.clone(),
        )));
    }
    let connect_deadline = connect_started + Duration::from_secs(args.connect_timeout_seconds);
    let mut next_report = Instant::now() + Duration::from_secs(1);
    loop {
        let connected = shared.connected.load(Ordering::Acquire);
        let failed = shared.errors.load(Ordering::Acquire);
        if failed > 0 {
            bail!(
                "[{label}] {failed} subscriber(s) failed while connecting ({connected}/{n} \
                 connected); first error: {}",
                shared.first_error().unwrap_or_default()
            );
        }
        if connected == n {
            break;
        }
        if Instant::now() >= connect_deadline {
            bail!(
                "[{label}] only {connected}/{n} subscribers connected within {}s",
                args.connect_timeout_seconds
            );
        }
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(1);
            eprintln!(
                "[{label}] connecting: {connected}/{n} ({:.0}/s)",
                connected as f64 / connect_started.elapsed().as_secs_f64()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connect_time = connect_started.elapsed();
    let negotiated_deflate = shared.negotiated.load(Ordering::Acquire);
    eprintln!(
        "[{label}] connected and subscribed {n} in {:.2}s ({:.0}/s), deflate negotiated by \
         {negotiated_deflate}",
        connect_time.as_secs_f64(),
        n as f64 / connect_time.as_secs_f64()
    );
    harness::eventually(
        Duration::from_secs(10),
        "worker reports every connection and subscription",
        || async move {
            scrape(admin).await.is_ok_and(|m| {
                m.get("worker_connections") as usize == n
                    && m.get("worker_subscriptions") as usize == n
            })
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_idle_kib = proc_status_kib(worker.pid, "VmRSS")?;
    eprintln!(
        "[{label}] worker RSS {:.1} MiB idle with {n} connections ({:.1} MiB before)",
        rss_idle_kib as f64 / 1024.0,
        rss_before_kib as f64 / 1024.0
    );

    // Prime: publish slowly until every subscriber has seen a message (the worker subscribes
    // upstream only once clients subscribe, and ZeroMQ subscriptions take a moment to apply).
    let prime_stop = CancellationToken::new();
    let prime = publisher.run(50.0, None, prime_stop.clone());
    let primed = harness::eventually(
        Duration::from_secs(30),
        "every subscriber receives a first message",
        || {
            let shared = shared.clone();
            async move { shared.primed.load(Ordering::Acquire) >= n }
        },
    )
    .await;
    prime_stop.cancel();
    let prime_report = prime.await??;
    primed?;
    let mut published_so_far = prime_report.published;

    // Warm-up at the measured rate.
    let rate = f64::from(args.rate);
    if args.warmup_seconds > 0 {
        let count = u64::from(args.rate) * args.warmup_seconds;
        eprintln!("[{label}] warm-up: {count} messages at {} msg/s", args.rate);
        let warm = publisher
            .run(rate, Some(count), CancellationToken::new())
            .await??;
        published_so_far += warm.published;
    }
    // Settle: wait until everything the worker queued has arrived, so that the window's
    // counters start from a quiet worker.
    settle(&shared, admin, label).await;

    // The measurement window.
    let count = u64::from(args.rate) * args.seconds;
    let expected = count * n as u64;
    let window_start = published_so_far;
    shared
        .window_end
        .store(window_start + count, Ordering::Release);
    shared.window_start.store(window_start, Ordering::Release);
    let m0 = scrape(admin).await?;
    let split0 = proc_cpu_split(&worker.pid.to_string())?;
    let cpu0 = split0.0 + split0.1;
    let self0 = proc_cpu_ticks("self")?;
    let inflations0 = shared.inflations.load(Ordering::Acquire);
    let machine0 = machine_busy_ticks()?;
    let t0 = Instant::now();
    let t0_us = harness::publisher::now_us();
    eprintln!(
        "[{label}] window: {count} messages at {} msg/s to {n} subscribers ({} deliveries)",
        args.rate,
        thousands(expected)
    );
    let mut window = publisher.run(rate, Some(count), CancellationToken::new());
    let mut report = None;
    let mut drain_deadline = None;
    let mut next_tick = t0 + Duration::from_secs(1);
    let mut last = (t0, 0u64, cpu0);
    let complete = loop {
        if report.is_none() {
            if let Ok(r) = window.try_recv() {
                report = Some(r?);
                drain_deadline = Some(Instant::now() + Duration::from_secs(args.drain_seconds));
            }
        }
        let delivered = shared.window_received.load(Ordering::Acquire);
        let alive = n.saturating_sub(shared.errors.load(Ordering::Acquire) as usize);
        let done = shared.done.load(Ordering::Acquire);
        if report.is_some() && (delivered >= expected || done >= alive) {
            break delivered >= expected;
        }
        let now = Instant::now();
        if drain_deadline.is_some_and(|d| now >= d) {
            eprintln!(
                "[{label}] warning: {} of {} deliveries outstanding {}s after the last publish",
                thousands(expected - delivered),
                thousands(expected),
                args.drain_seconds
            );
            break false;
        }
        if now >= next_tick {
            next_tick += Duration::from_secs(1);
            let cpu = proc_cpu_ticks(&worker.pid.to_string()).unwrap_or(last.2);
            let dt = now.duration_since(last.0).as_secs_f64();
            eprintln!(
                "[{label}] t={:>5.1}s delivered {:>12} / {} ({:>9}/s)  worker CPU {:>5.1}%",
                now.duration_since(t0).as_secs_f64(),
                thousands(delivered),
                thousands(expected),
                thousands(((delivered - last.1) as f64 / dt) as u64),
                (cpu - last.2) as f64 / clk_tck / dt * 100.0
            );
            last = (now, delivered, cpu);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let wall = t0.elapsed();
    let split1 = proc_cpu_split(&worker.pid.to_string())?;
    let cpu1 = split1.0 + split1.1;
    let self1 = proc_cpu_ticks("self")?;
    let inflations1 = shared.inflations.load(Ordering::Acquire);
    let machine1 = machine_busy_ticks()?;
    let m1 = scrape(admin).await?;
    let rss_after_kib = proc_status_kib(worker.pid, "VmRSS")?;
    let rss_peak_kib = proc_status_kib(worker.pid, "VmHWM")?;
    let worker_threads = proc_status_kib(worker.pid, "Threads").ok();
    // Memory the worker keeps once the burst is written (queues that do not shrink show here).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_settled_kib = proc_status_kib(worker.pid, "VmRSS")?;
    let report = match report {
        Some(r) => r,
        None => window.await??,
    };
    let delivered = shared.window_received.load(Ordering::Acquire);
    let last_us = shared.last_recv_us.load(Ordering::Acquire);
    let deliver_span = Duration::from_micros(last_us.saturating_sub(t0_us).max(1));

    // Tear down: stop the subscribers (they hold their sockets until now), then the worker.
    stop.cancel();
    let mut stats = SubStats::default();
    let join = async {
        for t in tasks {
            if let Ok(Ok(s)) = t.await {
                stats.add(&s);
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(30), join)
        .await
        .is_err()
    {
        eprintln!("[{label}] warning: subscriber tasks did not stop within 30 s");
    }
    let sub_errors = shared.errors.load(Ordering::Acquire);
    let first_sub_error = shared.first_error();
    let keep = args.keep_logs;
    worker.stop(keep);
    drop(publisher);

    Ok(Outcome {
        label,
        subscribers: n,
        negotiated_deflate,
        connect_time,
        published: report.published,
        publish_elapsed: report.elapsed,
        max_publish_lag: report.max_lag,
        expected,
        delivered,
        deliver_span,
        complete,
        latency: shared.hist.percentiles(),
        stats,
        sub_errors,
        first_sub_error,
        worker_cpu: Duration::from_secs_f64((cpu1 - cpu0) as f64 / clk_tck),
        worker_user: Duration::from_secs_f64((split1.0 - split0.0) as f64 / clk_tck),
        bench_cpu: Duration::from_secs_f64((self1 - self0) as f64 / clk_tck),
        machine_busy: Duration::from_secs_f64((machine1 - machine0) as f64 / clk_tck),
        machine_cpus: std::fs::read_to_string("/proc/stat")
            .map(|s| {
                s.lines()
                    .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
                    .count()
            })
            .unwrap_or(0),
        wall,
        worker_threads,
        rss_before_kib,
        rss_idle_kib,
        rss_after_kib,
        rss_settled_kib,
        rss_peak_kib,
        metrics: MetricsDelta::between(&m0, &m1),
        message_json_bytes: shared.message_json_bytes.load(Ordering::Acquire),
        client_inflations: inflations1 - inflations0,
        bench_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
    })
}

/// Waits (bounded) until the bench has received every frame the worker queued.
async fn settle(shared: &Shared, admin: SocketAddr, label: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut agreed = 0;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Ok(m) = scrape(admin).await else { continue };
        let queued = m.get("worker_fanout_deliveries_total") as u64;
        let received = shared.received_total.load(Ordering::Acquire);
        agreed = if queued == received { agreed + 1 } else { 0 };
        if agreed >= 2 {
            return;
        }
    }
    eprintln!("[{label}] warning: worker and subscribers did not agree on delivered counts in 30s");
}

// ---------------------------------------------------------------------------------------------
// Subscribers.

/// State shared by every subscriber task.
struct Shared {
    connected: AtomicUsize,
    negotiated: AtomicUsize,
    primed: AtomicUsize,
    done: AtomicUsize,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    /// First and one-past-last offset of the measurement window (`u64::MAX` until set).
    window_start: AtomicU64,
    window_end: AtomicU64,
    received_total: AtomicU64,
    window_received: AtomicU64,
    last_recv_us: AtomicU64,
    message_json_bytes: AtomicU64,
    /// Compressed payloads the subscribers inflated (cache misses, see `compressed_header`).
    inflations: AtomicU64,
    hist: Histogram,
}

impl Shared {
    fn new() -> Self {
        Shared {
            connected: AtomicUsize::new(0),
            negotiated: AtomicUsize::new(0),
            primed: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            errors: AtomicU64::new(0),
            first_error: Mutex::new(None),
            window_start: AtomicU64::new(u64::MAX),
            window_end: AtomicU64::new(u64::MAX),
            received_total: AtomicU64::new(0),
            window_received: AtomicU64::new(0),
            last_recv_us: AtomicU64::new(0),
            message_json_bytes: AtomicU64::new(0),
            inflations: AtomicU64::new(0),
            hist: Histogram::new(),
        }
    }

    fn fail(&self, e: &anyhow::Error) {
        self.errors.fetch_add(1, Ordering::AcqRel);
        let mut first = self.first_error.lock().expect("not poisoned");
        first.get_or_insert_with(|| format!("{e:#}"));
    }

    fn first_error(&self) -> Option<String> {
        self.first_error.lock().expect("not poisoned").clone()
    }
}

/// Per-subscriber offset bookkeeping, summed at the end.
#[derive(Default, Debug, Clone, Copy)]
struct SubStats {
    /// Jumps forward in offsets (each may skip several messages).
    gaps: u64,
    /// Messages skipped by those jumps.
    missing: u64,
    /// Offsets received again or out of order.
    dups: u64,
    /// Window messages not received by the deadline (after the last one received).
    tail_missing: u64,
}

impl SubStats {
    fn add(&mut self, o: &SubStats) {
        self.gaps += o.gaps;
        self.missing += o.missing;
        self.dups += o.dups;
        self.tail_missing += o.tail_missing;
    }
}

async fn subscriber(
    addr: SocketAddr,
    deflate: bool,
    topic: String,
    shared: Arc<Shared>,
    connect_sem: Arc<Semaphore>,
    stop: CancellationToken,
) -> Result<SubStats> {
    let r = subscriber_inner(addr, deflate, &topic, &shared, connect_sem, &stop).await;
    if let Err(e) = &r {
        if !stop.is_cancelled() {
            shared.fail(e);
        }
    }
    r
}

async fn subscriber_inner(
    addr: SocketAddr,
    deflate: bool,
    topic: &str,
    shared: &Shared,
    connect_sem: Arc<Semaphore>,
    stop: &CancellationToken,
) -> Result<SubStats> {
    let permit = connect_sem.acquire_owned().await?;
    let mut c = tokio::time::timeout(Duration::from_secs(30), async {
        let mut c = WsClient::connect(addr, "/ws", deflate, &[]).await?;
        let welcome = c.recv_json().await?;
        ensure!(
            welcome["type"] == "welcome",
            "expected welcome, got {welcome}"
        );
        c.subscribe(topic).await?;
        anyhow::Ok(c)
    })
    .await
    .context("connect and subscribe timed out after 30 s")??;
    drop(permit);
    ensure!(
        c.deflate == deflate,
        "permessage-deflate negotiated: {}, wanted {deflate}",
        c.deflate
    );
    if c.deflate {
        shared.negotiated.fetch_add(1, Ordering::AcqRel);
    }
    shared.connected.fetch_add(1, Ordering::AcqRel);
    // After the ack the worker sends nothing until the first publish, and publishing waits for
    // every subscriber to get here: WsClient's read buffer is empty, so from now on the socket
    // is read directly, in large chunks, parsing every frame in a chunk at once. That keeps the
    // bench's own cost per delivery low (the client is not what this measures).
    let mut buf = BytesMut::with_capacity(READ_BUF);
    let mut t = Tracker::default();
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
        while let Some((b0, at, len)) = frame_bounds(&buf)? {
            ensure!(b0 & 0x80 != 0, "fragmented frame from the worker");
            let payload = &buf[at..at + len];
            match b0 & 0x0F {
                1 => {
                    let header = if b0 & 0x40 != 0 {
                        compressed_header(payload, shared)?
                    } else {
                        message_header(payload).map(|(o, ts)| (o, ts, payload.len()))
                    };
                    if let Some((offset, ts, json_len)) = header {
                        let now = harness::publisher::now_us();
                        t.message(shared, offset, ts, now, json_len);
                    }
                }
                8 => {
                    let code =
                        (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                    t.flush(shared);
                    bail!("worker closed the connection with {code:?}");
                }
                9 => pongs.push(payload.to_vec()),
                _ => {}
            }
            buf.advance(at + len);
        }
        t.flush(shared);
        for p in pongs.drain(..) {
            c.send_frame(0x8A, &p).await?;
        }
    }
    let mut stats = t.stats;
    let end = shared.window_end.load(Ordering::Acquire);
    if end != u64::MAX && !t.reached_end {
        let start = shared.window_start.load(Ordering::Acquire);
        let got_to = t.last.map_or(start, |l| (l + 1).max(start));
        stats.tail_missing = end.saturating_sub(got_to);
    }
    Ok(stats)
}

/// Bytes a subscriber reads at a time (its buffer grows for larger frames).
const READ_BUF: usize = 8 * 1024;

/// `(first byte, payload start, payload length)` of the first complete frame in `b`.
fn frame_bounds(b: &[u8]) -> Result<Option<(u8, usize, usize)>> {
    if b.len() < 2 {
        return Ok(None);
    }
    ensure!(b[1] & 0x80 == 0, "server frame is masked");
    let (len, at) = match b[1] & 0x7F {
        126 if b.len() >= 4 => (usize::from(u16::from_be_bytes([b[2], b[3]])), 4),
        127 if b.len() >= 10 => (
            usize::try_from(u64::from_be_bytes(b[2..10].try_into()?))?,
            10,
        ),
        126 | 127 => return Ok(None),
        n => (usize::from(n), 2),
    };
    Ok((b.len() >= at + len).then_some((b[0], at, len)))
}

/// One subscriber's view of the offsets it receives; shared counters are updated once per read.
#[derive(Default)]
struct Tracker {
    stats: SubStats,
    last: Option<u64>,
    reached_end: bool,
    end_pending: bool,
    received: u64,
    in_window: u64,
    last_us: u64,
}

impl Tracker {
    fn message(&mut self, shared: &Shared, offset: u64, ts: u64, now: u64, json_len: usize) {
        match self.last {
            None => {
                shared.primed.fetch_add(1, Ordering::AcqRel);
            }
            Some(l) if offset == l + 1 => {}
            Some(l) if offset > l + 1 => {
                self.stats.gaps += 1;
                self.stats.missing += offset - l - 1;
            }
            Some(_) => self.stats.dups += 1,
        }
        if self.last.is_none_or(|l| offset > l) {
            self.last = Some(offset);
        }
        self.received += 1;
        let start = shared.window_start.load(Ordering::Acquire);
        let end = shared.window_end.load(Ordering::Acquire);
        if (start..end).contains(&offset) {
            shared.hist.record(now.saturating_sub(ts));
            self.last_us = self.last_us.max(now);
            if offset == start {
                shared
                    .message_json_bytes
                    .store(json_len as u64, Ordering::Release);
            }
            self.in_window += 1;
            if offset + 1 == end && !self.reached_end {
                self.reached_end = true;
                self.end_pending = true;
            }
        }
    }

    fn flush(&mut self, shared: &Shared) {
        if self.received > 0 {
            shared
                .received_total
                .fetch_add(std::mem::take(&mut self.received), Ordering::AcqRel);
        }
        if self.in_window > 0 {
            shared
                .last_recv_us
                .fetch_max(self.last_us, Ordering::AcqRel);
            shared
                .window_received
                .fetch_add(std::mem::take(&mut self.in_window), Ordering::AcqRel);
        }
        if std::mem::take(&mut self.end_pending) {
            shared.done.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// `(offset, ts)` of a `message` push. Reads the fixed header the worker writes before the
/// payload; falls back to a full JSON parse.
fn message_header(json: &[u8]) -> Option<(u64, u64)> {
    if !json.starts_with(br#"{"type":"message""#) {
        return None;
    }
    let head = &json[..json.len().min(1024)];
    let fast = number_after(head, br#""offset":"#).zip(number_after(head, br#""ts":"#));
    fast.or_else(|| {
        let v: serde_json::Value = serde_json::from_slice(json).ok()?;
        Some((v["position"]["offset"].as_u64()?, v["ts"].as_u64()?))
    })
}

/// `(offset, ts, JSON length)` of a compressed `message` push.
///
/// Compress-once means every subscriber gets the very same bytes for a message, and inflating
/// is a pure function of them: each distinct compressed payload is inflated (and so checked)
/// once per runtime thread and its header remembered. A subscriber that got different bytes
/// misses the cache and is inflated on its own. This keeps the bench's CPU per delivery far
/// below the worker's. Misses are counted: they should be about one per message per thread.
fn compressed_header(payload: &[u8], shared: &Shared) -> Result<Option<(u64, u64, usize)>> {
    type Header = Option<(u64, u64, usize)>;
    thread_local! {
        // Two generations, so the cache stays bounded without forgetting messages in flight.
        static SEEN: std::cell::RefCell<[std::collections::HashMap<Vec<u8>, Header>; 2]> =
            Default::default();
    }
    const GENERATION: usize = 1024;
    SEEN.with(|cell| {
        let mut seen = cell.borrow_mut();
        if let Some(h) = seen.iter().find_map(|g| g.get(payload)) {
            return Ok(*h);
        }
        shared.inflations.fetch_add(1, Ordering::Relaxed);
        let json = worker::ws::deflate::inflate(payload, 64 << 20)
            .map_err(|e| anyhow::anyhow!("bad deflate data from the worker: {e:?}"))?;
        let header = message_header(&json).map(|(o, ts)| (o, ts, json.len()));
        if seen[0].len() >= GENERATION {
            seen[1] = std::mem::take(&mut seen[0]);
        }
        seen[0].insert(payload.to_vec(), header);
        Ok(header)
    })
}

fn number_after(hay: &[u8], key: &[u8]) -> Option<u64> {
    let at = (0..=hay.len().checked_sub(key.len())?)
        .find(|&i| hay[i..i + key.len()].iter().zip(key).all(|(a, b)| a == b))?
        + key.len();
    let digits = hay[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&hay[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

// ---------------------------------------------------------------------------------------------
// Latency histogram: log-linear buckets, 64 per power of two (< 1.6 % relative error),
// exact below 128 µs. Shared by all subscriber tasks through relaxed atomics.

const SUB_BUCKETS: u64 = 64;
const LINEAR: u64 = 2 * SUB_BUCKETS;
const MAX_EXP: u64 = 40; // ~12.7 days in µs; larger values are clamped

struct Histogram {
    buckets: Vec<AtomicU64>,
    max: AtomicU64,
    count: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Percentiles {
    count: u64,
    p50_us: u64,
    p90_us: u64,
    p99_us: u64,
    p999_us: u64,
    max_us: u64,
}

impl Histogram {
    fn new() -> Self {
        let n = LINEAR + (MAX_EXP - 6) * SUB_BUCKETS;
        Histogram {
            buckets: (0..n).map(|_| AtomicU64::new(0)).collect(),
            max: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    fn index(v: u64) -> usize {
        let v = v.min((1 << MAX_EXP) - 1);
        if v < LINEAR {
            return v as usize;
        }
        let e = 63 - u64::from(v.leading_zeros()); // >= 7
        let m = (v >> (e - 6)) & (SUB_BUCKETS - 1);
        (LINEAR + (e - 7) * SUB_BUCKETS + m) as usize
    }

    /// A representative value (the middle) of bucket `i`.
    fn value(i: usize) -> u64 {
        let i = i as u64;
        if i < LINEAR {
            return i;
        }
        let e = 7 + (i - LINEAR) / SUB_BUCKETS;
        let m = (i - LINEAR) % SUB_BUCKETS;
        let width = 1u64 << (e - 6);
        ((SUB_BUCKETS + m) << (e - 6)) + width / 2
    }

    fn record(&self, us: u64) {
        self.buckets[Self::index(us)].fetch_add(1, Ordering::Relaxed);
        self.max.fetch_max(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn percentiles(&self) -> Percentiles {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Acquire))
            .collect();
        let total: u64 = counts.iter().sum();
        let max = self.max.load(Ordering::Acquire);
        let at = |q: f64| -> u64 {
            if total == 0 {
                return 0;
            }
            let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return Self::value(i).min(max);
                }
            }
            max
        };
        Percentiles {
            count: total,
            p50_us: at(0.50),
            p90_us: at(0.90),
            p99_us: at(0.99),
            p999_us: at(0.999),
            max_us: max,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The publisher: its own thread and runtime, so that pacing and timestamps are not delayed
// behind thousands of subscriber tasks.

struct PubThread {
    endpoint: String,
    tx: Option<mpsc::UnboundedSender<PubRun>>,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct PubRun {
    rate: f64,
    count: Option<u64>,
    stop: CancellationToken,
    done: oneshot::Sender<Result<RunReport>>,
}

#[derive(Debug, Clone, Copy)]
struct RunReport {
    published: u64,
    elapsed: Duration,
    max_lag: Duration,
}

impl PubThread {
    async fn start(topic: String, payload_bytes: usize) -> Result<PubThread> {
        let (tx, mut rx) = mpsc::unbounded_channel::<PubRun>();
        let (ready_tx, ready_rx) = oneshot::channel::<Result<String>>();
        let shutdown = CancellationToken::new();
        let sd = shutdown.clone();
        let thread = std::thread::Builder::new()
            .name("publisher".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return;
                    }
                };
                rt.block_on(async move {
                    let mut publisher = match harness::Publisher::bind().await {
                        Ok(p) => p,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(publisher.endpoint.clone()));
                    let mut payloads = PayloadGen::new(payload_bytes);
                    loop {
                        let run = tokio::select! {
                            r = rx.recv() => match r { Some(r) => r, None => return },
                            _ = sd.cancelled() => return,
                        };
                        let stop = run.stop.clone();
                        let result = tokio::select! {
                            r = publish_run(&mut publisher, &topic, &mut payloads, &run, &stop) => r,
                            _ = sd.cancelled() => return,
                        };
                        let _ = run.done.send(result);
                    }
                });
            })?;
        let endpoint = ready_rx.await.context("publisher thread died")??;
        Ok(PubThread {
            endpoint,
            tx: Some(tx),
            shutdown,
            thread: Some(thread),
        })
    }

    /// Publishes `count` messages (or until `stop`) at `rate` per second.
    fn run(
        &self,
        rate: f64,
        count: Option<u64>,
        stop: CancellationToken,
    ) -> oneshot::Receiver<Result<RunReport>> {
        let (done, rx) = oneshot::channel();
        if let Some(tx) = &self.tx {
            let _ = tx.send(PubRun {
                rate,
                count,
                stop,
                done,
            });
        }
        rx
    }
}

impl Drop for PubThread {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn publish_run(
    publisher: &mut harness::Publisher,
    topic: &str,
    payloads: &mut PayloadGen,
    run: &PubRun,
    stop: &CancellationToken,
) -> Result<RunReport> {
    let start = tokio::time::Instant::now();
    let mut max_lag = Duration::ZERO;
    let mut k = 0u64;
    while run.count.is_none_or(|c| k < c) && !stop.is_cancelled() {
        let due = start + Duration::from_secs_f64(k as f64 / run.rate);
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = stop.cancelled() => break,
        }
        max_lag = max_lag.max(tokio::time::Instant::now().saturating_duration_since(due));
        let payload = payloads.next();
        publisher.publish(topic, payload.as_bytes()).await?;
        k += 1;
    }
    Ok(RunReport {
        published: k,
        elapsed: start.elapsed(),
        max_lag,
    })
}

/// Realistic live sports-event JSON, about `target` bytes, different in every message (so the
/// compression ratio is what a live feed would get, not that of a repeated string).
struct PayloadGen {
    target: usize,
    seq: u64,
    rng: rand::rngs::StdRng,
}

impl PayloadGen {
    fn new(target: usize) -> Self {
        PayloadGen {
            target,
            seq: 0,
            rng: rand::rngs::StdRng::seed_from_u64(4711),
        }
    }

    fn next(&mut self) -> String {
        const EVENTS: &[&str] = &[
            "shot_on_target",
            "shot_off_target",
            "corner",
            "free_kick",
            "foul",
            "offside",
            "throw_in",
            "goal_kick",
            "yellow_card",
            "substitution",
            "save",
            "possession_change",
        ];
        const PLAYERS: &[(&str, &str, u8, &str)] = &[
            ("p-204", "Vinícius Júnior", 7, "home"),
            ("p-118", "Jude Bellingham", 5, "home"),
            ("p-331", "Kylian Mbappé", 9, "home"),
            ("p-077", "Federico Valverde", 8, "home"),
            ("p-512", "Erling Haaland", 9, "away"),
            ("p-530", "Phil Foden", 47, "away"),
            ("p-545", "Rodri", 16, "away"),
            ("p-561", "Bernardo Silva", 20, "away"),
        ];
        const PHRASES: &[&str] = &[
            "Pressing high up the pitch and forcing the defence back.",
            "A quick one-two on the left flank opens up space in the box.",
            "The keeper comes off his line to claim a dangerous cross.",
            "Patient build-up play from the back, probing for an opening.",
            "The referee waves play on after a coming-together in midfield.",
            "A long diagonal ball switches play to the right wing.",
            "The crowd roars as the home side win a corner.",
            "Tired legs now; both managers are looking at the bench.",
        ];
        self.seq += 1;
        let r = &mut self.rng;
        let seq = self.seq;
        let minute = 1 + (seq / 20) % 95;
        let (pid, pname, number, team) = PLAYERS[r.random_range(0..PLAYERS.len())];
        let event = EVENTS[r.random_range(0..EVENTS.len())];
        let (hs, as_) = ((seq / 700) % 5, (seq / 1100) % 4);
        let poss: u32 = r.random_range(38..63);
        let mut s = String::with_capacity(self.target + 128);
        // The core of the event, always present (~260 B).
        let _ = write!(
            s,
            concat!(
                r#"{{"event_id":"evt-4711-{seq:07}","match":{{"id":4711,"status":"{status}","#,
                r#""minute":{minute},"score":{{"home":{hs},"away":{as_}}}}},"#,
                r#""event":{{"seq":{seq},"type":"{event}","team":"{team}","#,
                r#""player":{{"id":"{pid}","name":"{pname}","number":{number}}},"#,
                r#""x":{x:.1},"y":{y:.1},"xg":{xg:.2}}}"#
            ),
            seq = seq,
            status = if minute <= 45 { "1H" } else { "2H" },
            minute = minute,
            hs = hs,
            as_ = as_,
            event = event,
            team = team,
            pid = pid,
            pname = pname,
            number = number,
            x = r.random_range(0.0..105.0f64),
            y = r.random_range(0.0..68.0f64),
            xg = r.random_range(0.0..0.8f64),
        );
        // Then whatever else fits, most useful first.
        let extras = [
            format!(
                r#","odds":{{"1x2":{{"home":{:.2},"draw":{:.2},"away":{:.2}}},"over_2_5":{:.2}}}"#,
                r.random_range(1.2..3.5f64),
                r.random_range(2.8..5.0f64),
                r.random_range(1.8..9.0f64),
                r.random_range(1.3..2.6f64),
            ),
            format!(
                r#","stats":{{"possession":[{poss},{}],"shots":[{},{}],"corners":[{},{}]}}"#,
                100 - poss,
                seq % 23,
                seq % 17,
                seq % 11,
                seq % 9,
            ),
            concat!(
                r#","teams":{"home":{"id":"t-541","name":"Real Madrid","short":"RMA"},"#,
                r#""away":{"id":"t-50","name":"Manchester City","short":"MCI"}}"#
            )
            .to_string(),
            concat!(
                r#","competition":{"id":"uefa-cl","name":"UEFA Champions League","#,
                r#""season":"2025/26","stage":"Round of 16"}"#
            )
            .to_string(),
        ];
        for extra in extras {
            if s.len() + extra.len() < self.target {
                s.push_str(&extra);
            }
        }
        // Pad with commentary up to the target size.
        let room = self.target.saturating_sub(s.len() + 17);
        if room > 0 {
            let mut text = String::with_capacity(room + 80);
            while text.len() < room {
                if !text.is_empty() {
                    text.push(' ');
                }
                text.push_str(PHRASES[r.random_range(0..PHRASES.len())]);
            }
            let mut cut = room.min(text.len());
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            let _ = write!(s, r#","commentary":"{text}""#);
        }
        s.push('}');
        s
    }
}

// ---------------------------------------------------------------------------------------------
// The worker child process.

struct WorkerProc {
    child: Option<Child>,
    pid: u32,
    dir: PathBuf,
    announce: PathBuf,
    log_path: PathBuf,
    keep_dir: bool,
}

impl WorkerProc {
    fn start(
        args: &Args,
        bin: &Path,
        endpoint: &str,
        deflate: bool,
        label: &str,
    ) -> Result<WorkerProc> {
        let dir = std::env::temp_dir().join(format!(
            "fanout_bench-{}-{label}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let announce = dir.join("announce.json");
        let log_path = dir.join("worker.log");
        let log = std::fs::File::create(&log_path)?;
        let mut cmd = match &args.worker_cpu {
            Some(cpus) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(cpus).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--admin-listen")
            .arg("127.0.0.1:0")
            .arg("--announce-file")
            .arg(&announce)
            .arg("--publisher")
            .arg(endpoint)
            .arg("--outbound-queue-bytes")
            .arg("67108864");
        if !deflate {
            cmd.arg("--no-compression");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(WorkerProc {
            pid: child.id(),
            child: Some(child),
            dir,
            announce,
            log_path,
            keep_dir: true,
        })
    }

    /// Waits for the announce file; returns the WebSocket and admin addresses.
    async fn wait_announce(&self, within: Duration) -> Result<(SocketAddr, SocketAddr)> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(text) = std::fs::read_to_string(&self.announce) {
                let v: serde_json::Value = serde_json::from_str(&text)
                    .with_context(|| format!("bad announce file: {text}"))?;
                let addr = |k: &str| -> Result<SocketAddr> {
                    v[k].as_str()
                        .with_context(|| format!("announce file has no {k:?}: {text}"))?
                        .parse()
                        .with_context(|| format!("bad {k:?} address in {text}"))
                };
                return Ok((addr("ws")?, addr("admin")?));
            }
            if !Path::new(&format!("/proc/{}", self.pid)).exists() || self.exited() {
                bail!("worker exited before announcing its ports");
            }
            if Instant::now() >= deadline {
                bail!("worker did not write its announce file within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn exited(&self) -> bool {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) else {
            return true;
        };
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X'))
    }

    fn log_hint(&self) -> String {
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "worker log {} (kept); last lines:\n{}",
            self.log_path.display(),
            tail.join("\n")
        )
    }

    /// Kills the worker now (the drain would take minutes with thousands of clients) and
    /// removes its files unless `keep_dir`. Dropped without this (errors), the files stay.
    fn stop(mut self, keep_dir: bool) {
        self.keep_dir = keep_dir;
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.keep_dir {
            eprintln!("worker files kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// /proc and admin metrics.

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|&t| t > 0.0)
        .unwrap_or(100.0)
}

/// utime + stime in clock ticks of `/proc/<pid>/stat` (`pid` may be `self`).
fn proc_cpu_ticks(pid: &str) -> Result<u64> {
    let (user, system) = proc_cpu_split(pid)?;
    Ok(user + system)
}

/// (utime, stime) in clock ticks of `/proc/<pid>/stat`.
fn proc_cpu_split(pid: &str) -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let (_, rest) = stat.rsplit_once(") ").context("bad /proc stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    ensure!(f.len() > 13, "short /proc/{pid}/stat");
    Ok((f[11].parse()?, f[12].parse()?))
}

/// A numeric field of `/proc/<pid>/status` (kB for memory fields).
fn proc_status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// Busy (non-idle, non-iowait) clock ticks of all CPUs, from `/proc/stat`.
fn machine_busy_ticks() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    ensure!(f.len() >= 5, "short /proc/stat");
    Ok(f.iter().sum::<u64>() - f[3] - f[4])
}

fn cpus_allowed(pid: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|s| s.trim().to_string())
}

fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

struct Scrape(String);

impl Scrape {
    fn get(&self, name: &str) -> f64 {
        metric_value(&self.0, name)
    }
}

async fn scrape(admin: SocketAddr) -> Result<Scrape> {
    let (status, body) = http_request(admin, "GET", "/metrics").await?;
    ensure!(status == 200, "GET /metrics answered {status}");
    Ok(Scrape(body))
}

/// Worker counters over the measurement window.
#[derive(Debug, Clone, Copy, Default)]
struct MetricsDelta {
    upstream_messages: f64,
    fanout_messages: f64,
    fanout_deliveries: f64,
    frames_written: f64,
    bytes_written: f64,
    socket_writes: f64,
    deflate_operations: f64,
    compression_in: f64,
    compression_out: f64,
    dropped: f64,
    slow_closes: f64,
}

impl MetricsDelta {
    fn between(a: &Scrape, b: &Scrape) -> Self {
        let d = |name: &str| b.get(name) - a.get(name);
        MetricsDelta {
            upstream_messages: d("worker_upstream_messages_total"),
            fanout_messages: d("worker_fanout_messages_total"),
            fanout_deliveries: d("worker_fanout_deliveries_total"),
            frames_written: d("worker_frames_written_total"),
            bytes_written: d("worker_bytes_written_total"),
            socket_writes: d("worker_socket_writes_total"),
            deflate_operations: d("worker_deflate_operations_total"),
            compression_in: d("worker_compression_input_bytes_total"),
            compression_out: d("worker_compression_output_bytes_total"),
            dropped: d("worker_dropped_deliveries_total"),
            slow_closes: d("worker_slow_client_closes_total"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Output.

fn thousands(v: u64) -> String {
    let digits = v.to_string().into_bytes();
    let groups: Vec<&str> = digits
        .rchunks(3)
        .rev()
        .map(|g| std::str::from_utf8(g).expect("ASCII digits"))
        .collect();
    groups.join(",")
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

fn print_outcome(args: &Args, o: &Outcome) {
    let m = &o.metrics;
    let pct = |a: f64, b: f64| if b > 0.0 { a / b * 100.0 } else { 0.0 };
    println!();
    println!(
        "== {}: {} subscribers on one topic, {} msg/s for {} s, ~{} B payload ==",
        o.label, o.subscribers, args.rate, args.seconds, args.payload_bytes
    );
    println!(
        "connect+subscribe        {} in {:.2} s ({:.0}/s); permessage-deflate negotiated by {}",
        o.subscribers,
        o.connect_time.as_secs_f64(),
        o.subscribers as f64 / o.connect_time.as_secs_f64(),
        o.negotiated_deflate
    );
    println!(
        "published                {} msgs in {:.2} s (max publisher lag {}); worker received {}",
        o.published,
        o.publish_elapsed.as_secs_f64(),
        ms(o.max_publish_lag.as_micros() as u64),
        m.upstream_messages
    );
    println!(
        "message                  {} B of JSON per message push",
        o.message_json_bytes
    );
    println!(
        "deliveries               {} of {} expected ({:.3}%){}",
        thousands(o.delivered),
        thousands(o.expected),
        pct(o.delivered as f64, o.expected as f64),
        if o.complete { "" } else { "  INCOMPLETE" }
    );
    let offered = (o.subscribers as u64 * u64::from(args.rate)) as f64;
    println!(
        "deliveries/s             {} (offered {}; first publish to last receive {:.3} s){}",
        thousands(o.deliveries_per_sec() as u64),
        thousands(offered as u64),
        o.deliver_span.as_secs_f64(),
        if o.deliveries_per_sec() < 0.95 * offered {
            "  NOT KEEPING UP"
        } else {
            ""
        }
    );
    let l = &o.latency;
    println!(
        "publish->receive         p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (n = {})",
        ms(l.p50_us),
        ms(l.p90_us),
        ms(l.p99_us),
        ms(l.p999_us),
        ms(l.max_us),
        thousands(l.count)
    );
    let s = &o.stats;
    println!(
        "offsets per subscriber   gaps {} (missing {}), dups {}, undelivered at end {}; \
         subscriber errors {}{}",
        s.gaps,
        s.missing,
        s.dups,
        s.tail_missing,
        o.sub_errors,
        o.first_sub_error
            .as_deref()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default()
    );
    println!(
        "worker CPU               {:.2} s over {:.2} s ({:.1}% of one core, {} threads) = {:.3} µs \
         per delivery ({:.0}% user, {:.0}% kernel)",
        o.worker_cpu.as_secs_f64(),
        o.wall.as_secs_f64(),
        pct(o.worker_cpu.as_secs_f64(), o.wall.as_secs_f64()),
        o.worker_threads
            .map_or_else(|| "?".to_string(), |t| t.to_string()),
        o.cpu_us_per_delivery(),
        pct(o.worker_user.as_secs_f64(), o.worker_cpu.as_secs_f64()),
        100.0 - pct(o.worker_user.as_secs_f64(), o.worker_cpu.as_secs_f64()),
    );
    println!(
        "bench (client) CPU       {:.2} s ({:.1}% of one core) = {:.3} µs per delivery",
        o.bench_cpu.as_secs_f64(),
        pct(o.bench_cpu.as_secs_f64(), o.wall.as_secs_f64()),
        o.bench_cpu.as_secs_f64() * 1e6 / o.delivered.max(1) as f64
    );
    let other =
        o.machine_busy.as_secs_f64() - o.worker_cpu.as_secs_f64() - o.bench_cpu.as_secs_f64();
    println!(
        "machine CPU              {:.1}% busy of {} CPUs; other processes used {:.2} s ({:.1}% of \
         one core){}",
        pct(
            o.machine_busy.as_secs_f64(),
            o.wall.as_secs_f64() * o.machine_cpus.max(1) as f64
        ),
        o.machine_cpus,
        other.max(0.0),
        pct(other.max(0.0), o.wall.as_secs_f64()),
        if other > 0.1 * o.wall.as_secs_f64() {
            "  (OTHER LOAD: figures are noisy)"
        } else {
            ""
        }
    );
    println!(
        "worker RSS               {:.1} MiB before, {:.1} MiB idle with {} connections \
         ({:.1} KiB per connection), {:.1} MiB after the window, {:.1} MiB 2 s later, peak \
         {:.1} MiB",
        o.rss_before_kib as f64 / 1024.0,
        o.rss_idle_kib as f64 / 1024.0,
        o.subscribers,
        o.rss_per_conn_kib(),
        o.rss_after_kib as f64 / 1024.0,
        o.rss_settled_kib as f64 / 1024.0,
        o.rss_peak_kib as f64 / 1024.0
    );
    println!(
        "wire                     {:.1} B per delivery (worker_bytes_written_total +{})",
        o.wire_bytes_per_delivery(),
        thousands(m.bytes_written as u64)
    );
    println!(
        "socket writes            {} ({:.3} per delivery, {:.2} frames per write); worker \
         queued {} deliveries, wrote {} frames",
        thousands(m.socket_writes as u64),
        m.socket_writes / o.worker_deliveries(),
        m.frames_written / m.socket_writes.max(1.0),
        thousands(m.fanout_deliveries as u64),
        thousands(m.frames_written as u64)
    );
    let expected_deflates = if o.negotiated_deflate > 0 {
        o.published as f64
    } else {
        0.0
    };
    println!(
        "deflate operations       {} for {} messages published ({} fanned out) {}",
        m.deflate_operations,
        o.published,
        m.fanout_messages,
        if m.deflate_operations == expected_deflates {
            "OK (once per message)".to_string()
        } else {
            format!("MISMATCH: expected {expected_deflates}")
        }
    );
    if o.negotiated_deflate > 0 {
        println!(
            "client inflations        {} distinct compressed payloads for {} messages ({} runtime \
             threads; > messages x threads would mean per-subscriber compression)",
            o.client_inflations, o.published, o.bench_threads
        );
    }
    if m.deflate_operations > 0.0 {
        println!(
            "compression              {:.0} B -> {:.0} B per message ({:.1}% of the JSON)",
            m.compression_in / m.deflate_operations,
            m.compression_out / m.deflate_operations,
            pct(m.compression_out, m.compression_in)
        );
    }
    println!(
        "worker drops             {} dropped deliveries, {} slow-consumer closes",
        m.dropped, m.slow_closes
    );
}

fn print_comparison(outcomes: &[Outcome]) {
    println!();
    println!("== comparison ==");
    let mut header = format!("{:<34}", "");
    for o in outcomes {
        let _ = write!(header, "{:>14}", o.label);
    }
    println!("{header}");
    let row = |name: &str, f: &dyn Fn(&Outcome) -> String| {
        let mut line = format!("{name:<34}");
        for o in outcomes {
            let _ = write!(line, "{:>14}", f(o));
        }
        println!("{line}");
    };
    row("subscribers", &|o| o.subscribers.to_string());
    row("messages published", &|o| o.published.to_string());
    row("deliveries", &|o| thousands(o.delivered));
    row(
        "deliveries/s",
        &|o| thousands(o.deliveries_per_sec() as u64),
    );
    row("worker CPU (% of one core)", &|o| {
        format!(
            "{:.1}",
            o.worker_cpu.as_secs_f64() / o.wall.as_secs_f64() * 100.0
        )
    });
    row("worker CPU µs/delivery", &|o| {
        format!("{:.3}", o.cpu_us_per_delivery())
    });
    row("bench CPU µs/delivery", &|o| {
        format!(
            "{:.3}",
            o.bench_cpu.as_secs_f64() * 1e6 / o.delivered.max(1) as f64
        )
    });
    row("other load (% of one core)", &|o| {
        let other =
            o.machine_busy.as_secs_f64() - o.worker_cpu.as_secs_f64() - o.bench_cpu.as_secs_f64();
        format!("{:.1}", other.max(0.0) / o.wall.as_secs_f64() * 100.0)
    });
    row("latency p50 (ms)", &|o| {
        format!("{:.2}", o.latency.p50_us as f64 / 1e3)
    });
    row("latency p99 (ms)", &|o| {
        format!("{:.2}", o.latency.p99_us as f64 / 1e3)
    });
    row("latency max (ms)", &|o| {
        format!("{:.2}", o.latency.max_us as f64 / 1e3)
    });
    row("worker RSS KiB/connection", &|o| {
        format!("{:.1}", o.rss_per_conn_kib())
    });
    row("worker RSS after window (MiB)", &|o| {
        format!("{:.1}", o.rss_settled_kib as f64 / 1024.0)
    });
    row("worker peak RSS (MiB)", &|o| {
        format!("{:.1}", o.rss_peak_kib as f64 / 1024.0)
    });
    row("wire bytes/delivery", &|o| {
        format!("{:.1}", o.wire_bytes_per_delivery())
    });
    row("socket writes/delivery", &|o| {
        format!("{:.3}", o.metrics.socket_writes / o.worker_deliveries())
    });
    row("deflate ops / messages", &|o| {
        format!("{}/{}", o.metrics.deflate_operations, o.published)
    });
    row("gaps / dups / undelivered", &|o| {
        format!("{}/{}/{}", o.stats.gaps, o.stats.dups, o.stats.tail_missing)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_monotonic_and_tight() {
        let mut prev = 0;
        for v in (0..1_000_000u64).step_by(7) {
            let i = Histogram::index(v);
            assert!(i >= prev);
            prev = i;
            let rep = Histogram::value(i);
            assert!(
                rep.abs_diff(v) as f64 <= (v as f64 * 0.016).max(1.0),
                "{v} -> {rep}"
            );
        }
    }

    #[test]
    fn reads_the_message_header() {
        let json = protocol::client::encode_message(
            "t\"ts\":1",
            Some(protocol::Position {
                epoch: 9,
                offset: 42,
            }),
            Some(1234),
            br#"{"ts":5,"offset":6}"#,
        );
        assert_eq!(message_header(&json), Some((42, 1234)));
        assert_eq!(message_header(br#"{"type":"ack"}"#), None);
    }

    #[test]
    fn payloads_are_json_near_the_target_size() {
        let mut g = PayloadGen::new(500);
        for _ in 0..100 {
            let p = g.next();
            serde_json::from_str::<serde_json::Value>(&p).unwrap();
            assert!((480..=520).contains(&p.len()), "{}: {p}", p.len());
        }
    }
}
