//! Which processes make up the local fleet and the arguments each gets: pure, so the ports and
//! flags are checked by unit tests rather than by starting anything.
//!
//! Every role reads its documented configuration from the ops directory (`herald.toml`,
//! `worker.toml`, `proxy.toml`); the plan only adds what differs per process (ids, ports,
//! herald's and the publisher's addresses), as flags, which override the files.

use std::path::Path;

/// Ports of the local fleet before `--port-offset`.
pub mod ports {
    /// Herald's API and status page.
    pub const HERALD: u16 = 7070;
    /// Herald's HAProxy agent checks.
    pub const HERALD_AGENT: u16 = 7071;
    /// The proxy, where clients and the demo page are.
    pub const PROXY: u16 = 8000;
    /// The proxy's admin port (metrics).
    pub const PROXY_ADMIN: u16 = 9100;
    /// Worker `i` (from 1) takes clients on `WORKER + i`...
    pub const WORKER: u16 = 8080;
    /// ...and its admin port is `WORKER_ADMIN + i`.
    pub const WORKER_ADMIN: u16 = 9090;
    /// The demo publisher's ZeroMQ endpoint.
    pub const PUBLISHER: u16 = 5556;
    /// Most workers: one more would take the proxy's admin port.
    pub const MAX_WORKERS: u16 = PROXY_ADMIN - WORKER_ADMIN - 1;
}

/// What a process of the fleet runs: the subcommand of this binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Herald,
    Worker,
    Proxy,
    DemoPublisher,
}

impl Role {
    /// The subcommand that runs it.
    pub fn subcommand(self) -> &'static str {
        match self {
            Role::Herald => "herald",
            Role::Worker => "worker",
            Role::Proxy => "proxy",
            Role::DemoPublisher => "demo-publisher",
        }
    }
}

/// One process to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    /// Its name in the logs (`worker-2`).
    pub name: String,
    /// What it runs.
    pub role: Role,
    /// Its arguments after the subcommand.
    pub args: Vec<String>,
    /// Where it writes its addresses once bound (none for the publisher).
    pub announce_file: Option<String>,
}

/// The fleet's shape.
#[derive(Debug, Clone)]
pub struct Shape<'a> {
    /// Workers to run.
    pub workers: u16,
    /// Matches the demo publisher plays.
    pub matches: u32,
    /// Real time per simulated match minute, as a duration text (`1s`).
    pub minute: String,
    /// Added to every port.
    pub port_offset: u16,
    /// Where herald.toml, worker.toml and proxy.toml are.
    pub ops_dir: &'a Path,
    /// Where processes write their announce files.
    pub run_dir: &'a Path,
}

/// The addresses a fleet of this shape serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addresses {
    /// `127.0.0.1:port` of herald's HTTP API.
    pub herald: String,
    /// `127.0.0.1:port` of herald's agent checks.
    pub herald_agent: String,
    /// `127.0.0.1:port` of the proxy (clients, demo page).
    pub proxy: String,
    /// `127.0.0.1:port` of the proxy's admin port.
    pub proxy_admin: String,
    /// `(id, client address, admin address)` of each worker.
    pub workers: Vec<(String, String, String)>,
    /// The publisher's ZeroMQ endpoint.
    pub publisher: String,
}

