// herald's live dashboard: polls GET /v1/stats (the counters behind /metrics, as JSON) once a
// second, shows totals and per-second rates from two consecutive samples, and publishes test
// events through POST /v1/events. With an admin token configured, both need it as a bearer
// token: the page asks for it and keeps it in sessionStorage (this tab only).
"use strict";

const POLL_MS = 1000;
const HISTORY = 300; // chart points: five minutes at one a second
const TOKEN_KEY = "herald-admin-token";

const $ = (id) => document.getElementById(id);
let previous = null;
let defaultsSet = false;
let lastLatency = null; // shown while no event is going out
const history = { connections: [], messages: [] };

function headers(extra = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

// Sum of a family's series, optionally only those whose labels match `where`.
function total(stats, name, where = {}) {
  const family = stats.metrics[name];
  if (!family) return 0;
  return family.series
    .filter((s) => Object.entries(where).every(([k, v]) => s.labels[k] === v))
    .reduce((sum, s) => sum + (s.value ?? 0), 0);
}

function byLabel(stats, name, label) {
  const family = stats.metrics[name];
  const out = {};
  for (const s of family ? family.series : []) {
    out[s.labels[label]] = (out[s.labels[label]] ?? 0) + (s.value ?? 0);
  }
  return out;
}

function rate(stats, name) {
  if (!previous) return null;
  const seconds = (stats.time_ms - previous.time_ms) / 1000;
  if (seconds <= 0) return null;
  return Math.max(0, (total(stats, name) - total(previous, name)) / seconds);
}

// A histogram family merged over its series: cumulative buckets [[le, count], ...] without
// +Inf, and the count of every observation (the +Inf bucket).
function histogram(stats, name) {
  const merged = new Map();
  let count = 0;
  const family = stats.metrics[name];
  for (const s of family ? family.series : []) {
    count += s.count;
    for (const [le, n] of s.buckets) merged.set(le, (merged.get(le) ?? 0) + n);
  }
  return { count, buckets: [...merged.entries()].sort((a, b) => a[0] - b[0]) };
}

// Quantile q of what was observed between the two samples: the upper bound of its bucket, or
// Infinity when it lies beyond the largest bound.
function quantile(q, now, before) {
  const count = now.count - (before ? before.count : 0);
  if (count <= 0) return null;
  const bucket = now.buckets.find(([, n], i) => n - (before?.buckets[i]?.[1] ?? 0) >= q * count);
  return bucket ? bucket[0] : Infinity;
}

const number = (n) => (n === null ? "–" : Math.round(n).toLocaleString("en-US"));
const perSecond = (n) => (n === null ? "–" : n < 10 ? n.toFixed(1) : number(n));
function seconds(s) {
  if (s === null) return "–";
  if (!isFinite(s)) return "> 30 s";
  return s < 1 ? `≤ ${(s * 1000).toFixed(s < 0.01 ? 1 : 0)} ms` : `≤ ${s} s`;
}
function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}
const listing = (o) => Object.entries(o).map(([k, v]) => `${k}: ${number(v)}`).join(" · ");

