//! `proxy`: see `proxy --help` and the crate docs.

fn main() -> std::process::ExitCode {
    protocol::process::main("proxy", |c: &proxy::Config| &c.log_format, proxy::run)
}
