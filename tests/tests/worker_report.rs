//! Load reports as herald sees them: numbered reports naming the worker, following its clients;
//! a reply that drains the worker; herald down and back; refusals counted; peers named by
//! herald used for history. Herald is a small fake here that records what it receives.

use anyhow::{bail, Context, Result};
use harness::{eventually, Publisher, TestWorker};
use protocol::client::close;
use protocol::load::{LoadReport, ReportReply, WorkerState, REPORT_VERSION};
use serde_json::json;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(10);
const INTERVAL: Duration = Duration::from_millis(200);

/// What the fake herald answers to a report.
#[derive(Clone)]
enum Answer {
    Reply(ReportReply),
    Refuse(String),
}

fn reply(drain: bool, peers: &[String]) -> Answer {
    Answer::Reply(ReportReply {
        version: REPORT_VERSION,
        drain,
        peers: peers.to_vec(),
    })
}

/// Answers `POST /v1/reports` on 127.0.0.1 and records each report with its arrival time.
/// A body herald would refuse is answered 400 and recorded as a problem.
struct FakeHerald {
    addr: SocketAddr,
    reports: Arc<Mutex<Vec<(Instant, LoadReport)>>>,
    problems: Arc<Mutex<Vec<String>>>,
    answer: Arc<Mutex<Answer>>,
    accept: JoinHandle<()>,
}

impl FakeHerald {
    async fn bind() -> Result<FakeHerald> {
        FakeHerald::bind_at("127.0.0.1:0".parse()?).await
    }

    async fn bind_at(addr: SocketAddr) -> Result<FakeHerald> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let reports = Arc::new(Mutex::new(Vec::new()));
        let problems = Arc::new(Mutex::new(Vec::new()));
        let answer = Arc::new(Mutex::new(reply(false, &[])));
        let accept = tokio::spawn({
            let (reports, problems, answer) = (reports.clone(), problems.clone(), answer.clone());
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let (reports, problems, answer) =
                        (reports.clone(), problems.clone(), answer.clone());
                    tokio::spawn(async move {
                        let exchange = serve(stream, &reports, &problems, &answer);
                        if let Ok(Err(e)) = tokio::time::timeout(WAIT, exchange).await {
                            problems.lock().unwrap().push(e.to_string());
                        }
                    });
                }
            }
        });
        Ok(FakeHerald {
            addr,
            reports,
            problems,
            answer,
            accept,
        })
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn answer(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }

    fn reports(&self) -> Vec<LoadReport> {
        let reports = self.reports.lock().unwrap();
        reports.iter().map(|(_, r)| r.clone()).collect()
    }

    fn arrivals(&self) -> Vec<Instant> {
        self.reports
            .lock()
            .unwrap()
            .iter()
            .map(|(at, _)| *at)
            .collect()
    }

    /// Waits until a report received from now on satisfies `check`; returns it.
    async fn next_report(
        &self,
        what: &str,
        check: impl Fn(&LoadReport) -> bool,
    ) -> Result<LoadReport> {
        let from = self.reports.lock().unwrap().len();
        let mut found = None;
        eventually(WAIT, what, || {
            found = self.reports().into_iter().skip(from).find(&check);
            let done = found.is_some();
            async move { done }
        })
        .await?;
        Ok(found.expect("found"))
    }

    /// Herald refused nothing and every exchange was well-formed.
    fn assert_no_problems(&self) {
        let problems = self.problems.lock().unwrap();
        assert!(problems.is_empty(), "{problems:?}");
    }

    /// Stops listening (connections already accepted finish).
    async fn stop(self) {
        self.accept.abort();
        let _ = self.accept.await;
    }
}

