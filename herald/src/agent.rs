//! HAProxy agent-check server: feedback balancing for users who keep HAProxy in front of workers.
//!
//! ```text
//!  HAProxy ── connect, "w1\n" ──▶ serve ──▶ answer(request, current RoutingTable)
//!     ▲                                              │
//!     └──────────── "ready 57%\n", close ◀───────────┘   HAProxy sets w1's weight to 57
//! ```
//!
//! Every `agent-inter`, HAProxy connects to the agent, sends the server's `agent-send` string and
//! reads one line of words (HAProxy 2.6 configuration manual, `agent-check`). Herald answers from
//! the routing table it already publishes to proxies; the connection carries one request and
//! one reply.
//!
//! | request                          | reply                           | metric `answer` |
//! |----------------------------------|---------------------------------|-----------------|
//! | a worker in the table            | `ready <weight>%`               | `weight`        |
//! | a draining worker                | `drain`                         | `drain`         |
//! | an id not in the table, or none  | `ready 100% herald:not-in-table`| `unknown`       |
//! | empty, too long, not text        | `herald:bad-request:<why>`      | `bad_request`   |
//! | over [`AgentLimits::max_connections`] | none, closed at once       | `refused`       |
//!
//! What HAProxy does with each word (checked against HAProxy 2.6):
//! - `<n>%` sets the server's weight to `n`% of the weight in its `server` line (integer
//!   arithmetic, rounded down). `0%` takes the server out like a drain, so herald never sends
//!   less than [`MIN_WEIGHT_PERCENT`].
//! - `drain`: no new connections except persistent ones; established connections stay.
//! - `ready` clears the drain and maintenance states, which HAProxy shares between the agent
//!   and the CLI: it undoes herald's own earlier `drain`, and also an operator's
//!   `set server … state drain|maint` (see below).
//! - Words HAProxy does not know change nothing; the first is shown as the server's last agent
//!   check, "agent reports an error : <word>" (`last_agt` in `show stat`). Herald uses such
//!   words to make a misspelt `agent-send` or a bad request visible there.
//! - Herald never sends `up`, `down`, `fail`, `stopped` or `maint`: whether a server is alive
//!   is the health check's call (`check`), and a failed or refused agent check is not an error
//!   to HAProxy, so herald being away leaves every server as it was.
//!
//! # Configuring HAProxy
//!
//! ```text
//! backend pushfleet
//!     balance leastconn
//!     server w1 10.0.0.11:8080 weight 100 check agent-check agent-addr 10.0.0.5 agent-port 9103 agent-send "w1\n" agent-inter 2s
//!     server w2 10.0.0.12:8080 weight 100 check agent-check agent-addr 10.0.0.5 agent-port 9103 agent-send "w2\n" agent-inter 2s
//! ```
//!
//! - `agent-addr`/`agent-port`: herald's `--agent-listen` address (the agent is off unless set).
//! - `agent-send "<worker id>\n"`: the worker's `--id`, ended by a newline. Without it HAProxy
//!   sends nothing and herald cannot tell which worker is meant (it answers as for an unknown
//!   worker). A misspelt id shows as `herald:not-in-table` in the server's last agent check.
//! - `weight 100`: percentages apply to this weight and round down, so 100 (up to HAProxy's
//!   256) keeps 1% steps and keeps herald's 1% floor from becoming 0.
//! - `check`: keep HAProxy's own health check; herald sets weights and drains, never up/down.
//! - `balance leastconn` (or `roundrobin`): an algorithm that honours weight changes at run
//!   time. `static-rr` and map-based hashing ignore them.
//! - `agent-inter`: how often weights follow the table; the workers' report interval is a good
//!   value. It is also HAProxy's timeout for the agent's reply.
//!
//! To take a server out by hand, run `disable agent <backend>/<server>` on HAProxy's CLI first,
//! or herald's next `ready` undoes the manual drain or maintenance; `enable agent` hands the
//! server back to herald.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use protocol::load::MAX_NAME_BYTES;
use protocol::routing::RoutingTable;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::{timeout_at, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::metrics::Metrics;

/// Longest request read, bytes: the longest worker id plus CR LF. A request without a line end
/// within this many bytes is answered as a bad request.
pub const MAX_REQUEST_BYTES: usize = MAX_NAME_BYTES + 2;

/// Smallest weight sent, percent: HAProxy treats `0%` like a drain.
pub const MIN_WEIGHT_PERCENT: u8 = 1;

/// Bytes of an oversized request read and thrown away after the reply while waiting for the
/// peer to close: closing with unread bytes would reset the connection and could lose the reply
/// on its way. (A framed request leaves nothing unread: HAProxy sends only `agent-send`.)
const MAX_LINGER_BYTES: usize = 4096;

/// Pause after a failed accept: errors such as running out of file descriptors persist, and
/// the pause keeps the accept loop from spinning on them.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Bounds on the agent-check listener.
#[derive(Debug, Clone)]
pub struct AgentLimits {
    /// Agent-check connections served at once. A connection over the bound is closed at once
    /// without a reply and counted (`answer="refused"`); HAProxy treats that as no news and
    /// changes nothing.
    pub max_connections: usize,
    /// How long to wait for the request line; a peer that sends nothing for this long is
    /// answered as an unknown worker, one that sent part of a line as a bad request. Writing
    /// the reply is bounded by the same time.
    pub request_timeout: Duration,
}

impl Default for AgentLimits {
    fn default() -> Self {
        AgentLimits {
            max_connections: 1024,
            request_timeout: Duration::from_secs(2),
        }
    }
}

/// What one connection sent, framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<'a> {
    /// The bytes before the first CR or LF, or all bytes when the peer closed its side first.
    Line(&'a [u8]),
    /// Nothing before the peer closed its side or the request timeout passed.
    Silent,
    /// No line end within [`MAX_REQUEST_BYTES`].
    TooLong,
    /// Part of a line, then the request timeout passed.
    Unfinished,
}

/// How reading a request stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadEnd {
    /// The peer may still send more.
    Open,
    /// The peer closed its side.
    Closed,
    /// The request timeout passed.
    TimedOut,
}

