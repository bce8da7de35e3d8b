//! The whole fleet end to end: herald, three workers keeping history and reporting to it, a
//! publisher stamping positions, and the proxy placing clients by herald's table.
//!
//! ```text
//!  publisher ──ZeroMQ──▶ worker a, b, c ──reports──▶ herald ──table──▶ proxy ◀── 300 clients
//! ```
//!
//! Hundreds of clients connect through the proxy and subscribe with `last` (catching up on the
//! messages published before they came). Mid-way through a steady stream the worker holding
//! the most clients is killed (like `kill -9`). Every client that loses its connection
//! reconnects through the proxy with jittered backoff and resumes with `since` its last
//! position. The test proves, for every client: every offset of its topic arrives exactly once
//! and in order (no gap, no duplicate) up to the last one published; every resume is
//! `recovered`; no `gap` notice is ever sent; only the killed worker's clients lost their
//! connection, and they now sit on the survivors.

use anyhow::{bail, ensure, Context, Result};
use harness::fleet::{KillableWorker, TestHerald, TestProxy};
use harness::{eventually, Publisher, WsClient};
use protocol::Position;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

const WORKERS: [&str; 3] = ["a", "b", "c"];
const TOPICS: usize = 4;
const CLIENTS: usize = 300;
/// Messages per topic published before the clients connect (they catch up on them).
const PRELUDE: u64 = 20;
/// Messages per topic in all: offsets 0..MESSAGES.
const MESSAGES: u64 = 200;
/// The offset at which the busiest worker is killed (mid-way through the stream).
const KILL_AT: u64 = MESSAGES / 2;
/// One message per topic each round: 40 messages/s per topic, 160/s in all.
const ROUND: Duration = Duration::from_millis(25);
/// `last` on every subscribe: more than a topic ever holds, so a fresh start gets it all.
const LAST: u64 = 1000;
const REPORT_INTERVAL: Duration = Duration::from_millis(200);
/// Connection attempts per reconnect before a client gives up.
const CONNECT_ATTEMPTS: u32 = 20;
/// Connections one client may open in all (one, plus one per loss of its worker).
const MAX_SESSIONS: usize = 4;
/// Longest a subscribed client waits for its next frame: messages come every `ROUND`.
const STALL: Duration = Duration::from_secs(15);
const SETUP: Duration = Duration::from_secs(20);
/// Time for every client to reach the last offset once everything is published.
const FINISH: Duration = Duration::from_secs(40);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_through_the_proxy_survive_a_killed_worker_without_loss() -> Result<()> {
    let started = Instant::now();
    let herald = TestHerald::start_slots_only(REPORT_INTERVAL).await?;
    let mut publisher = Publisher::bind().await?;
    let mut workers = start_workers(&herald, &publisher.endpoint)?;
    until_workers_hear(&mut publisher, &workers).await?;
    eventually(SETUP, "herald lists the three workers", || async {
        herald
            .table()
            .await
            .is_ok_and(|t| t.eligible().count() == WORKERS.len())
    })
    .await?;
    let proxy = TestProxy::following(&herald.url()).await?;
    eventually(SETUP, "the proxy has herald's table", || async {
        proxy.knows_eligible(WORKERS.len())
    })
    .await?;
    let epoch = Position {
        epoch: publisher.epoch,
        offset: 0,
    }
    .epoch_hex()
    .to_string();

    // Before anyone connects: the first messages of every topic, caught up on with `last`.
    for offset in 0..PRELUDE {
        publish_round(&mut publisher, offset).await?;
    }
    let (subscribed_tx, mut subscribed) = mpsc::channel(CLIENTS);
    let mut clients = JoinSet::new();
    for index in 0..CLIENTS {
        let client = Client::new(index, topic(index % TOPICS), epoch.clone());
        clients.spawn(client.run(proxy.addr(), subscribed_tx.clone()));
    }
    drop(subscribed_tx);
    let placed = match until_subscribed(&mut subscribed).await {
        Ok(placed) => placed,
        Err(e) => return Err(first_failure(&mut clients).unwrap_or(e)),
    };
    let per_worker = count_by_worker(&placed);
    eprintln!("placed through the proxy: {per_worker:?}");
    ensure!(
        per_worker.len() > 1,
        "clients spread over more than one worker: {per_worker:?}"
    );
    let (victim, victims_clients) = busiest(&per_worker);

    // The steady stream; the busiest worker dies mid-way.
    let mut tick = tokio::time::interval(ROUND);
    for offset in PRELUDE..MESSAGES {
        tick.tick().await;
        if offset == KILL_AT {
            eprintln!("killing worker {victim} ({victims_clients} clients) at offset {offset}");
            kill(&mut workers, &victim);
        }
        publish_round(&mut publisher, offset).await?;
    }
    let published = started.elapsed();

    let logs = until_clients_finish(&mut clients).await?;
    check_every_client(&logs, &victim)?;
    let reconnects: usize = logs.iter().map(|l| l.workers.len() - 1).sum();
    let resumes: usize = logs.iter().map(|l| l.resumes.len()).sum();
    let refusals: usize = logs.iter().map(|l| l.refusals.len()).sum();
    let after = count_by_worker(
        &logs
            .iter()
            .map(|l| (l.index, l.workers.last().cloned().unwrap_or_default()))
            .collect::<Vec<_>>(),
    );
    let proxy_retries = proxy.metric("proxy_connect_retries_total");
    eprintln!(
        "{CLIENTS} clients on {TOPICS} topics, {MESSAGES} messages per topic ({} delivered), \
         {reconnects} reconnects, {resumes} resumes (all recovered), {refusals} refused connect \
         attempts, {proxy_retries} proxy dials retried on another worker; placed {per_worker:?} \
         before the kill, {after:?} after; published by {published:.1?}, all done in {:.1?}",
        logs.iter().map(|l| l.offsets.len()).sum::<usize>(),
        started.elapsed()
    );
    Ok(())
}

