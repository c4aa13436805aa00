"""The live status page served at GET /, and the records/s history it charts.

The page is one self-contained file (no CDN, no build step). It polls ``status`` (a relative URL, so it
works behind a path prefix) every two seconds and draws tables and an inline-SVG chart from the JSON.
Every value goes in with ``textContent``, never as markup: source names and sync errors come from
config and upstream answers.

The HTML itself is served without the token (it holds no data). When ``status`` answers 401, the page
asks for the control token once and keeps it in ``sessionStorage`` (this tab only, gone when it
closes), sending it as ``Authorization: Bearer``. A link may carry it as ``#token=...``: the fragment
never leaves the browser, and the page removes it from the address bar at once.

``Throughput`` lives in the control process, which feeds it the fetched and delivered totals of all
processes every ``interval_s``; /status carries its view, so the chart has the last minutes as soon as
the page opens, and `conflux top` shows the same rates.
"""

from __future__ import annotations

from collections import deque


class Throughput:
    """Records/s over a sliding window, computed from monotonic counters sampled at a fixed interval."""

    COUNTERS = {"fetched": "conflux_records_fetched_total", "delivered": "conflux_records_delivered_total"}

    def __init__(self, *, interval_s: float = 2.0, window_s: float = 300.0) -> None:
        self.interval_s = interval_s
        self.window_s = window_s
        self.points: deque[dict[str, float]] = deque(maxlen=int(window_s / interval_s))
        self.sources: dict[str, dict[str, float]] = {}
        self._last: tuple[float, dict[str, dict[str, float]]] | None = None

    def add(self, now: float, wall: float, totals: dict[str, dict[str, float]]) -> None:
        """One sample: ``totals`` maps each counter name of ``COUNTERS`` to {source: total}."""
        by_kind = {kind: totals.get(name, {}) for kind, name in self.COUNTERS.items()}
        if self._last is not None:
            then, before = self._last
            elapsed_s = max(now - then, 1e-6)
            point = {"t": round(wall, 3)}
            for kind, by_source in by_kind.items():
                total_rate = 0.0
                for source, value in by_source.items():
                    # A counter only drops if the metric files were reset; never chart a negative rate.
                    rate = max(0.0, value - before[kind].get(source, 0.0)) / elapsed_s
                    self.sources.setdefault(source, {})[f"{kind}_per_s"] = round(rate, 1)
                    total_rate += rate
                point[f"{kind}_per_s"] = round(total_rate, 1)
            self.points.append(point)
        for kind, by_source in by_kind.items():
            for source, value in by_source.items():
                self.sources.setdefault(source, {})[f"{kind}_total"] = value
        self._last = (now, by_kind)

    def view(self) -> dict:
        return {"interval_s": self.interval_s, "window_s": self.window_s, "points": list(self.points),
                "sources": self.sources}


