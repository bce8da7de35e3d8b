//! What every pushfleet server does the same way around its `run`: loading its layered
//! configuration, logging to stderr (text or JSON, filtered by `RUST_LOG`), stopping on
//! signals, and serving a small HTTP port (admin, API). Behind the `process` feature, so the
//! wire types stay free of a runtime.

use crate::layered::{self, LayeredError};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A server binary's `main`: parses `C` (TOML file < environment < flags, the file named by
/// `--config`), starts logging in `log_format(&config)`, runs `run(config, shutdown)` on a
/// multi-threaded runtime with [`stop_on_signal`], and exits non-zero with `name: error` when
/// anything fails.
pub fn main<C, F, Fut, E>(name: &str, log_format: fn(&C) -> &str, run: F) -> std::process::ExitCode
where
    C: clap::Parser,
    F: FnOnce(C, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    main_from(name, std::env::args_os(), log_format, run)
}

/// As [`main`], from explicit arguments (the first is the program name): how one binary runs
/// another role's `main` (the local fleet launcher).
pub fn main_from<C, F, Fut, E, I>(
    name: &str,
    args: I,
    log_format: fn(&C) -> &str,
    run: F,
) -> std::process::ExitCode
where
    C: clap::Parser,
    F: FnOnce(C, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
    I: IntoIterator,
    I::Item: Into<std::ffi::OsString>,
{
    let config: C = match layered::parse_from(args, "config") {
        Ok(c) => c,
        Err(LayeredError::Cli(e)) => e.exit(),
        Err(e) => {
            eprintln!("{name}: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    init_logging(log_format(&config));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        run(config, shutdown).await
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "{name} failed");
            eprintln!("{name}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Serves HTTP/1.1 on `listener` until `stop`, answering every request with
/// `route(state, request)`. A client gets 10 s to send a request head; an accept error (out of
/// descriptors) pauses accepting for 50 ms instead of spinning.
pub async fn serve_http<S, F, Fut>(
    listener: TcpListener,
    state: std::sync::Arc<S>,
    route: F,
    stop: CancellationToken,
) where
    S: Send + Sync + 'static,
    F: Fn(std::sync::Arc<S>, Request<Incoming>) -> Fut + Copy + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let state = state.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let answer = route(state.clone(), req);
                async move { Ok::<_, Infallible>(answer.await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

/// The `host:port` of an `http://host:port[/]` URL (how binaries name herald); the error says
/// what is wrong.
pub fn parse_http_url(url: &str) -> Result<String, String> {
    let Some(rest) = url.strip_prefix("http://") else {
        return Err("must start with http:// (herald speaks plain HTTP)".into());
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#', '@']) || authority.chars().any(char::is_whitespace) {
        return Err("must be http://host:port with no path, query or user".into());
    }
    let Some((host, port)) = authority.rsplit_once(':') else {
        return Err("must name a port: http://host:port".into());
    };
    let bracketed = host.starts_with('[') && host.ends_with(']');
    if host.is_empty() || (host.contains(':') && !bracketed) || host == "[]" {
        return Err(format!("{host:?} is not a host name or address"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(authority.to_string()),
        _ => Err(format!("{port:?} is not a port number (1-65535)")),
    }
}

/// One HTTP/1.1 exchange on a new connection to `authority` (`host:port`): sends `request`
/// (with `Host` and `Connection: close` added) and reads the answer's status and body, the body
/// at most `max_body_bytes`. The caller bounds the time (`tokio::time::timeout`); the
/// connection task ends with the exchange.
pub async fn http_call(
    authority: &str,
    mut request: Request<Full<Bytes>>,
    max_body_bytes: usize,
) -> Result<(hyper::StatusCode, Bytes), String> {
    use http_body_util::{BodyExt, Limited};
    let stream = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|e| format!("cannot connect to {authority}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(conn);
    let headers = request.headers_mut();
    headers.insert(
        hyper::header::HOST,
        authority
            .parse()
            .map_err(|_| format!("{authority:?} is not a host"))?,
    );
    headers.insert(hyper::header::CONNECTION, "close".parse().expect("valid"));
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let body = Limited::new(response.into_body(), max_body_bytes)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        Ok((status, body))
    }
    .await;
    driver.abort();
    result
}

/// A response of `status` with `body` as `content_type`.
pub fn respond(
    status: hyper::StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("valid response")
}

/// `GET /metrics`: a Prometheus text exposition.
pub fn metrics_response(exposition: String) -> Response<Full<Bytes>> {
    respond(
        hyper::StatusCode::OK,
        "text/plain; version=0.0.4; charset=utf-8",
        exposition,
    )
}

/// `GET /readyz`: 200 `ready`, or 503 `draining` once a server stops taking new clients.
pub fn readiness(draining: bool) -> Response<Full<Bytes>> {
    if draining {
        text(hyper::StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else {
        text(hyper::StatusCode::OK, "ready\n")
    }
}

/// A plain-text response.
pub fn text(status: hyper::StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    respond(status, "text/plain; charset=utf-8", body.into())
}

/// Writes `text` to `path` through a temporary file renamed over it, so a reader (a supervisor
/// or test waiting for an announce file) never sees half of it.
pub fn write_atomically(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// Pending connections queued on admin and API ports (scrapers, load reports, table polls).
pub const ADMIN_BACKLOG: u32 = 1024;

/// Binds `addr` and listens with a queue of `backlog` pending connections (the kernel caps it
/// at `net.core.somaxconn`). The runtime's own bind queues only 128: a burst of new clients
/// beyond that is dropped by the kernel and each dropped client retries only after a second.
pub fn listen(addr: std::net::SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As the runtime's bind does: a restarted server rebinds at once past TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// A port that could not be bound.
#[derive(Debug)]
pub struct BindError {
    /// Which port: "client" or "admin".
    pub what: &'static str,
    /// The configured address.
    pub addr: std::net::SocketAddr,
    /// The OS error.
    pub source: std::io::Error,
}

/// Binds a server's client port, queueing `backlog` pending connections, and its admin port.
pub fn listen_client_and_admin(
    client: std::net::SocketAddr,
    backlog: u32,
    admin: std::net::SocketAddr,
) -> Result<(TcpListener, TcpListener), BindError> {
    let bind = |what, addr, backlog| {
        listen(addr, backlog).map_err(|source| BindError { what, addr, source })
    };
    Ok((
        bind("client", client, backlog)?,
        bind("admin", admin, ADMIN_BACKLOG)?,
    ))
}

/// Descriptors a server needs beyond its connections: listeners, log, peers, herald, ZeroMQ.
pub const SPARE_OPEN_FILES: u64 = 64;

/// Raises the soft limit on open files to the hard limit (the usual soft default, 1024, would
/// cap a server far below its configured connections) and warns when even that is below
/// `needed`, naming the setting (`what`) to lower. Returns the soft limit in force, if known.
pub fn ensure_open_files(needed: u64, what: &str) -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed by reference.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot read the open files limit");
        return None;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            tracing::info!(
                from = limit.rlim_cur,
                to = raised.rlim_cur,
                "raised the open files limit to its hard limit"
            );
            limit = raised;
        }
    }
    let soft: u64 = limit.rlim_cur;
    if soft < needed {
        tracing::warn!(
            limit = soft,
            needed,
            "the open files limit is below what {what} needs: connections past it fail \
             with \"too many open files\"; raise LimitNOFILE (systemd) or ulimit -n, or lower {what}"
        );
    }
    Some(soft)
}

/// Creates the series for each label value at 0, so they are scraped before the first event:
/// a rate then sees the first increment, and dashboards and alerts always have a series.
pub fn preset(counter: &prometheus::IntCounterVec, values: &[&str]) {
    for value in values {
        counter.with_label_values(&[value]);
    }
}

/// The Prometheus text exposition of every metric in `registry`.
pub fn render_metrics(registry: &prometheus::Registry) -> String {
    use prometheus::Encoder;
    let mut out = Vec::new();
    prometheus::TextEncoder::new()
        .encode(&registry.gather(), &mut out)
        .expect("text encoding cannot fail");
    String::from_utf8(out).expect("exposition is UTF-8")
}

/// Logs to stderr as `text` or `json`, at `info` unless `RUST_LOG` says otherwise.
pub fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,zeromq=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A closed stderr (the supervisor holding the pipe died) must not stop the server:
        // by default a failed write is reported with eprintln!, which panics on it.
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// First SIGTERM/SIGINT: cancel `shutdown` (a graceful stop). Second: exit at once.
pub async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    let mut int = signal(SignalKind::interrupt()).expect("signal handler");
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!("signal received: stopping gracefully (send again to stop at once)");
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::warn!("second signal: stopping now");
    std::process::exit(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel completes handshakes for as many connections as the queue holds, accepted or
    /// not; past the queue it drops them (the runtime's own bind queued only 128).
    #[tokio::test]
    async fn listen_queues_the_backlog_it_is_given() {
        let listener = listen("127.0.0.1:0".parse().unwrap(), 600).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut held = Vec::new();
        for i in 0..400 {
            let stream = tokio::time::timeout(
                Duration::from_millis(500),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            .unwrap_or_else(|_| panic!("connection {i} was not queued"))
            .unwrap();
            held.push(stream);
        }
        let (_, peer) = listener.accept().await.unwrap();
        assert_eq!(peer, held[0].local_addr().unwrap());
    }
}
