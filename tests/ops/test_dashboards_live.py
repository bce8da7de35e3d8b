"""A real Prometheus scrapes the local fleet under traffic; every dashboard query must return data.

The fleet is the launcher of `cargo run --release` (herald, three workers, the demo publisher,
the proxy), on shifted ports. Prometheus runs with ops/prometheus/local.yml, its targets moved
by the same offset, and the project's rule files. WebSocket clients connect through the proxy,
subscribe with history, some with permessage-deflate, and some leave and come back. Then:

- every target of every panel in ops/grafana/dashboards/*.json, with Grafana's variables
  filled in as "All", returns at least one non-NaN sample over the traffic window (no dead
  panels, no metric-name typos, no label that does not exist);
- every dashboard variable's label_values() query lists values, every annotation query runs;
- every recording rule and alert rule evaluates without error and every recording rule
  returns data;
- no alert fires on this healthy fleet.

Needs: the release launcher (PUSHFLEET_BIN, default target/release/pushfleet), `prometheus`
on PATH (Debian package), and websockets + PyYAML in the venv.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import websockets
import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((REPO / "ops/grafana/dashboards").glob("*.json"))
LOCAL_YML = REPO / "ops/prometheus/local.yml"
PORT_OFFSET = int(os.environ.get("PUSHFLEET_OPS_PORT_OFFSET", "600"))
SCRAPE = "1s"
# Grafana's values for its built-in variables at this scrape interval and range.
RATE_INTERVAL = "8s"
CLIENTS = 40
TRAFFIC_SECONDS = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = cond()
            if last:
                return last
        except (OSError, ValueError) as e:
            last = e
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def http_json(url: str, data: dict | None = None, timeout: float = 10.0) -> dict:
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    with urllib.request.urlopen(url, data=body, timeout=timeout) as r:
        return json.load(r)


class Process:
    """A child process with its output in a file; stopped with SIGINT, then killed."""

    def __init__(self, name: str, args: list[str], log: Path):
        self.name, self.log = name, log
        self.file = open(log, "wb")
        self.proc = subprocess.Popen(args, stdout=self.file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def stop(self, grace: float = 15.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.file.close()
        return self.proc.returncode

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError as e:
            return f"(no log: {e})"


def shifted_config(announce: dict, rules_dir: Path, out: Path) -> Path:
    """ops/prometheus/local.yml with every static target moved by the fleet's port offset,
    scraped every second, its rule files by absolute path. The local config names the
    default ports, so each target must be one the launcher announced after the shift."""
    config = yaml.safe_load(LOCAL_YML.read_text())
    config.setdefault("global", {}).update(scrape_interval=SCRAPE, scrape_timeout=SCRAPE,
                                           evaluation_interval=SCRAPE)
    announced = {announce["herald"], announce["proxy_admin"]}
    announced |= {w["admin"] for w in announce["workers"]}
    announced = {a.removeprefix("http://").rstrip("/") for a in announced}
    seen = set()
    for job in config["scrape_configs"]:
        job.pop("scrape_interval", None)
        job.pop("scrape_timeout", None)
        for static in job.get("static_configs", []):
            moved = []
            for t in static["targets"]:
                host, port = t.rsplit(":", 1)
                moved.append(f"{host}:{int(port) + PORT_OFFSET}")
            static["targets"] = moved
            seen |= set(moved)
    missing = announced - seen
    assert not missing, f"ops/prometheus/local.yml does not scrape {sorted(missing)}"
    config["rule_files"] = [str((LOCAL_YML.parent / f).resolve())
                            for f in config.get("rule_files", [])]
    assert config["rule_files"], "ops/prometheus/local.yml loads no rule files"
    config.pop("alerting", None)
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


async def client(url: str, n: int, stop_at: float, stats: dict) -> None:
    """One client: subscribes to a match with history; every third one leaves and comes
    back (a close 1000, a new placement, a resume); half negotiate permessage-deflate."""
    compression = "deflate" if n % 2 == 0 else None
    topic = f"match.{n % 3 + 1}"
    position = None
    while time.monotonic() < stop_at:
        async with websockets.connect(url, compression=compression, open_timeout=10,
                                      max_size=None) as ws:
            sub = {"op": "subscribe", "id": 1, "topic": topic, "last": 20}
            if position:
                sub["since"] = position
            await ws.send(json.dumps(sub))
            leave_at = (time.monotonic() + random.uniform(5, 10) if n % 3 == 0
                        else stop_at)
            while time.monotonic() < min(leave_at, stop_at):
                try:
                    raw = await asyncio.wait_for(ws.recv(), timeout=1.0)
                except asyncio.TimeoutError:
                    continue
                msg = json.loads(raw)
                if msg.get("type") == "message":
                    stats["messages"] += 1
                    if "position" in msg:
                        position = msg["position"]
                elif msg.get("type") == "ack" and "history" in msg:
                    stats["acks"] += 1
        stats["sessions"] += 1


async def traffic(url: str, seconds: float) -> dict:
    stats = {"messages": 0, "acks": 0, "sessions": 0}
    stop_at = time.monotonic() + seconds
    await asyncio.wait_for(
        asyncio.gather(*(client(url, n, stop_at, stats) for n in range(CLIENTS))),
        timeout=seconds + 30)
    return stats


def substitute(expr: str, range_seconds: int) -> str:
    """Fills Grafana's variables the way Grafana would for "All" and this scrape interval."""
    for name, value in {"$__rate_interval": RATE_INTERVAL, "$__interval": "2s",
                        "$__range": f"{range_seconds}s", "$worker": ".*",
                        "$instance": ".*"}.items():
        expr = expr.replace(name, value)
    leftover = re.findall(r"\$\{?\w+", expr)
    assert not leftover, f"unknown variable {leftover} in {expr}"
    return expr


