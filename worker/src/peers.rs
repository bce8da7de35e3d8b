//! Asking peer workers for history: `GET /history` on their admin port, body in the
//! [`protocol::backfill`] format. Used to fill a late-starting worker's history and to repair
//! holes (a message lost between a publisher and this worker).
//!
//! Peers are tried one after another (starting at a different one for each request, to spread
//! the load), each bounded by `timeout`; the first complete answer wins, otherwise the longest.
//! A bounded number of fetches run at once; the rest wait their turn.
//!
//! The list is dynamic: the configured `--peer`s plus the workers herald names in its replies
//! to load reports ([`Peers::learn`]). A fetch reads the list when it starts; the hub follows
//! changes ([`Peers::changes`]) to know whether there is anyone to ask at all.

use crate::history::FetchRequest;
use crate::metrics::Metrics;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::StatusCode;
use hyper_util::rt::TokioIo;
use protocol::backfill;
use protocol::publish::Published;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::net::TcpStream;
use tokio::sync::{watch, Semaphore};

/// Most fetches in flight at once.
const MAX_IN_FLIGHT: usize = 16;
/// Largest history body accepted from a peer.
const MAX_BODY_BYTES: usize = 256 << 20;

/// Why one peer could not answer.
#[derive(Debug, Error)]
pub enum PeerError {
    /// Connecting, sending or reading failed.
    #[error("{0}")]
    Io(String),
    /// The peer answered with an unexpected status.
    #[error("HTTP {0}")]
    Status(StatusCode),
    /// The body is not a valid history body.
    #[error("bad history body: {0}")]
    Body(#[from] backfill::BackfillError),
    /// No answer in time.
    #[error("timed out")]
    Timeout,
}

/// The peer workers' admin addresses and how to ask them.
#[derive(Clone)]
pub struct Peers {
    configured: Arc<Vec<String>>,
    /// The current list: `configured` plus what herald named last.
    addrs: Arc<watch::Sender<Arc<Vec<String>>>>,
    timeout: Duration,
    topic_limit: usize,
    in_flight: Arc<Semaphore>,
}

impl Peers {
    /// Peers at `addrs` (`host:port` of their admin ports).
    pub fn new(addrs: Vec<String>, timeout: Duration, topic_limit: usize) -> Self {
        Peers {
            addrs: Arc::new(watch::Sender::new(Arc::new(addrs.clone()))),
            configured: Arc::new(addrs),
            timeout,
            topic_limit,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        }
    }

    /// Whether there is anyone to ask.
    pub fn is_empty(&self) -> bool {
        self.addrs.borrow().is_empty()
    }

    /// The current list.
    pub fn current(&self) -> Arc<Vec<String>> {
        self.addrs.borrow().clone()
    }

    /// Follows changes of the list.
    pub fn changes(&self) -> watch::Receiver<Arc<Vec<String>>> {
        self.addrs.subscribe()
    }

    /// Replaces what herald named with `discovered`; see [`merge`]. Returns whether the list
    /// changed.
    pub fn learn(&self, discovered: &[String], own: &[&str], max_discovered: usize) -> bool {
        let merged = merge(&self.configured, discovered, own, max_discovered);
        self.addrs.send_if_modified(|current| {
            if **current == merged {
                return false;
            }
            *current = Arc::new(merged);
            true
        })
    }

    /// Asks the peers for what `req` describes; empty if none had anything.
    pub async fn fetch(&self, req: &FetchRequest, metrics: &Metrics) -> Vec<Published> {
        tokio::time::sleep(req.delay).await;
        let _permit = self.in_flight.acquire().await.expect("never closed");
        let path = history_path(req);
        let mut best: Vec<Published> = Vec::new();
        let addrs = self.current();
        let n = addrs.len();
        for i in 0..n {
            let addr = &addrs[(req.id as usize + i) % n];
            let result = tokio::time::timeout(self.timeout, self.get(addr, &path)).await;
            let result = result.unwrap_or(Err(PeerError::Timeout));
            let label = match &result {
                Ok(Some(_)) => "ok",
                Ok(None) => "not_found",
                Err(PeerError::Timeout) => "timeout",
                Err(_) => "error",
            };
            metrics.peer_fetches.with_label_values(&[label]).inc();
            match result {
                Ok(Some(messages)) => {
                    let complete = messages.len() >= req.limit || req.from.is_none();
                    if messages.len() > best.len() {
                        best = messages;
                    }
                    if complete {
                        break;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(peer = %addr, topic = %req.topic, error = %e, "history fetch from peer failed")
                }
            }
        }
        tracing::debug!(topic = %req.topic, from = ?req.from, got = best.len(), "history fetch done");
        best
    }

    /// One GET; `None` when the peer has no history for the topic (404/409).
    async fn get(&self, addr: &str, path: &str) -> Result<Option<Vec<Published>>, PeerError> {
        let io = |e: &dyn std::fmt::Display| PeerError::Io(e.to_string());
        let stream = TcpStream::connect(addr).await.map_err(|e| io(&e))?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| io(&e))?;
        tokio::spawn(conn);
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, addr)
            .body(Empty::<Bytes>::new())
            .map_err(|e| io(&e))?;
        let response = sender.send_request(request).await.map_err(|e| io(&e))?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND | StatusCode::CONFLICT => return Ok(None),
            other => return Err(PeerError::Status(other)),
        }
        let body = Limited::new(response.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|e| io(&*e))?
            .to_bytes();
        Ok(Some(backfill::decode(body, self.topic_limit)?))
    }
}

