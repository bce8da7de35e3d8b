//! `pushfleet-publish`: see `pushfleet-publish --help` and the crate docs.

use clap::{CommandFactory, Parser};
use publisher::Config;
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    if let Err(message) = config.validate() {
        Config::command()
            .error(clap::error::ErrorKind::ArgumentConflict, message)
            .exit();
    }
    protocol::process::init_logging("text");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(protocol::process::stop_on_signal(shutdown.clone()));
        publisher::run(config, shutdown).await
    });
    // Stdin is read on a blocking thread that cannot be cancelled: do not wait for it.
    runtime.shutdown_background();
    result?;
    Ok(())
}
