"""S3 and S4 at the edge: our proxy against HAProxy (TCP mode), each alone on CPU 0, both in
front of the same 2 release workers (static `--worker` list for our proxy, `leastconn` for
HAProxy).

- ProxyMemory (S3): resident memory per relayed connection, (RSS while ~9,000 idle
  WebSocket connections are relayed - RSS before) / connected, read from /proc. The clients
  offer permessage-deflate; neither proxy parses frames, so it is negotiated with the worker.
- Burst (S4): ~8,000 new WebSocket connections at once (`--ramp 0s`): connections/s achieved,
  handshake time, failures with the first error, and the proxy's own CPU per 1,000
  connections (utime + stime from /proc), which is the equal-CPU figure: the workers and the
  load generator share CPU 1, so when CPU 1 limits the rate both proxies reach the same
  connections/s and only their CPU cost tells them apart. The kernel's listen-queue
  overflows during each run and the listeners' accept queue lengths are recorded too: a
  dropped SYN is retried after 1 s and dominates the handshake tail.

Each proxy is restarted for every repeat; the workers are restarted for every repeat and
shared by both proxies of that repeat, which go in alternating order. One process may hold
20,000 open files and a relayed connection holds 2 of them, so a proxy relays fewer than
~9,900 connections (start_proxy's `--max-connections` 9,900, HAProxy's maxconn ~9,983).
Clients come from 8 source addresses 127.0.0.1-8, so the TIME_WAIT ports one run leaves on
the client side do not run a later run out of ports. While a run is measured this driver
lists the proxy's open files a few times a second (that is how it knows every connection is
up) and keeps itself on CPU 1 meanwhile."""

from __future__ import annotations

import json
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from common import (CLIENT_CPU, CLK_TCK, SERVER_CPU, HAProxy, Proc, cpu_ticks, free_port,
                    loadgen, log, rss_kib, spread, start_fleet_worker, start_proxy)

PROXIES = ["pushfleet proxy", "HAProxy leastconn"]
SOURCE_IPS = 8
# Every relayed connection holds a client-side and a worker-side socket.
FDS_PER_RELAYED = 2


def open_files(pids: list[int]) -> int:
    """Open file descriptors of `pids` (sockets included), from /proc."""
    total = 0
    for pid in pids:
        try:
            total += sum(1 for _ in os.scandir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return total


def listen_overflows() -> int:
    """The machine's count of connections dropped because a listen queue was full
    (TcpExt ListenOverflows in /proc/net/netstat): the client's SYN is retransmitted after 1 s,
    then 3 s, ... so each one shows in the handshake times."""
    rows = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()
            if line.startswith("TcpExt:")]
    if len(rows) >= 2:
        fields = dict(zip(rows[0][1:], rows[1][1:]))
        return int(fields.get("ListenOverflows", 0))
    return 0


def listen_backlog(addr: str) -> int | None:
    """The accept queue length of the socket listening on `addr` (`ss`'s Send-Q column of a
    listener), or None when `ss` cannot tell."""
    port = addr.rsplit(":", 1)[1]
    try:
        out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True,
                             text=True, timeout=5, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        cols = line.split()
        if len(cols) >= 4 and cols[3] == addr and cols[2].isdigit():
            return int(cols[2])
    return None


