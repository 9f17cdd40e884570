// tunnelgate's dashboard: one view of the gateway (/api/v1/dashboard) each second,
// by Server-Sent Events (/api/v1/stream), or by polling when a proxy keeps the
// stream from arriving. Rates are the difference of two views. The fleet's view
// (/api/v1/fleet) reads Redis, so it is asked every FLEET_INTERVAL, and only while the
// gateway is in a fleet (a 404 says it is in none: asked again only if it restarts,
// since a reload cannot change that). No library, no build.
"use strict";

const API = "/api/v1";
const HISTORY_POINTS = 300; // seconds of live chart
const POLL_INTERVAL = 2000;
const FLEET_INTERVAL = 5000;
const FLEET_TIMEOUT = 10000; // a registry that does not answer: say so, ask again later
const state = {
  view: null, previous: null, rates: new Map(), live: [], errors: [], selected: null, range: "1h", stream: null, polling: null,
  fleet: null, // the last 200 of /api/v1/fleet; null: in no fleet (or not known yet)
  fleetDue: true, // ask even if not in a fleet: at load, and after the gateway restarts
  fleetProblem: "", // why the last question went unanswered
  fleetAt: 0, // when the last answer came (ms)
};

const $ = (id) => document.getElementById(id);

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(Math.round(n))) + " " + units[i];
}

function age(seconds) {
  if (seconds < 60) return Math.floor(seconds) + "s";
  if (seconds < 3600) return Math.floor(seconds / 60) + "m" + String(Math.floor(seconds % 60)).padStart(2, "0") + "s";
  if (seconds < 86400) return Math.floor(seconds / 3600) + "h" + String(Math.floor((seconds % 3600) / 60)).padStart(2, "0") + "m";
  return Math.floor(seconds / 86400) + "d" + Math.floor((seconds % 86400) / 3600) + "h";
}

