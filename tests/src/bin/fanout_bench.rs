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
use harness::bench::feed::PubThread;
use harness::bench::procfs::{machine_cpus, proc_cpu_ticks, proc_status_kib, CpuSample};
use harness::bench::scrape::{scrape, Scrape};
use harness::bench::wire::{compressed_header, frame_bounds, message_header, READ_BUF};
use harness::bench::worker_child::{worker_bin, WorkerChild};
use harness::bench::{ms, thousands, wait_connected, Connecting};
use harness::WsClient;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;
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
    harness::bench::ensure_open_files(args.subscribers, "subscribers")?;
    harness::bench::block_on(run(args))?;
    Ok(())
}

async fn run(args: Args) -> Result<()> {
    let worker_bin = worker_bin(args.worker_bin.as_deref())?;
    let clk_tck =
        harness::bench::print_setup("fanout_bench", &worker_bin, args.worker_cpu.as_deref());
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
    let publisher = PubThread::start(args.payload_bytes).await?;
    let mut worker_args = vec![
        "--publisher".to_string(),
        publisher.endpoint.clone(),
        "--outbound-queue-bytes".to_string(),
        "67108864".to_string(),
    ];
    if !deflate {
        worker_args.push("--no-compression".to_string());
    }
    let (worker, ws_addr, admin) = WorkerChild::launch(
        worker_bin,
        args.worker_cpu.as_deref(),
        "fanout_bench",
        label,
        &worker_args,
    )
    .await?;
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
    let connecting = Connecting {
        connected: &shared.connected,
        errors: &shared.errors,
        first_error: &|| shared.first_error(),
    };
    let timeout = Duration::from_secs(args.connect_timeout_seconds);
    wait_connected(
        connecting,
        n,
        "subscriber(s)",
        connect_started,
        timeout,
        label,
    )
    .await?;
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
    let topics = std::slice::from_ref(&args.topic);
    let prime = publisher.run(topics, 50.0, None, prime_stop.clone());
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
            .run(topics, rate, Some(count), CancellationToken::new())
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
    let sample0 = CpuSample::take(worker.pid)?;
    let cpu0 = sample0.worker_ticks();
    let inflations0 = shared.inflations.load(Ordering::Acquire);
    let t0 = Instant::now();
    let t0_us = harness::publisher::now_us();
    eprintln!(
        "[{label}] window: {count} messages at {} msg/s to {n} subscribers ({} deliveries)",
        args.rate,
        thousands(expected)
    );
    let mut window = publisher.run(topics, rate, Some(count), CancellationToken::new());
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
    let cpu = CpuSample::take(worker.pid)?.since(&sample0, clk_tck);
    let inflations1 = shared.inflations.load(Ordering::Acquire);
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
        worker_cpu: cpu.worker,
        worker_user: cpu.worker_user,
        bench_cpu: cpu.bench,
        machine_busy: cpu.machine,
        machine_cpus: machine_cpus(),
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
                        compressed_header(payload, &shared.inflations, 1024)?
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
// Admin metrics.

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
}
