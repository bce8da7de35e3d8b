//! `pushfleet`: with no subcommand, the whole platform on this machine (see [`fleet`]); with
//! one, a single role (`worker`, `herald`, `proxy`, `demo-publisher`) exactly as its own
//! binary runs it. The launcher starts its processes through these subcommands, so the local
//! fleet runs the same code as a deployment.

mod demo;
mod fleet;

use clap::Parser;
use std::ffi::OsString;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    let role = args.get(1).and_then(|a| a.to_str()).unwrap_or_default();
    // The role's own parser sees `pushfleet ROLE` as its program name.
    let role_args = || {
        let program = OsString::from(format!("pushfleet {role}"));
        std::iter::once(program).chain(args.iter().skip(2).cloned())
    };
    use protocol::process::main_from;
    match role {
        "worker" => main_from(
            "worker",
            role_args(),
            |c: &worker::Config| &c.log_format,
            worker::run,
        ),
        "herald" => main_from(
            "herald",
            role_args(),
            |c: &herald::Config| &c.log_format,
            herald::run,
        ),
        "proxy" => main_from(
            "proxy",
            role_args(),
            |c: &proxy::Config| &c.log_format,
            proxy::run,
        ),
        "demo-publisher" => main_from(
            "demo-publisher",
            role_args(),
            |c: &demo::DemoConfig| &c.log_format,
            demo::run,
        ),
        _ => fleet::main(fleet::FleetConfig::parse()),
    }
}