/// The peer list: every `configured` address, then the first `max_discovered` of
/// `discovered` that are new, leaving out this worker's own addresses (`own`) and anything that
/// is not `host:port` within [`protocol::load::MAX_NAME_BYTES`].
pub fn merge(
    configured: &[String],
    discovered: &[String],
    own: &[&str],
    max_discovered: usize,
) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(configured.len() + discovered.len());
    let plausible = |a: &str| {
        a.len() <= protocol::load::MAX_NAME_BYTES
            && a.rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
    };
    for a in configured {
        if !own.contains(&a.as_str()) && !out.contains(a) {
            out.push(a.clone());
        }
    }
    let mut added = 0;
    for a in discovered {
        if added == max_discovered {
            break;
        }
        if plausible(a) && !own.contains(&a.as_str()) && !out.contains(a) {
            out.push(a.clone());
            added += 1;
        }
    }
    out
}

/// `/history?topic=..&epoch=..&from=..&limit=..` for a fetch.
pub fn history_path(req: &FetchRequest) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    q.append_pair("topic", &req.topic);
    if let Some(epoch) = req.epoch {
        q.append_pair("epoch", &format!("{epoch:016x}"));
    }
    if let Some(from) = req.from {
        q.append_pair("from", &from.to_string());
    }
    q.append_pair("limit", &req.limit.to_string());
    format!("/history?{}", q.finish())
}

/// A parsed `GET /history` query.
#[derive(Debug, PartialEq, Eq)]
pub struct HistoryQuery {
    /// The topic.
    pub topic: String,
    /// Only this epoch.
    pub epoch: Option<u64>,
    /// From this offset.
    pub from: Option<u64>,
    /// Most messages.
    pub limit: usize,
}

/// Parses the query string of `GET /history`; the error names the parameter at fault.
pub fn parse_history_query(query: &str, max_limit: usize) -> Result<HistoryQuery, String> {
    let mut topic = None;
    let mut epoch = None;
    let mut from = None;
    let mut limit = max_limit;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "topic" => topic = Some(v.into_owned()),
            "epoch" => {
                epoch = Some(
                    protocol::position::parse_epoch(&v)
                        .ok_or_else(|| format!("epoch {v:?} is not 1 to 16 hex digits"))?,
                )
            }
            "from" => {
                from = Some(
                    v.parse()
                        .map_err(|_| format!("from {v:?} is not an offset"))?,
                )
            }
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .map_err(|_| format!("limit {v:?} is not a count"))?
                    .min(max_limit)
            }
            other => {
                return Err(format!(
                    "unknown parameter {other:?} (topic, epoch, from, limit)"
                ))
            }
        }
    }
    let topic = topic.ok_or("missing topic parameter")?;
    Ok(HistoryQuery {
        topic,
        epoch,
        from,
        limit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_round_trips_awkward_topics() {
        let req = FetchRequest {
            id: 1,
            topic: "a b&c=d/é%".into(),
            epoch: Some(0xab),
            from: Some(7),
            limit: 50,
            delay: Duration::ZERO,
        };
        let path = history_path(&req);
        let q = parse_history_query(path.strip_prefix("/history?").unwrap(), 1000).unwrap();
        assert_eq!(
            q,
            HistoryQuery {
                topic: "a b&c=d/é%".into(),
                epoch: Some(0xab),
                from: Some(7),
                limit: 50
            }
        );
        assert_eq!(
            parse_history_query("topic=x&limit=99999", 100)
                .unwrap()
                .limit,
            100
        );
        assert!(parse_history_query("limit=1", 10).is_err());
        assert!(parse_history_query("topic=x&epoch=zz", 10).is_err());
        assert!(parse_history_query("topic=x&epoch=%2B1", 10).is_err());
        assert!(parse_history_query("topic=x&from=-1", 10).is_err());
        assert!(parse_history_query("topic=x&colour=red", 10).is_err());
    }

    fn strings(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn merged_list_keeps_configured_peers_and_leaves_out_itself_and_nonsense() {
        let configured = strings(&["a:1", "me:9"]);
        let discovered = strings(&["b:2", "a:1", "me:9", "nonsense", ":3", "b:2", "c:3", "d:4"]);
        assert_eq!(
            merge(&configured, &discovered, &["me:9"], 2),
            strings(&["a:1", "b:2", "c:3"])
        );
        assert_eq!(merge(&configured, &[], &["me:9"], 2), strings(&["a:1"]));
    }

    #[test]
    fn learning_replaces_what_herald_said_before_and_reports_changes() {
        let peers = Peers::new(strings(&["a:1"]), Duration::from_secs(1), 256);
        let mut changes = peers.changes();
        assert!(peers.learn(&strings(&["b:2"]), &[], 10));
        assert!(changes.has_changed().unwrap());
        assert_eq!(**changes.borrow_and_update(), strings(&["a:1", "b:2"]));
        assert!(!peers.learn(&strings(&["b:2"]), &[], 10), "same list");
        assert!(!changes.has_changed().unwrap());
        assert!(peers.learn(&[], &[], 10));
        assert_eq!(*peers.current(), strings(&["a:1"]));
        let none = Peers::new(Vec::new(), Duration::from_secs(1), 256);
        assert!(none.is_empty());
        none.learn(&strings(&["b:2"]), &["x:1"], 10);
        assert!(!none.is_empty());
    }
}
