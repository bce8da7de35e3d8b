//! What every pushfleet binary does the same way around its `run`: logging to stderr (text or
//! JSON, filtered by `RUST_LOG`) and stopping on signals. Behind the `process` feature, so
//! the wire types stay free of a runtime.

use tokio_util::sync::CancellationToken;

/// Logs to stderr as `text` or `json`, at `info` unless `RUST_LOG` says otherwise.
pub fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
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