/// Frames the bytes read so far; `None` while more may come and are needed.
pub fn frame(read: &[u8], end: ReadEnd) -> Option<Request<'_>> {
    if let Some(at) = read.iter().position(|&b| b == b'\r' || b == b'\n') {
        return Some(Request::Line(&read[..at]));
    }
    if read.len() >= MAX_REQUEST_BYTES {
        return Some(Request::TooLong);
    }
    match end {
        ReadEnd::Open => None,
        ReadEnd::Closed | ReadEnd::TimedOut if read.is_empty() => Some(Request::Silent),
        ReadEnd::Closed => Some(Request::Line(read)),
        ReadEnd::TimedOut => Some(Request::Unfinished),
    }
}

/// Why a request names no worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadRequest {
    /// An empty line.
    Empty,
    /// Longer than a worker id may be.
    TooLong,
    /// No line end before the request timeout.
    Unfinished,
    /// Not UTF-8.
    NotUtf8,
    /// Contains a control character (worker ids never do).
    ControlCharacter,
}

impl BadRequest {
    /// The reason as one word of the reply.
    pub fn word(self) -> &'static str {
        match self {
            BadRequest::Empty => "empty",
            BadRequest::TooLong => "too-long",
            BadRequest::Unfinished => "unfinished",
            BadRequest::NotUtf8 => "not-utf8",
            BadRequest::ControlCharacter => "control-character",
        }
    }
}