@contextmanager
def on_client_cpu():
    """Runs the enclosed block with this process pinned to CPU 1, so that polling /proc does not
    take time from the proxy under test on CPU 0."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {int(CLIENT_CPU)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


class Edge:
    """One proxy under test: its client address and the PIDs to account."""

    def __init__(self, kind: str, work: Path, workers: list[str], tag: str):
        self.kind = kind
        self.proc = None
        self.haproxy = None
        if kind == "pushfleet proxy":
            # A short drain: the clients are gone by the time it stops, and a leftover must
            # not hold the stop for the default minute.
            self.proc = start_proxy(work, workers=workers, cpu=SERVER_CPU,
                                    extra=["--drain-timeout", "2s"])
            if not self.proc.alive():
                raise RuntimeError(f"proxy exited at start: {self.proc.tail()}")
            self.pids = [self.proc.pid]
            self.ws = self.proc.ws
        else:
            self.haproxy = HAProxy(work, "leastconn", workers, cpu=SERVER_CPU,
                                   name=f"haproxy-{tag}")
            if not self.haproxy.pids:
                self.haproxy.stop()
                raise RuntimeError(f"haproxy started but recorded no PID in {self.haproxy.dir}")
            self.pids = self.haproxy.pids
            self.ws = self.haproxy.ws

    def alive(self) -> bool:
        return all(Path(f"/proc/{pid}").exists() for pid in self.pids)

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()
        if self.haproxy:
            self.haproxy.stop()


def start_workers(work: Path) -> list[Proc]:
    """2 release workers on CPU 1, subscribed to a ZeroMQ endpoint nobody binds (nothing is
    published in these scenarios)."""
    publisher = f"tcp://127.0.0.1:{free_port()}"
    workers: list[Proc] = []
    try:
        for i in (1, 2):
            workers.append(start_fleet_worker(work, f"edge-w{i}", publisher, cpu=CLIENT_CPU))
    except BaseException:
        for w in workers:
            w.stop()
        raise
    return workers


def run_loadgen(name: str, flags: list[str], work: Path) -> Proc:
    return Proc(name, [loadgen(), "run", "--target", "pushfleet", "--source-ips",
                       str(SOURCE_IPS), *flags], work, cpu=CLIENT_CPU)


def finish_loadgen(lg: Proc, out: Path, timeout: float) -> dict:
    """Waits for a load generator and returns its JSON summary."""
    code = lg.wait(timeout)
    if code != 0 or not out.exists():
        raise RuntimeError(f"{lg.name} exited with {code} and no summary; its log ends:\n"
                           f"{lg.tail()}")
    return json.loads(out.read_text())


def wait_closed(edge: Edge, base_fds: int, timeout: float) -> None:
    """Waits (bounded) until the proxy has let go of the relayed connections."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and open_files(edge.pids) > base_fds + 10:
        time.sleep(0.2)


def order(i: int) -> list[str]:
    """Both proxies, first one first in even repeats, the other first in odd ones."""
    return PROXIES if i % 2 == 0 else PROXIES[::-1]


def cell(runs: list[dict], key: str, scale: float = 1, digits: int = 1) -> str:
    vals = [r[key] * scale for r in runs if r.get(key) is not None]
    if not vals:
        return "—"
    med, lo, hi = spread(vals)
    return f"{med:,.{digits}f} ({lo:,.{digits}f}–{hi:,.{digits}f})"


def errors(runs: list[dict]) -> str:
    seen = sorted({r["first_error"] for r in runs if r.get("first_error")})
    return "; ".join(f"`{e}`" for e in seen) if seen else "none"


