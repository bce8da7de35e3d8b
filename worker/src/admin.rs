//! The admin HTTP port: `GET /metrics` (Prometheus), `GET /healthz` (alive), `GET /readyz`
//! (accepting clients), `POST /drain` (close clients in staggered batches, stop accepting),
//! `GET /history?topic=..` (a topic's history for peer workers, see `protocol::backfill`).

use crate::history::SnapshotError;
use crate::hub::Command;
use crate::server::Shared;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use protocol::process::{metrics_response, readiness, text};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Serves the admin port until `stop`.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    let route = |s: Arc<Shared>, req| async move { route(&s, req).await };
    protocol::process::serve_http(listener, shared, route, stop).await
}

async fn route(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => metrics_response(shared.metrics.render()),
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => readiness(shared.draining.load(Ordering::Relaxed)),
        (&Method::GET, "/history") => history(shared, req.uri().query().unwrap_or("")).await,
        (&Method::POST, "/drain") => {
            let already = shared.draining.load(Ordering::Relaxed);
            shared.drain_requested.cancel();
            let body = serde_json::json!({
                "draining": true,
                "already_draining": already,
                "connections": shared.connections.lock().len(),
            });
            Response::builder()
                .status(StatusCode::ACCEPTED)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_string())))
                .expect("valid response")
        }
        (_, "/metrics" | "/healthz" | "/readyz" | "/drain" | "/history") => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "use GET for /metrics, /healthz, /readyz, /history and POST for /drain\n",
        ),
        (_, path) => text(
            StatusCode::NOT_FOUND,
            format!("no admin endpoint at {path}; try /metrics, /healthz, /readyz, /history, POST /drain\n"),
        ),
    }
}

/// `GET /history?topic=T[&epoch=E&from=N][&limit=L]`: 200 with a history body, 404 when this
/// worker has no history for the topic, 409 when its history is of another epoch.
async fn history(shared: &Shared, query: &str) -> Response<Full<Bytes>> {
    let q = match crate::peers::parse_history_query(query, shared.config.max_held.max(1)) {
        Ok(q) => q,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    let command = Command::PeerHistory {
        topic: q.topic,
        epoch: q.epoch,
        from: q.from,
        limit: q.limit,
        reply,
    };
    if shared.hub.send(command).await.is_err() {
        return text(StatusCode::SERVICE_UNAVAILABLE, "worker stopping\n");
    }
    match answer.await {
        Ok(Ok(body)) => Response::builder()
            .header("content-type", protocol::backfill::CONTENT_TYPE)
            .body(Full::new(Bytes::from(body)))
            .expect("valid response"),
        Ok(Err(SnapshotError::UnknownTopic)) => {
            text(StatusCode::NOT_FOUND, "no history for this topic here\n")
        }
        Ok(Err(SnapshotError::OtherEpoch(e))) => text(
            StatusCode::CONFLICT,
            format!("history here is of epoch {e:016x}\n"),
        ),
        Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "worker stopping\n"),
    }
}
