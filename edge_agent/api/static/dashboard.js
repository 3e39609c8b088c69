// edge-agent dashboard: no build step, no external code. Live state comes from /api/events
// (server-sent events, read with fetch so an API key can be sent); the chat streams from
// /v1/chat/completions. Every value from the server is written with textContent.
"use strict";

const PALETTE = ["#4fb3ff", "#f5a524", "#3ddc97", "#c77dff", "#ff7a90", "#2ec4b6", "#ffd166", "#8ecae6"];
const LOCAL_COLOUR = "#5c6773";
const WINDOW_S = 300;
const state = { snapshot: null, colours: new Map(), history: [] };
const $ = (id) => document.getElementById(id);
const short = (id) => (id === "local" ? "this device" : id.slice(0, 10));

function headers() {
  const key = $("api-key").value.trim();
  const h = { "Content-Type": "application/json" };
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

// Reads a text/event-stream body; calls onEvent(eventName, dataString) per event.
async function readSSE(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) onEvent(name, data.join("\n"));
    }
  }
}

function colourOf(peerId) {
  if (peerId === "local") return LOCAL_COLOUR;
  if (!state.colours.has(peerId)) state.colours.set(peerId, PALETTE[state.colours.size % PALETTE.length]);
  return state.colours.get(peerId);
}

function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function owners(snap, layer) {
  const out = [];
  for (const [a, b] of snap.local) if (layer >= a && layer < b) out.push("local");
  for (const p of snap.peers) for (const [a, b] of p.ranges) if (layer >= a && layer < b) out.push(p.peer_id);
  return out;
}

function renderLayers(snap) {
  const bar = $("layer-bar");
  bar.replaceChildren();
  const width = bar.clientWidth || 800, height = 40, n = snap.n_layer;
  const w = width / n;
  bar.setAttribute("viewBox", `0 0 ${width} ${height + 16}`);
  for (let i = 0; i < n; i++) {
    const who = owners(snap, i);
    const title = svg("title", {});
    title.textContent = `layer ${i}: ` + (who.length ? who.map(short).join(", ") : "nobody (uncovered)");
    if (!who.length) {
      const r = svg("rect", { x: i * w + 1, y: 1, width: Math.max(w - 2, 1), height: height - 2, fill: "none",
        stroke: "#ff6b6b", "stroke-dasharray": "3 2", class: "layer uncovered", "data-layer": i });
      r.appendChild(title);
      bar.appendChild(r);
      continue;
    }
    const h = height / who.length;
    who.forEach((peer, j) => {
      const r = svg("rect", { x: i * w + 0.5, y: j * h, width: Math.max(w - 1, 1), height: h, fill: colourOf(peer),
        class: "layer", "data-layer": i, "data-peer": peer });
      r.appendChild(title.cloneNode(true));
      bar.appendChild(r);
    });
  }
  for (let i = 0; i <= n; i += Math.max(1, Math.round(n / 10))) {
    const t = svg("text", { x: Math.min(i * w, width - 12), y: height + 13, fill: "#8b98a5", "font-size": 10 });
    t.textContent = String(i);
    bar.appendChild(t);
  }
  const legend = $("legend");
  legend.replaceChildren();
  for (const id of ["local", ...snap.peers.map((p) => p.peer_id)]) {
    const item = el("span");
    item.append(el("span", null, { class: "swatch", style: `background:${colourOf(id)}` }), short(id));
    legend.appendChild(item);
  }
  const covered = snap.covered ? "every remote layer is served" : "some layers have no peer";
  $("layer-summary").textContent = `${n} layers; this device keeps ${snap.local.map(([a, b]) => a + ":" + b).join(" and ")}; ${covered}`;
}

function fillTable(id, rows, emptyText, columns) {
  const body = $(id).tBodies[0];
  body.replaceChildren();
  if (!rows.length) {
    const tr = el("tr");
    tr.appendChild(el("td", emptyText, { colspan: columns, class: "empty" }));
    body.appendChild(tr);
    return;
  }
  for (const cells of rows) {
    const tr = el("tr");
    for (const c of cells) tr.appendChild(c instanceof Node ? c : el("td", c));
    body.appendChild(tr);
  }
}

