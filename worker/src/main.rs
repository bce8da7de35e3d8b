//! `worker`: see `worker --help` and the crate docs.

fn main() -> std::process::ExitCode {
    protocol::process::main("worker", |c: &worker::Config| &c.log_format, worker::run)
}
