"""S2 fan-out: subscribers on one hot topic, ~500-byte JSON published at rising rates (one
publisher, one epoch, each step's wall-clock window reported) until p99 passes 200 ms:
deliveries/s, server cores used, server CPU µs per delivery, p50/p99 latency per step, for the
worker, nchan and Pushpin, with permessage-deflate on and off."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from common import (CLIENT_CPU, CLK_TCK, Proc, cpu_ticks, loadgen, log, spread, start_peer,
                    start_worker)

NAME = "fanout"


def add_args(ap) -> None:
    g = ap.add_argument_group("S2 fan-out")
    g.add_argument("--subscribers", type=int, default=10_000, help="subscribers on the topic")
    g.add_argument("--rates", default="10,20,50,100,200,400",
                   help="publish rates (messages/s), one step each")
    g.add_argument("--step-seconds", type=int, default=10, help="length of each rate step")


def run(args, work: Path) -> dict:
    results = {}
    rates = [int(r) for r in args.rates.split(",")]
    for kind in args.servers.split(","):
        for deflate in (True, False):
            key = f"{kind}, deflate {'on' if deflate else 'off'}"
            runs = []
            for i in range(args.repeats):
                log(f"S2 fan-out: {key}, run {i + 1}/{args.repeats}")
                runs.append(fanout_once(kind, deflate, args.subscribers, rates,
                                        args.step_seconds, work))
            results[key] = runs
    return results


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
                                     "--source-ips", "4",
                                     "--hold", f"{hold}s", "--label", f"S2 {kind}",
                                     "--out", str(out)] + (["--deflate"] if deflate else []),
                  work, cpu=CLIENT_CPU)
        time.sleep(ramp + 3)
        steps = ",".join(f"{r}:{step_s}s" for r in rates)
        # The first step's CPU counts from here; the publisher's start delay adds idle time
        # only.
        base_ticks = cpu_ticks(server.pids)
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
    prev_ticks = base_ticks
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
            "rate": step["rate"], "published_per_s": step.get("sent", step["messages"]) / window,
            "deliveries_per_s": per_s, "p50_us": p50, "p99_us": p99,
            "server_cpu_cores": (cpu_s / window) if cpu_s is not None else None,
            "cpu_us_per_delivery": (cpu_s * 1e6 / (per_s * window))
            if cpu_s is not None and per_s > 0 else None,
            "deliveries_per_core_s": (per_s * window / cpu_s) if cpu_s else None,
        })
    return {"server": kind, "deflate": deflate, "negotiated": result["deflate_negotiated"],
            "connected": result["connected"], "failed": result["failed"],
            "gaps": result["gaps"], "dups": result["dups"], "steps": rows}


def template(runs: list[dict]) -> list[dict]:
    """The steps of the run that has the most (a run whose publisher failed has none)."""
    return max(runs, key=lambda r: len(r["steps"]))["steps"]


def step_values(runs: list[dict], i: int, key: str, scale: float = 1) -> list[float]:
    """Step `i`'s `key` in every run that has it."""
    return [r["steps"][i][key] * scale for r in runs
            if i < len(r["steps"]) and r["steps"][i].get(key) is not None]


COLUMNS = [("published_per_s", 1, 1), ("deliveries_per_s", 1, 0), ("server_cpu_cores", 1, 2),
           ("deliveries_per_core_s", 1, 0), ("cpu_us_per_delivery", 1, 2), ("p50_us", 1e-3, 1),
           ("p99_us", 1e-3, 1)]


def report(out: Path, args, fanout: dict) -> list[str]:
    lines = [f"## S2: fan-out, {args.subscribers:,} subscribers on one topic, ~500-byte JSON",
             "",
             "Each step publishes at its rate for its duration and no longer: a server that "
             "answers each HTTP publish only once it has delivered it (nchan, Pushpin) takes "
             "fewer messages than the rate, which shows as *published/s* below the target. "
             "Latency is publisher timestamp to the subscriber's receipt; CPU is the server's "
             "processes (/proc utime + stime) over the step.",
             ""]
    for key, runs in fanout.items():
        lines += [f"### {key}", "",
                  "| target rate | published/s | deliveries/s | server cores | "
                  "deliveries per core-second | CPU µs/delivery | p50 ms | p99 ms |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for i, step in enumerate(template(runs)):
            cells = []
            for k, scale, d in COLUMNS:
                vals = step_values(runs, i, k, scale)
                if vals:
                    med, lo, hi = spread(vals)
                    cells.append(f"{med:,.{d}f} ({lo:,.{d}f}–{hi:,.{d}f})")
                else:
                    cells.append("—")
            lines.append(f"| {step['rate']:g}/s | " + " | ".join(cells) + " |")
        empty = sum(1 for r in runs if not r["steps"])
        lines.append("")
        for n, r in enumerate(runs, 1):
            lines.append(f"Run {n}: connected {r['connected']:,}, failed {r['failed']:,}, "
                         f"deflate negotiated on {r['negotiated']:,}, gaps {r['gaps']:,}, "
                         f"duplicates {r['dups']:,}"
                         + (" (its publisher failed: no steps)" if not r["steps"] else "")
                         + ".")
        if empty:
            lines.append(f"Figures are over the {len(runs) - empty} run(s) with steps.")
        lines.append("")
    plot(out, fanout)
    lines += ["![p99 latency against publish rate](fanout-p99.png)", "",
              "![server CPU per delivery](fanout-cpu.png)", ""]
    return lines


def headline(fanout: dict) -> dict:
    """Per server and compression: the highest deliveries/s of a step whose median p99 stayed
    within 200 ms, and the CPU µs per delivery at that step."""
    best = {}
    for key, runs in fanout.items():
        top = None
        for i, step in enumerate(template(runs)):
            p99 = statistics.median(step_values(runs, i, "p99_us"))
            rate = statistics.median(step_values(runs, i, "deliveries_per_s"))
            cpu = step_values(runs, i, "cpu_us_per_delivery")
            if rate > 0 and p99 <= 200_000 and (top is None or rate > top["deliveries_per_s"]):
                top = {"rate": step["rate"], "deliveries_per_s": rate,
                       "cpu_us_per_delivery": statistics.median(cpu) if cpu else None}
        best[key] = top
    return best


def plot(out: Path, fanout: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for metric, ylabel, name in [("p99_us", "p99 latency (ms)", "fanout-p99.png"),
                                 ("cpu_us_per_delivery", "server CPU µs per delivery",
                                  "fanout-cpu.png")]:
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, runs in fanout.items():
            xs, ys = [], []
            for i, step in enumerate(template(runs)):
                vals = step_values(runs, i, metric)
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