function renderPeers(snap) {
  const others = snap.incompatible || [];
  $("peer-count").textContent = `(${snap.peers.length}${others.length ? `; ${others.length} not used` : ""})`;
  const rows = snap.peers.map((p) => {
    const name = el("td", null, { title: p.peer_id, class: "peer" });
    name.append(el("span", null, { class: "swatch", style: `background:${colourOf(p.peer_id)}` }), short(p.peer_id));
    return [name, p.ranges.map(([a, b]) => a + ":" + b).join(", "), p.ms_per_layer.toFixed(3),
      Math.round(p.free_mem_mb) + " MB", p.backend, `${p.transport}, ${p.rtt_ms.toFixed(1)} ms`];
  });
  for (const p of others) {  // peers whose arithmetic settings would change the output: never routed to
    const reason = el("td", "not used: " + p.reason, { colspan: 4, class: "empty", title: p.reason });
    rows.push([el("td", short(p.peer_id), { title: p.peer_id }), p.ranges.map(([a, b]) => a + ":" + b).join(", "), reason]);
  }
  fillTable("peers", rows, "no peers seen yet", 6);
}

function renderFlights(snap) {
  $("flight-count").textContent = `(${snap.in_flight.length}; ${snap.kept_conversations} conversation(s) kept for a next turn)`;
  fillTable("flights", snap.in_flight.map((f) => [
    f.id.slice(0, 16), `${f.prompt_tokens} + ${f.completion_tokens}`, f.age_s.toFixed(1) + " s",
    f.running ? (Object.entries(f.path).map(([r, p]) => `${short(p)} ${r}`).join(" → ") || "prefill") : "queued",
  ]), "idle", 4);
}

function plot(canvasId, points, colour) {
  const c = $(canvasId), ctx = c.getContext("2d");
  const W = c.width, H = c.height, pad = 34;
  ctx.clearRect(0, 0, W, H);
  const now = Date.now() / 1000;
  const pts = points.filter(([t, v]) => v !== null && v !== undefined && now - t <= WINDOW_S);
  const max = Math.max(1e-9, ...pts.map(([, v]) => v)) * 1.15;
  ctx.strokeStyle = "#263241"; ctx.fillStyle = "#8b98a5"; ctx.font = "10px sans-serif"; ctx.lineWidth = 1;
  for (let k = 0; k <= 2; k++) {
    const y = H - pad + 10 - (k / 2) * (H - pad);
    ctx.beginPath(); ctx.moveTo(pad, y); ctx.lineTo(W - 4, y); ctx.stroke();
    const tick = max * k / 2;
    ctx.fillText(tick >= 10 ? String(Math.round(tick)) : tick.toFixed(1), 2, y + 3);
  }
  if (!pts.length) { ctx.fillText("no finished requests yet", pad + 8, H / 2); return; }
  const x = (t) => pad + (W - pad - 6) * (1 - (now - t) / WINDOW_S);
  const y = (v) => H - pad + 10 - (v / max) * (H - pad);
  ctx.strokeStyle = colour; ctx.fillStyle = colour; ctx.lineWidth = 1.5;
  ctx.beginPath();
  pts.forEach(([t, v], i) => (i ? ctx.lineTo(x(t), y(v)) : ctx.moveTo(x(t), y(v))));
  ctx.stroke();
  for (const [t, v] of pts) { ctx.beginPath(); ctx.arc(x(t), y(v), 2.2, 0, 2 * Math.PI); ctx.fill(); }
}

function render(snap) {
  state.snapshot = snap;
  $("model").textContent = `${snap.model_id} · agent ${snap.agent_id.slice(0, 10)}`;
  renderLayers(snap);
  renderPeers(snap);
  renderFlights(snap);
  plot("plot-ttft", snap.recent.map((r) => [r.t, r.ttft_ms]), "#4fb3ff");
  plot("plot-tbt", snap.recent.map((r) => [r.t, r.tbt_ms]), "#f5a524");
  plot("plot-tps", snap.recent.map((r) => [r.t, r.tokens_per_s]), "#3ddc97");
}

// The Accounts panel: this agent's own verified ledger, as `edge-agent ledger balance|reputation|evidence`
// compute it. Agent ids, reasons and problems come from the network: written with textContent only.
const KINDS = { "failed-audit": "failed audit", equivocation: "equivocation" };
const count = (n) => Number(n).toLocaleString("en-US");
const num = (n) => el("td", count(n), { class: "num" });

function agentCell(a) {
  const cell = el("td", null, { title: a.agent_id, class: "agent" });
  if (a.live) cell.appendChild(el("span", null, { class: "swatch", style: `background:${colourOf(a.agent_id)}` }));
  cell.append(a.this_device ? `this device (${a.agent_id.slice(0, 10)})` : a.agent_id.slice(0, 10));
  return cell;
}

