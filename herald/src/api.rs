//! Herald's HTTP port:
//! - `POST /v1/reports`: a worker's [`LoadReport`]; answered with a [`ReportReply`] (drain,
//!   peers) or `400` with the reason (`413` past the size limit).
//! - `GET /v1/table[?generation=G&after=V&wait=30s]`: the routing table; a long poll when the
//!   caller's table is current (see `protocol::routing`).
//! - `GET /v1/status`: everything herald knows and decided, as JSON; `GET /`: the same as a
//!   page.
//! - `GET /metrics` (Prometheus), `GET /healthz`.
//!
//! [`ReportReply`]: protocol::load::ReportReply

use crate::server::Shared;
use crate::status;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use protocol::load::{LoadReport, MAX_REPORT_BYTES};
use protocol::process::{metrics_response, respond, text};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Longest long poll a proxy may ask for.
pub const MAX_TABLE_WAIT: Duration = Duration::from_secs(60);

/// Serves the HTTP port until `stop`.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    let route = |s: Arc<Shared>, req| async move { route(&s, req).await };
    protocol::process::serve_http(listener, shared, route, stop).await
}

async fn route(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    match (req.method(), path.as_str()) {
        (&Method::POST, "/v1/reports") => report(shared, req).await,
        (&Method::GET, "/v1/table") => table(shared, &query).await,
        (&Method::GET, "/v1/status") => {
            let body = status::json(&shared.control.lock(), Instant::now());
            respond(StatusCode::OK, "application/json", body)
        }
        (&Method::GET, "/") => respond(StatusCode::OK, "text/html; charset=utf-8", status::PAGE),
        (&Method::GET, "/metrics") => metrics_response(shared.metrics.render()),
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (_, "/v1/reports" | "/v1/table" | "/v1/status" | "/" | "/metrics" | "/healthz") => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "use POST for /v1/reports and GET for /v1/table, /v1/status, /, /metrics, /healthz\n",
        ),
        (_, path) => text(
            StatusCode::NOT_FOUND,
            format!(
                "no endpoint at {path}; try POST /v1/reports, GET /v1/table, /v1/status, /, \
                 /metrics, /healthz\n"
            ),
        ),
    }
}

async fn report(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let refused = |status, why: String| {
        shared.metrics.reports.with_label_values(&["refused"]).inc();
        tracing::warn!(%why, "report refused");
        text(status, format!("{why}\n"))
    };
    let body = match Limited::new(req.into_body(), MAX_REPORT_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return match e.downcast_ref::<http_body_util::LengthLimitError>() {
                Some(_) => refused(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("report is over the {MAX_REPORT_BYTES}-byte limit"),
                ),
                None => refused(StatusCode::BAD_REQUEST, format!("cannot read report: {e}")),
            };
        }
    };
    let report = match LoadReport::decode(&body) {
        Ok(r) => r,
        Err(e) => return refused(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let (id, address, state, boot) = (
        report.worker.id.clone(),
        report.worker.address.clone(),
        report.state,
        report.worker.boot,
    );
    let (reply, recorded) = shared.control.lock().report(report, Instant::now());
    shared
        .metrics
        .reports
        .with_label_values(&["accepted"])
        .inc();
    if recorded.new_process {
        tracing::info!(worker = %id, %address, ?state, boot, "worker reporting");
    }
    let body = serde_json::to_vec(&reply).expect("a reply always serialises");
    respond(StatusCode::OK, "application/json", body)
}

/// The query of a table request.
#[derive(Debug, Default, PartialEq)]
struct TableQuery {
    generation: Option<u64>,
    after: Option<u64>,
    wait: Duration,
}

fn parse_table_query(query: &str) -> Result<TableQuery, String> {
    let mut q = TableQuery::default();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        let number = |what: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("{what}={v:?} is not a whole number"))
        };
        match &*k {
            "generation" => q.generation = Some(number("generation")?),
            "after" => q.after = Some(number("after")?),
            "wait" => {
                let d = humantime::parse_duration(&v)
                    .map_err(|e| format!("wait={v:?} is not a duration like 30s: {e}"))?;
                if d > MAX_TABLE_WAIT {
                    return Err(format!(
                        "wait={v} is longer than the {MAX_TABLE_WAIT:?} limit"
                    ));
                }
                q.wait = d;
            }
            other => {
                return Err(format!(
                    "unknown parameter {other:?}; use generation, after, wait"
                ))
            }
        }
    }
    Ok(q)
}

async fn table(shared: &Shared, query: &str) -> Response<Full<Bytes>> {
    let q = match parse_table_query(query) {
        Ok(q) => q,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    let mut rx = shared.table.clone();
    let current = rx.borrow_and_update().clone();
    let is_current = |t: &protocol::routing::RoutingTable| {
        Some(t.generation) == q.generation && Some(t.version) == q.after
    };
    let table = if !q.wait.is_zero() && is_current(&current) {
        shared.metrics.table_watchers.inc();
        let _ = tokio::time::timeout(q.wait, rx.changed()).await;
        shared.metrics.table_watchers.dec();
        rx.borrow().clone()
    } else {
        current
    };
    Response::builder()
        .header("content-type", "application/json")
        .header("x-table-version", table.version)
        .header("x-table-generation", table.generation)
        .body(Full::new(Bytes::from(table.encode())))
        .expect("valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_queries_are_checked() {
        assert_eq!(parse_table_query(""), Ok(TableQuery::default()));
        assert_eq!(
            parse_table_query("generation=5&after=7&wait=30s"),
            Ok(TableQuery {
                generation: Some(5),
                after: Some(7),
                wait: Duration::from_secs(30),
            })
        );
        assert!(parse_table_query("wait=2m").unwrap_err().contains("limit"));
        assert!(parse_table_query("after=x").unwrap_err().contains("after"));
        assert!(parse_table_query("colour=red")
            .unwrap_err()
            .contains("unknown"));
    }
}
