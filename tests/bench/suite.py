#!/usr/bin/env python3
"""The side-by-side benchmark suite: pushfleet against what users would pick instead, in the
same run on the same machine. Run it with `bash tests/bench/run.sh` (it builds and installs what
this needs); it writes `report.md`, PNG plots and every raw result into the folder it names.

Scenarios (`--scenario`, repeatable; default all that are implemented):
  fanout  S2: subscribers on one hot topic, ~500-byte JSON at rising rates until p99 passes
          200 ms: deliveries/s per server core, server CPU µs per delivery, p50/p99 latency;
          pushfleet's worker, nchan and Pushpin; permessage-deflate on and off.
  memory  S3: idle connections (deflate offered): server memory per connection for the
          worker, nchan and Pushpin; the proxy's memory per relayed connection against
          HAProxy's.

Servers run on CPU 0 and the load generators and publishers on CPU 1 (`taskset`), said in the
report. Each scenario runs `--repeats` times; the report gives the median and the spread
(min-max). Only 127.0.0.x is used; every process started is stopped, every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
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


def log(msg: str) -> None:
    print(f"[suite {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
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
    wait_port(port, 20, "worker")
    return Server("pushfleet worker", "pushfleet", f"ws://127.0.0.1:{port}/ws",
                  ["--target", "pushfleet", "--bind", f"tcp://127.0.0.1:{pub}"],
                  pids=[p.pid], procs=[p], publish_delay="2s")


def start_peer(kind: str, work: Path, deflate: bool) -> Server:
    """nchan or Pushpin through their start scripts (tests/bench/peers/<kind>/start.sh), which
    print a JSON line: {"pids": [...], "sub_url": "...{topic}", "pub_url": "...",
    "stop": [...]} ."""
    port = free_port()
    out = subprocess.run(
        ["bash", str(PEERS / kind / "start.sh"), "--dir", str(work / kind), "--port", str(port),
         "--cpu", SERVER_CPU, "--deflate", "on" if deflate else "off", "--json"],
        capture_output=True, text=True, timeout=60, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} did not start: {out.stderr.strip()[-800:]}")
    info = json.loads(out.stdout.strip().splitlines()[-1])
    return Server(kind, "raw", info["sub_url"],
                  ["--target", kind, "--url", info["pub_url"]],
                  pids=[int(p) for p in info["pids"]], stop_cmd=info.get("stop"))


def loadgen() -> str:
    return str(RELEASE / "loadgen")


# ---------------------------------------------------------------------------------------------
# S2: fan-out


def fanout_once(kind: str, deflate: bool, subscribers: int, rates: list[int], step_s: int,
                work: Path) -> dict:
    server = start_worker(work) if kind == "pushfleet" else start_peer(kind, work, deflate)
    lg = None
    try:
        ramp = max(2, subscribers // 2000)
        hold = len(rates) * step_s + 10
        out = work / f"fanout-{kind}-{'deflate' if deflate else 'plain'}.json"
        lg = Proc("loadgen-fanout", [loadgen(), "run", "--target", server.target,
                                     "--url", server.url, "--clients", str(subscribers),
                                     "--topics", "1", "--ramp", f"{ramp}s",
                                     "--hold", f"{hold}s", "--label", f"S2 {kind}",
                                     "--out", str(out)] + (["--deflate"] if deflate else []),
                  work, cpu=CLIENT_CPU)
        time.sleep(ramp + 3)
        steps = ",".join(f"{r}:{step_s}s" for r in rates)
        pub = Proc("publish-fanout", [loadgen(), "publish", *server.publish, "--topics", "1",
                                      "--steps", steps, "--delay", server.publish_delay],
                   work, cpu=CLIENT_CPU, stdout_pipe=True)
        step_rows = []
        for line in pub.proc.stdout:  # one JSON line per step, as each ends
            step = json.loads(line)
            step["server_ticks"] = cpu_ticks(server.pids)
            step_rows.append(step)
            log(f"S2 {kind} {'deflate' if deflate else 'plain'}: {step['rate']} msg/s done")
        pub.wait(30)
        pub.stop()
        lg.wait(hold + 60)
        result = json.loads(out.read_text())
    finally:
        if lg:
            lg.stop()
        server.stop()
    # Per step: deliveries, latency and server CPU inside the step's window (its first and
    # last second left out).
    rows = []
    prev_ticks = None
    for step in step_rows:
        pts = [p for p in result["timeline"]
               if step["start_unix"] + 1.5 <= p["unix"] <= step["end_unix"] - 0.5]
        seconds = max(1, len(pts))
        delivered = sum(p["messages"] for p in pts)
        p99 = max((p["p99_us"] for p in pts), default=0)
        p50 = statistics.median([p["p50_us"] for p in pts]) if pts else 0
        ticks = step["server_ticks"] - prev_ticks if prev_ticks is not None else None
        prev_ticks = step["server_ticks"]
        window = step["end_unix"] - step["start_unix"]
        cpu_s = ticks / CLK_TCK if ticks is not None else None
        per_s = delivered / seconds
        rows.append({
            "rate": step["rate"], "deliveries_per_s": per_s, "p50_us": p50, "p99_us": p99,
            "server_cpu_cores": (cpu_s / window) if cpu_s is not None else None,
            "cpu_us_per_delivery": (cpu_s * 1e6 / (per_s * window))
            if cpu_s is not None and per_s > 0 else None,
        })
    return {"server": kind, "deflate": deflate, "negotiated": result["deflate_negotiated"],
            "connected": result["connected"], "failed": result["failed"],
            "gaps": result["gaps"], "dups": result["dups"], "steps": rows}


# ---------------------------------------------------------------------------------------------
# S3: idle memory


def memory_once(kind: str, clients: int, work: Path) -> dict:
    server = start_worker(work) if kind == "pushfleet" else start_peer(kind, work, True)
    try:
        time.sleep(1)
        base = rss_kib(server.pids)
        hold = 20
        ramp = max(2, clients // 2500)
        out = work / f"memory-{kind}.json"
        lg = Proc("loadgen-memory", [loadgen(), "run", "--target", server.target,
                                     "--url", server.url, "--clients", str(clients),
                                     "--topics", "100", "--ramp", f"{ramp}s",
                                     "--hold", f"{hold}s", "--deflate",
                                     "--label", f"S3 {kind}", "--out", str(out)],
                  work, cpu=CLIENT_CPU)
        time.sleep(ramp + hold / 2)
        loaded = rss_kib(server.pids)
        lg.wait(ramp + hold + 60)
        lg.stop()
        result = json.loads(out.read_text())
    finally:
        server.stop()
    n = max(1, result["connected"])
    return {"server": kind, "clients": clients, "connected": result["connected"],
            "failed": result["failed"], "deflate": result["deflate_negotiated"],
            "rss_base_kib": base, "rss_loaded_kib": loaded,
            "kib_per_connection": (loaded - base) / n}


# ---------------------------------------------------------------------------------------------
# report


def spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def fmt(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def write_report(out: Path, args, results: dict) -> None:
    lines = [f"# pushfleet side-by-side benchmarks", "",
             f"Run {time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} CPUs; servers pinned "
             f"to CPU {SERVER_CPU}, load generators and publishers to CPU {CLIENT_CPU} "
             f"(`taskset`); {args.repeats} repeat(s) per figure, median with the spread "
             "(min–max) in brackets. Loopback only.", ""]
    if "memory" in results:
        lines += ["## S3: idle memory per connection (permessage-deflate offered)", "",
                  "| server | connections | deflate negotiated | KiB per connection |",
                  "| --- | --- | --- | --- |"]
        for kind, runs in results["memory"].items():
            med, lo, hi = spread([r["kib_per_connection"] for r in runs])
            lines.append(f"| {kind} | {runs[0]['connected']:,} | {runs[0]['deflate']:,} | "
                         f"{med:.1f} ({lo:.1f}–{hi:.1f}) |")
        lines.append("")
    if "fanout" in results:
        lines += [f"## S2: fan-out, {args.subscribers:,} subscribers on one topic, "
                  "~500-byte JSON", ""]
        for key, runs in results["fanout"].items():
            lines += [f"### {key}", "",
                      "| publish rate | deliveries/s | server cores | CPU µs/delivery | "
                      "p50 ms | p99 ms |", "| --- | --- | --- | --- | --- | --- |"]
            for i, step in enumerate(runs[0]["steps"]):
                col = lambda k, scale=1.0: [r["steps"][i][k] * scale for r in runs
                                            if i < len(r["steps"]) and r["steps"][i][k] is not None]
                cells = []
                for k, scale, d in [("deliveries_per_s", 1, 0), ("server_cpu_cores", 1, 2),
                                    ("cpu_us_per_delivery", 1, 2), ("p50_us", 1e-3, 1),
                                    ("p99_us", 1e-3, 1)]:
                    vals = col(k, scale)
                    if vals:
                        med, lo, hi = spread(vals)
                        cells.append(f"{med:,.{d}f} ({lo:,.{d}f}–{hi:,.{d}f})")
                    else:
                        cells.append("—")
                lines.append(f"| {step['rate']:g}/s | " + " | ".join(cells) + " |")
            r0 = runs[0]
            lines += ["", f"Connected {r0['connected']:,}, failed {r0['failed']}, "
                      f"deflate negotiated on {r0['negotiated']:,}, gaps {r0['gaps']}, "
                      f"duplicates {r0['dups']}.", ""]
        plot_fanout(out, results["fanout"])
        lines += ["![p99 latency against publish rate](fanout-p99.png)", "",
                  "![server CPU per delivery](fanout-cpu.png)", ""]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))


def plot_fanout(out: Path, fanout: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for metric, ylabel, name in [("p99_us", "p99 latency (ms)", "fanout-p99.png"),
                                 ("cpu_us_per_delivery", "server CPU µs per delivery",
                                  "fanout-cpu.png")]:
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, runs in fanout.items():
            xs, ys = [], []
            for i, step in enumerate(runs[0]["steps"]):
                vals = [r["steps"][i][metric] for r in runs
                        if i < len(r["steps"]) and r["steps"][i][metric] is not None]
                if vals:
                    xs.append(step["rate"])
                    ys.append(statistics.median(vals) / (1000 if metric == "p99_us" else 1))
            ax.plot(xs, ys, marker="o", label=key)
        if metric == "p99_us":
            ax.axhline(200, color="red", linestyle="--", linewidth=1, label="200 ms")
            ax.set_yscale("log")
        ax.set_xlabel("publish rate (messages/s on the hot topic)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for the report")
    ap.add_argument("--scenario", action="append", choices=["fanout", "memory"])
    ap.add_argument("--servers", default="pushfleet,nchan,pushpin")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--subscribers", type=int, default=10_000)
    ap.add_argument("--rates", default="10,20,50,100,200,400")
    ap.add_argument("--step-seconds", type=int, default=10)
    ap.add_argument("--idle-connections", type=int, default=15_000)
    args = ap.parse_args()
    scenarios = args.scenario or ["memory", "fanout"]
    servers = args.servers.split(",")
    for binary in ["worker", "loadgen"]:
        if not (RELEASE / binary).exists():
            sys.exit(f"{RELEASE / binary} missing: run tests/bench/run.sh, which builds it")
    if shutil.which("taskset") is None:
        sys.exit("taskset missing (util-linux)")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="pushfleet-bench-") as tmp:
        work = Path(tmp)
        if "memory" in scenarios:
            results["memory"] = {}
            for kind in servers:
                runs = []
                for i in range(args.repeats):
                    log(f"S3 memory: {kind}, run {i + 1}/{args.repeats}")
                    runs.append(memory_once(kind, args.idle_connections, work))
                    log(f"  {runs[-1]['kib_per_connection']:.1f} KiB per connection")
                results["memory"][kind] = runs
        if "fanout" in scenarios:
            results["fanout"] = {}
            rates = [int(r) for r in args.rates.split(",")]
            for kind in servers:
                for deflate in (True, False):
                    key = f"{kind}, deflate {'on' if deflate else 'off'}"
                    runs = []
                    for i in range(args.repeats):
                        log(f"S2 fan-out: {key}, run {i + 1}/{args.repeats}")
                        runs.append(fanout_once(kind, deflate, args.subscribers, rates,
                                                args.step_seconds, work))
                    results["fanout"][key] = runs
        write_report(args.out, args, results)
    log(f"report: {args.out / 'report.md'}")


if __name__ == "__main__":
    main()
