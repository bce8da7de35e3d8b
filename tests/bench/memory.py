"""S3 idle memory, servers: ~15k idle connections with permessage-deflate offered; resident
memory per connection of the worker, nchan and Pushpin (every process of a peer summed), read
from /proc while the connections are held."""

from __future__ import annotations

import json
import time
from pathlib import Path

from common import CLIENT_CPU, Proc, loadgen, log, rss_kib, spread, start_peer, start_worker

NAME = "memory"


def add_args(ap) -> None:
    g = ap.add_argument_group("S3 idle memory")
    g.add_argument("--idle-connections", type=int, default=15_000,
                   help="idle connections held against each server")


def run(args, work: Path) -> dict:
    results = {}
    for kind in args.servers.split(","):
        runs = []
        for i in range(args.repeats):
            log(f"S3 memory: {kind}, run {i + 1}/{args.repeats}")
            runs.append(memory_once(kind, args.idle_connections, work))
            log(f"  {runs[-1]['kib_per_connection']:.1f} KiB per connection")
        results[kind] = runs
    return results


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
                                     "--source-ips", "4",
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




def report(out: Path, args, memory: dict) -> list[str]:
    lines = ["## S3: idle memory per connection (permessage-deflate offered)", "",
             "| server | connections | deflate negotiated | KiB per connection |",
             "| --- | --- | --- | --- |"]
    for kind, runs in memory.items():
        med, lo, hi = spread([r["kib_per_connection"] for r in runs])
        lines.append(f"| {kind} | {runs[0]['connected']:,} | {runs[0]['deflate']:,} | "
                     f"{med:.1f} ({lo:.1f}–{hi:.1f}) |")
    return lines + [""]
