"""What every benchmark scenario shares: processes pinned to a CPU and stopped for sure, the
servers under test (our worker, nchan, Pushpin) started and accounted for, /proc readings of
CPU and memory, the load generator's path, and medians with their spread."""

from __future__ import annotations

import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RELEASE = REPO / "target" / "release"
PEERS = Path(__file__).resolve().parent / "peers"
SERVER_CPU = "0"
CLIENT_CPU = "1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def stop_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so that a driver killed by `kill` or a CI time-out runs its
    `finally` blocks and stops every process it started, as Ctrl-C does."""
    def handler(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)


def log(msg: str) -> None:
    print(f"[suite {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


_GIVEN: set[int] = set()


def free_port() -> int:
    """A free port outside the kernel's ephemeral range. A port the kernel picks (bind to 0)
    is an ephemeral one, and the load generators' thousands of client sockets take ephemeral
    ports too: a server or publisher binding a moment later can find its port taken by a
    client (EADDRINUSE). Never the same port twice in one run: a port handed out may not be
    bound yet."""
    lo, hi = ephemeral_range()
    candidates = [p for p in range(10_000, 65_536) if not lo <= p <= hi and p not in _GIVEN]
    random.shuffle(candidates)
    for port in candidates[:2000]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    raise RuntimeError(f"no free port outside the ephemeral range {lo}-{hi}")


def wait_port(port: int, timeout: float, what: str, proc: "Proc | None" = None) -> None:
    """Until 127.0.0.1:`port` accepts; with `proc`, stops early if it exits, and stops it on
    failure (nothing started is left behind)."""
    try:
        wait_listening(port, timeout, what, proc)
    except RuntimeError:
        if proc is not None:
            proc.stop()
            raise RuntimeError(f"{what} did not start: {proc.tail(10)}") from None
        raise


def wait_listening(port: int, timeout: float, what: str, proc: "Proc | None") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{what} exited with {proc.proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout} s")


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KIB
        except (OSError, IndexError, ValueError):
            pass
    return total


class Proc:
    """A child process in its own process group, output to a log file; stopped by `stop`."""

    def __init__(self, name: str, args: list[str], log_dir: Path, cpu: str | None = None,
                 stdout_pipe: bool = False):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.log_file = open(self.log_path, "ab")
        full = (["taskset", "-c", cpu] if cpu is not None else []) + args
        self.proc = subprocess.Popen(
            full, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else self.log_file,
            stderr=self.log_file, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self, grace: float = 10.0) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
            except ProcessLookupError:
                pass
        self.log_file.close()

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


# ---------------------------------------------------------------------------------------------
# servers under test: each starts on CPU 0 and says how clients subscribe and how to publish


@dataclass
class Server:
    name: str
    target: str  # loadgen run --target
    url: str  # loadgen run --url
    publish: list[str]  # loadgen publish flags
    pids: list[int] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)
    stop_cmd: list[str] | None = None
    publish_delay: str = "0s"

    def stop(self) -> None:
        if self.stop_cmd:
            subprocess.run(self.stop_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=30, check=False)
        for p in self.procs:
            p.stop()
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() for pid in self.pids) and \
                time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def start_worker(work: Path) -> Server:
    """The release worker on CPU 0; compression follows what clients offer."""
    port, admin, pub = free_port(), free_port(), free_port()
    args = [str(RELEASE / "worker"), "--listen", f"127.0.0.1:{port}",
            "--admin-listen", f"127.0.0.1:{admin}", "--publisher", f"tcp://127.0.0.1:{pub}",
            "--max-connections", "19000", "--id", "bench-worker"]
    p = Proc("worker", args, work, cpu=SERVER_CPU)
    wait_port(port, 20, "worker", p)
    return Server("pushfleet worker", "pushfleet", f"ws://127.0.0.1:{port}/ws",
                  ["--target", "pushfleet", "--bind", f"tcp://127.0.0.1:{pub}"],
                  pids=[p.pid], procs=[p], publish_delay="2s")


def start_peer(kind: str, work: Path, deflate: bool) -> Server:
    """nchan or Pushpin on CPU 0 through their start scripts (peers/<kind>/start.sh; see
    peers/README.md): every process they start is listed in DIR/pids as `ROLE PID` lines, and
    their URLs follow from the ports given."""
    port, pub_port = free_port(), free_port()
    d = work / kind
    flags = ["--dir", str(d), "--port", str(port), "--deflate", "on" if deflate else "off"]
    if kind == "pushpin":
        flags += ["--publish-port", str(pub_port)]
    out = subprocess.run(["taskset", "-c", SERVER_CPU, "bash", str(PEERS / kind / "start.sh"),
                          *flags], capture_output=True, text=True, timeout=90, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} did not start: {out.stderr.strip()[-800:]}")
    pids = recorded_pids(d)
    sub_url = f"ws://127.0.0.1:{port}/sub/{{topic}}"
    pub_url = (f"http://127.0.0.1:{port}/pub/{{topic}}" if kind == "nchan"
               else f"http://127.0.0.1:{pub_port}/publish/")
    return Server(kind, "raw", sub_url, ["--target", kind, "--url", pub_url], pids=pids,
                  stop_cmd=["bash", str(PEERS / kind / "stop.sh"), "--dir", str(d)])


def recorded_pids(d: Path) -> list[int]:
    """The PIDs a peer's start script wrote to DIR/pids, with the live children of nginx's
    master (it respawns workers)."""
    pids = []
    for line in (d / "pids").read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            pids.append(int(parts[1]))
    for pid in list(pids):
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        pids += [int(c) for c in children if int(c) not in pids]
    return pids


def loadgen() -> str:
    return str(RELEASE / "loadgen")



def spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def fmt(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"




# ---------------------------------------------------------------------------------------------
# a fleet: workers, herald, our proxy or HAProxy in front


def start_fleet_worker(work: Path, name: str, publisher: str, herald: str | None = None,
                       cpu: str = SERVER_CPU, extra: list[str] | None = None) -> Proc:
    """One release worker `name` subscribed to `publisher`, reporting to `herald` if given;
    returns once its WebSocket port answers. Its address is in `.ws` and admin in `.admin`."""
    port, admin = free_port(), free_port()
    args = [str(RELEASE / "worker"), "--listen", f"127.0.0.1:{port}",
            "--admin-listen", f"127.0.0.1:{admin}", "--publisher", publisher,
            "--max-connections", "19000", "--id", name]
    if herald:
        args += ["--herald", herald]
    p = Proc(name, args + (extra or []), work, cpu=cpu)
    wait_port(port, 20, name, p)
    p.ws = f"127.0.0.1:{port}"  # type: ignore[attr-defined]
    p.admin = f"127.0.0.1:{admin}"  # type: ignore[attr-defined]
    return p


def start_herald(work: Path, extra: list[str] | None = None, cpu: str = SERVER_CPU) -> Proc:
    """Herald with the log actuator (no scaling happens in a benchmark); `.url` is its API."""
    port = free_port()
    p = Proc("herald", [str(RELEASE / "pushfleet"), "herald", "--listen", f"127.0.0.1:{port}",
                        "--actuator", "log", *(extra or [])], work, cpu=cpu)
    wait_port(port, 20, "herald", p)
    p.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    return p


def start_proxy(work: Path, herald: str | None = None, workers: list[str] | None = None,
                cpu: str = SERVER_CPU, extra: list[str] | None = None) -> Proc:
    """Our proxy following `herald` (or a static `workers` list), admission limits opened up
    so that a benchmark measures placement and relaying, not the token bucket; `.ws` is its
    client address, `.admin` its admin port."""
    port, admin = free_port(), free_port()
    args = [str(RELEASE / "proxy"), "--listen", f"127.0.0.1:{port}",
            "--admin-listen", f"127.0.0.1:{admin}", "--max-connections", "9900",
            "--accept-rate", "100000", "--accept-burst", "100000"]
    if herald:
        args += ["--herald", herald]
    for w in workers or []:
        args += ["--worker", w]
    p = Proc("proxy", args + (extra or []), work, cpu=cpu)
    wait_port(port, 20, "proxy", p)
    p.ws = f"127.0.0.1:{port}"  # type: ignore[attr-defined]
    p.admin = f"127.0.0.1:{admin}"  # type: ignore[attr-defined]
    return p


class HAProxy:
    """HAProxy in TCP mode (peers/haproxy/start.sh) in front of `servers`, pinned to `cpu`."""

    def __init__(self, work: Path, balance: str, servers: list[str], cpu: str = SERVER_CPU,
                 name: str = "haproxy"):
        self.dir = work / name
        port = free_port()
        out = subprocess.run(
            ["taskset", "-c", cpu, "bash", str(PEERS / "haproxy" / "start.sh"), "--dir",
             str(self.dir), "--port", str(port), "--balance", balance,
             *[a for s in servers for a in ("--server", s)]],
            capture_output=True, text=True, timeout=60, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"haproxy did not start: {out.stderr.strip()[-800:]}")
        self.pids = recorded_pids(self.dir)
        self.ws = f"127.0.0.1:{port}"

    def stop(self) -> None:
        subprocess.run(["bash", str(PEERS / "haproxy" / "stop.sh"), "--dir", str(self.dir)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30,
                       check=False)


def process_cpu_seconds(pid: int) -> float:
    return cpu_ticks([pid]) / CLK_TCK
