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
    protocol::process::init_logging(&config.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(protocol::process::stop_on_signal(shutdown.clone()));
        worker::run(config, shutdown).await
    })?;
    Ok(())
}