/// Herald's reply to one agent check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// A worker taking new connections: `ready <percent>%`. `ready` undoes a drain herald set
    /// earlier; the percentage is of the weight in HAProxy's `server` line.
    Weight {
        /// [`MIN_WEIGHT_PERCENT`]..=100.
        percent: u8,
    },
    /// A draining worker: `drain` — it keeps its connections and takes no new ones.
    Drain,
    /// No worker of that id in the table, or no id sent: `ready 100% herald:not-in-table`.
    ///
    /// The id is missing when herald just restarted (its table fills as workers report), while
    /// a new worker is not yet trusted, or when `agent-send` names no worker. Herald has no
    /// evidence against the server then, and herald being away must never take capacity away:
    /// `100%` restores the weight configured in HAProxy and `ready` undoes a drain herald may
    /// have set before it lost track. No `up`: herald never marks a server down, so it has
    /// nothing to undo, and liveness is the health check's call. The last word is not a keyword:
    /// HAProxy changes nothing for it and shows it as the server's last agent check, which
    /// makes a misspelt `agent-send` visible.
    NotInTable,
    /// A request that names no worker: `herald:bad-request:<why>`.
    ///
    /// HAProxy knows none of the words, so weight, drain and health stay as they were (check
    /// status "CHECKED", "No status change"); it shows "agent reports an error :
    /// herald:bad-request:<why>" as the server's last agent check. Answering beats closing
    /// silently, which HAProxy reports only as an empty response.
    BadRequest(BadRequest),
}

impl Answer {
    /// The reply line HAProxy reads, newline included.
    pub fn line(&self) -> String {
        match self {
            Answer::Weight { percent } => format!("ready {percent}%\n"),
            Answer::Drain => "drain\n".to_string(),
            Answer::NotInTable => "ready 100% herald:not-in-table\n".to_string(),
            Answer::BadRequest(why) => format!("herald:bad-request:{}\n", why.word()),
        }
    }

    /// The `answer` label of `herald_agent_answers_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Answer::Weight { .. } => "weight",
            Answer::Drain => "drain",
            Answer::NotInTable => "unknown",
            Answer::BadRequest(_) => "bad_request",
        }
    }
}

/// Decides the reply to one agent check from the current table.
pub fn answer(request: Request<'_>, table: &RoutingTable) -> Answer {
    let line = match request {
        Request::Line(line) => line,
        Request::Silent => return Answer::NotInTable,
        Request::TooLong => return Answer::BadRequest(BadRequest::TooLong),
        Request::Unfinished => return Answer::BadRequest(BadRequest::Unfinished),
    };
    let id = match worker_id(line) {
        Ok(id) => id,
        Err(why) => return Answer::BadRequest(why),
    };
    match table.worker(id) {
        None => Answer::NotInTable,
        Some(worker) if worker.draining => Answer::Drain,
        Some(worker) => Answer::Weight {
            percent: weight_percent(worker.weight),
        },
    }
}

/// A request line as a worker id, under the rule worker ids follow in load reports.
fn worker_id(line: &[u8]) -> Result<&str, BadRequest> {
    if line.is_empty() {
        return Err(BadRequest::Empty);
    }
    if line.len() > MAX_NAME_BYTES {
        return Err(BadRequest::TooLong);
    }
    let id = std::str::from_utf8(line).map_err(|_| BadRequest::NotUtf8)?;
    if id.chars().any(char::is_control) {
        return Err(BadRequest::ControlCharacter);
    }
    Ok(id)
}

/// A table weight (0..1) as a percentage of the configured weight, never below
/// [`MIN_WEIGHT_PERCENT`] nor above 100. A weight that is not a number gives 100: a broken
/// figure must not take capacity away.
pub fn weight_percent(weight: f64) -> u8 {
    if weight.is_nan() {
        return 100;
    }
    (weight * 100.0)
        .round()
        .clamp(f64::from(MIN_WEIGHT_PERCENT), 100.0) as u8
}

/// Serves HAProxy agent checks from `table` with [`AgentLimits::default`] until `stop`.
pub async fn serve(
    listener: TcpListener,
    table: watch::Receiver<Arc<RoutingTable>>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    serve_with_limits(listener, table, metrics, AgentLimits::default(), stop).await
}