STATUS_PAGE_HTML = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Conflux status</title>
<style>
  :root { --fg: #1d2430; --muted: #6b7585; --line: #dde2ea; --ok: #16803c; --warn: #b26b00; --bad: #c0262d;
          --fetched: #6b7fd7; --delivered: #16803c; font: 14px/1.4 system-ui, sans-serif; color: var(--fg); }
  body { margin: 0 auto; padding: 1rem 1.5rem; max-width: 1200px; }
  header { display: flex; gap: 1rem; align-items: baseline; flex-wrap: wrap; }
  h1 { margin: 0; font-size: 1.4rem; } h2 { font-size: 1rem; margin: 1.4rem 0 .4rem; }
  table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
  th, td { text-align: left; padding: .25rem .6rem; border-bottom: 1px solid var(--line); white-space: nowrap; }
  th { color: var(--muted); font-weight: 600; }
  td[data-field="detail"] { white-space: normal; }
  .axis { display: flex; justify-content: space-between; color: var(--muted); font-size: .8rem; }
  .num { text-align: right; } .muted { color: var(--muted); }
  .ok, .closed, .running, .ready { color: var(--ok); }
  .half_open, .starting, .backoff, .stopping { color: var(--warn); }
  .failed, .open, .fatal, .not-ready { color: var(--bad); font-weight: 600; }
  #error { background: #fde8e8; color: var(--bad); padding: .5rem .8rem; margin-top: .8rem; }
  #login { margin-top: .8rem; display: flex; gap: .6rem; align-items: center; }
  #login[hidden] { display: none; }
  svg { width: 100%; height: 180px; border: 1px solid var(--line); }
  .legend span { margin-right: 1rem; }
  .swatch { display: inline-block; width: .8rem; height: .2rem; vertical-align: middle; }
  footer { margin-top: 1.5rem; color: var(--muted); font-size: .85rem; }
</style></head>
<body>
<header>
  <h1>Conflux</h1>
  <span id="ready" class="muted">loading…</span>
  <span id="daemon" class="muted"></span>
  <span>sink breaker: <b id="sink-breaker">&ndash;</b></span>
  <span>consumer lag: <b id="total-lag">&ndash;</b></span>
</header>
<div id="error" hidden></div>
<form id="login" hidden>
  <label>Control token <input id="token" type="password" autocomplete="current-password" required></label>
  <button type="submit">Show status</button>
  <span class="muted">kept in this tab only</span>
</form>

<h2>Records/s <span class="muted">over the last <span id="window">5</span> min</span></h2>
<svg id="chart" viewBox="0 0 600 180" preserveAspectRatio="none" role="img" aria-label="records per second">
  <polyline data-series="fetched" fill="none" stroke="var(--fetched)" stroke-width="1.5" points=""></polyline>
  <polyline data-series="delivered" fill="none" stroke="var(--delivered)" stroke-width="1.5" points=""></polyline>
</svg>
<div class="axis"><span><span id="axis-start">5 min</span> ago</span><span>now</span></div>
<div class="legend">
  <span><i class="swatch" style="background: var(--fetched)"></i> fetched <b id="fetched-rate">&ndash;</b>/s</span>
  <span><i class="swatch" style="background: var(--delivered)"></i>
    delivered <b id="delivered-rate">&ndash;</b>/s</span>
  <span class="muted">peak <span id="chart-max">&ndash;</span>/s</span>
</div>

<h2>Sources</h2>
<table id="sources"><thead><tr><th>source</th><th>last sync</th><th>type</th><th>result</th>
  <th class="num">records synced</th><th class="num">delivered/s</th><th class="num">success</th><th>watermark</th>
  <th class="num">sync lag</th><th>breaker</th></tr></thead><tbody></tbody></table>

<h2>Sinks</h2>
<table id="sinks"><thead><tr><th>sink</th><th>type</th><th>sources</th><th>breaker</th>
  <th class="num">failing for</th><th class="num">last answer</th><th class="num">in flight</th></tr></thead>
  <tbody></tbody></table>

<h2>Workers</h2>
<table id="workers"><thead><tr><th>worker</th><th>role</th><th class="num">pid</th><th>state</th>
  <th class="num">restarts</th><th>partitions</th><th class="num">heartbeat</th><th>detail</th></tr></thead>
  <tbody></tbody></table>

<h2>Partitions</h2>
<table id="partitions"><thead><tr><th>topic</th><th class="num">partition</th><th>owner</th>
  <th class="num">committed</th><th class="num">end</th><th class="num">lag</th></tr></thead><tbody></tbody></table>

<footer>Refreshed every 2 s · <span id="refreshes">0</span> refreshes ·
  last at <span id="updated">&ndash;</span></footer>
<noscript>This page needs JavaScript; the same data is at <a href="status">status</a>.</noscript>
<script>
"use strict";
const REFRESH_MS = 2000;
const NA = "\u2013";  // shown for a value not known yet
const CIRCUIT = ["closed", "half_open", "open"];
const TOKEN_KEY = "conflux-control-token";
let refreshes = 0;
let timer = null;

function $(id) { return document.getElementById(id); }
function fmt(n) { return n === null || n === undefined ? NA : Number(n).toLocaleString("en-US"); }
function duration(s) {
  if (s === null || s === undefined || !isFinite(s)) return NA;
  s = Math.max(0, s);
  if (s < 120) return s.toFixed(s < 10 ? 1 : 0) + " s";
  if (s < 7200) return (s / 60).toFixed(0) + " min";
  if (s < 172800) return (s / 3600).toFixed(1) + " h";
  return (s / 86400).toFixed(1) + " d";
}
function ago(ts, now) { return ts ? duration(now - ts) + " ago" : "never"; }
function cell(field, text, cls) {
  const td = document.createElement("td");
  td.dataset.field = field;
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}
function fill(tableId, rows, keyName, keyOf, cellsOf) {
  const body = document.createElement("tbody");
  for (const row of rows) {
    const tr = document.createElement("tr");
    tr.dataset[keyName] = keyOf(row);
    for (const td of cellsOf(row)) tr.appendChild(td);
    body.appendChild(tr);
  }
  $(tableId).replaceChild(body, $(tableId).tBodies[0]);
}

function renderSources(status, now) {
  const rates = (status.throughput || {}).sources || {};
  const rows = Object.entries(status.sources || {}).map(([name, s]) => ({name, ...s}));
  fill("sources", rows, "source", s => s.name, s => {
    const lag = s.watermark ? now - Date.parse(s.watermark) / 1000 : null;
    const result = s.syncing ? "syncing" : (s.last_sync_result || NA);
    return [
      cell("name", s.name), cell("last_sync_at", ago(s.last_sync_at, now)),
      cell("last_sync_type", s.last_sync_type || NA),
      cell("last_sync_result", result, result === "ok" ? "ok" : (result.startsWith("failed") ? "failed" : "")),
      cell("records_synced", fmt(s.records_synced || 0), "num"),
      cell("delivered_per_s", fmt((rates[s.name] || {}).delivered_per_s || 0), "num"),
      cell("success_rate", s.success_rate === null || s.success_rate === undefined ? NA
           : (100 * s.success_rate).toFixed(1) + " %", "num"),
      cell("watermark", s.watermark || NA), cell("sync_lag", duration(lag), "num"),
      cell("breaker", s.breaker || NA, s.breaker || ""),
    ];
  });
}

function renderSinks(status) {
  const rows = Object.entries(status.sinks || {}).map(([name, s]) => ({name, ...s}));
  fill("sinks", rows, "sink", s => s.name, s => [
    cell("name", s.name), cell("type", s.type), cell("sources", (s.sources || []).join(", ") || NA),
    cell("circuit", s.circuit || NA, s.circuit || ""),
    cell("failing_s", s.failing_s ? duration(s.failing_s) : NA, "num"),
    cell("last_status", s.last_status === undefined || s.last_status < 0 ? NA
         : (s.last_status === 0 ? "unreachable" : s.last_status), "num"),
    cell("in_flight", fmt(s.in_flight || 0), "num"),
  ]);
}

function workerDetail(w) {
  const stats = w.stats || {};
  const shown = Object.entries(stats).filter(([k]) => k !== "sink_circuit" && k !== "sources");
  const parts = shown.map(([k, v]) => k.replace("_", " ") + " " + fmt(v));
  if (stats.sink_circuit !== undefined) parts.push("sink breaker " + CIRCUIT[stats.sink_circuit]);
  if (w.sources && w.sources.length) parts.unshift("sources " + w.sources.join(", "));
  if (w.last_exit) parts.push("last exit: " + w.last_exit);
  return parts.join(" · ");
}

function renderWorkers(status) {
  fill("workers", status.workers || [], "worker", w => w.name, w => [
    cell("name", w.name), cell("role", w.role), cell("pid", w.pid || NA, "num"), cell("state", w.state, w.state),
    cell("restarts", fmt(w.restarts), "num"),
    cell("partitions", (w.partitions || []).map(tp => tp[0] + "/" + tp[1]).join(" ") || NA),
    cell("heartbeat", w.heartbeat_age_s === null || w.heartbeat_age_s === undefined ? NA
         : duration(w.heartbeat_age_s) + " ago", "num"),
    cell("detail", workerDetail(w), "muted"),
  ]);
  const circuits = (status.workers || []).map(w => (w.stats || {}).sink_circuit).filter(c => c !== undefined);
  const worst = circuits.length ? CIRCUIT[Math.max(...circuits)] : NA;
  $("sink-breaker").textContent = worst;
  $("sink-breaker").className = worst;
}

function renderPartitions(status) {
  const rows = status.partitions || [];
  fill("partitions", rows, "partition", p => p.topic + "/" + p.partition, p => [
    cell("topic", p.topic), cell("partition", p.partition, "num"), cell("owner", p.owner || NA),
    cell("committed", fmt(p.committed), "num"), cell("end", fmt(p.end), "num"),
    cell("lag", fmt(p.lag), "num" + (p.lag > 1000 ? " failed" : "")),
  ]);
  $("total-lag").textContent = fmt(rows.reduce((sum, p) => sum + (p.lag || 0), 0));
}

function renderChart(throughput) {
  const points = (throughput && throughput.points) || [];
  const windowS = (throughput && throughput.window_s) || 300;
  $("window").textContent = Math.round(windowS / 60);
  $("axis-start").textContent = Math.round(windowS / 60) + " min";
  const end = points.length ? points[points.length - 1].t : 0;
  const peak = Math.max(1, ...points.map(p => Math.max(p.fetched_per_s, p.delivered_per_s)));
  for (const series of ["fetched", "delivered"]) {
    const coords = points.map(p => {
      const x = 600 * (1 - (end - p.t) / windowS);
      const y = 175 - 165 * p[series + "_per_s"] / peak;
      return x.toFixed(1) + "," + y.toFixed(1);
    });
    document.querySelector('polyline[data-series="' + series + '"]').setAttribute("points", coords.join(" "));
    $(series + "-rate").textContent = points.length ? fmt(points[points.length - 1][series + "_per_s"]) : NA;
  }
  $("chart-max").textContent = points.length ? fmt(peak) : NA;
}

function renderHeader(status) {
  const ready = status.ready || {};
  $("ready").textContent = ready.ready ? "ready" : "not ready: " + (ready.reasons || []).join("; ");
  $("ready").className = ready.ready ? "ready" : "not-ready";
  const d = status.daemon || {};
  $("daemon").textContent = d.state + " · " + d.backend + " log · generation " + d.generation + " · pid " + d.pid
    + " · up " + duration(d.uptime_s);
}

function render(status) {
  const now = status.generated_at || Date.now() / 1000;
  renderHeader(status);
  renderSources(status, now);
  renderSinks(status);
  renderWorkers(status);
  renderPartitions(status);
  renderChart(status.throughput);
  $("updated").textContent = new Date(now * 1000).toLocaleTimeString();
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

function takeTokenFromLink() {
  const match = /^#token=(.+)$/.exec(location.hash);
  if (!match) return;
  sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
  history.replaceState(null, "", location.pathname + location.search);  // out of the address bar and history
}

function askForToken(wasWrong) {
  sessionStorage.removeItem(TOKEN_KEY);
  showError(wasWrong ? "The daemon refused that token." : "The daemon needs its control token to show its status.");
  $("login").hidden = false;
  $("token").focus();
}

async function refresh() {
  clearTimeout(timer);
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = {"Accept": "application/json"};
  if (token) headers["Authorization"] = "Bearer " + token;
  let again = true;
  try {
    const response = await fetch("status", {cache: "no-store", headers});
    if (response.status === 401) {
      again = false;  // polling resumes once a token is given
      askForToken(Boolean(token));
      return;
    }
    if (!response.ok) throw new Error("status answered " + response.status);
    render(await response.json());
    showError("");
    $("login").hidden = true;
  } catch (err) {
    showError("Cannot read the daemon's status (" + err.message + "); retrying.");
  } finally {
    refreshes += 1;
    $("refreshes").textContent = refreshes;
    if (again) timer = setTimeout(refresh, REFRESH_MS);
  }
}

$("login").addEventListener("submit", event => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value);
  $("token").value = "";
  refresh();
});
takeTokenFromLink();
refresh();
</script>
</body></html>
"""
