#!/usr/bin/env python3
"""Soak: a worker behind our proxy under steady load for a long time (default 30 minutes at
about half of the capacity measured for this shape, see --rate), then every client leaves.
Not part of the tests. Run it with `bash tests/bench/soak.sh` (it builds what it needs).

Every `--every` seconds it prints, for the worker and the proxy: resident memory, open file
descriptors, threads, and the connections and subscriptions their metrics report, with the
clients' delivery rate and p99 latency. It passes (exit 0) when

  - the worker's and the proxy's RSS at the end of the load is less than 5% (`--rss-growth`)
    above what they used once the load had settled (after `--warmup`), and
  - after the clients leave, open files, threads, connections and subscriptions come back to
    what they were before the clients came (within `--settle` seconds),
  - and no client saw a gap or a duplicate.

It prints why it failed otherwise. The worker runs on CPU 0; the proxy, the publisher and the
load generator on CPU 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (CLIENT_CPU, SERVER_CPU, Proc, free_port, loadgen, log,  # noqa: E402
                    process_cpu_seconds, rss_kib, start_fleet_worker, start_proxy,
                    stop_on_sigterm)


def open_files(pid: int) -> int:
    try:
        return len(list(Path(f"/proc/{pid}/fd").iterdir()))
    except OSError:
        return -1


def threads(pid: int) -> int:
    try:
        return len(list(Path(f"/proc/{pid}/task").iterdir()))
    except OSError:
        return -1


def metric(admin: str, name: str) -> float:
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=2) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and line[len(name)] in " {")


def snapshot(worker: Proc, proxy: Proc) -> dict:
    return {
        "t": time.monotonic(),
        "worker": {"rss_kib": rss_kib([worker.pid]), "fds": open_files(worker.pid),
                   "cpu_s": process_cpu_seconds(worker.pid),
                   "threads": threads(worker.pid),
                   "connections": metric(worker.admin, "worker_connections"),
                   "subscriptions": metric(worker.admin, "worker_subscriptions")},
        "proxy": {"rss_kib": rss_kib([proxy.pid]), "fds": open_files(proxy.pid),
                  "threads": threads(proxy.pid),
                  "connections": metric(proxy.admin, "proxy_connections_active")},
    }


def line(s: dict, started: float, prev: dict | None = None) -> str:
    w, p = s["worker"], s["proxy"]
    cores = ""
    if prev is not None and s["t"] > prev["t"]:
        used = (w["cpu_s"] - prev["worker"]["cpu_s"]) / (s["t"] - prev["t"])
        cores = f" cpu {used:4.2f}"
    return (f"{s['t'] - started:7.0f}s  worker{cores} rss {w['rss_kib'] / 1024:7.1f} MiB fds "
            f"{w['fds']:6} threads {w['threads']:3} conns {w['connections']:6.0f} subs "
            f"{w['subscriptions']:6.0f} | proxy rss {p['rss_kib'] / 1024:7.1f} MiB fds "
            f"{p['fds']:6} threads {p['threads']:3} conns {p['connections']:6.0f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30, help="how long the load lasts")
    ap.add_argument("--clients", type=int, default=5_000)
    ap.add_argument("--topics", type=int, default=50, help="clients spread over these")
    ap.add_argument("--rate", type=float, default=500,
                    help="messages/s over all topics (default: 50k deliveries/s to 5,000 "
                         "clients on 50 topics with deflate, about half of capacity: "
                         "1,000 msg/s of this shape fill the worker's core and p99 passes "
                         "300 ms, 500 msg/s use 0.45 cores with p99 about 60 ms)")
    ap.add_argument("--every", type=float, default=30, help="seconds between samples")
    ap.add_argument("--warmup", type=float, default=120,
                    help="seconds after the last client arrives before the baseline RSS")
    ap.add_argument("--rss-growth", type=float, default=0.05, help="allowed RSS growth")
    ap.add_argument("--settle", type=float, default=30,
                    help="seconds the counts have to come back after the clients leave")
    ap.add_argument("--out", type=Path, help="write every sample as JSON here")
    args = ap.parse_args()
    stop_on_sigterm()
    hold_s = args.minutes * 60
    ramp_s = max(5, args.clients // 1000)
    samples: list[dict] = []
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="pushfleet-soak-") as tmp:
        work = Path(tmp)
        publisher = f"tcp://127.0.0.1:{free_port()}"
        procs: list[Proc] = []
        try:
            worker = start_fleet_worker(work, "soak-worker", publisher, cpu=SERVER_CPU)
            procs.append(worker)
            proxy = start_proxy(work, workers=[worker.ws], cpu=CLIENT_CPU)
            procs.append(proxy)
            # The publisher runs from before the clients come until after they leave, so the
            # worker's connection to it is part of the baseline.
            pub = Proc("publish", [loadgen(), "publish", "--target", "pushfleet", "--bind",
                                   publisher, "--topics", str(args.topics), "--rate",
                                   str(args.rate), "--duration",
                                   f"{int(ramp_s + hold_s + args.settle + 60)}s", "--delay",
                                   "2s"],
                       work, cpu=CLIENT_CPU)
            procs.append(pub)
            deadline = time.monotonic() + 20
            while metric(worker.admin, "worker_upstream_connected") < 1:
                if time.monotonic() > deadline or not pub.alive():
                    raise SystemExit("soak: the worker never connected to the publisher")
                time.sleep(0.2)
            time.sleep(1)  # the worker closes the admin connections of those polls
            before = snapshot(worker, proxy)
            started = before["t"]
            log("before the clients: " + line(before, started))
            out = work / "loadgen.json"
            lg = Proc("loadgen", [loadgen(), "run", "--target", "pushfleet", "--url",
                                  f"ws://{proxy.ws}/ws", "--clients", str(args.clients),
                                  "--topics", str(args.topics), "--ramp", f"{ramp_s}s",
                                  "--hold", f"{int(hold_s)}s", "--deflate", "--source-ips",
                                  "4", "--label", "soak", "--out", str(out)],
                      work, cpu=CLIENT_CPU)
            procs.append(lg)
            baseline = None
            next_sample = time.monotonic() + args.every
            while lg.alive() and time.monotonic() < started + ramp_s + hold_s + 120:
                time.sleep(max(0.0, min(1.0, next_sample - time.monotonic())))
                if time.monotonic() < next_sample:
                    continue
                next_sample += args.every
                s = snapshot(worker, proxy)
                log(line(s, started, samples[-1] if samples else before))
                samples.append(s)
                if baseline is None and s["t"] >= started + ramp_s + args.warmup:
                    baseline = s
                    log("baseline taken (load settled)")
            loaded = samples[-1] if samples else None
            lg.wait(120)
            result = json.loads(out.read_text())
            log(f"clients: {result['connected']:,} connected, {result['failed']} failed, "
                f"{result['messages']:,} messages, gaps {result['gaps']}, dups "
                f"{result['dups']}, latency p99 {result['latency_us']['p99'] / 1000:.1f} ms")
            if result["gaps"] or result["dups"]:
                failures.append(f"clients saw {result['gaps']} gaps and {result['dups']} "
                                "duplicates")
            if result["failed"]:
                failures.append(f"{result['failed']} clients failed: {result['first_error']}")
            if baseline is None or loaded is None or loaded is baseline:
                failures.append("the load ended before a baseline after --warmup: run longer")
            else:
                cores = ((loaded["worker"]["cpu_s"] - baseline["worker"]["cpu_s"])
                         / (loaded["t"] - baseline["t"]))
                log(f"worker used {cores:.2f} cores under load (at half of capacity "
                    "about 0.5; adjust --rate otherwise)")
                for role in ("worker", "proxy"):
                    b, e = baseline[role]["rss_kib"], loaded[role]["rss_kib"]
                    growth = (e - b) / b if b else 0.0
                    log(f"{role} RSS {b / 1024:.1f} → {e / 1024:.1f} MiB ({growth:+.1%}) over "
                        f"{(loaded['t'] - baseline['t']) / 60:.1f} min of load")
                    if growth >= args.rss_growth:
                        failures.append(f"{role} RSS grew {growth:.1%} (limit "
                                        f"{args.rss_growth:.0%})")
            # After the clients left: counts back to where they were.
            deadline = time.monotonic() + args.settle
            while True:
                after = snapshot(worker, proxy)
                diffs = [f"{role} {k} {before[role][k]:g} → {after[role][k]:g}"
                         for role in ("worker", "proxy")
                         for k in ("fds", "threads", "connections", "subscriptions")
                         if k in before[role] and after[role][k] > before[role][k]]
                if not diffs or time.monotonic() > deadline:
                    break
                time.sleep(1)
            samples.append(after)
            log("after the clients left: " + line(after, started))
            if diffs:
                failures.append("not back to the baseline after the clients left: "
                                + "; ".join(diffs))
        finally:
            for p in reversed(procs):
                p.stop()
    if args.out:
        args.out.write_text(json.dumps(samples, indent=1))
    if failures:
        for f in failures:
            log(f"FAIL: {f}")
        return 1
    log("PASS: memory flat under load, every count back to its baseline, no gap or duplicate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
