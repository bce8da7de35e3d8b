"""S1 balance: the same 4 workers, the same publisher and the same arrival of clients behind
(a) our proxy following herald, (b) HAProxy `leastconn`, (c) HAProxy `roundrobin`; then (a)
again with every load report reaching herald 10 s late.

The load is skewed the way connections are unequal in production: the publisher spreads its
messages over the topics by a Zipf law (a few hot topics carry most messages, most are quiet)
while clients pick topics uniformly, so a handful of clients on hot topics cost far more than
the rest. Clients arrive evenly over minutes and stay. A balancer that counts connections gives
every worker the same number of them; one that follows reported load can steer new clients
away from the workers that happen to hold the hot ones.

Every 2 s the driver reads each worker's deliveries (`worker_fanout_deliveries_total` on its
admin port), connections and CPU (/proc). Over the hold (all clients connected) it reports,
per balancer: deliveries/s per worker and the max/mean ratio of deliveries and of CPU, the
connections per worker, and the clients' p99 delivery latency; plots deliveries and CPU per
worker over time. The delayed run reports the share of new connections each worker got per
10 s interval, and plots it: herding would show as one worker taking most of an interval.

Workers run on CPU 0 (the four share it; herald judges their deliveries against a capacity of
a quarter of what one core delivers, `--balance-capacity-deliveries`, as an operator would
set it for the worker's share of a machine); balancers, herald, the publisher and the load
generator on CPU 1. The rate keeps CPU 0 below saturation: four workers on a full core each get
a quarter of it, whatever their load, and both the CPU ratio and herald's view flatten.
"""

from __future__ import annotations

import heapq
import json
import statistics
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from common import (CLIENT_CPU, CLK_TCK, SERVER_CPU, HAProxy, Proc, cpu_ticks, free_port,
                    loadgen, log, spread, start_fleet_worker, start_herald, start_proxy)

NAME = "balance"
WORKERS = 4
SAMPLE_S = 2.0


def add_args(ap) -> None:
    g = ap.add_argument_group("S1 balance")
    g.add_argument("--balance-clients", type=int, default=6_000, help="clients in all")
    g.add_argument("--balance-topics", type=int, default=1_000,
                   help="topics; clients pick one uniformly")
    g.add_argument("--balance-zipf", type=float, default=1.2,
                   help="Zipf exponent of the messages' spread over topics")
    g.add_argument("--balance-rate", type=float, default=4_000,
                   help="messages per second over all topics (keep the four workers' CPU "
                        "below their one shared core: a saturated core is split evenly by "
                        "the scheduler, which hides every imbalance from CPU figures and "
                        "from herald; 8,000 msg/s saturated it)")
    g.add_argument("--balance-ramp", type=int, default=120,
                   help="seconds over which clients arrive")
    g.add_argument("--balance-hold", type=int, default=60,
                   help="seconds all clients stay connected (the measured window)")
    g.add_argument("--balance-delay", type=int, default=10,
                   help="seconds every load report is held back in the delayed run (0: skip it)")
    g.add_argument("--balance-capacity-deliveries", type=float, default=100_000,
                   help="herald's deliveries/s at which a worker is full")
    g.add_argument("--balance-modes", default="pushfleet,leastconn,roundrobin",
                   help="balancers to compare")


def run(args, work: Path) -> dict:
    modes = args.balance_modes.split(",")
    if args.balance_delay > 0 and "pushfleet" in modes:
        modes.append("pushfleet-delayed")
    results: dict = {mode: [] for mode in modes}
    # Balancers interleaved within each repeat, so a drift of the machine hits them alike.
    # Repeat i draws the same topics and arrival order for every balancer; repeats differ, so
    # the median is over several arrival patterns.
    for i in range(args.repeats):
        for mode in modes:
            log(f"S1 balance: {mode}, run {i + 1}/{args.repeats}")
            r = balance_once(mode, args, work / f"{mode}-{i}", seed=7 + i)
            results[mode].append(r)
            log(f"  deliveries max/mean {r['deliveries_max_mean']:.2f}, CPU max/mean "
                f"{r['cpu_max_mean']:.2f}, p99 {r['p99_us'] / 1000:.1f} ms, "
                f"connections {r['connections']}")
    return results