function when(unix) {
  return unix ? new Date(unix * 1000).toLocaleString() : "never";
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function button(row, label, action) {
  const b = document.createElement("button");
  b.textContent = label;
  b.className = "danger";
  b.addEventListener("click", (event) => { event.stopPropagation(); action(b); });
  row.insertCell().appendChild(b);
}

async function post(path) {
  // Same-origin JSON: a cross-site page cannot send it (the server refuses it otherwise).
  const response = await fetch(API + path, { method: "POST", headers: { "Content-Type": "application/json" }, body: "{}" });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function filterRows(table) {
  const input = document.querySelector(`.filter[data-table="${table.id}"]`);
  const needle = input ? input.value.trim().toLowerCase() : "";
  for (const row of table.tBodies[0].rows) {
    row.hidden = needle !== "" && !row.textContent.toLowerCase().includes(needle);
  }
}

// --- receiving views ------------------------------------------------------------------

function receive(view) {
  state.previous = state.view;
  state.view = view;
  if (state.previous && state.previous.info.started_at !== view.info.started_at) state.fleetDue = true; // restarted
  measure();
  render();
}

function measure() {
  const now = state.view, before = state.previous;
  let up = 0, down = 0, errors = 0;
  const rates = new Map();
  if (before) {
    const seconds = Math.max(0.001, now.time - before.time);
    const old = new Map(before.services.map((s) => [s.agent + "/" + s.name, s]));
    for (const s of now.services) {
      const o = old.get(s.agent + "/" + s.name);
      if (!o) continue;
      const r = { up: Math.max(0, s.bytes_up - o.bytes_up) / seconds, down: Math.max(0, s.bytes_down - o.bytes_down) / seconds };
      rates.set(s.agent + "/" + s.name, r);
      up += r.up; down += r.down;
      errors += Math.max(0, s.errors_total - o.errors_total);
    }
    state.live.push({ t: now.time, up, down });
    while (state.live.length > HISTORY_POINTS) state.live.shift();
    state.errors.push({ t: now.time, n: errors });
    while (state.errors.length && state.errors[0].t < now.time - 300) state.errors.shift();
  }
  state.rates = rates;
  state.now = { up, down };
}

function render() {
  const v = state.view;
  $("version").textContent = `${v.info.version} · ${v.info.address} · ${v.info.tls ? "TLS" : "no TLS"} · up ${age(v.info.uptime)}`;
  const online = v.agents.filter((a) => a.online).length;
  $("agents-online").textContent = `${online} / ${v.agents.length}`;
  $("services-up").textContent = `${v.services.filter((s) => s.up).length} / ${v.services.length}`;
  $("open-connections").textContent = String(v.connections_total);
  $("rate-now").textContent = state.now ? `${bytes(state.now.up)}/s / ${bytes(state.now.down)}/s` : "–";
  $("recent-errors").textContent = String(state.errors.reduce((sum, e) => sum + e.n, 0));
  renderEvents($("recent-events"), v.events.slice(-10).reverse(), "");
  renderEvents($("event-log"), v.events.slice().reverse(), $("events-filter").value.trim().toLowerCase());
  renderAgents(v);
  renderServices(v);
  renderConnections(v);
  drawLive();
}

function renderEvents(list, events, needle) {
  list.replaceChildren();
  for (const e of events) {
    const text = `${e.agent}${e.service ? " / " + e.service : ""} ${e.detail}`;
    if (needle && !(e.kind + " " + text).toLowerCase().includes(needle)) continue;
    const li = document.createElement("li");
    const kind = document.createElement("span");
    kind.className = "kind " + (e.kind.endsWith("_down") || e.kind === "auth_failure" ? "bad" : "ok");
    kind.textContent = e.kind.replace("_", " ");
    const time = document.createElement("span");
    time.className = "muted";
    time.textContent = new Date(e.time * 1000).toLocaleTimeString() + " ";
    li.append(time, kind, " " + text);
    list.appendChild(li);
  }
}

function renderAgents(v) {
  const table = $("agents-table"), body = table.tBodies[0];
  body.replaceChildren();
  for (const a of v.agents) {
    const row = body.insertRow();
    row.dataset.agent = a.name;
    cell(row, a.name);
    cell(row, a.online ? "online" : "offline", a.online ? "ok" : "bad");
    cell(row, a.address || "–");
    cell(row, a.online ? "now" : when(a.last_seen));
    cell(row, a.heartbeat_rtt == null ? "–" : (a.heartbeat_rtt * 1000).toFixed(1) + " ms", "num");
    cell(row, String(a.services.length), "num");
    cell(row, String(a.connections), "num");
    cell(row, `${bytes(a.up)} / ${bytes(a.down)}`, "num");
    if (a.online) {
      button(row, "Disconnect", async (b) => {
        if (!confirm(`Disconnect agent ${a.name}? It will reconnect.`)) return;
        b.disabled = true;
        try { await post(`/agents/${encodeURIComponent(a.name)}/disconnect`); } catch (error) { alert(error.message); }
      });
    } else {
      row.insertCell();
    }
  }
  filterRows(table);
}

function renderServices(v) {
  const table = $("services-table"), body = table.tBodies[0];
  body.replaceChildren();
  for (const s of v.services) {
    const key = s.agent + "/" + s.name;
    const row = body.insertRow();
    row.className = "clickable" + (state.selected === key ? " selected" : "");
    row.dataset.service = key;
    row.addEventListener("click", () => selectService(s));
    const rate = state.rates.get(key);
    cell(row, s.name);
    cell(row, s.agent);
    cell(row, s.address || "–");
    cell(row, s.up ? "up" : "down", s.up ? "ok" : "bad");
    cell(row, String(s.connections), "num");
    cell(row, rate ? `${bytes(rate.up + rate.down)}/s` : "–", "num");
    cell(row, `${bytes(s.bytes_up)} / ${bytes(s.bytes_down)}`, "num");
    cell(row, String(s.errors_total), "num");
  }
  filterRows(table);
}

function renderConnections(v) {
  const table = $("connections-table"), body = table.tBodies[0];
  body.replaceChildren();
  for (const c of v.connections) {
    const row = body.insertRow();
    row.dataset.conn = String(c.id);
    cell(row, c.client);
    cell(row, c.service);
    cell(row, c.agent);
    cell(row, age(c.age), "num");
    cell(row, bytes(c.up), "num");
    cell(row, bytes(c.down), "num");
    button(row, "Close", async (b) => {
      b.disabled = true;
      try { await post(`/connections/${c.id}/close`); } catch (error) { alert(error.message); }
    });
  }
  const shown = v.connections.length;
  $("connections-note").textContent = shown < v.connections_total
    ? `the ${shown} longest-running of ${v.connections_total} (all of them: ${API}/connections)` : "";
  filterRows(table);
}

// --- the fleet ---------------------------------------------------------------------------

function tag(parent, text, className) {
  const span = document.createElement("span");
  span.textContent = text;
  span.className = className;
  parent.append(" ", span);
}

async function askFleet() {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), FLEET_TIMEOUT);
  try {
    const response = await fetch(API + "/fleet", { signal: controller.signal });
    if (response.status === 404) {
      state.fleet = null; // in no fleet
    } else {
      const body = await response.json().catch(() => ({}));
      if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
      state.fleet = body;
    }
    state.fleetDue = false;
    state.fleetProblem = "";
    state.fleetAt = Date.now();
  } catch (error) {
    state.fleetProblem = error.name === "AbortError" ? `no answer within ${FLEET_TIMEOUT / 1000} s` : error.message;
  } finally {
    clearTimeout(timer);
  }
  renderFleet();
}

