#!/usr/bin/env python3
"""Writes pushfleet's Grafana dashboards (dashboards/*.json) from one description.

    python3 ops/grafana/dashboards.py           # rewrite dashboards/*.json
    python3 ops/grafana/dashboards.py --check   # fail if the JSON files differ from this file

Edit the panels here, never the JSON: the JSON is what Grafana provisions and what the test
command checks against a real Prometheus scraping the local fleet (every query must return
data). Uids are fixed, so links and bookmarks survive a re-provision. Every query uses only
the metrics the servers export (no recording rules), so the dashboards work with any scrape
config; every panel reads its datasource from the `datasource` variable.
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
SLO_SECONDS = 0.2  # p99 publish-to-socket objective, same as ops/prometheus/rules/alerts.yml
W = '{worker=~"$worker"}'
I = '{instance=~"$instance"}'


def rate(metric, selector=W, by=None):
    """sum [by (...)] (rate(metric{selector}[$__rate_interval]))"""
    inner = f"rate({metric}{selector}[$__rate_interval])"
    return f"sum by ({by}) ({inner})" if by else f"sum({inner})"


def target(expr, legend, ref):
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref,
            "range": True, "instant": False}


def thresholds(steps):
    return {"mode": "absolute",
            "steps": [{"color": "green", "value": None}]
            + [{"color": c, "value": v} for v, c in steps]}


def timeseries(title, description, queries, unit="short", steps=(), log=False, stack=False,
               max_value=None, min_value=None):
    """A time series panel; `steps` are (value, colour) thresholds drawn as lines."""
    custom = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10 if stack else 0,
              "showPoints": "never", "spanNulls": False,
              "stacking": {"mode": "normal" if stack else "none", "group": "A"},
              "thresholdsStyle": {"mode": "line" if steps else "off"}}
    if log:
        custom["scaleDistribution"] = {"type": "log", "log": 10}
    defaults = {"unit": unit, "custom": custom, "thresholds": thresholds(steps),
                "color": {"mode": "palette-classic"}}
    if max_value is not None:
        defaults["max"] = max_value
    if min_value is not None:
        defaults["min"] = min_value
    return {"type": "timeseries", "title": title, "description": description,
            "datasource": DS,
            "targets": [target(e, l, chr(ord("A") + i)) for i, (e, l) in enumerate(queries)],
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"legend": {"displayMode": "table", "placement": "bottom",
                                   "calcs": ["lastNotNull", "max"]},
                        "tooltip": {"mode": "multi", "sort": "desc"}}}


def stat(title, description, expr, unit="short", steps=(), decimals=None):
    defaults = {"unit": unit, "thresholds": thresholds(steps), "color": {"mode": "thresholds"}}
    if decimals is not None:
        defaults["decimals"] = decimals
    return {"type": "stat", "title": title, "description": description, "datasource": DS,
            "targets": [target(expr, "", "A")],
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "background", "graphMode": "area", "textMode": "auto"}}


def row(title):
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


def layout(items):
    """Places panels left to right, 24 columns wide, numbering them; a row starts a new line.
    Items are panels (12 × 8) or (panel, width, height)."""
    panels, x, y, line_h = [], 0, 0, 0
    for n, item in enumerate(items, start=1):
        panel, w, h = item if isinstance(item, tuple) else (item, 12, 8)
        is_row = panel["type"] == "row"
        if is_row:
            w, h = 24, 1
        if x > 0 and (is_row or x + w > 24):
            x, y, line_h = 0, y + line_h, 0
        panels.append(dict(panel, id=n, gridPos={"x": x, "y": y, "w": w, "h": h}))
        x, line_h = x + w, max(line_h, h)
        if is_row:
            x, y, line_h = 0, y + 1, 0
    return panels


def variable_datasource():
    return {"name": "datasource", "label": "Prometheus", "type": "datasource",
            "query": "prometheus", "current": {}, "hide": 0, "refresh": 1, "regex": "",
            "options": [], "includeAll": False, "multi": False}


def variable(name, label, metric, label_name):
    return {"name": name, "label": label, "type": "query", "datasource": DS,
            "query": {"query": f"label_values({metric}, {label_name})", "refId": name},
            "definition": f"label_values({metric}, {label_name})",
            "refresh": 2, "sort": 1, "includeAll": True, "multi": True, "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "options": [], "hide": 0, "regex": ""}


WORKER_VAR = variable("worker", "Worker", "worker_connections", "worker")
INSTANCE_VAR = variable("instance", "Proxy", "proxy_connections_active", "instance")

SCALE_ANNOTATION = {
    "name": "Scale decisions", "enable": True, "iconColor": "orange", "datasource": DS,
    "expr": "sum by (action, reason) (increase(herald_decisions_total"
            '{action=~"scale_out|scale_in"}[$__interval])) > 0',
    "step": "$__interval", "titleFormat": "herald: {{action}}",
    "textFormat": "{{reason}}; see herald's status page for the full reason",
    "tagKeys": "action", "useValueForTime": False,
}
FLEET_ANNOTATION = {
    "name": "Workers expired or drained", "enable": True, "iconColor": "purple",
    "datasource": DS,
    "expr": "sum by (action, reason) (increase(herald_decisions_total"
            '{action=~"expired|drained"}[$__interval])) > 0',
    "step": "$__interval", "titleFormat": "herald: {{action}}", "textFormat": "{{reason}}",
    "tagKeys": "action", "useValueForTime": False,
}

LINKS = [{"title": "Pushfleet", "type": "dashboards", "tags": ["pushfleet"], "asDropdown": False,
          "includeVars": True, "keepTime": True, "icon": "external link", "targetBlank": False,
          "url": "", "tooltip": ""}]


def dashboard(uid, title, description, variables, items, annotations=()):
    builtin = {"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
               "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
               "name": "Annotations & Alerts", "type": "dashboard"}
    return {
        "uid": uid, "title": title, "description": description, "tags": ["pushfleet"],
        "timezone": "browser", "editable": True, "graphTooltip": 1, "refresh": "10s",
        "schemaVersion": 39, "version": 1, "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [variable_datasource(), *variables]},
        "annotations": {"list": [builtin, *annotations]},
        "links": LINKS, "panels": layout(items),
    }


WRITTEN = "worker_publish_to_socket_seconds_count"

stages = dashboard(
    "pushfleet-stages", "Pushfleet / Message stages",
    "Counts of messages at each stage of the path, publisher to client socket. When a stage "
    "drops data its count diverges from the one before; the ratio panels say by how much.",
    [WORKER_VAR],
    [
        row("Stages"),
        (timeseries(
            "Messages per stage",
            "Received from publishers (each worker receives every message of the topics it "
            "keeps, so this is the published rate × workers) → messages with local subscribers "
            "→ deliveries queued (one per subscriber) → live messages written to sockets. "
            "Drops are deliveries not queued.",
            [(rate("worker_upstream_messages_total"), "received from publishers"),
             (rate("worker_fanout_messages_total"), "fanned out (had subscribers)"),
             (rate("worker_fanout_deliveries_total"), "deliveries queued"),
             (rate(WRITTEN), "written to sockets"),
             (rate("worker_dropped_deliveries_total"), "dropped"),
             (rate("worker_slow_client_closes_total"), "slow clients closed")],
            unit="cps", log=True), 16, 9),
        (stat("Written ÷ queued, whole range",
              "Live messages written to client sockets over deliveries queued for them, over "
              "the dashboard's time range. Expected 1.0: anything lower was queued and never "
              "written (a client closed with frames still queued, or a drop).",
              f"sum(increase({WRITTEN}{W}[$__range])) / "
              f"sum(increase(worker_fanout_deliveries_total{W}[$__range]))",
              unit="percentunit", decimals=3, steps=((0, "red"), (0.99, "orange"),
                                                      (0.999, "green"))), 8, 9),
        (timeseries(
            "Written ÷ queued per worker (expected 1.0)",
            "Per worker, live frames written to sockets over deliveries queued. A worker "
            "below the others is losing deliveries between queue and socket.",
            [(f"{rate(WRITTEN, by='worker')} / "
              f"{rate('worker_fanout_deliveries_total', by='worker')}", "{{worker}}")],
            unit="percentunit", steps=((0.99, "red"),)), 12, 8),
        (timeseries(
            "Received from publishers ÷ fleet maximum (expected 1.0)",
            "Every worker subscribes upstream to all topics it keeps history for, so every "
            "worker should receive the same number of messages. A worker below 1.0 is missing "
            "publisher messages (a ZeroMQ connection down or slow).",
            [(f"{rate('worker_upstream_messages_total', by='worker')} / ignoring(worker) "
              f"group_left max({rate('worker_upstream_messages_total', by='worker')})",
              "{{worker}}")],
            unit="percentunit", steps=((0.99, "red"),)), 12, 8),
        row("Where messages go missing"),
        timeseries(
            "Dropped deliveries by reason, slow-client closes",
            "slow_consumer: the client's outbound queue was full (it is then closed with "
            "4001); closing: the connection was already closing.",
            [(rate("worker_dropped_deliveries_total", by="reason"), "dropped: {{reason}}"),
             (rate("worker_slow_client_closes_total"), "slow clients closed")],
            unit="cps"),
        timeseries(
            "Stream gaps: detected, repaired from peers, declared lost",
            "A gap is a hole in a topic's offsets as received from publishers. Workers fill "
            "holes from their peers' history; what cannot be filled is declared lost and "
            "announced to clients. Lost should stay at 0.",
            [(rate("worker_stream_events_total", '{worker=~"$worker",event="gap"}'), "gaps detected"),
             (rate("worker_stream_repaired_messages_total"), "messages repaired"),
             (rate("worker_stream_lost_messages_total"), "messages lost"),
             (rate("worker_stream_events_total", '{worker=~"$worker",event="duplicate"}'),
              "duplicates dropped")],
            unit="cps"),
        timeseries(
            "Received from publishers, by worker and endpoint",
            "Messages per second from each publisher endpoint, per worker.",
            [(rate("worker_upstream_messages_total", by="worker, endpoint"),
              "{{worker}} ← {{endpoint}}")],
            unit="cps"),
        timeseries(
            "Deliveries per fanned-out message",
            "Average fan-out: subscribers reached per message that had any. Moves with "
            "audience size, not with loss.",
            [(f"{rate('worker_fanout_deliveries_total', by='worker')} / "
              f"{rate('worker_fanout_messages_total', by='worker')}", "{{worker}}")]),
        timeseries(
            "Peer history fetches and resumes",
            "History fetched from peer workers (filling holes, late starts), and client "
            "history requests (resume with `since`, `last`) by outcome.",
            [(rate("worker_peer_fetches_total", by="result"), "peer fetch: {{result}}"),
             (rate("worker_history_requests_total", by="outcome"), "client: {{outcome}}"),
             (rate("worker_replayed_messages_total"), "messages replayed")],
            unit="cps"),
        timeseries(
            "Publisher connections",
            "1 while a worker is connected to the endpoint; silent: nothing received for "
            "longer than the worker's publisher_silence.",
            [(f"sum by (endpoint) (worker_upstream_connected{W})", "connected: {{endpoint}}"),
             (f"sum by (endpoint) (worker_upstream_silent{W})", "silent: {{endpoint}}")],
            min_value=0),
    ],
)

workers = dashboard(
    "pushfleet-workers", "Pushfleet / Workers",
    "Latency from publisher to client socket, load as herald sees it, connections, "
    "compression and history, per worker.",
    [WORKER_VAR],
    [
        row("Latency"),
        (timeseries(
            "p99 publish-to-socket latency per worker",
            "From the publisher's timestamp to the write of the frame to the client socket. "
            f"The line is the objective ({int(SLO_SECONDS * 1000)} ms; alerts "
            "PushfleetWorkerPublishLatencyHigh and, fleet-wide, PushfleetPublishLatencyHigh).",
            [("histogram_quantile(0.99, "
              f"{rate('worker_publish_to_socket_seconds_bucket', by='worker, le')})",
              "{{worker}}")],
            unit="s", steps=((SLO_SECONDS, "red"),)), 16, 8),
        (timeseries(
            "Fleet p50 / p99",
            "All workers together.",
            [("histogram_quantile(0.5, "
              f"{rate('worker_publish_to_socket_seconds_bucket', by='le')})", "p50"),
             ("histogram_quantile(0.99, "
              f"{rate('worker_publish_to_socket_seconds_bucket', by='le')})", "p99")],
            unit="s", steps=((SLO_SECONDS, "red"),)), 8, 8),
        row("Load and placement"),
        timeseries(
            "Utilisation per worker (herald)",
            "The most used resource over its capacity, smoothed, as herald computes it from "
            "the reports: 1.0 is at capacity. Herald grows the fleet when the mean stays "
            "above its scale_out_above and shrinks it below scale_in_below.",
            [(f"herald_worker_utilisation_ratio{W}", "{{worker}}")],
            unit="percentunit", steps=((0.7, "orange"), (0.9, "red")), min_value=0),
        timeseries(
            "Routing weight per worker (herald)",
            "The share of new connections herald tells the proxies to send to each worker "
            "(draining workers get 0).",
            [(f"herald_worker_weight_ratio{W}", "{{worker}}")],
            unit="percentunit", min_value=0),
        timeseries(
            "Connections per worker",
            "Open client WebSockets as the worker counts them, and as herald last heard.",
            [(f"sum by (worker) (worker_connections{W})", "{{worker}}"),
             (f"sum by (worker) (herald_worker_connections{W})", "{{worker}} (herald)")]),
        timeseries(
            "Subscriptions and accepts per worker",
            "Client subscriptions held, and connections upgraded per second.",
            [(f"sum by (worker) (worker_subscriptions{W})", "{{worker}} subscriptions"),
             (rate("worker_connections_accepted_total", by="worker"), "{{worker}} accepts/s")]),
        timeseries(
            "Connections closed by close code",
            "Close codes sent or received: 1000 normal, 1001 the client went away (a page "
            "closed), 1012 drain (herald's scale-in or a stop), 4001 slow client, 4002 idle, "
            "4003 no pong, none: the TCP connection ended without a close frame. A rise in "
            "anything else (1002-1011: broken clients or an internal error) deserves a look.",
            [(rate("worker_connections_closed_total", by="code"), "{{code}}")],
            unit="cps"),
        timeseries(
            "Report age per worker (herald)",
            "Seconds since herald's last report from each worker; herald expires a worker "
            "after several missed intervals.",
            [(f"herald_worker_report_age_seconds{W}", "{{worker}}")],
            unit="s"),
        row("Compression and bytes"),
        timeseries(
            "Compression ratio",
            "permessage-deflate output over input bytes (lower is better). Messages are "
            "compressed once per message and window size, never per subscriber.",
            [(f"{rate('worker_compression_output_bytes_total', by='worker')} / "
              f"{rate('worker_compression_input_bytes_total', by='worker')}", "{{worker}}")],
            unit="percentunit", min_value=0),
        timeseries(
            "Bytes written to clients",
            "Bytes per second written to client sockets, per worker.",
            [(rate("worker_bytes_written_total", by="worker"), "{{worker}}")],
            unit="Bps", stack=True),
        timeseries(
            "Deflate operations and compressed share of connections",
            "Deflate operations per second (one per message and window size), and the share "
            "of accepted connections that negotiated permessage-deflate.",
            [(rate("worker_deflate_operations_total", by="worker"), "{{worker}} deflates/s"),
             (f"{rate('worker_deflate_negotiated_total', by='worker')} / "
              f"{rate('worker_connections_accepted_total', by='worker')}",
              "{{worker}} share negotiated")]),
        timeseries(
            "History kept",
            "Messages and topics each worker keeps for resume and catch-up.",
            [(f"sum by (worker) (worker_history_messages{W})", "{{worker}} messages"),
             (f"sum by (worker) (worker_history_topics{W})", "{{worker}} topics")]),
    ],
)

edge = dashboard(
    "pushfleet-edge", "Pushfleet / Edge and scaling",
    "The proxies (accepts, refusals, placement, herald's table) and herald's fleet size: "
    "desired against actual workers, with each scale decision as an annotation.",
    [INSTANCE_VAR],
    [
        row("Proxies"),
        timeseries(
            "Accepts per proxy",
            "Client connections accepted per second (before admission). A reconnect storm "
            "shows here first.",
            [(rate("proxy_connections_accepted_total", I, by="instance"), "{{instance}}")],
            unit="cps"),
        timeseries(
            "Open connections per proxy",
            "Admitted client connections: in handshake, connecting to a worker, or relayed.",
            [(f"proxy_connections_active{I}", "{{instance}}")]),
        timeseries(
            "Refusals by reason",
            "rate: over the admission rate limit; connections: over max_connections; "
            "no_worker: herald's table and the static list had no eligible worker; "
            "upstream_failed: every worker tried failed; the rest are bad requests.",
            [(rate("proxy_refused_total", I, by="reason"), "{{reason}}")],
            unit="cps"),
        timeseries(
            "Placements per worker",
            "New connections placed on each worker by the proxies, by placement mode "
            "(fresh: herald's current table).",
            [(rate("proxy_placements_total", I, by="worker, mode"), "{{worker}} ({{mode}})")],
            unit="cps", stack=True),
        timeseries(
            "Placement mode and table age",
            "Which table places the next connection: fresh (herald's, current), stale "
            "(herald's, old), fallback, static. Table age is seconds since herald's table "
            "arrived (-1: none yet).",
            [(f"max by (mode) (proxy_placement_mode{I})", "{{mode}}"),
             (f"max(proxy_table_age_seconds{I})", "table age (s)")]),
        timeseries(
            "Worker connects retried, relays ended",
            "Dials to a worker retried on another worker after a failure, and relayed "
            "connections ended by how.",
            [(rate("proxy_connect_retries_total", I), "retries"),
             (rate("proxy_relays_ended_total", I, by="end"), "ended: {{end}}")],
            unit="cps"),
        timeseries(
            "Bytes relayed",
            "Bytes per second through the proxies, by direction.",
            [(rate("proxy_relay_bytes_total", I, by="direction"), "{{direction}}")],
            unit="Bps"),
        row("Fleet size"),
        timeseries(
            "Desired vs actual workers",
            "Herald's desired fleet size against the workers it knows, by state. Scale "
            "decisions are annotations (orange: scale out/in, purple: expired/drained).",
            [("max(herald_desired_workers)", "desired"),
             ("sum(herald_workers)", "known"),
             ('sum(herald_workers{state=~"slow_start|ready"})', "taking connections")],
            min_value=0),
        timeseries(
            "Workers by state",
            "new: fewer reports than herald needs to trust it; slow_start: weight rising; "
            "ready; draining.",
            [("sum by (state) (herald_workers)", "{{state}}")],
            stack=True, min_value=0),
        timeseries(
            "Scale actions and actuator calls",
            "Decisions per action, and calls to the actuator (the autoscaling group, a "
            "webhook, a command) by result. Failed calls are retried with backoff.",
            [('sum by (action) (increase(herald_decisions_total[$__rate_interval]))',
              "decision: {{action}}"),
             ("sum by (action, result) (increase(herald_actuator_calls_total"
              "[$__rate_interval]))", "call: {{action}} {{result}}")]),
    ],
    annotations=(SCALE_ANNOTATION, FLEET_ANNOTATION),
)

DASHBOARDS = {"stages.json": stages, "workers.json": workers, "edge.json": edge}


def main(argv):
    check = argv[1:] == ["--check"]
    if argv[1:] not in ([], ["--check"]):
        sys.exit(f"usage: {argv[0]} [--check]")
    OUT.mkdir(exist_ok=True)
    stale = []
    for name, board in DASHBOARDS.items():
        text = json.dumps(board, indent=2, ensure_ascii=False) + "\n"
        path = OUT / name
        if check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(HERE)} ({len(board['panels'])} panels)")
    if stale:
        sys.exit("out of date (run ops/grafana/dashboards.py): " + ", ".join(stale))
    if check:
        print(f"{len(DASHBOARDS)} dashboards match ops/grafana/dashboards.py")


if __name__ == "__main__":
    main(sys.argv)