def balance_once(mode: str, args, work: Path, seed: int) -> dict:
    work.mkdir(parents=True)
    publisher = f"tcp://127.0.0.1:{free_port()}"
    procs: list = []
    relay = None
    front = None
    try:
        report_to = None
        if mode.startswith("pushfleet"):
            herald = start_herald(work, cpu=CLIENT_CPU, extra=[
                "--slow-start", "0s",
                "--capacity-deliveries", str(args.balance_capacity_deliveries)])
            procs.append(herald)
            report_to = herald.url
            if mode == "pushfleet-delayed":
                relay = ReportDelay(herald.url, args.balance_delay)
                report_to = relay.url
        workers = [start_fleet_worker(work, f"w{i + 1}", publisher, herald=report_to,
                                      cpu=SERVER_CPU) for i in range(WORKERS)]
        procs += workers
        if mode.startswith("pushfleet"):
            front = start_proxy(work, herald=herald.url, cpu=CLIENT_CPU)
            procs.append(front)
            wait_table(herald.url, WORKERS, 30 + args.balance_delay)
        else:
            front = HAProxy(work, mode, [w.ws for w in workers], cpu=CLIENT_CPU)
        total_s = args.balance_ramp + args.balance_hold
        pub = Proc("publish", [loadgen(), "publish", "--target", "pushfleet", "--bind",
                               publisher, "--topics", str(args.balance_topics), "--zipf",
                               str(args.balance_zipf), "--rate", str(args.balance_rate),
                               "--duration", f"{total_s + 15}s", "--delay", "2s"],
                   work, cpu=CLIENT_CPU)
        procs.append(pub)
        time.sleep(3)  # the workers' ZeroMQ subscriptions join before the first client
        out = work / "loadgen.json"
        lg = Proc("loadgen", [loadgen(), "run", "--target", "pushfleet", "--url",
                              f"ws://{front.ws}/ws", "--clients", str(args.balance_clients),
                              "--topics", str(args.balance_topics), "--zipf", "0",
                              "--seed", str(seed), "--source-ips", "4",
                              "--ramp", f"{args.balance_ramp}s", "--hold",
                              f"{args.balance_hold}s", "--deflate", "--label", f"S1 {mode}",
                              "--out", str(out)], work, cpu=CLIENT_CPU)
        procs.append(lg)
        start = time.time()
        samples = sample_workers(workers, lg, start, total_s + 60)
        lg.wait(90)
        result = json.loads(out.read_text())
    finally:
        for p in reversed(procs):
            p.stop()
        if isinstance(front, HAProxy):
            front.stop()
        if relay:
            relay.close()
    return summarise(mode, args, workers, samples, result, start)


def wait_table(herald: str, n: int, timeout: float) -> None:
    """Until herald's routing table lists `n` workers with a weight."""
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{herald}/v1/table", timeout=2) as r:
                table = json.load(r)
            seen = sum(1 for w in table.get("workers", []) if w.get("weight", 0) > 0)
            if seen >= n:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"herald's table listed {seen} of {n} workers after {timeout:.0f} s")


def metric(admin: str, name: str) -> float:
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=2) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and (line[len(name)] in " {"))


def sample_workers(workers: list, lg: Proc, start: float, limit_s: float) -> list[dict]:
    """Every SAMPLE_S while the load generator runs: per worker cumulative deliveries, CPU
    seconds and connections."""
    samples = []
    deadline = time.monotonic() + limit_s
    while lg.alive() and time.monotonic() < deadline:
        row = {"t": time.time() - start, "workers": {}}
        for w in workers:
            try:
                row["workers"][w.name] = {
                    "deliveries": metric(w.admin, "worker_fanout_deliveries_total"),
                    "connections": metric(w.admin, "worker_connections"),
                    "cpu_s": cpu_ticks([w.pid]) / CLK_TCK}
            except OSError:
                pass
        samples.append(row)
        time.sleep(SAMPLE_S)
    return samples


