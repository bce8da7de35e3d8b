"""The report's first section: one line per claim, pushfleet's median figure against each
peer's from the same run, with the ratio. README.md quotes these lines."""

from __future__ import annotations

import statistics

import fanout


def median(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def ratio(ours: float | None, theirs: float | None) -> str:
    if not ours or not theirs:
        return "—"
    return f"{ours / theirs:.2f}×"


def lines(results: dict) -> list[str]:
    rows = []
    b = results.get("balance")
    if b and "pushfleet" in b:
        ours = median(b["pushfleet"], "cpu_max_mean")
        for peer in ("leastconn", "roundrobin"):
            if peer in b:
                theirs = median(b[peer], "cpu_max_mean")
                rows.append(("S1 worker CPU max/mean (1.00 is even)", f"{ours:.2f}",
                             f"HAProxy {peer} {theirs:.2f}", "—"))
        ours_d = median(b["pushfleet"], "deliveries_max_mean")
        theirs_d = median(b["leastconn"], "deliveries_max_mean") if "leastconn" in b else None
        if theirs_d:
            rows.append(("S1 worker deliveries/s max/mean", f"{ours_d:.2f}",
                         f"HAProxy leastconn {theirs_d:.2f}", "—"))
        if "pushfleet-delayed" in b:
            share = median(b["pushfleet-delayed"], "max_interval_share")
            rows.append(("S1 reports 10 s late: most new connections one worker took in a 10 s "
                         "interval (25% even, 100% herding)", f"{share:.0%}", "—", "—"))
    f = results.get("fanout")
    if f:
        best = fanout.headline(f)
        for deflate in ("on", "off"):
            ours = best.get(f"pushfleet, deflate {deflate}")
            for peer in ("nchan", "pushpin"):
                theirs = best.get(f"{peer}, deflate {deflate}")
                if ours and f"{peer}, deflate {deflate}" in best:
                    t = theirs["deliveries_per_s"] if theirs else None
                    rows.append((f"S2 deliveries/s on one core with p99 ≤ 200 ms, deflate "
                                 f"{deflate}", f"{ours['deliveries_per_s']:,.0f}",
                                 f"{peer} {t:,.0f}" if t else f"{peer}: none within 200 ms",
                                 ratio(ours["deliveries_per_s"], t)))
    m = results.get("memory")
    if m and "pushfleet" in m:
        ours = median(m["pushfleet"], "kib_per_connection")
        for peer in ("nchan", "pushpin"):
            if peer in m:
                theirs = median(m[peer], "kib_per_connection")
                rows.append(("S3 KiB per idle connection (deflate)", f"{ours:.1f}",
                             f"{peer} {theirs:.1f}", ratio(ours, theirs)))
    for key, what, fmt in [("proxy-memory", "S3 KiB per relayed connection", "{:.1f}"),
                           ("burst", "S4 connections/s through the proxy, one core", "{:,.0f}")]:
        r = results.get(key)
        if r and "pushfleet proxy" in r and "HAProxy leastconn" in r:
            metric = "kib_per_connection" if key == "proxy-memory" else "connections_per_s"
            ours = median(r["pushfleet proxy"], metric)
            theirs = median(r["HAProxy leastconn"], metric)
            rows.append((what, fmt.format(ours), "HAProxy " + fmt.format(theirs),
                         ratio(ours, theirs)))
            if key == "burst":
                for m_key, label in [("handshake_p99_us", "S4 handshake p99 ms"),
                                     ("cpu_ms_per_1000_total", "S4 proxy CPU ms per 1,000 "
                                      "connections (open + close)")]:
                    o = median(r["pushfleet proxy"], m_key)
                    t = median(r["HAProxy leastconn"], m_key)
                    scale = 1e-3 if m_key.endswith("_us") else 1
                    rows.append((label, f"{o * scale:.0f}", f"HAProxy {t * scale:.0f}",
                                 ratio(o, t)))
    if not rows:
        return []
    out = ["## Headlines", "", "Medians of the runs below; ratio is pushfleet over the peer.", "",
           "| figure | pushfleet | peer | ratio |", "| --- | --- | --- | --- |"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return out + [""]