/// Three workers reporting to `herald`, subscribed to `publisher`, keeping history of `match.*`.
fn start_workers(herald: &TestHerald, publisher: &str) -> Result<Vec<KillableWorker>> {
    WORKERS
        .iter()
        .map(|id| {
            KillableWorker::start(id, &herald.url(), REPORT_INTERVAL, |c| {
                c.publishers = vec![publisher.to_string()];
                c.history = vec!["match.*,messages=1000".parse().expect("valid rule")];
            })
        })
        .collect()
}

/// Publishes on a warm-up topic until every worker has heard the publisher (ZeroMQ's slow
/// joiner: a subscription takes a moment to reach it), so none misses the test's topics.
async fn until_workers_hear(p: &mut Publisher, workers: &[KillableWorker]) -> Result<()> {
    let deadline = Instant::now() + SETUP;
    loop {
        p.publish("match.warm", b"{}").await?;
        let mut heard = 0;
        for w in workers {
            let (_, metrics) = harness::http_request(w.admin_addr, "GET", "/metrics").await?;
            if harness::metric_value(&metrics, "worker_upstream_messages_total") > 0.0 {
                heard += 1;
            }
        }
        if heard == workers.len() {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "only {heard} workers heard the publisher"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn topic(i: usize) -> String {
    format!("match.{i}")
}

/// Publishes the message at `offset` on every topic.
async fn publish_round(p: &mut Publisher, offset: u64) -> Result<()> {
    for t in 0..TOPICS {
        let payload = format!("{{\"topic\":{t},\"n\":{offset}}}");
        let position = p.publish(&topic(t), payload.as_bytes()).await?;
        ensure!(
            position.offset == offset,
            "stamped {position:?}, expected {offset}"
        );
    }
    Ok(())
}

/// Collects every client's first worker once all have subscribed.
async fn until_subscribed(
    rx: &mut mpsc::Receiver<(usize, String)>,
) -> Result<Vec<(usize, String)>> {
    let deadline = tokio::time::Instant::now() + SETUP;
    let mut placed = Vec::with_capacity(CLIENTS);
    while placed.len() < CLIENTS {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(p)) => placed.push(p),
            Ok(None) => bail!(
                "a client ended before subscribing ({} subscribed)",
                placed.len()
            ),
            Err(_) => bail!(
                "only {} of {CLIENTS} clients subscribed within {SETUP:?}",
                placed.len()
            ),
        }
    }
    Ok(placed)
}

/// The error of a client that has already failed, if any (a better story than a timeout).
fn first_failure(clients: &mut JoinSet<Result<Client>>) -> Option<anyhow::Error> {
    while let Some(joined) = clients.try_join_next() {
        match joined {
            Ok(Err(e)) => return Some(e),
            Err(e) => return Some(e.into()),
            Ok(Ok(_)) => {}
        }
    }
    None
}

fn count_by_worker(placed: &[(usize, String)]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for (_, worker) in placed {
        *counts.entry(worker.clone()).or_default() += 1;
    }
    counts
}

/// The worker holding the most clients, and how many.
fn busiest(per_worker: &BTreeMap<String, usize>) -> (String, usize) {
    per_worker
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(w, n)| (w.clone(), *n))
        .expect("clients were placed")
}