def summarise(mode: str, args, workers: list, samples: list[dict], result: dict,
              start: float) -> dict:
    names = [w.name for w in workers]
    # Rates per sample interval, per worker.
    series = {n: {"t": [], "deliveries_per_s": [], "cpu_cores": []} for n in names}
    for a, b in zip(samples, samples[1:]):
        dt = b["t"] - a["t"]
        for n in names:
            if n in a["workers"] and n in b["workers"]:
                s = series[n]
                s["t"].append(b["t"])
                s["deliveries_per_s"].append(
                    (b["workers"][n]["deliveries"] - a["workers"][n]["deliveries"]) / dt)
                s["cpu_cores"].append((b["workers"][n]["cpu_s"] - a["workers"][n]["cpu_s"]) / dt)
    # The hold: from the last arrival (plus a few seconds) to the end of the hold.
    lo, hi = args.balance_ramp + 5, args.balance_ramp + args.balance_hold - 2
    hold = [s for s in samples if lo <= s["t"] <= hi]
    per_worker = {}
    if len(hold) >= 2:
        a, b = hold[0], hold[-1]
        dt = b["t"] - a["t"]
        for n in names:
            if n in a["workers"] and n in b["workers"]:
                per_worker[n] = {
                    "deliveries_per_s": (b["workers"][n]["deliveries"]
                                         - a["workers"][n]["deliveries"]) / dt,
                    "cpu_cores": (b["workers"][n]["cpu_s"] - a["workers"][n]["cpu_s"]) / dt,
                    "connections": b["workers"][n]["connections"]}

    def max_mean(key: str) -> float:
        vals = [v[key] for v in per_worker.values()]
        return max(vals) / statistics.mean(vals) if vals and statistics.mean(vals) > 0 else 0.0

    # Hold-window p99 from the load generator's per-second timeline (worst second's p99 is
    # too noisy; the median of per-second p99s is the steady figure, the max the worst).
    tl = [p for p in result["timeline"] if lo <= p["t"] <= hi and p["messages"] > 0]
    p99s = [p["p99_us"] for p in tl]
    shares = interval_shares(result["timeline"], 10)
    return {
        "mode": mode, "per_worker": per_worker, "series": series,
        "deliveries_max_mean": max_mean("deliveries_per_s"), "cpu_max_mean": max_mean("cpu_cores"),
        "connections": {n: int(v["connections"]) for n, v in per_worker.items()},
        "connections_max_mean": max_mean("connections"),
        "p99_us": statistics.median(p99s) if p99s else 0, "p99_worst_us": max(p99s, default=0),
        "latency_us": result["latency_us"], "connected": result["connected"],
        "failed": result["failed"], "first_error": result["first_error"],
        "gaps": result["gaps"], "dups": result["dups"], "by_worker": result["by_worker"],
        "shares": shares,
        "max_interval_share": max((max(s["share"].values(), default=0) for s in shares
                                   if s["new"] >= 20), default=0),
    }