function renderAccounts(panel) {
  const note = $("accounts-note");
  const problem = !panel.ledger ? panel.message : panel.error;
  note.hidden = !problem;
  note.textContent = problem || "";
  $("accounts-tables").hidden = Boolean(problem);
  $("accounts-summary").textContent = problem ? "" : `(${panel.accounts_total} agent(s) in this agent's ledger and seen live)`;
  if (problem) return;
  const rows = panel.accounts.map((a) => {
    const rep = el("td", a.reputation.toFixed(3) + (a.in_ledger ? "" : " (new)"), { class: "num" });
    const route = a.routable ? el("td", "yes") : el("td", "no: " + a.not_routable_because, { class: "bad", title: a.not_routable_because });
    return [agentCell(a), num(a.balance), num(a.earned), num(a.spent), num(a.bonded), num(a.stake), rep, route, num(a.offences)];
  });
  fillTable("accounts", rows, "no accounts yet", 9);
  [...$("accounts").tBodies[0].rows].forEach((tr, i) => { if (panel.accounts[i]) tr.dataset.agent = panel.accounts[i].agent_id; });
  const shown = panel.evidence.length;
  $("evidence-summary").textContent = shown < panel.evidence_total ? `(newest ${shown} of ${panel.evidence_total})` : `(${shown})`;
  fillTable("evidence", panel.evidence.map((e) => [
    new Date(e.stored_ms).toLocaleString(), KINDS[e.kind] || e.kind, el("td", e.accused.slice(0, 10), { title: e.accused }),
    e.valid ? el("td", e.request.slice(0, 12), { title: e.request }) : "", e.valid ? String(e.chunk) : "",
    e.distance !== undefined ? `${e.distance.toFixed(3)} > ${e.tolerance.toFixed(3)}` : "",
    e.valid ? "yes" : el("td", "no: " + e.problem, { class: "bad", title: e.problem }),
  ]), "no evidence: no node has been caught", 7);
}

function setLive(on) {
  $("live").textContent = on ? "live" : "offline";
  $("live").className = "pill " + (on ? "on" : "off");
}

async function followEvents() {
  for (;;) {
    try {
      const res = await fetch("/api/events", { headers: headers() });
      if (!res.ok) throw new Error("HTTP " + res.status);
      setLive(true);
      await readSSE(res, (name, data) => {
        if (name === "snapshot") render(JSON.parse(data));
        else if (name === "accounts") renderAccounts(JSON.parse(data));
      });
    } catch (err) {
      console.warn("event stream:", err);
    }
    setLive(false);
    await new Promise((r) => setTimeout(r, 2000));
  }
}

function describePath(ext) {
  if (!ext || !ext.path) return "";
  const hops = ext.path.map((h) => `${short(h.peer_id)} (${h.range})`).join(" → ");
  const t = ext.ttft_ms !== null ? `, first token ${ext.ttft_ms.toFixed(0)} ms` : "";
  const policy = ext.privacy ? `, privacy ${ext.privacy}` : "";
  return `via ${hops}${t}${ext.reroutes.length ? `, ${ext.reroutes.length} re-route(s)` : ""}${policy}`;
}

async function sendChat(event) {
  event.preventDefault();
  const input = $("chat-input"), text = input.value.trim();
  if (!text || !state.snapshot) return;
  input.value = "";
  $("chat-send").disabled = true;
  const log = $("chat-log");
  log.appendChild(el("div", text, { class: "msg user" }));
  const answer = el("div", "", { class: "msg assistant" });
  const body = el("span", "", { class: "content" });
  answer.appendChild(body);
  log.appendChild(answer);
  state.history.push({ role: "user", content: text });
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(),
      body: JSON.stringify({ model: state.snapshot.model_id, messages: state.history, stream: true, max_tokens: 128, temperature: 0 }),
    });
    if (!res.ok) throw new Error((await res.json()).error.message);
    await readSSE(res, (_name, data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.choices.length && chunk.choices[0].delta.content) body.textContent += chunk.choices[0].delta.content;
      if (chunk.x_edge_agent) answer.appendChild(el("span", describePath(chunk.x_edge_agent), { class: "via" }));
      log.scrollTop = log.scrollHeight;
    });
    state.history.push({ role: "assistant", content: body.textContent });
    answer.dataset.done = "1";
  } catch (err) {
    answer.classList.add("error");
    body.textContent = "error: " + err.message;
    state.history.pop();
  } finally {
    $("chat-send").disabled = false;
  }
}

// The desktop app (edge_agent/desktop.py) answers /api/app: its phase, a model picker when it has no
// model, and the stop button. A plain `edge-agent serve` answers 404 and none of this shows.
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const PHASES = { starting: "starting", no_model: "no model yet", fetching: "fetching from a peer", loading: "loading",
  ready: "running", error: "error", stopping: "stopped" };

