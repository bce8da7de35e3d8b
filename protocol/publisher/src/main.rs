//! `pushfleet-publish`: see `pushfleet-publish --help` and the crate docs.

use clap::{CommandFactory, Parser};
use publisher::Config;
use std::io::IsTerminal;
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    if let Err(message) = config.validate() {
        Config::command()
            .error(clap::error::ErrorKind::ArgumentConflict, message)
            .exit();
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        publisher::run(config, shutdown).await
    });
    // Stdin is read on a blocking thread that cannot be cancelled: do not wait for it.
    runtime.shutdown_background();
    result?;
    Ok(())
}

/// First SIGTERM/SIGINT: stop publishing, send the final checks, linger, exit. Second: exit now.
async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    let mut int = signal(SignalKind::interrupt()).expect("signal handler");
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!("signal received: stopping (send again to stop at once)");
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::warn!("second signal: stopping now");
    std::process::exit(1);
}
