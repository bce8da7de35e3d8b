//! `worker`: see `worker --help` and the crate docs.

use protocol::layered::{self, LayeredError};
use tokio_util::sync::CancellationToken;
use worker::Config;

fn main() -> anyhow::Result<()> {
    let config: Config = match layered::parse("config") {
        Ok(c) => c,
        Err(LayeredError::Cli(e)) => e.exit(),
        Err(e) => {
            eprintln!("worker: {e}");
            std::process::exit(2);
        }
    };
    init_logging(&config.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        worker::run(config, shutdown).await
    })?;
    Ok(())
}

/// First SIGTERM/SIGINT: drain and stop. Second: stop at once.
async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    let mut int = signal(SignalKind::interrupt()).expect("signal handler");
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!("signal received: draining (send again to stop at once)");
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::warn!("second signal: stopping now");
    std::process::exit(1);
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