async function watchFleet() {
  // One question at a time: the next is asked FLEET_INTERVAL after the last answer.
  if (state.fleet || state.fleetDue) await askFleet();
  setTimeout(watchFleet, FLEET_INTERVAL);
}

function renderFleet() {
  const f = state.fleet, section = $("fleet"), nav = $("fleet-nav");
  section.dataset.state = f ? (f.up ? "up" : "down") : "none";
  const wasShown = !nav.hidden;
  nav.hidden = !f;
  nav.classList.toggle("warn", Boolean(f && (!f.up || state.fleetProblem)));
  if (wasShown !== !nav.hidden) show(); // the Fleet view comes or goes
  if (!f) return;

  $("fleet-name").textContent = f.fleet;
  $("fleet-node").textContent = f.node;
  const registry = $("fleet-registry");
  registry.textContent = f.up ? "up" : "down";
  registry.className = "value " + (f.up ? "ok" : "bad");
  const warnings = [];
  if (!f.up) warnings.push(`The fleet's registry cannot be reached${f.error ? ": " + f.error : ""}. Open tunnels carry on; new ports wait until it is back.`);
  if (state.fleetProblem) warnings.push(`The fleet's view could not be read (${state.fleetProblem}); shown as it was at ${new Date(state.fleetAt).toLocaleTimeString()}.`);
  $("fleet-warning").textContent = warnings.join(" ");
  $("fleet-warning").hidden = warnings.length === 0;

  const nodes = $("fleet-nodes-table").tBodies[0];
  nodes.replaceChildren();
  for (const n of f.nodes) {
    const row = nodes.insertRow();
    row.dataset.node = n.node;
    const name = cell(row, n.node);
    if (n.node === f.node) { row.className = "selected"; tag(name, "this gateway", "pill"); }
    cell(row, n.address || "–");
    cell(row, n.version || "–");
    cell(row, n.agents.length ? n.agents.join(", ") : "–");
  }
  if (!f.nodes.length) emptyRow(nodes, 4, f.up ? "no gateway is announced" : "unknown while the registry is down");

  const forwarded = new Set(f.forwarding ? f.forwarding.ports : []);
  const leases = $("fleet-leases-table");
  leases.tBodies[0].replaceChildren();
  for (const lease of f.leases) {
    const row = leases.tBodies[0].insertRow();
    row.dataset.port = String(lease.port);
    cell(row, String(lease.port), "num");
    cell(row, lease.owner);
    const held = cell(row, "");
    lease.nodes.forEach((node, i) => {
      if (i) held.append(", ");
      const span = document.createElement("span");
      span.textContent = node;
      if (node === f.node) span.className = "here";
      held.append(span);
    });
    if (forwarded.has(lease.port)) cell(row, "forwarded", "forwarded");
    else if (lease.nodes.includes(f.node)) cell(row, "served");
    else cell(row, "–", "muted");
  }
  if (!f.leases.length) emptyRow(leases.tBodies[0], 4, f.up ? "no port is leased" : "unknown while the registry is down");
  filterRows(leases);

  const forwarding = f.forwarding;
  $("fleet-forwarding").hidden = !forwarding;
  if (forwarding) {
    $("fleet-out").textContent = String(forwarding.out);
    $("fleet-in").textContent = String(forwarding.in);
    $("fleet-failed").textContent = String(forwarding.failed);
    $("fleet-refused").textContent = String(forwarding.refused);
    $("fleet-forwarding-note").textContent = `Other gateways reach this one on ${forwarding.link || "–"}; it forwards `
      + (forwarding.ports.length ? `port${forwarding.ports.length > 1 ? "s" : ""} ${forwarding.ports.join(", ")}.` : "no port now.");
  } else {
    $("fleet-forwarding-note").textContent = "This gateway forwards no clients to the others (no fleet_listen).";
  }
  $("fleet-updated").textContent = state.fleetAt ? `; last at ${new Date(state.fleetAt).toLocaleTimeString()}` : "";
}

