//! `proxy`: not runnable yet (see the proxy issue).

fn main() -> std::process::ExitCode {
    eprintln!("proxy: not built yet");
    std::process::ExitCode::FAILURE
}