/// One exchange: read the request, record the report, answer, close.
async fn serve(
    mut stream: TcpStream,
    reports: &Mutex<Vec<(Instant, LoadReport)>>,
    problems: &Mutex<Vec<String>>,
    answer: &Mutex<Answer>,
) -> Result<()> {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 || stream.read_buf(&mut buf).await? == 0 {
            bail!("incomplete request head");
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
    if !head.starts_with("post /v1/reports http/1.1\r\n") {
        bail!("unexpected request: {head}");
    }
    if !head.contains("\r\ncontent-type: application/json\r\n") {
        bail!("report without content-type application/json: {head}");
    }
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .context("no content-length")?
        .trim()
        .parse()?;
    while buf.len() < head_end + length {
        if stream.read_buf(&mut buf).await? == 0 {
            bail!("incomplete body");
        }
    }
    let (status, body) = match LoadReport::decode(&buf[head_end..head_end + length]) {
        Err(e) => {
            problems.lock().unwrap().push(e.to_string());
            ("400 Bad Request", e.to_string())
        }
        Ok(report) => {
            reports.lock().unwrap().push((Instant::now(), report));
            match answer.lock().unwrap().clone() {
                Answer::Reply(r) => ("200 OK", serde_json::to_string(&r)?),
                Answer::Refuse(reason) => ("400 Bad Request", reason),
            }
        }
    };
    let kind = if status.starts_with("200") {
        "application/json"
    } else {
        "text/plain"
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}

/// A worker reporting to `herald` every [`INTERVAL`].
async fn reporting_worker(
    herald: &str,
    tweak: impl FnOnce(&mut worker::Config),
) -> Result<TestWorker> {
    let herald = herald.to_string();
    TestWorker::start(|c| {
        c.herald = Some(herald);
        c.report_interval = INTERVAL;
        tweak(c);
    })
    .await
}

#[tokio::test]
async fn reports_arrive_numbered_name_the_worker_and_follow_its_clients() -> Result<()> {
    let herald = FakeHerald::bind().await?;
    let w = reporting_worker(&herald.url(), |c| {
        c.id = Some("w-report".into());
        c.instance_id = Some("i-0abc123".into());
        c.max_connections = 500;
        c.memory_budget = Some(3 << 30);
    })
    .await?;

    herald.next_report("six reports", |r| r.seq >= 6).await?;
    let reports = herald.reports();
    let seqs: Vec<u64> = reports.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    let first = &reports[0];
    assert_eq!(first.worker.id, "w-report");
    assert_eq!(first.worker.address, w.addr().to_string());
    assert_eq!(first.worker.admin_address, w.worker.admin_addr.to_string());
    assert_eq!(first.worker.instance_id.as_deref(), Some("i-0abc123"));
    assert_eq!(first.state, WorkerState::Ready);
    assert_eq!(first.interval_ms, 200);
    assert_eq!(first.max_connections, 500);
    assert_eq!(first.memory_budget_bytes, 3 << 30);
    assert!(first.rss_bytes > 0);
    assert!(
        reports.iter().all(|r| r.worker == first.worker),
        "one identity, one boot value for the life of the process"
    );
    // Waits are 160-240 ms; allow a busy machine to be late, never early by much.
    let arrivals = herald.arrivals();
    let span = arrivals[5] - arrivals[0];
    assert!(
        span >= Duration::from_millis(5 * 160 - 150)
            && span <= Duration::from_millis(5 * 240 + 3000),
        "five intervals took {span:?}"
    );

    let mut clients = Vec::new();
    for i in 0..3 {
        let mut c = w.client(false).await?;
        c.subscribe(&format!("t.{i}")).await?;
        clients.push(c);
    }
    let r = herald
        .next_report("a report with the three clients", |r| r.connections == 3)
        .await?;
    assert_eq!(r.subscriptions, 3);
    clients.truncate(1);
    herald
        .next_report("a report with one client left", |r| r.connections == 1)
        .await?;
    herald.assert_no_problems();
    assert!(w.metric("worker_reports_total{result=\"ok\"") >= 6.0);
    assert_eq!(w.metric("worker_herald_reachable"), 1.0);
    Ok(())
}

#[tokio::test]
async fn a_drain_reply_closes_clients_with_1012_and_reports_follow_the_drain() -> Result<()> {
    let herald = FakeHerald::bind().await?;
    let w = reporting_worker(&herald.url(), |_| {}).await?;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(w.client(false).await?);
    }
    herald
        .next_report("a report with the clients", |r| r.connections == 3)
        .await?;

    herald.answer(reply(true, &[]));
    for c in clients.iter_mut() {
        assert_eq!(c.expect_close().await?, close::SERVICE_RESTART);
    }
    herald
        .next_report("a draining report with no connections left", |r| {
            r.state == WorkerState::Draining && r.connections == 0
        })
        .await?;
    // Herald keeps saying drain; the worker keeps reporting and stays drained.
    let seq = herald.reports().last().unwrap().seq;
    herald
        .next_report("two more reports", |r| r.seq >= seq + 2)
        .await?;
    let reports = herald.reports();
    let drained_from = reports
        .iter()
        .position(|r| r.state == WorkerState::Draining)
        .unwrap();
    assert!(reports[drained_from..]
        .iter()
        .all(|r| r.state == WorkerState::Draining));
    assert_eq!(w.admin("GET", "/readyz").await?.0, 503);
    assert!(
        w.client(false).await.is_err(),
        "no new clients while drained"
    );
    herald.assert_no_problems();
    Ok(())
}

#[tokio::test]
async fn the_worker_serves_clients_while_herald_is_down_and_reports_again_when_it_is_back(
) -> Result<()> {
    // A port nobody listens on (yet).
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let w = reporting_worker(&format!("http://{addr}"), |_| {}).await?;
    eventually(WAIT, "failed reports counted", || {
        let failed = w.metric("worker_reports_total{result=\"failed\"");
        async move { failed >= 2.0 }
    })
    .await?;
    assert_eq!(w.metric("worker_herald_reachable"), 0.0);
    let mut c = w.client(false).await?;
    c.send_json(json!({"op": "ping", "id": 1})).await?;
    assert_eq!(c.recv_json().await?, json!({"type": "pong", "id": 1}));

    let herald = FakeHerald::bind_at(addr).await?;
    let r = herald
        .next_report("a report once herald is back", |_| true)
        .await?;
    assert!(
        r.seq > 2,
        "reports that failed took their numbers: {}",
        r.seq
    );
    assert_eq!(r.connections, 1);
    eventually(WAIT, "herald reachable again", || {
        let reachable = w.metric("worker_herald_reachable");
        async move { reachable == 1.0 }
    })
    .await?;
    assert!(w.metric("worker_reports_total{result=\"ok\"") >= 1.0);
    herald.assert_no_problems();
    herald.stop().await;
    Ok(())
}

#[tokio::test]
async fn refused_reports_are_counted_and_retried() -> Result<()> {
    let herald = FakeHerald::bind().await?;
    herald.answer(Answer::Refuse(
        "report field worker.id is invalid: test".into(),
    ));
    let w = reporting_worker(&herald.url(), |_| {}).await?;
    eventually(WAIT, "refusals counted", || {
        let refused = w.metric("worker_reports_total{result=\"refused\"");
        async move { refused >= 2.0 }
    })
    .await?;
    assert_eq!(w.metric("worker_reports_total{result=\"ok\""), 0.0);
    assert_eq!(w.metric("worker_herald_reachable"), 1.0, "herald answered");
    herald.answer(reply(false, &[]));
    eventually(WAIT, "accepted once herald accepts", || {
        let ok = w.metric("worker_reports_total{result=\"ok\"");
        async move { ok >= 1.0 }
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_worker_fills_history_from_peers_herald_names() -> Result<()> {
    let rule = "m.*,messages=100";
    let mut p = Publisher::bind().await?;
    let endpoint = p.endpoint.clone();
    let a = TestWorker::start(|c| {
        c.publishers = vec![endpoint.clone()];
        c.history = vec![rule.parse().expect("valid rule")];
    })
    .await?;
    // ZeroMQ's slow joiner: publish until the worker hears the publisher.
    let deadline = Instant::now() + WAIT;
    while a.metric("worker_upstream_messages_total") == 0.0 {
        if Instant::now() > deadline {
            bail!("the first worker never heard the publisher");
        }
        p.publish("m.warm", b"{}").await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 0..20 {
        p.publish("m.1", format!("{{\"n\":{i}}}").as_bytes())
            .await?;
    }
    eventually(WAIT, "history on the first worker", || {
        let n = a.metric("worker_history_messages");
        async move { n >= 21.0 }
    })
    .await?;

    // The second worker has no --peer: herald names the first (and, as herald may, itself).
    let herald = FakeHerald::bind().await?;
    let b = reporting_worker(&herald.url(), |c| {
        c.publishers = vec![endpoint.clone()];
        c.history = vec![rule.parse().expect("valid rule")];
    })
    .await?;
    assert_eq!(b.metric("worker_peers"), 0.0);
    let peers = vec![
        a.worker.admin_addr.to_string(),
        b.worker.admin_addr.to_string(),
    ];
    herald.answer(reply(false, &peers));
    eventually(WAIT, "the second worker knows its peer", || {
        let n = b.metric("worker_peers");
        async move { n == 1.0 }
    })
    .await?;

    let mut c = b.client(false).await?;
    let (ack, replayed) = c
        .subscribe_history(json!({"op": "subscribe", "id": 1, "topic": "m.1", "last": 20}))
        .await?;
    assert_eq!(ack["history"]["replayed"], 20, "{ack}");
    assert_eq!(replayed[19]["payload"]["n"], 19);
    assert!(b.metric("worker_peer_fetches_total{result=\"ok\"") >= 1.0);
    herald.assert_no_problems();
    Ok(())
}

#[tokio::test]
async fn settings_herald_cannot_use_stop_the_worker_at_start() -> Result<()> {
    let err = TestWorker::start(|c| c.herald = Some("herald:7000".into()))
        .await
        .err()
        .context("a URL without http:// must not start")?;
    assert!(err.to_string().contains("--herald"), "{err}");
    let err = TestWorker::start(|c| {
        c.herald = Some("http://127.0.0.1:7000".into());
        c.report_interval = Duration::from_millis(10);
    })
    .await
    .err()
    .context("an interval herald refuses must not start")?;
    assert!(err.to_string().starts_with("--report-interval"), "{err}");
    Ok(())
}