function renderApp(info) {
  state.app = info;
  document.body.classList.add("app");
  const picking = info.phase === "no_model" || info.phase === "error";
  document.body.classList.toggle("setup", info.phase !== "ready");
  $("app-card").hidden = info.phase === "ready";
  $("stop").hidden = !info.stoppable || info.phase === "stopping";
  $("app-phase").textContent = "(" + (PHASES[info.phase] || info.phase) + ")";
  $("app-message").textContent = info.message;
  const bar = $("app-progress");
  bar.hidden = !["starting", "loading", "fetching"].includes(info.phase);
  if (info.progress && info.progress.total > 0) {  // bytes of the shard files fetched so far
    bar.max = info.progress.total;
    bar.value = info.progress.done;
    $("app-message").textContent = info.message + ": " + (info.progress.done / 1e6).toFixed(1) + " of " +
      (info.progress.total / 1e6).toFixed(1) + " MB";
  } else {
    bar.removeAttribute("value");  // indeterminate
  }
  $("model-picker").hidden = !picking;
  if (!picking) return;
  renderOffers(info);
  $("how-to").textContent = info.how_to_get_a_model || "";
  const list = $("suggestions");
  list.replaceChildren();
  if (info.suggestions && info.suggestions.length) list.appendChild(el("p", "GGUF files found on this machine:", { class: "muted" }));
  for (const path of info.suggestions || []) {
    const b = el("button", path, { type: "button", class: "suggestion" });
    b.addEventListener("click", () => { $("model-path").value = path; });
    list.appendChild(b);
  }
}

// Peers of the swarm that share their model's weights: one click fetches this device's layers.
function renderOffers(info) {
  const box = $("offers");
  box.replaceChildren();
  const offers = info.offers || [];
  if (!offers.length) return;
  box.appendChild(el("p", "A peer of your swarm can give this device what it needs to chat (verified against the model's content hash):"));
  for (const offer of offers) {
    const b = el("button", "Fetch " + offer.model + " from peer " + offer.peer_id.slice(0, 12) + ": " + offer.mb + " MB",
      { type: "button", class: "offer" });
    b.addEventListener("click", () => fetchFrom(offer.peer_id, b));
    box.appendChild(b);
  }
  box.appendChild(el("p", info.thin_client_note || "", { class: "muted" }));
}

async function fetchFrom(peerId, button) {
  button.disabled = true;
  $("model-error").textContent = "";
  try {
    const answer = await appAction("/api/app/fetch", { peer_id: peerId });
    renderApp({ ...state.app, phase: answer.phase, message: "fetching from peer " + peerId.slice(0, 12) });
  } catch (err) {
    $("model-error").textContent = err.message;
    button.disabled = false;
  }
}

async function followApp() {
  for (;;) {
    let info = null;
    try {
      const res = await fetch("/api/app");
      if (!res.ok) return;  // 404 (or 401 behind an API key): a plain `serve`, not the app
      info = await res.json();
    } catch (err) {
      console.warn("app state:", err);
    }
    if (info) renderApp(info);
    if (info && info.phase === "stopping") return;
    await sleep(info && info.phase === "ready" ? 5000 : 1000);
  }
}

async function appAction(path, body) {
  const res = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body) });
  const answer = await res.json();
  if (!res.ok) throw new Error(answer.error.message);
  return answer;
}

async function openModel(event) {
  event.preventDefault();
  const path = $("model-path").value.trim();
  if (!path) return;
  $("model-open").disabled = true;
  $("model-error").textContent = "";
  try {
    const answer = await appAction("/api/app/model", { path });
    renderApp({ ...state.app, phase: answer.phase, message: "loading " + answer.model });
  } catch (err) {
    $("model-error").textContent = err.message;
  } finally {
    $("model-open").disabled = false;
  }
}

async function stopApp() {
  $("stop").disabled = true;
  try {
    await appAction("/api/app/stop", {});
    renderApp({ ...state.app, phase: "stopping", message: "edge-agent stopped: you can close this tab." });
    setLive(false);
  } catch (err) {
    $("stop").disabled = false;
    alert("could not stop: " + err.message);
  }
}

$("model-form").addEventListener("submit", openModel);
$("stop").addEventListener("click", stopApp);
followApp();

$("api-key").value = sessionStorage.getItem("edge-agent-api-key") || "";
$("api-key").addEventListener("change", () => sessionStorage.setItem("edge-agent-api-key", $("api-key").value.trim()));
$("chat-form").addEventListener("submit", sendChat);
window.addEventListener("resize", () => state.snapshot && renderLayers(state.snapshot));
followEvents();