fn kill(workers: &mut [KillableWorker], id: &str) {
    workers
        .iter_mut()
        .find(|w| w.id == id)
        .expect("the victim is one of ours")
        .kill();
}

/// Waits, bounded, for every client task; fails with the first client's error.
async fn until_clients_finish(clients: &mut JoinSet<Result<Client>>) -> Result<Vec<Client>> {
    let deadline = tokio::time::Instant::now() + FINISH;
    let mut logs = Vec::with_capacity(CLIENTS);
    while let Some(joined) = tokio::time::timeout_at(deadline, clients.join_next())
        .await
        .with_context(|| {
            format!(
                "{} of {CLIENTS} clients reached the last offset within {FINISH:?}",
                logs.len()
            )
        })?
    {
        logs.push(joined??);
    }
    logs.sort_by_key(|l| l.index);
    Ok(logs)
}

/// The assertions about each client's whole life.
fn check_every_client(logs: &[Client], victim: &str) -> Result<()> {
    ensure!(logs.len() == CLIENTS, "{} client logs", logs.len());
    for log in logs {
        let who = format!(
            "client {} on {} via {:?}",
            log.index, log.topic, log.workers
        );
        check_contiguous(&log.offsets).with_context(|| who.clone())?;
        ensure!(
            log.notices.is_empty(),
            "{who} saw notices (no gap, reset or error is expected): {:?}",
            log.notices
        );
        for history in &log.resumes {
            ensure!(
                history["recovered"] == true,
                "{who}: a resume was not recovered: {history}"
            );
        }
        for (worker, why) in &log.drops {
            ensure!(
                worker == victim,
                "{who} lost its connection to {worker}, which was not killed: {why}"
            );
        }
        if log.workers[0] == victim {
            ensure!(
                log.workers.len() == 2 && log.drops.len() == 1 && log.resumes.len() == 1,
                "{who}: one loss, one reconnect, one resume expected (drops {:?}, resumes {:?})",
                log.drops,
                log.resumes
            );
            ensure!(
                log.workers[1] != victim,
                "{who} landed on the killed worker again"
            );
        } else {
            ensure!(
                log.workers.len() == 1,
                "{who}: a survivor's client kept its connection"
            );
        }
    }
    Ok(())
}

/// Offsets must be exactly 0, 1, ..., MESSAGES - 1: the first message of the topic (caught up
/// with `last`) to the last published, each once.
fn check_contiguous(offsets: &[u64]) -> Result<()> {
    for (i, (&got, want)) in offsets.iter().zip(0..).enumerate() {
        ensure!(
            got == want,
            "offset {got} where {want} was expected (after {:?}); {} offsets in all",
            &offsets[i.saturating_sub(3)..i],
            offsets.len()
        );
    }
    ensure!(
        offsets.len() as u64 == MESSAGES,
        "{} offsets received, {MESSAGES} published",
        offsets.len()
    );
    Ok(())
}

/// One simulated client: its topic, and what it saw over its whole life, however many
/// connections that took.
struct Client {
    index: usize,
    topic: String,
    /// The publisher's epoch, as the protocol writes it.
    epoch: String,
    /// The worker of each connection, in order (from its `welcome`).
    workers: Vec<String>,
    /// Offsets of every message received, in order of arrival.
    offsets: Vec<u64>,
    /// The position of the last message received, to resume from.
    position: Option<Value>,
    /// The `history` of each resume (a subscribe with `since`).
    resumes: Vec<Value>,
    /// Connections lost after the welcome: the worker and what the client saw.
    drops: Vec<(String, String)>,
    /// Failed connection attempts (e.g. the proxy's 502/503 while it learns a worker died).
    refusals: Vec<String>,
    /// Anything else the client was sent: gap, reset, error, a message of another epoch.
    notices: Vec<Value>,
}

/// How one connection ended.
enum SessionEnd {
    /// The last offset arrived.
    Done,
    /// The connection was lost (the worker behind it died): reconnect and resume.
    Lost(String),
}

impl Client {
    fn new(index: usize, topic: String, epoch: String) -> Client {
        Client {
            index,
            topic,
            epoch,
            workers: Vec::new(),
            offsets: Vec::new(),
            position: None,
            resumes: Vec::new(),
            drops: Vec::new(),
            refusals: Vec::new(),
            notices: Vec::new(),
        }
    }

