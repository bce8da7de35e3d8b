#!/usr/bin/env python3
"""The side-by-side benchmark suite: pushfleet against what users would pick instead, in the
same run on the same machine. Run it with `bash tests/bench/run.sh` (it builds and installs what
this needs); it writes `report.md`, PNG plots and every raw result (`results.json`) into the
folder it names.

Scenarios (`--scenario`, repeatable; default all), one module each:
  balance       S1 (balance.py): 4 workers behind our proxy + herald, HAProxy leastconn and
                HAProxy roundrobin; skewed topics, clients arriving over minutes; per-worker
                deliveries/s and CPU over time, max/mean, p99; then herald's reports delayed.
  fanout        S2 (fanout.py): subscribers on one hot topic at rising publish rates until p99
                passes 200 ms; the worker, nchan and Pushpin, deflate on and off.
  memory        S3 (memory.py): idle connections (deflate offered): memory per connection of
                the worker, nchan and Pushpin.
  proxy-memory  S3 (edge.py): the proxy's memory per relayed connection against HAProxy's.
  burst         S4 (edge.py): new WebSocket connections/s through our proxy and HAProxy (TCP
                mode) on one core each, with p99 handshake time.

Servers run on CPU 0 and the load generators and publishers on CPU 1 (`taskset`), said in the
report. Each figure is measured `--repeats` times; the report gives the median and the spread
(min-max). Only 127.0.0.x is used; every process started is stopped, every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import balance  # noqa: E402
import edge  # noqa: E402
import fanout  # noqa: E402
import headlines  # noqa: E402
import memory  # noqa: E402
from common import CLIENT_CPU, RELEASE, SERVER_CPU, log, stop_on_sigterm  # noqa: E402

# Report order: S1 .. S4.
SCENARIOS = {"balance": balance, "fanout": fanout, "memory": memory,
             "proxy-memory": edge.ProxyMemory, "burst": edge.Burst}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for the report")
    ap.add_argument("--scenario", action="append", choices=list(SCENARIOS),
                    help="run only these (repeatable) [default: all]")
    ap.add_argument("--servers", default="pushfleet,nchan,pushpin",
                    help="servers for S2 and S3 (pushfleet, nchan, pushpin)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each figure")
    for module in dict.fromkeys(SCENARIOS.values()):
        module.add_args(ap)
    args = ap.parse_args()
    stop_on_sigterm()
    chosen = [name for name in SCENARIOS if name in (args.scenario or SCENARIOS)]
    for binary in ["worker", "proxy", "pushfleet", "loadgen"]:
        if not (RELEASE / binary).exists():
            sys.exit(f"{RELEASE / binary} missing: run tests/bench/run.sh, which builds it")
    if shutil.which("taskset") is None:
        sys.exit("taskset missing (util-linux)")
    if (os.cpu_count() or 1) < 2:
        sys.exit("the suite pins servers and load generators to separate CPUs: needs 2")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pushfleet-bench-") as tmp:
        for name in chosen:
            work = Path(tmp) / name
            work.mkdir()
            log(f"scenario {name}: starting")
            results[name] = SCENARIOS[name].run(args, work)
            # Written after every scenario, so a long run interrupted keeps what it measured.
            write_report(args, chosen, results)
            log(f"scenario {name}: done after {time.monotonic() - started:.0f} s")
            for f in work.glob("*.log"):
                shutil.copy(f, args.out / f"{name}-{f.name}")
    log(f"report: {args.out / 'report.md'}")


def write_report(args, chosen: list[str], results: dict) -> None:
    lines = ["# pushfleet side-by-side benchmarks", "",
             f"Run {time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} CPUs; servers pinned "
             f"to CPU {SERVER_CPU}, load generators and publishers to CPU {CLIENT_CPU} "
             f"(`taskset`); {args.repeats} repeat(s) per figure, median with the spread "
             "(min–max) in brackets. Loopback only.", "",
             "Command: `bash tests/bench/run.sh " + " ".join(sys.argv[1:]) + "`", ""]
    lines += headlines.lines(results)
    for name in chosen:
        if name in results:
            lines += SCENARIOS[name].report(args.out, args, results[name])
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