impl Shape<'_> {
    /// Checks what the flags cannot: ports that stay valid and apart.
    pub fn validate(&self) -> Result<(), String> {
        if self.workers == 0 || self.workers > ports::MAX_WORKERS {
            return Err(format!(
                "--workers must be 1 to {} (worker ports run up to the proxy's)",
                ports::MAX_WORKERS
            ));
        }
        let highest = ports::PROXY_ADMIN;
        if u32::from(highest) + u32::from(self.port_offset) > u32::from(u16::MAX) {
            return Err(format!(
                "--port-offset {} moves port {highest} past 65535",
                self.port_offset
            ));
        }
        Ok(())
    }

    fn addr(&self, port: u16) -> String {
        format!("127.0.0.1:{}", port + self.port_offset)
    }

    /// The addresses every process binds.
    pub fn addresses(&self) -> Addresses {
        Addresses {
            herald: self.addr(ports::HERALD),
            herald_agent: self.addr(ports::HERALD_AGENT),
            proxy: self.addr(ports::PROXY),
            proxy_admin: self.addr(ports::PROXY_ADMIN),
            workers: (1..=self.workers)
                .map(|i| {
                    let id = format!("worker-{i}");
                    let ws = self.addr(ports::WORKER + i);
                    let admin = self.addr(ports::WORKER_ADMIN + i);
                    (id, ws, admin)
                })
                .collect(),
            publisher: format!("tcp://{}", self.addr(ports::PUBLISHER)),
        }
    }

    /// Every process, in start order: herald, the workers, the publisher, the proxy.
    pub fn processes(&self) -> Vec<Process> {
        let a = self.addresses();
        let config = |file: &str| self.ops_dir.join(file).display().to_string();
        let announce = |name: &str| {
            self.run_dir
                .join(format!("{name}.json"))
                .display()
                .to_string()
        };
        let herald_url = format!("http://{}", a.herald);
        let mut out = Vec::new();
        let herald_announce = announce("herald");
        out.push(Process {
            name: "herald".into(),
            role: Role::Herald,
            args: strings([
                "--config",
                &config("herald.toml"),
                "--listen",
                &a.herald,
                "--agent-listen",
                &a.herald_agent,
                // Never scale in below the fleet started here: its log actuator cannot start
                // workers again.
                "--min-workers",
                &self.workers.to_string(),
                "--announce-file",
                &herald_announce,
            ]),
            announce_file: Some(herald_announce),
        });
        for (id, ws, admin) in &a.workers {
            let file = announce(id);
            let mut args = strings([
                "--config",
                &config("worker.toml"),
                "--id",
                id,
                "--listen",
                ws,
                "--admin-listen",
                admin,
                "--herald",
                &herald_url,
                "--publisher",
                &a.publisher,
                "--announce-file",
                &file,
            ]);
            // The other workers are history peers from the first message on: a restarted
            // worker fills each topic's history from them before herald's first reply (which
            // names the same peers) could.
            for (_, _, peer) in a.workers.iter().filter(|(other, _, _)| other != id) {
                args.extend(strings(["--peer", peer]));
            }
            out.push(Process {
                name: id.clone(),
                role: Role::Worker,
                args,
                announce_file: Some(file),
            });
        }
        out.push(Process {
            name: "publisher".into(),
            role: Role::DemoPublisher,
            args: strings([
                "--bind",
                &a.publisher,
                "--matches",
                &self.matches.to_string(),
                "--minute",
                &self.minute,
            ]),
            announce_file: None,
        });
        let proxy_announce = announce("proxy");
        let mut proxy_args = strings([
            "--config",
            &config("proxy.toml"),
            "--listen",
            &a.proxy,
            "--admin-listen",
            &a.proxy_admin,
            "--herald",
            &herald_url,
            "--announce-file",
            &proxy_announce,
        ]);
        // Known from the start: the proxy places before herald has trusted anyone.
        for (_, ws, _) in &a.workers {
            proxy_args.extend(strings(["--worker", ws]));
        }
        out.push(Process {
            name: "proxy".into(),
            role: Role::Proxy,
            args: proxy_args,
            announce_file: Some(proxy_announce),
        });
        out
    }
}

fn strings<const N: usize>(items: [&str; N]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(workers: u16, port_offset: u16) -> Shape<'static> {
        Shape {
            workers,
            matches: 3,
            minute: "1s".into(),
            port_offset,
            ops_dir: Path::new("ops/local"),
            run_dir: Path::new("/run/fleet"),
        }
    }

    fn flag<'a>(p: &'a Process, name: &str) -> Vec<&'a str> {
        p.args
            .windows(2)
            .filter(|w| w[0] == name)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn the_default_fleet_is_herald_three_workers_a_publisher_and_a_proxy() {
        let processes = shape(3, 0).processes();
        let names: Vec<&str> = processes.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "herald",
                "worker-1",
                "worker-2",
                "worker-3",
                "publisher",
                "proxy"
            ]
        );
        let proxy = processes.last().unwrap();
        assert_eq!(flag(proxy, "--listen"), ["127.0.0.1:8000"]);
        assert_eq!(flag(proxy, "--herald"), ["http://127.0.0.1:7070"]);
        assert_eq!(
            flag(proxy, "--worker"),
            ["127.0.0.1:8081", "127.0.0.1:8082", "127.0.0.1:8083"]
        );
        assert_eq!(flag(proxy, "--config"), ["ops/local/proxy.toml"]);
        let w2 = &processes[2];
        assert_eq!(w2.role, Role::Worker);
        assert_eq!(flag(w2, "--id"), ["worker-2"]);
        assert_eq!(flag(w2, "--admin-listen"), ["127.0.0.1:9092"]);
        assert_eq!(flag(w2, "--publisher"), ["tcp://127.0.0.1:5556"]);
        assert_eq!(
            w2.announce_file.as_deref(),
            Some("/run/fleet/worker-2.json")
        );
        assert_eq!(flag(w2, "--peer"), ["127.0.0.1:9091", "127.0.0.1:9093"]);
        assert_eq!(flag(&processes[0], "--min-workers"), ["3"]);
    }

    #[test]
    fn every_port_is_distinct_and_moves_with_the_offset() {
        for offset in [0, 100, 1000] {
            let s = shape(ports::MAX_WORKERS, offset);
            assert_eq!(s.validate(), Ok(()));
            let a = s.addresses();
            let mut all = vec![a.herald, a.herald_agent, a.proxy, a.proxy_admin];
            all.push(a.publisher.trim_start_matches("tcp://").to_string());
            for (_, ws, admin) in a.workers {
                all.extend([ws, admin]);
            }
            let count = all.len();
            all.sort();
            all.dedup();
            assert_eq!(all.len(), count, "a port is used twice at offset {offset}");
            assert!(all.contains(&format!("127.0.0.1:{}", 8000 + offset)));
        }
    }

    #[test]
    fn impossible_shapes_are_refused_with_the_flag_named() {
        assert!(shape(0, 0).validate().unwrap_err().contains("--workers"));
        let too_many = shape(ports::MAX_WORKERS + 1, 0).validate().unwrap_err();
        assert!(too_many.contains("--workers"));
        assert!(shape(3, 60000)
            .validate()
            .unwrap_err()
            .contains("--port-offset"));
    }
}