    /// Connects through the proxy, subscribes, reads to the last offset; on a lost connection
    /// reconnects and resumes. Tells `subscribed` its first worker once its first ack came.
    async fn run(
        mut self,
        proxy: SocketAddr,
        subscribed: mpsc::Sender<(usize, String)>,
    ) -> Result<Client> {
        let mut subscribed = Some(subscribed);
        loop {
            ensure!(
                self.workers.len() < MAX_SESSIONS,
                "client {}: {} connections already ({:?}, drops {:?})",
                self.index,
                self.workers.len(),
                self.workers,
                self.drops
            );
            let mut c = self.connect(proxy).await?;
            let worker = self.workers.last().cloned().unwrap_or_default();
            let end = self
                .session(&mut c, &mut subscribed)
                .await
                .with_context(|| format!("client {} on {worker}", self.index))?;
            match end {
                SessionEnd::Done => return Ok(self),
                SessionEnd::Lost(why) => self.drops.push((worker, why)),
            }
        }
    }

    /// Connects through the proxy and reads the welcome, retrying with full-jitter
    /// exponential backoff (the proxy may refuse while it learns that a worker died).
    async fn connect(&mut self, proxy: SocketAddr) -> Result<WsClient> {
        for attempt in 0..CONNECT_ATTEMPTS {
            match connect_once(proxy, self.index.is_multiple_of(2)).await {
                Ok((c, worker)) => {
                    self.workers.push(worker);
                    return Ok(c);
                }
                Err(e) => {
                    self.refusals.push(format!("{e:#}"));
                    let cap_ms = (20u64 << attempt.min(6)).min(1000);
                    let wait = Duration::from_millis(rand::random_range(0..=cap_ms));
                    tokio::time::sleep(wait).await;
                }
            }
        }
        bail!(
            "client {}: no connection in {CONNECT_ATTEMPTS} attempts: {:?}",
            self.index,
            self.refusals
        )
    }

    /// Subscribes (resuming when it has a position) and reads until the last offset or the
    /// connection is lost. A stall is an error, not a loss.
    async fn session(
        &mut self,
        c: &mut WsClient,
        subscribed: &mut Option<mpsc::Sender<(usize, String)>>,
    ) -> Result<SessionEnd> {
        let mut request = json!({"op": "subscribe", "id": 1, "topic": self.topic, "last": LAST});
        if let Some(position) = &self.position {
            request["since"] = position.clone();
        }
        if let Err(e) = c.send_json(request).await {
            return Ok(SessionEnd::Lost(format!("subscribe not sent: {e:#}")));
        }
        let mut acked = false;
        // Our own timeout below tells a stall (an error) from a lost connection (a reconnect).
        c.read_timeout = STALL * 2;
        loop {
            let m = match tokio::time::timeout(STALL, c.recv_json()).await {
                Err(_) => bail!(
                    "no frame within {STALL:?} (acked {acked}, last offset {:?})",
                    self.offsets.last()
                ),
                Ok(Err(e)) => return Ok(SessionEnd::Lost(format!("{e:#}"))),
                Ok(Ok(m)) => m,
            };
            match (m["type"].as_str(), m["topic"] == self.topic.as_str()) {
                (Some("ack"), true) if !acked => {
                    acked = true;
                    if self.position.is_some() {
                        self.resumes.push(m["history"].clone());
                    }
                    if let Some(tx) = subscribed.take() {
                        let worker = self.workers[0].clone();
                        tx.send((self.index, worker)).await.ok();
                    }
                }
                (Some("message"), true)
                    if acked && m["position"]["epoch"] == self.epoch.as_str() =>
                {
                    let offset = m["position"]["offset"].as_u64().context("offset")?;
                    self.offsets.push(offset);
                    self.position = Some(m["position"].clone());
                    if offset + 1 == MESSAGES {
                        return Ok(SessionEnd::Done);
                    }
                }
                (Some("error"), _) => bail!("the worker answered with an error: {m}"),
                _ => self.notices.push(m),
            }
        }
    }
}

/// One connection attempt through the proxy: upgrade, then the welcome (naming the worker).
async fn connect_once(proxy: SocketAddr, deflate: bool) -> Result<(WsClient, String)> {
    let mut c = WsClient::connect(proxy, "/ws", deflate, &[]).await?;
    let welcome = c.recv_json().await?;
    ensure!(
        welcome["type"] == "welcome",
        "expected welcome, got {welcome}"
    );
    let worker = welcome["worker"]
        .as_str()
        .with_context(|| format!("welcome names its worker: {welcome}"))?
        .to_string();
    Ok((c, worker))
}