function emptyRow(body, columns, text) {
  const row = body.insertRow();
  row.className = "empty";
  const td = cell(row, text, "muted");
  td.colSpan = columns;
}

// --- charts ------------------------------------------------------------------------------

function chart(canvas, series, labels) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio);
  g.clearRect(0, 0, width, height);
  const max = Math.max(1, ...series.flatMap((s) => s.values));
  g.fillStyle = "#6b7385";
  g.font = "11px system-ui, sans-serif";
  g.fillText(labels.top(max), 6, 12);
  const colors = ["#2f5fd0", "#1a7f37"];
  series.forEach((s, i) => {
    const n = s.values.length;
    if (n < 2) return;
    g.strokeStyle = colors[i % colors.length];
    g.lineWidth = 1.5;
    g.beginPath();
    s.values.forEach((value, x) => {
      const px = (x / (n - 1)) * (width - 8) + 4;
      const py = height - 6 - (value / max) * (height - 24);
      if (x === 0) g.moveTo(px, py); else g.lineTo(px, py);
    });
    g.stroke();
    g.fillStyle = colors[i % colors.length];
    g.fillText(s.name, width - 60 - i * 60, 12);
  });
}

function drawLive() {
  if ($("overview").hidden) return;
  chart($("live-chart"), [
    { name: "up", values: state.live.map((p) => p.up) },
    { name: "down", values: state.live.map((p) => p.down) },
  ], { top: (max) => `${bytes(max)}/s` });
}

async function selectService(s) {
  state.selected = s.agent + "/" + s.name;
  $("traffic").hidden = false;
  $("traffic-title").textContent = `${s.name} on ${s.agent}`;
  for (const b of document.querySelectorAll(".ranges button")) b.classList.toggle("active", b.dataset.range === state.range);
  const note = $("traffic-note");
  if (!state.view.history) { note.textContent = "this gateway keeps no history"; return; }
  const url = `${API}/services/${encodeURIComponent(s.name)}/traffic?range=${state.range}&agent=${encodeURIComponent(s.agent)}`;
  const response = await fetch(url);
  const body = await response.json();
  if (!response.ok) { note.textContent = body.error; return; }
  note.textContent = body.points.length ? `${body.points.length} points, written each minute` : "no traffic recorded yet (written each minute)";
  chart($("traffic-chart"), [
    { name: "up", values: body.points.map((p) => p.up) },
    { name: "down", values: body.points.map((p) => p.down) },
  ], { top: (max) => bytes(max) + (state.range === "30d" ? "/day" : "/min") });
  renderServices(state.view);
}

// --- navigation and updates --------------------------------------------------------------

function show() {
  let name = (location.hash || "#overview").slice(1);
  if (name === "fleet" && !state.fleet) name = "overview"; // in no fleet (or not known yet)
  for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== name;
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("active", link.dataset.view === name);
  if (state.view) drawLive();
}

function setLink(text, className) {
  const link = $("link");
  link.textContent = text;
  link.className = "pill " + className;
}

function poll() {
  if (state.polling) return;
  setLink("polling", "live");
  const tick = async () => {
    try {
      const response = await fetch(API + "/dashboard");
      if (!response.ok) throw new Error(response.statusText);
      receive(await response.json());
      setLink("polling", "live");
    } catch (error) {
      setLink("unreachable", "down");
    }
  };
  tick();
  state.polling = setInterval(tick, POLL_INTERVAL);
}

function connect() {
  if (!window.EventSource) { poll(); return; }
  let failures = 0;
  const stream = new EventSource(API + "/stream");
  state.stream = stream;
  stream.onmessage = (message) => { failures = 0; setLink("live", "live"); receive(JSON.parse(message.data)); };
  stream.onerror = () => {
    failures += 1;
    if (failures >= 3) { stream.close(); poll(); } else { setLink("reconnecting", "down"); }
  };
}

window.addEventListener("hashchange", show);
window.addEventListener("resize", () => state.view && drawLive());
for (const input of document.querySelectorAll(".filter[data-table]")) input.addEventListener("input", () => filterRows($(input.dataset.table)));
$("events-filter").addEventListener("input", () => state.view && render());
for (const b of document.querySelectorAll(".ranges button")) {
  b.addEventListener("click", () => {
    state.range = b.dataset.range;
    const s = state.view.services.find((x) => x.agent + "/" + x.name === state.selected);
    if (s) selectService(s);
  });
}
show();
connect();
watchFleet();
