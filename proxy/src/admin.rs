//! The admin HTTP port: `GET /metrics` (Prometheus), `GET /healthz` (alive), `GET /readyz`
//! (accepting clients: fails while draining, so a load balancer stops sending new ones).

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
    let route = |s: Arc<Shared>, req| async move { route(&s, req) };
    protocol::process::serve_http(listener, shared, route, stop).await
}

fn route(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => metrics_response(shared.render_metrics()),
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => readiness(shared.draining.load(Ordering::Relaxed)),
        (_, "/metrics" | "/healthz" | "/readyz") => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "use GET for /metrics, /healthz and /readyz\n",
        ),
        (_, path) => text(
            StatusCode::NOT_FOUND,
            format!("no admin endpoint at {path}; try /metrics, /healthz, /readyz\n"),
        ),
    }
}
