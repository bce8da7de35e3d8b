//! What herald knows and decided, for people: `GET /v1/status` (JSON) and `GET /` (a page that
//! renders it every two seconds).

use crate::control::{Control, DecisionRecord, Drain};
use crate::fleet::DrainCause;
use crate::scale::ScalerState;
use protocol::load::WorkerState;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Instant;

#[derive(Serialize)]
struct Status<'a> {
    generation: u64,
    table_version: u64,
    uptime_s: f64,
    desired: Option<u32>,
    desired_applied: Option<u32>,
    scaler: ScalerState,
    workers: Vec<WorkerStatus<'a>>,
    drains: Vec<&'a Drain>,
    decisions: Vec<&'a DecisionRecord>,
}

#[derive(Serialize)]
struct WorkerStatus<'a> {
    id: &'a str,
    address: &'a str,
    admin_address: &'a str,
    instance_id: Option<&'a str>,
    state: WorkerState,
    trusted: bool,
    warm: bool,
    retired: bool,
    drain_cause: Option<DrainCause>,
    reports: u64,
    seq: u64,
    report_age_ms: u64,
    utilisation: f64,
    raw_utilisation: f64,
    dominant: &'static str,
    resources: BTreeMap<&'static str, f64>,
    weight: Option<f64>,
    slow_start: Option<f64>,
    cost_per_connection: Option<f64>,
    connections: u64,
    max_connections: u64,
    subscriptions: u64,
    deliveries_per_s: f64,
    bytes_out_per_s: f64,
    cpu_ratio: f64,
    rss_bytes: u64,
    memory_budget_bytes: u64,
    loop_lag_seconds: f64,
    queue_bytes: u64,
    publish_to_socket_p99_seconds: f64,
}

/// The status document.
pub fn json(control: &Control, now: Instant) -> Vec<u8> {
    let table = control.table();
    let fleet = &control.fleet;
    let workers = fleet
        .iter()
        .map(|t| {
            let r = &t.report;
            let row = table.worker(&r.worker.id);
            WorkerStatus {
                id: &r.worker.id,
                address: &r.worker.address,
                admin_address: &r.worker.admin_address,
                instance_id: r.worker.instance_id.as_deref(),
                state: r.state,
                trusted: t.trusted(fleet.settings.min_reports),
                warm: fleet.warm(t, now),
                retired: control.retired.contains(&r.worker.id),
                drain_cause: t.drain.map(|d| d.0),
                reports: t.reports,
                seq: r.seq,
                report_age_ms: now.saturating_duration_since(t.last_report).as_millis() as u64,
                utilisation: t.utilisation,
                raw_utilisation: t.score.utilisation,
                dominant: t.score.dominant.name(),
                resources: t
                    .score
                    .resources
                    .iter()
                    .map(|(k, v)| (k.name(), *v))
                    .collect(),
                weight: row.map(|w| w.weight),
                slow_start: row.map(|w| w.slow_start),
                cost_per_connection: row.map(|w| w.cost_per_connection),
                connections: r.connections,
                max_connections: r.max_connections,
                subscriptions: r.subscriptions,
                deliveries_per_s: r.deliveries_per_s,
                bytes_out_per_s: r.bytes_out_per_s,
                cpu_ratio: r.cpu_ratio,
                rss_bytes: r.rss_bytes,
                memory_budget_bytes: r.memory_budget_bytes,
                loop_lag_seconds: r.loop_lag_seconds,
                queue_bytes: r.queue_bytes,
                publish_to_socket_p99_seconds: r.publish_to_socket_p99_seconds,
            }
        })
        .collect();
    let status = Status {
        generation: table.generation,
        table_version: table.version,
        uptime_s: control.uptime(now).as_secs_f64(),
        desired: control.scaler.desired(),
        desired_applied: control.desired_applied,
        scaler: control.scaler.state(now),
        workers,
        drains: control.drains.values().collect(),
        decisions: control.decisions.iter().rev().collect(),
    };
    serde_json::to_vec_pretty(&status).expect("status always serialises")
}