def interval_shares(timeline: list[dict], every_s: int) -> list[dict]:
    """New connections per worker in each `every_s` interval of the run, as shares."""
    buckets: dict[int, dict[str, int]] = {}
    for p in timeline:
        b = buckets.setdefault(int(p["t"] // every_s), {})
        for w, n in (p.get("new_by_worker") or {}).items():
            b[w] = b.get(w, 0) + n
    rows = []
    for k in sorted(buckets):
        total = sum(buckets[k].values())
        if total:
            rows.append({"t": k * every_s, "new": total,
                         "share": {w: n / total for w, n in sorted(buckets[k].items())}})
    return rows


class ReportDelay:
    """Holds every load report for `delay_s` before passing it to herald, so herald (and the
    proxies it feeds) see each worker as it was `delay_s` ago. The worker waits at most 2 s for
    an answer, so it is answered at once with herald's last answer to that worker (drain and
    peers are level-triggered: the next answer repeats them)."""

    def __init__(self, herald: str, delay_s: float):
        self.herald, self.delay_s = herald, delay_s
        self.replies: dict[str, bytes] = {}
        self.queue: list = []
        self.cond = threading.Condition()
        self.closed = False
        relay = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    worker = json.loads(body)["worker"]["id"]
                except (ValueError, KeyError, TypeError):
                    worker = ""
                with relay.cond:
                    heapq.heappush(relay.queue, (time.monotonic() + relay.delay_s,
                                                 id(body), self.path, body, worker))
                    relay.cond.notify()
                    reply = relay.replies.get(worker, b'{"version":1,"drain":false,"peers":[]}')
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        threading.Thread(target=self.forward, daemon=True).start()

    def forward(self) -> None:
        while True:
            with self.cond:
                while not self.closed and (not self.queue
                                           or self.queue[0][0] > time.monotonic()):
                    self.cond.wait(0.05)
                if self.closed:
                    return
                _, _, path, body, worker = heapq.heappop(self.queue)
            req = urllib.request.Request(self.herald + path, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    reply = r.read()
                with self.cond:
                    self.replies[worker] = reply
            except OSError:
                pass

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------------------------------------
# report


LABELS = {"pushfleet": "pushfleet proxy + herald", "leastconn": "HAProxy leastconn",
          "roundrobin": "HAProxy roundrobin",
          "pushfleet-delayed": "pushfleet proxy + herald, reports 10 s late"}


def report(out: Path, args, balance: dict) -> list[str]:
    lines = [f"## S1: balance, {WORKERS} workers, {args.balance_clients:,} clients arriving "
             f"over {args.balance_ramp} s", "",
             f"{args.balance_rate:,.0f} messages/s over {args.balance_topics:,} topics (Zipf "
             f"{args.balance_zipf}: a few hot topics, most quiet); clients pick topics "
             f"uniformly, so deliveries per connection differ widely. Measured over the "
             f"{args.balance_hold} s hold. Workers on CPU {SERVER_CPU} (sharing it), balancers, "
             f"herald and the load on CPU {CLIENT_CPU}.", "",
             "| balancer | deliveries max/mean | CPU max/mean | connections max/mean | "
             "p99 latency ms (median second) | worst second p99 ms | failed | gaps / dups |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for mode, runs in balance.items():
        cells = []
        for key, scale, d in [("deliveries_max_mean", 1, 2), ("cpu_max_mean", 1, 2),
                              ("connections_max_mean", 1, 2), ("p99_us", 1e-3, 1),
                              ("p99_worst_us", 1e-3, 1)]:
            med, lo, hi = spread([r[key] * scale for r in runs])
            cells.append(f"{med:.{d}f} ({lo:.{d}f}–{hi:.{d}f})")
        cells.append(str(sum(r["failed"] for r in runs)))
        cells.append(f"{sum(r['gaps'] for r in runs)} / {sum(r['dups'] for r in runs)}")
        lines.append(f"| {LABELS.get(mode, mode)} | " + " | ".join(cells) + " |")
    lines += ["", "Per worker over the hold (first run): deliveries/s, CPU cores, connections.",
              "", "| balancer | " + " | ".join(f"w{i + 1}" for i in range(WORKERS)) + " |",
              "| --- |" + " --- |" * WORKERS]
    for mode, runs in balance.items():
        pw = runs[0]["per_worker"]
        lines.append(f"| {LABELS.get(mode, mode)} | " + " | ".join(
            f"{v['deliveries_per_s']:,.0f}/s, {v['cpu_cores']:.3f}, {v['connections']:,.0f}"
            for _, v in sorted(pw.items())) + " |")
    lines.append("")
    if "pushfleet-delayed" in balance:
        runs = balance["pushfleet-delayed"]
        med, lo, hi = spread([r["max_interval_share"] for r in runs])
        fresh = balance.get("pushfleet")
        fresh_txt = ""
        if fresh:
            fm, flo, fhi = spread([r["max_interval_share"] for r in fresh])
            fresh_txt = f" (fresh reports: {fm:.0%}, {flo:.0%}–{fhi:.0%})"
        lines += [f"With every report {args.balance_delay} s late, the largest share of new "
                  f"connections one worker took in any 10 s interval was {med:.0%} "
                  f"({lo:.0%}–{hi:.0%}){fresh_txt}; an even split is "
                  f"{1 / WORKERS:.0%}, herding would approach 100%.", ""]
    plot(out, balance)
    lines += ["![deliveries per worker over time](balance-deliveries.png)", "",
              "![CPU per worker over time](balance-cpu.png)", ""]
    if "pushfleet-delayed" in balance:
        lines += ["![share of new connections per worker per 10 s](balance-shares.png)", ""]
    return lines


def plot(out: Path, balance: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    modes = list(balance)
    for key, ylabel, name in [("deliveries_per_s", "deliveries/s", "balance-deliveries.png"),
                              ("cpu_cores", "CPU (cores)", "balance-cpu.png")]:
        fig, axes = plt.subplots(1, len(modes), figsize=(4 * len(modes), 3.4), sharey=True,
                                 squeeze=False)
        for ax, mode in zip(axes[0], modes):
            for w, s in sorted(balance[mode][0]["series"].items()):
                ax.plot(s["t"], s[key], label=w, linewidth=1)
            ax.set_title(LABELS.get(mode, mode), fontsize=9)
            ax.set_xlabel("seconds")
            ax.grid(True, alpha=0.3)
        axes[0][0].set_ylabel(ylabel)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
    if "pushfleet-delayed" in balance:
        fig, axes = plt.subplots(1, 2 if "pushfleet" in balance else 1, figsize=(10, 3.4),
                                 squeeze=False)
        for ax, mode in zip(axes[0], [m for m in ("pushfleet", "pushfleet-delayed")
                                      if m in balance]):
            shares = balance[mode][0]["shares"]
            workers = sorted({w for s in shares for w in s["share"]})
            bottom = [0.0] * len(shares)
            for w in workers:
                vals = [s["share"].get(w, 0) for s in shares]
                ax.bar([s["t"] + 5 for s in shares], vals, width=9, bottom=bottom, label=w)
                bottom = [b + v for b, v in zip(bottom, vals)]
            ax.set_title(LABELS[mode], fontsize=9)
            ax.set_xlabel("seconds (10 s intervals)")
            ax.set_ylabel("share of new connections")
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "balance-shares.png", dpi=100)
        plt.close(fig)