def plot_bars(out: Path, name: str, panels: list[tuple[str, str, float]], results: dict) -> None:
    """One bar chart per (result key, axis label, scale): the median per proxy, min–max bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    kinds = [k for k in PROXIES if k in results]
    for ax, (key, label, scale) in zip(axes[0], panels):
        meds, los, his = [], [], []
        for kind in kinds:
            vals = [r[key] * scale for r in results[kind] if r.get(key) is not None] or [0.0]
            med, lo, hi = spread(vals)
            meds.append(med)
            los.append(med - lo)
            his.append(hi - med)
        ax.bar(kinds, meds, yerr=[los, his], capsize=6, color=["tab:blue", "tab:orange"])
        ax.set_ylabel(label)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# S3: memory per relayed connection


def each_proxy(repeats: int, work: Path, once) -> dict:
    """`once(kind, workers, i)` for each proxy in each repeat (fresh workers per repeat, the
    proxies' order alternating), with the driver itself on the clients' CPU."""
    results: dict = {k: [] for k in PROXIES}
    with on_client_cpu():
        for i in range(repeats):
            workers = start_workers(work)
            try:
                for kind in order(i):
                    results[kind].append(once(kind, [w.ws for w in workers], i))
            finally:
                for w in workers:
                    w.stop()
    return results


class ProxyMemory:
    """S3 at the edge: RSS per idle relayed connection, our proxy against HAProxy."""

    @staticmethod
    def add_args(ap) -> None:
        g = ap.add_argument_group("S3 proxy memory (edge.py)")
        g.add_argument("--relayed-connections", type=int, default=9_000,
                       help="idle connections relayed by each proxy (below ~9,900: one "
                            "process holds 20,000 files, 2 per relayed connection)")
        g.add_argument("--relayed-hold", type=int, default=15,
                       help="seconds the connections stay after the last one arrived")

    @staticmethod
    def run(args, work: Path) -> dict:
        def once(kind: str, workers: list[str], i: int) -> dict:
            log(f"S3 proxy memory: {kind}, run {i + 1}/{args.repeats}, "
                f"{args.relayed_connections:,} connections")
            r = ProxyMemory.once(kind, workers, args.relayed_connections, args.relayed_hold,
                                 work, i)
            log(f"  {r['kib_per_connection']:.1f} KiB per relayed connection "
                f"({r['connected']:,} connected, {r['failed']} failed)")
            return r
        return each_proxy(args.repeats, work, once)

    @staticmethod
    def once(kind: str, workers: list[str], clients: int, hold: int, work: Path,
             i: int) -> dict:
        edge = Edge(kind, work, workers, f"s3-{i}")
        lg = None
        try:
            time.sleep(1)
            base = rss_kib(edge.pids)
            base_fds = open_files(edge.pids)
            ramp = max(2, clients // 2500)
            tag = "proxy" if edge.proc else "haproxy"
            out = work / f"proxy-memory-{tag}-{i}.json"
            lg = run_loadgen(f"loadgen-s3-{tag}", [
                "--url", f"ws://{edge.ws}/ws", "--clients", str(clients), "--topics", "100",
                "--ramp", f"{ramp}s", "--hold", f"{hold}s", "--deflate",
                "--label", f"S3 {kind}", "--out", str(out)], work)
            # Settled: the open files have not changed for 2 s, with some connections up.
            deadline = time.monotonic() + ramp + hold * 0.6
            fds, since = open_files(edge.pids), time.monotonic()
            while time.monotonic() < deadline and lg.alive():
                time.sleep(0.25)
                now = open_files(edge.pids)
                if now != fds:
                    fds, since = now, time.monotonic()
                elif fds > base_fds and time.monotonic() - since >= 2:
                    break
            if not edge.alive():
                raise RuntimeError(f"{kind} died while connections were coming in")
            loaded = rss_kib(edge.pids)
            relayed = (open_files(edge.pids) - base_fds) // FDS_PER_RELAYED
            result = finish_loadgen(lg, out, ramp + hold + 90)
            wait_closed(edge, base_fds, 15)
        finally:
            if lg:
                lg.stop()
            edge.stop()
        n = max(1, result["connected"])
        return {"proxy": kind, "clients": clients, "connected": result["connected"],
                "failed": result["failed"], "first_error": result["first_error"],
                "deflate": result["deflate_negotiated"], "relayed_by_fds": relayed,
                "rss_base_kib": base, "rss_loaded_kib": loaded,
                "kib_per_connection": (loaded - base) / n}

    @staticmethod
    def report(out: Path, args, results: dict) -> list[str]:
        lines = ["## S3: proxy memory per relayed connection, our proxy vs HAProxy (TCP mode)",
                 "",
                 f"{args.relayed_connections:,} idle WebSocket connections (permessage-deflate "
                 "offered, negotiated with the worker) through each proxy to 2 workers; the "
                 f"proxy alone on CPU {SERVER_CPU}, workers and load generator on CPU "
                 f"{CLIENT_CPU}. RSS (/proc) while they are held minus RSS before, over the "
                 "connections made (kernel socket buffers are not in RSS; both hold the "
                 "same two sockets per connection). HAProxy: one process, `nbthread 1`, "
                 "`leastconn`; our proxy: static worker list, default relay settings (reads "
                 "of up to 4 KiB into a scratch buffer per thread, a buffer per connection "
                 "only while a side lags).", "",
                 "| proxy | connected | failed | RSS before MiB | RSS loaded MiB | "
                 "KiB per relayed connection |", "| --- | --- | --- | --- | --- | --- |"]
        for kind in PROXIES:
            runs = results.get(kind) or []
            if not runs:
                continue
            lines.append(f"| {kind} | {cell(runs, 'connected', digits=0)} | "
                         f"{cell(runs, 'failed', digits=0)} | "
                         f"{cell(runs, 'rss_base_kib', 1 / 1024)} | "
                         f"{cell(runs, 'rss_loaded_kib', 1 / 1024)} | "
                         f"{cell(runs, 'kib_per_connection')} |")
        lines.append("")
        for kind in PROXIES:
            runs = results.get(kind) or []
            if any(r["failed"] for r in runs):
                lines.append(f"{kind}: first error {errors(runs)}.")
        if any(results.values()):
            plot_bars(out, "proxy-memory.png",
                      [("kib_per_connection", "KiB per relayed connection", 1)], results)
            lines += ["", "![memory per relayed connection](proxy-memory.png)"]
        return lines + [""]


# ---------------------------------------------------------------------------------------------
# S4: connection burst


class Burst:
    """S4: a burst of new WebSocket connections through our proxy and through HAProxy."""

    @staticmethod
    def add_args(ap) -> None:
        g = ap.add_argument_group("S4 connection burst (edge.py)")
        g.add_argument("--burst-clients", type=int, default=8_000,
                       help="new connections fired at once at each proxy (below ~9,900)")
        g.add_argument("--burst-concurrency", type=int, default=500,
                       help="connects in flight per load generator process")
        g.add_argument("--burst-processes", type=int, default=2,
                       help="load generator processes (all on CPU 1)")
        g.add_argument("--burst-hold", type=int, default=10,
                       help="seconds from the burst's start until the clients leave")

    @staticmethod
    def run(args, work: Path) -> dict:
        def once(kind: str, workers: list[str], i: int) -> dict:
            log(f"S4 burst: {kind}, run {i + 1}/{args.repeats}, "
                f"{args.burst_clients:,} connections")
            r = Burst.once(kind, workers, args, work, i)
            cpu = r["cpu_ms_per_1000_open"]
            log(f"  {r['connections_per_s']:,.0f} connections/s, handshake p99 "
                f"{r['handshake_p99_us'] / 1000:.1f} ms, "
                f"{'—' if cpu is None else f'{cpu:.0f}'} ms CPU per 1,000 "
                f"({r['connected']:,} connected, {r['failed']} failed, "
                f"{r['listen_overflows']} listen queue overflows)")
            return r
        return each_proxy(args.repeats, work, once)

    @staticmethod
    def once(kind: str, workers: list[str], args, work: Path, i: int) -> dict:
        edge = Edge(kind, work, workers, f"s4-{i}")
        lg = None
        try:
            time.sleep(1)
            base_fds = open_files(edge.pids)
            tag = "proxy" if edge.proc else "haproxy"
            out = work / f"burst-{tag}-{i}.json"
            hold = args.burst_hold
            backlogs = {"proxy": listen_backlog(edge.ws),
                        "workers": [listen_backlog(w) for w in workers]}
            drops0 = listen_overflows()
            t0 = cpu_ticks(edge.pids)
            lg = run_loadgen(f"loadgen-s4-{tag}", [
                "--url", f"ws://{edge.ws}/ws", "--clients", str(args.burst_clients),
                "--ramp", "0s", "--hold", f"{hold}s",
                "--concurrency", str(args.burst_concurrency),
                "--processes", str(args.burst_processes),
                "--label", f"S4 {kind}", "--out", str(out)], work)
            # (seconds, CPU ticks, open files) every 0.2 s until the load generator ends.
            samples = []
            deadline = time.monotonic() + hold + 90
            while lg.alive() and time.monotonic() < deadline:
                samples.append((time.monotonic(), cpu_ticks(edge.pids), open_files(edge.pids)))
                time.sleep(0.2)
            if not edge.alive():
                raise RuntimeError(f"{kind} died during the burst")
            result = finish_loadgen(lg, out, 30)
            drops = listen_overflows() - drops0
            wait_closed(edge, base_fds, 15)
            t_end = cpu_ticks(edge.pids)
        finally:
            if lg:
                lg.stop()
            edge.stop()
        # The burst is over at the first sample with (nearly) every connection open: its CPU
        # ticks are the cost of opening them (relayed idle connections cost nothing more).
        peak = max((s[2] for s in samples), default=base_fds)
        full = base_fds + 0.995 * (peak - base_fds)
        t_open = next((s[1] for s in samples if s[2] >= full), t_end)
        n = result["connected"]
        hs = result["handshake_us"]
        # With --ramp 0s every client starts at once: the burst lasts from the load
        # generator's start to its last upgrade.
        span_s = result.get("connect_span_s") or None
        if span_s and span_s > hold:
            log(f"  the burst took {span_s:.1f} s, longer than --burst-hold {hold} s: early "
                "clients left while late ones connected")
        rate = n / span_s if span_s and n else 0.0
        return {"proxy": kind, "clients": args.burst_clients, "connected": n,
                "failed": result["failed"], "first_error": result["first_error"],
                "burst_s": span_s, "connections_per_s": rate,
                "connections_per_s_timeline": timeline_rate(result["timeline"]),
                "listen_overflows": drops, "listen_backlog": backlogs,
                "handshake_p50_us": hs["p50"], "handshake_p99_us": hs["p99"],
                "handshake_max_us": hs["max"],
                "cpu_s_open": (t_open - t0) / CLK_TCK, "cpu_s_total": (t_end - t0) / CLK_TCK,
                "cpu_ms_per_1000_open": (t_open - t0) / CLK_TCK * 1e6 / n if n else None,
                "cpu_ms_per_1000_total": (t_end - t0) / CLK_TCK * 1e6 / n if n else None,
                "by_worker": result.get("by_worker", {})}

    @staticmethod
    def report(out: Path, args, results: dict) -> list[str]:
        slots = args.burst_concurrency * args.burst_processes
        lines = ["## S4: connection burst, our proxy vs HAProxy (TCP mode) on one core each",
                 "",
                 f"{args.burst_clients:,} new WebSocket connections at once (`--ramp 0s`, "
                 f"{args.burst_processes} load generator processes × "
                 f"{args.burst_concurrency} connects in flight = {slots:,} slots) through "
                 "each proxy to 2 workers. Each proxy runs alone on CPU "
                 f"{SERVER_CPU} (one core each: equal CPU); the 2 workers and the load "
                 f"generator share CPU {CLIENT_CPU}, so the workers' own handshakes compete "
                 "with the clients there, and when that core is the limit both proxies reach "
                 "similar connections/s: the proxy's own CPU per 1,000 connections (/proc "
                 "utime + stime) is then the fair figure. HAProxy: `nbthread 1`, `leastconn`.",
                 "",
                 "| proxy | connected | failed | connections/s | "
                 "handshake p50 ms | handshake p99 ms | listen queue "
                 "overflows | proxy CPU ms per 1,000 (open) | (open + close) |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for kind in PROXIES:
            runs = results.get(kind) or []
            if not runs:
                continue
            lines.append(f"| {kind} | {cell(runs, 'connected', digits=0)} | "
                         f"{cell(runs, 'failed', digits=0)} | "
                         f"{cell(runs, 'connections_per_s', digits=0)} | "
                         f"{cell(runs, 'handshake_p50_us', 1e-3)} | "
                         f"{cell(runs, 'handshake_p99_us', 1e-3)} | "
                         f"{cell(runs, 'listen_overflows', digits=0)} | "
                         f"{cell(runs, 'cpu_ms_per_1000_open', digits=0)} | "
                         f"{cell(runs, 'cpu_ms_per_1000_total', digits=0)} |")
        lines += ["",
                  "connections/s: connected / time from the burst's start to the last "
                  "upgrade (every client having started at once). Handshake times are "
                  "connect + upgrade, from the moment one of the load generator's slots is "
                  "free to the 101 (the wait for a slot is the generator's limit, not the "
                  "proxy's). Listen queue overflows: connections the kernel "
                  "dropped during the run because a listener's accept queue was full "
                  "(TcpExt ListenOverflows, machine-wide, the proxy's and the workers' "
                  "listeners alike); each such client retries its SYN after 1 s, then 3 s, "
                  "which shows as handshake tails. CPU (open): the proxy's CPU from before "
                  "the burst until every connection was open; (open + close): until it had "
                  "closed them all after the hold.", ""]
        backlogs = [(kind, r["listen_backlog"]) for kind in PROXIES
                    for r in (results.get(kind) or [])[:1]]
        if backlogs:
            lines += ["Accept queue lengths (`ss`): " + ", ".join(
                f"{kind} {b['proxy']}" for kind, b in backlogs) +
                f", workers {backlogs[0][1]['workers']}.", ""]
        for kind in PROXIES:
            runs = results.get(kind) or []
            if any(r["failed"] for r in runs):
                lines.append(f"{kind}: first error {errors(runs)}.")
        if any(results.values()):
            plot_bars(out, "burst.png",
                      [("connections_per_s", "connections/s", 1),
                       ("cpu_ms_per_1000_open", "proxy CPU ms per 1,000 connections", 1)],
                      results)
            lines += ["", "![connection burst](burst.png)"]
        return lines + [""]


def timeline_rate(timeline: list[dict]) -> float | None:
    """Connections/s from loadgen's per-second timeline: connected at the end over the time
    from the last point before the first connection to the first point with all of them (a
    cross-check of the handshake-based rate, coarse at one-second resolution)."""
    if not timeline:
        return None
    final = timeline[-1]["connected"]
    first = next((k for k, p in enumerate(timeline) if p["connected"] > 0), None)
    last = next((k for k, p in enumerate(timeline) if p["connected"] >= final), None)
    if first is None or last is None or final == 0:
        return None
    start_t = timeline[first - 1]["t"] if first > 0 else 0.0
    span = timeline[last]["t"] - start_t
    return final / span if span > 0 else None