def has_data(result: list) -> bool:
    return any(not math.isnan(float(v)) for series in result for _, v in series["values"])


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    binary = Path(os.environ.get("PUSHFLEET_BIN", REPO / "target/release/pushfleet"))
    assert binary.exists(), f"{binary} missing: build it with cargo build --release -p pushfleet"
    prometheus = shutil.which("prometheus")
    assert prometheus, "prometheus not on PATH (Debian package prometheus)"
    tmp = tmp_path_factory.mktemp("ops")
    announce_file = tmp / "announce.json"
    fleet = Process("fleet", [str(binary), "--port-offset", str(PORT_OFFSET), "--minute",
                              "250ms", "--restart-after", "0s", "--ops-dir", str(REPO / "ops/local"),
                              "--announce-file", str(announce_file)], tmp / "fleet.log")
    prom = None
    try:
        def announced():
            assert fleet.proc.poll() is None, f"the fleet exited\n{fleet.tail()}"
            return announce_file.exists() and json.loads(announce_file.read_text())
        announce = wait_until(announced, 60, "the fleet's announce file")
        config = shifted_config(announce, LOCAL_YML.parent, tmp / "prometheus.yml")
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        prom = Process("prometheus", [prometheus, f"--config.file={config}",
                                      f"--storage.tsdb.path={tmp / 'tsdb'}",
                                      f"--web.listen-address=127.0.0.1:{port}",
                                      "--log.level=warn"], tmp / "prometheus.log")
        def ready():
            assert prom.proc.poll() is None, f"Prometheus exited\n{prom.tail()}"
            return urllib.request.urlopen(f"{base}/-/ready", timeout=2).status == 200
        wait_until(ready, 60, "Prometheus ready")

        def all_up():
            targets = http_json(f"{base}/api/v1/targets")["data"]["activeTargets"]
            return len(targets) >= 5 and all(t["health"] == "up" for t in targets) and targets
        targets = wait_until(all_up, 30, "every scrape target up")
        start = time.time()
        stats = asyncio.run(traffic(announce["ws"], TRAFFIC_SECONDS))
        time.sleep(3)  # two more scrapes and rule evaluations after the last client left
        end = time.time()
        print(f"traffic: {stats}; {len(targets)} targets")
        assert stats["messages"] > 0 and stats["acks"] >= CLIENTS, stats
        yield {"base": base, "start": start, "end": end, "stats": stats, "fleet": fleet,
               "prometheus": prom}
    except BaseException:
        print("--- fleet log ---\n" + fleet.tail())
        if prom:
            print("--- prometheus log ---\n" + prom.tail())
        raise
    finally:
        if prom:
            prom.stop()
        code = fleet.stop()
        assert code == 0, f"the fleet stopped with {code}\n{fleet.tail()}"