function draw(canvas, points) {
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  ctx.clearRect(0, 0, width, height);
  if (points.length < 2) return;
  const max = Math.max(1, ...points);
  ctx.strokeStyle = "#d6336c";
  ctx.lineWidth = 2;
  ctx.beginPath();
  points.forEach((p, i) => {
    const x = (i / (HISTORY - 1)) * width;
    const y = height - 4 - (p / max) * (height - 20);
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
  ctx.fillStyle = "#6b7385";
  ctx.font = "11px system-ui";
  ctx.fillText(`max ${number(max)}`, 4, 12);
}

function remember(series, value) {
  series.push(value ?? 0);
  if (series.length > HISTORY) series.shift();
}

function render(stats) {
  const connections = total(stats, "herald_connections");
  $("connections").textContent = number(connections);
  $("per-shard").textContent = "per shard: " + listing(byLabel(stats, "herald_connections", "shard"));
  $("connects-rate").textContent = perSecond(rate(stats, "herald_connections_accepted_total"));
  $("accepted").textContent = `${number(total(stats, "herald_connections_accepted_total"))} accepted`;
  $("events-in-rate").textContent = perSecond(rate(stats, "herald_events_published_total"));
  $("events-in").textContent = `${number(total(stats, "herald_events_published_total"))} events`;
  const out = rate(stats, "herald_event_frames_total");
  $("messages-out-rate").textContent = perSecond(out);
  $("messages-out").textContent = `${number(total(stats, "herald_event_frames_total"))} messages`;

  const now = histogram(stats, "herald_fanout_latency_seconds");
  const before = previous ? histogram(previous, "herald_fanout_latency_seconds") : null;
  const p50 = quantile(0.5, now, before);
  if (p50 !== null) {
    lastLatency = `${seconds(p50)} / ${seconds(quantile(0.99, now, before))}`;
    $("latency").textContent = lastLatency;
  } else {
    $("latency").textContent = lastLatency ? `idle (last ${lastLatency})` : "idle";
  }

  $("slow").textContent = number(total(stats, "herald_slow_consumers_total"));
  $("shed").textContent = `${number(total(stats, "herald_memory_shed_total"))} shed for memory`;
  $("replays").textContent = number(total(stats, "herald_replays_total"));
  $("replays-by").textContent = listing(byLabel(stats, "herald_replays_total", "outcome"));

  const ready = stats.bus.ready;
  $("bus").textContent = `${stats.bus.name} · ${ready ? "connected" : "disconnected"}`;
  const lagEntries = byLabel(stats, "herald_bus_lag_entries", "stream");
  const lagSeconds = byLabel(stats, "herald_bus_lag_seconds", "stream");
  $("bus-lag").textContent = Object.keys(lagEntries).length
    ? Object.keys(lagEntries).map((s) => `${s}: ${number(lagEntries[s])} behind (${(lagSeconds[s] ?? 0).toFixed(1)} s)`).join(" · ")
    : "no stream to lag behind";
  $("rss").textContent = bytes(total(stats, "herald_resident_memory_bytes"));
  $("buffered").textContent = `${bytes(total(stats, "herald_buffered_bytes"))} buffered for connections`;

  const status = $("status");
  status.textContent = stats.draining ? "draining" : ready ? "ready" : "bus disconnected";
  status.className = "status " + (ready && !stats.draining ? "ok" : "bad");
  $("updated").textContent = `updated ${new Date(stats.time_ms).toLocaleTimeString()}`;

  remember(history.connections, connections);
  remember(history.messages, out);
  draw($("chart-connections"), history.connections);
  draw($("chart-messages"), history.messages);
  if (!defaultsSet) {
    $("pub-project").value = stats.default_project;
    defaultsSet = true;
  }
}

async function poll() {
  try {
    const response = await fetch("/v1/stats", { headers: headers(), cache: "no-store" });
    if (response.status === 401) {
      $("token-form").hidden = false;
      $("status").textContent = "admin token needed";
      $("status").className = "status bad";
      return;
    }
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const stats = await response.json();
    render(stats);
    previous = stats;
  } catch (e) {
    $("status").textContent = `unreachable (${e.message})`;
    $("status").className = "status bad";
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

const list = (s) => s.split(",").map((x) => x.trim()).filter(Boolean);

async function publish(event) {
  event.preventDefault();
  const result = $("pub-result");
  let payload;
  try {
    payload = JSON.parse($("pub-payload").value || "{}");
  } catch (e) {
    result.textContent = `payload is not JSON: ${e.message}`;
    result.className = "error";
    return;
  }
  const body = { project: $("pub-project").value.trim(), channels: list($("pub-channels").value), payload };
  const events = list($("pub-events").value);
  if (events.length) body.events = events;
  const response = await fetch("/v1/events", {
    method: "POST",
    headers: headers({ "Content-Type": "application/json" }),
    body: JSON.stringify(body),
  });
  const answer = await response.json().catch(() => ({}));
  if (response.ok) {
    result.textContent = `published, id ${answer.id}`;
    result.className = "";
  } else {
    result.textContent = `refused (${response.status}): ${answer.message ?? "no reason given"}`;
    result.className = "error";
    if (response.status === 401) $("token-form").hidden = false;
  }
}

function useToken(event) {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value);
  $("token-form").hidden = true;
  $("token-error").textContent = "";
}

document.addEventListener("DOMContentLoaded", () => {
  $("publish").addEventListener("submit", publish);
  $("token-form").addEventListener("submit", useToken);
  poll();
});