/// Serves HAProxy agent checks from `table` until `stop`; returns once every connection closed.
pub async fn serve_with_limits(
    listener: TcpListener,
    table: watch::Receiver<Arc<RoutingTable>>,
    metrics: Arc<Metrics>,
    limits: AgentLimits,
    stop: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let tracker = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(%error, "agent check: accept failed");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                }
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics.agent_answers.with_label_values(&["refused"]).inc();
            debug!(%peer, max_connections = limits.max_connections,
                "agent check: over the connection limit, closed unanswered");
            continue;
        };
        let (conn_table, conn_metrics, conn_stop) = (table.clone(), metrics.clone(), stop.clone());
        let request_timeout = limits.request_timeout;
        tracker.spawn(async move {
            let _permit = permit;
            tokio::select! {
                _ = conn_stop.cancelled() => {}
                _ = check(stream, peer, &conn_table, &conn_metrics, request_timeout) => {}
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// One agent check: read the request, answer from the table as it is now, close.
async fn check(
    mut stream: TcpStream,
    peer: SocketAddr,
    table: &watch::Receiver<Arc<RoutingTable>>,
    metrics: &Metrics,
    request_timeout: Duration,
) {
    let mut read = [0u8; MAX_REQUEST_BYTES];
    let deadline = Instant::now() + request_timeout;
    let request = match read_request(&mut stream, &mut read, deadline).await {
        Ok(request) => request,
        Err(error) => {
            debug!(%peer, %error, "agent check: reading the request failed, closed unanswered");
            return;
        }
    };
    let answer = answer(request, &table.borrow());
    let line = answer.line();
    let deadline = Instant::now() + request_timeout;
    if let Err(error) = reply(&mut stream, line.as_bytes(), deadline).await {
        debug!(%peer, %error, "agent check: writing the reply failed");
        return;
    }
    metrics
        .agent_answers
        .with_label_values(&[answer.label()])
        .inc();
    let shown = match request {
        Request::Line(line) => String::from_utf8_lossy(line).escape_debug().to_string(),
        Request::Silent => "nothing".to_string(),
        Request::TooLong => format!("no line end within {MAX_REQUEST_BYTES} bytes"),
        Request::Unfinished => format!("no line end within {request_timeout:?}"),
    };
    debug!(%peer, request = %shown, reply = line.trim_end(), "agent check answered");
    if request == Request::TooLong {
        linger(&mut stream, deadline).await;
    }
}

/// Reads until a request is framed, the peer closes its side or `deadline` passes.
async fn read_request<'b>(
    stream: &mut TcpStream,
    read: &'b mut [u8; MAX_REQUEST_BYTES],
    deadline: Instant,
) -> io::Result<Request<'b>> {
    let mut len = 0;
    let end = loop {
        if frame(&read[..len], ReadEnd::Open).is_some() {
            break ReadEnd::Open;
        }
        // `frame` answers once the buffer is full, so there is room here.
        match timeout_at(deadline, stream.read(&mut read[len..])).await {
            Err(_) => break ReadEnd::TimedOut,
            Ok(Ok(0)) => break ReadEnd::Closed,
            Ok(Ok(n)) => len += n,
            Ok(Err(error)) => return Err(error),
        }
    };
    Ok(frame(&read[..len], end).expect("a request is framed once reading stopped"))
}

/// Writes the reply and closes the sending side.
async fn reply(stream: &mut TcpStream, line: &[u8], deadline: Instant) -> io::Result<()> {
    let write = async {
        stream.write_all(line).await?;
        stream.shutdown().await
    };
    timeout_at(deadline, write)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "reply not written in time"))?
}