def query_range(live, expr: str) -> list:
    span = int(live["end"] - live["start"]) + 1
    reply = http_json(f"{live['base']}/api/v1/query_range", {
        "query": substitute(expr, span), "start": live["start"], "end": live["end"],
        "step": "2"})
    assert reply["status"] == "success", f"{expr}: {reply}"
    return reply["data"]["result"]


def panels(board: dict):
    for p in board["panels"]:
        yield p
        yield from p.get("panels", [])


def test_every_dashboard_panel_query_returns_data(live):
    dead = []
    checked = 0
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in panels(board):
            for t in panel.get("targets", []):
                checked += 1
                if not has_data(query_range(live, t["expr"])):
                    dead.append(f"{path.name} / {panel['title']} / "
                                f"{t.get('legendFormat')}: {t['expr']}")
    assert checked > 30
    assert not dead, "queries without data:\n" + "\n".join(dead)


def test_every_variable_lists_values_and_every_annotation_runs(live):
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for var in board["templating"]["list"]:
            if var["type"] != "query":
                continue
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["query"]["query"])
            assert m, f"{path.name}: variable {var['name']} is not label_values(metric, label)"
            metric, label = m.groups()
            values = http_json(f"{live['base']}/api/v1/label/{label}/values?"
                               + urllib.parse.urlencode({"match[]": metric}))["data"]
            assert values, f"{path.name}: variable {var['name']} lists nothing"
        for ann in board["annotations"]["list"]:
            if "expr" in ann:
                query_range(live, ann["expr"])  # no decision is due; it must only evaluate


def test_every_rule_evaluates_and_recording_rules_return_data(live):
    groups = http_json(f"{live['base']}/api/v1/rules")["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert rules, "no rules loaded"
    broken = [f"{r['name']}: {r.get('lastError')}" for r in rules if r["health"] != "ok"]
    assert not broken, "rules failing to evaluate:\n" + "\n".join(broken)
    empty = [r["name"] for r in rules if r["type"] == "recording"
             and not has_data(query_range(live, r["name"]))]
    assert not empty, "recording rules without data: " + ", ".join(empty)


def test_no_alert_fires_on_a_healthy_fleet(live):
    alerts = http_json(f"{live['base']}/api/v1/alerts")["data"]["alerts"]
    firing = [f"{a['labels']['alertname']} {a['labels']}" for a in alerts
              if a["state"] == "firing"]
    assert not firing, "alerts firing on a healthy fleet:\n" + "\n".join(firing)


def test_dashboards_are_well_formed():
    uids = {}
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        assert board["uid"].startswith("pushfleet-"), path.name
        assert board["uid"] not in uids, f"{path.name} and {uids.get(board['uid'])} share a uid"
        uids[board["uid"]] = path.name
        names = [v["name"] for v in board["templating"]["list"]]
        assert names[0] == "datasource" and board["templating"]["list"][0]["type"] == "datasource"
        ids, cells = set(), set()
        for p in panels(board):
            assert p["id"] not in ids, f"{path.name}: duplicate panel id {p['id']}"
            ids.add(p["id"])
            g = p["gridPos"]
            assert g["x"] + g["w"] <= 24, f"{path.name}: {p['title']} is wider than the grid"
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    assert (x, y) not in cells, f"{path.name}: {p['title']} overlaps a panel"
                    cells.add((x, y))
            if p["type"] == "row":
                continue
            assert p.get("description"), f"{path.name}: {p['title']} has no description"
            assert p["datasource"]["uid"] == "${datasource}", f"{path.name}: {p['title']}"
            for t in p["targets"]:
                assert t["datasource"]["uid"] == "${datasource}", f"{path.name}: {p['title']}"
    assert set(uids) == {"pushfleet-stages", "pushfleet-workers", "pushfleet-edge"}