/// The status page: static HTML that fetches `/v1/status` every two seconds.
pub const PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>herald</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em;margin:0 0 .3em}h2{font-size:1.05em;margin:1.4em 0 .4em}
table{border-collapse:collapse;width:100%}th,td{padding:.3em .6em;border-bottom:1px solid #ddd;text-align:left;white-space:nowrap}
th{background:#f4f4f4;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
.bar{display:inline-block;height:.8em;background:#4a8;vertical-align:middle;margin-right:.4em}
.hot .bar{background:#d64}.draining{color:#888}.tag{font-size:.8em;padding:0 .4em;border-radius:.6em;background:#eee;margin-left:.3em}
#summary span{margin-right:1.5em}#err{color:#c00}
</style></head><body>
<h1>herald</h1><div id="summary">loading…</div><div id="err"></div>
<h2>Workers</h2>
<table><thead><tr><th>worker</th><th>state</th><th>utilisation</th><th>dominant</th><th>weight</th>
<th>connections</th><th>deliveries/s</th><th>CPU</th><th>RSS</th><th>loop lag</th><th>p99</th><th>report age</th></tr></thead>
<tbody id="workers"></tbody></table>
<h2>Recent decisions</h2>
<table><thead><tr><th>when</th><th>action</th><th>desired</th><th>worker</th><th>reason</th></tr></thead>
<tbody id="decisions"></tbody></table>
<script>
const esc = s => String(s ?? "").replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c]));
const pct = x => x == null ? "–" : (100 * x).toFixed(0) + "%";
const mib = b => (b / 1048576).toFixed(0) + " MiB";
async function refresh() {
  try {
    const s = await (await fetch("v1/status", {cache: "no-store"})).json();
    document.getElementById("err").textContent = "";
    document.getElementById("summary").innerHTML =
      `<span>workers <b>${s.workers.length}</b></span><span>desired <b>${s.desired ?? "–"}</b></span>` +
      `<span>applied <b>${s.desired_applied ?? "–"}</b></span><span>table v${s.table_version}</span>` +
      `<span>draining ${s.workers.filter(w => w.drain_cause || w.retired).length}</span><span>scale-in drains ${s.drains.length}</span><span>up ${s.uptime_s.toFixed(0)} s</span>`;
    document.getElementById("workers").innerHTML = s.workers.map(w => {
      const tags = [!w.trusted && "new", w.trusted && !w.warm && "warming", w.drain_cause && "draining", w.retired && "retired"]
        .filter(Boolean).map(t => `<span class="tag">${t}</span>`).join("");
      const cls = (w.utilisation > 0.7 ? "hot " : "") + (w.drain_cause ? "draining" : "");
      return `<tr class="${cls}"><td>${esc(w.id)}<br><small>${esc(w.address)}</small></td><td>${esc(w.state)}${tags}</td>` +
        `<td><span class="bar" style="width:${Math.min(100, 100 * w.utilisation).toFixed(0)}px"></span>${pct(w.utilisation)}</td>` +
        `<td>${esc(w.dominant)}</td><td class="n">${w.drain_cause || w.retired ? "drain" : pct(w.weight)}</td><td class="n">${w.connections}</td>` +
        `<td class="n">${w.deliveries_per_s.toFixed(0)}</td><td class="n">${pct(w.cpu_ratio)}</td><td class="n">${mib(w.rss_bytes)}</td>` +
        `<td class="n">${(1000 * w.loop_lag_seconds).toFixed(1)} ms</td><td class="n">${(1000 * w.publish_to_socket_p99_seconds).toFixed(1)} ms</td>` +
        `<td class="n">${(w.report_age_ms / 1000).toFixed(1)} s</td></tr>`;
    }).join("") || `<tr><td colspan="12">no worker has reported yet</td></tr>`;
    document.getElementById("decisions").innerHTML = s.decisions.map(d =>
      `<tr><td>${new Date(d.at_ms).toLocaleTimeString()}</td><td>${esc(d.action)}</td><td class="n">${d.desired ?? ""}</td>` +
      `<td>${esc(d.worker)}</td><td style="white-space:normal">${esc(d.reason)}</td></tr>`).join("")
      || `<tr><td colspan="5">none yet</td></tr>`;
  } catch (e) {
    document.getElementById("err").textContent = "cannot reach herald: " + e;
  }
}
refresh(); setInterval(refresh, 2000);
</script></body></html>
"#;
