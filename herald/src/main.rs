//! `herald`: see `herald --help` and the crate docs.

fn main() -> std::process::ExitCode {
    protocol::process::main("herald", |c: &herald::Config| &c.log_format, herald::run)
}