/// Reads and drops the rest of an oversized request until the peer closes (HAProxy does once it
/// has the reply), at most [`MAX_LINGER_BYTES`] and until `deadline`.
async fn linger(stream: &mut TcpStream, deadline: Instant) {
    let mut sink = [0u8; 512];
    let mut left = MAX_LINGER_BYTES;
    while left > 0 {
        match timeout_at(deadline, stream.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use protocol::routing::{RoutedWorker, TABLE_VERSION};

    fn table(workers: &[(&str, f64, bool)]) -> RoutingTable {
        let mut workers: Vec<_> = workers
            .iter()
            .map(|&(id, weight, draining)| RoutedWorker {
                id: id.into(),
                address: "127.0.0.1:1".into(),
                instance_id: None,
                utilisation: 0.5,
                cost_per_connection: 0.0001,
                connections: 10,
                report_seq: 1,
                report_age_ms: 0,
                slow_start: 1.0,
                weight,
                draining,
            })
            .collect();
        workers.sort_by(|a, b| a.id.cmp(&b.id));
        RoutingTable {
            format: TABLE_VERSION,
            generation: 1,
            version: 1,
            built_at_ms: 0,
            report_interval_ms: 1000,
            workers,
        }
    }

    fn reply_to(request: &[u8], t: &RoutingTable) -> String {
        let request = frame(request, ReadEnd::Closed).expect("closed input is framed");
        answer(request, t).line()
    }

    #[test]
    fn a_known_worker_gets_its_weight_and_ready() {
        let t = table(&[("w1", 0.57, false), ("w2", 1.0, false)]);
        assert_eq!(reply_to(b"w1\n", &t), "ready 57%\n");
        assert_eq!(reply_to(b"w2\r\n", &t), "ready 100%\n");
        let a = answer(Request::Line(b"w1"), &t);
        assert_eq!(a, Answer::Weight { percent: 57 });
        assert_eq!(a.label(), "weight");
    }

    #[test]
    fn weights_never_reach_zero_nor_pass_full() {
        for (weight, percent) in [
            (0.0, 1),
            (0.004, 1),
            (0.006, 1),
            (0.016, 2),
            (0.25, 25),
            (0.999, 100),
            (1.0, 100),
            (3.0, 100),
            (-1.0, 1),
            (f64::INFINITY, 100),
            (f64::NEG_INFINITY, 1),
            (f64::NAN, 100),
        ] {
            assert_eq!(weight_percent(weight), percent, "weight {weight}");
        }
        let t = table(&[("w1", 0.0, false)]);
        assert_eq!(reply_to(b"w1\n", &t), "ready 1%\n");
    }

    #[test]
    fn a_draining_worker_is_drained() {
        let t = table(&[("w1", 0.8, true)]);
        let a = answer(Request::Line(b"w1"), &t);
        assert_eq!(a, Answer::Drain);
        assert_eq!(a.line(), "drain\n");
        assert_eq!(a.label(), "drain");
    }

    #[test]
    fn an_unknown_or_missing_id_leaves_the_server_ready_at_full_weight() {
        let t = table(&[("w1", 0.3, true)]);
        for request in [Request::Line(b"w9"), Request::Line(b"W1"), Request::Silent] {
            let a = answer(request, &t);
            assert_eq!(a, Answer::NotInTable, "{request:?}");
            assert_eq!(a.line(), "ready 100% herald:not-in-table\n");
            assert_eq!(a.label(), "unknown");
        }
        assert_eq!(answer(Request::Silent, &table(&[])), Answer::NotInTable);
    }

    #[test]
    fn bad_requests_change_nothing() {
        let t = table(&[("w1", 0.3, false)]);
        let long_id = [b'a'; MAX_NAME_BYTES + 1];
        let cases: [(Request, BadRequest); 6] = [
            (Request::Line(b""), BadRequest::Empty),
            (Request::Line(&long_id), BadRequest::TooLong),
            (Request::TooLong, BadRequest::TooLong),
            (Request::Unfinished, BadRequest::Unfinished),
            (Request::Line(b"w\xff1"), BadRequest::NotUtf8),
            (Request::Line(b"w1\x00"), BadRequest::ControlCharacter),
        ];
        for (request, why) in cases {
            let a = answer(request, &t);
            assert_eq!(a, Answer::BadRequest(why), "{request:?}");
            assert_eq!(a.label(), "bad_request");
            assert_eq!(a.line(), format!("herald:bad-request:{}\n", why.word()));
        }
        assert_eq!(reply_to(b"\n", &t), "herald:bad-request:empty\n");
        // The longest valid id still fits in a request.
        let longest = "a".repeat(MAX_NAME_BYTES);
        let t = table(&[(&longest, 0.5, false)]);
        assert_eq!(
            reply_to(format!("{longest}\r\n").as_bytes(), &t),
            "ready 50%\n"
        );
    }

    #[test]
    fn framing_stops_at_the_first_line_end() {
        use ReadEnd::*;
        assert_eq!(frame(b"w1\nrest", Open), Some(Request::Line(b"w1")));
        assert_eq!(frame(b"w1\r\n", Open), Some(Request::Line(b"w1")));
        assert_eq!(frame(b"w1\r", Open), Some(Request::Line(b"w1")));
        assert_eq!(frame(b"\n", Open), Some(Request::Line(b"")));
        assert_eq!(frame(b"w1", Open), None);
        assert_eq!(frame(b"", Open), None);
        assert_eq!(frame(b"w1", Closed), Some(Request::Line(b"w1")));
        assert_eq!(frame(b"", Closed), Some(Request::Silent));
        assert_eq!(frame(b"", TimedOut), Some(Request::Silent));
        assert_eq!(frame(b"w1", TimedOut), Some(Request::Unfinished));
        let full = [b'x'; MAX_REQUEST_BYTES];
        assert_eq!(frame(&full, Open), Some(Request::TooLong));
        assert_eq!(frame(&full[..MAX_REQUEST_BYTES - 1], Open), None);
    }

    /// The words of an agent reply as HAProxy 2.6 splits them: up to the first CR or LF, on
    /// spaces, tabs and commas.
    fn haproxy_words(line: &str) -> Vec<&str> {
        let end = line.find(['\r', '\n']).expect("a line end");
        line[..end]
            .split([' ', '\t', ','])
            .filter(|w| !w.is_empty())
            .collect()
    }

    proptest! {
        #[test]
        fn every_reply_is_one_line_haproxy_reads_as_intended(
            id in "[a-z0-9-]{1,12}",
            asked in "[a-z0-9-]{0,12}",
            weight in proptest::num::f64::ANY,
            draining in any::<bool>(),
        ) {
            let t = table(&[(&id, weight, draining)]);
            let line = answer(Request::Line(asked.as_bytes()), &t).line();
            prop_assert!(line.ends_with('\n'));
            prop_assert_eq!(line.matches(['\r', '\n']).count(), 1);
            prop_assert!(!line.contains('#'));
            let words = haproxy_words(&line);
            if asked == id && draining {
                prop_assert_eq!(words, ["drain"]);
            } else if asked.is_empty() {
                prop_assert_eq!(words.len(), 1);
                prop_assert!(words[0].starts_with("herald:"));
            } else {
                prop_assert_eq!(words[0], "ready");
                let percent: u32 = words[1].strip_suffix('%').unwrap().parse().unwrap();
                prop_assert!((1..=100).contains(&percent));
                // The diagnostic word must not be one HAProxy acts on.
                for word in &words[2..] {
                    prop_assert!(word.starts_with("herald:"));
                }
            }
        }
    }

    /// A running agent on loopback, answering from a table the test holds.
    struct Agent {
        addr: SocketAddr,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
        served: tokio::task::JoinHandle<()>,
        _table: watch::Sender<Arc<RoutingTable>>,
    }

    async fn start(t: RoutingTable, limits: AgentLimits) -> Agent {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(Arc::new(t));
        let metrics = Arc::new(Metrics::new());
        let stop = CancellationToken::new();
        let served = tokio::spawn(serve_with_limits(
            listener,
            rx,
            metrics.clone(),
            limits,
            stop.clone(),
        ));
        Agent {
            addr,
            metrics,
            stop,
            served,
            _table: tx,
        }
    }

    impl Agent {
        fn count(&self, answer: &str) -> u64 {
            self.metrics
                .agent_answers
                .with_label_values(&[answer])
                .get()
        }
    }

    /// Everything the agent sends until it closes (bounded by a deadline).
    async fn read_all(stream: &mut TcpStream) -> String {
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
            .await
            .expect("the agent closes in time")
            .expect("read");
        String::from_utf8(out).unwrap()
    }

    #[tokio::test]
    async fn serve_answers_one_check_per_connection() {
        let agent = start(table(&[("w1", 0.57, false)]), AgentLimits::default()).await;
        for _ in 0..2 {
            let mut c = TcpStream::connect(agent.addr).await.unwrap();
            c.write_all(b"w1\n").await.unwrap();
            assert_eq!(read_all(&mut c).await, "ready 57%\n");
        }
        assert_eq!(agent.count("weight"), 2);
    }

    #[tokio::test]
    async fn a_peer_that_sends_nothing_gets_the_unknown_answer() {
        let limits = AgentLimits {
            request_timeout: Duration::from_millis(100),
            ..AgentLimits::default()
        };
        let agent = start(table(&[("w1", 0.5, false)]), limits).await;
        // Closing its side without a request: answered at once.
        let mut c = TcpStream::connect(agent.addr).await.unwrap();
        c.shutdown().await.unwrap();
        assert_eq!(read_all(&mut c).await, "ready 100% herald:not-in-table\n");
        // Silence until the request timeout.
        let mut c = TcpStream::connect(agent.addr).await.unwrap();
        assert_eq!(read_all(&mut c).await, "ready 100% herald:not-in-table\n");
        // Part of a line until the timeout.
        let mut c = TcpStream::connect(agent.addr).await.unwrap();
        c.write_all(b"w1").await.unwrap();
        assert_eq!(read_all(&mut c).await, "herald:bad-request:unfinished\n");
        assert_eq!(agent.count("unknown"), 2);
        assert_eq!(agent.count("bad_request"), 1);
    }

    #[tokio::test]
    async fn an_oversized_request_still_gets_its_reply() {
        let agent = start(table(&[]), AgentLimits::default()).await;
        let mut c = TcpStream::connect(agent.addr).await.unwrap();
        let mut request = vec![b'x'; 3 * MAX_REQUEST_BYTES];
        request.push(b'\n');
        c.write_all(&request).await.unwrap();
        c.shutdown().await.unwrap();
        assert_eq!(read_all(&mut c).await, "herald:bad-request:too-long\n");
        assert_eq!(agent.count("bad_request"), 1);
    }

    #[tokio::test]
    async fn connections_over_the_limit_are_closed_unanswered_and_counted() {
        let limits = AgentLimits {
            max_connections: 1,
            ..AgentLimits::default()
        };
        let agent = start(table(&[("w1", 0.5, false)]), limits).await;
        // The first connection holds the only permit while it has not sent its request: the
        // agent accepts in order, so it is taken before the second connection is accepted.
        let mut first = TcpStream::connect(agent.addr).await.unwrap();
        let mut second = TcpStream::connect(agent.addr).await.unwrap();
        assert_eq!(read_all(&mut second).await, "");
        assert_eq!(agent.count("refused"), 1);
        first.write_all(b"w1\n").await.unwrap();
        assert_eq!(read_all(&mut first).await, "ready 50%\n");
        drop(first);
        // The permit comes back when the first check's task ends, which the test cannot see:
        // retry until a check is answered again.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut again = TcpStream::connect(agent.addr).await.unwrap();
            let _ = again.write_all(b"w1\n").await;
            let mut reply = Vec::new();
            let _ = again.read_to_end(&mut reply).await;
            if reply == b"ready 50%\n" {
                break;
            }
            assert!(Instant::now() < deadline, "the agent never served again");
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn stop_ends_serving_with_connections_open() {
        let agent = start(table(&[("w1", 0.5, false)]), AgentLimits::default()).await;
        let mut open = TcpStream::connect(agent.addr).await.unwrap();
        open.write_all(b"w").await.unwrap();
        // Connections are accepted in order: once this one is answered, `open` is being served.
        let mut probe = TcpStream::connect(agent.addr).await.unwrap();
        probe.write_all(b"w1\n").await.unwrap();
        assert_eq!(read_all(&mut probe).await, "ready 50%\n");
        agent.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), agent.served)
            .await
            .expect("serve returns after stop")
            .unwrap();
        // Closed unanswered (an end of stream, or a reset if "w" was still unread).
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(10), open.read_to_end(&mut rest))
            .await
            .expect("closed in time");
        assert!(rest.is_empty(), "no reply after stop: {rest:?} {closed:?}");
    }
}
