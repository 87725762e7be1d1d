// Floorhand supervisor dashboard: wires the live connection, the store and the views.
// Performance counters for benchmarks/dashboard_render.py are in window.__floorhand.perf.

import { Api } from "./api.js";
import { LiveConnection } from "./live.js";
import { Store } from "./store.js";
import { ShelfGrid } from "./grid.js";
import { LineChart } from "./charts.js";
import {
  alertNow, AlertFeed, CoverEstimator, renderEvents, renderLowStock, renderOrders, renderPlcs,
} from "./panels.js";
import { cellState } from "./store.js";
import { renderOverview } from "./overview.js";
import { clear, clock, duration, el, fmtNum, STATE_LABEL } from "./util.js";

const TOKEN_KEY = "floorhand.token";
const PLC_POLL_MS = 5000;
const ORDER_POLL_MS = 10000;
const TREND_POLL_MS = 60000;
const TREND_WINDOW_S = 6 * 3600;
const PAGE_POLL_MS = 10000; // a large site's alert and low-stock pages are re-read this often
const ALERT_PAGE = 40;
const LOW_PAGE = 50;
const LOW_STATES = ["out", "critical", "low"];
const SEARCH_LIMIT = 10;

const $ = (id) => document.getElementById(id);

const perf = {
  firstRenderMs: null, firstPaintMs: null, buildMs: null, snapshotShelves: 0, frames: 0, messages: 0, events: 0,
  handleMs: 0, renderMs: 0, renders: 0, maxRenderMs: 0, longTasks: 0, longTaskMs: 0,
  alertReads: 0, // a large site's alert pages read again (every PAGE_POLL_MS)
  // A zone drill-down: from the click (subscribe sent) to its snapshot received, before it is
  // parsed (drillSnapshotMs: the controller and the network), to its grid built (drillMs), to the end
  // of that frame, its style, layout and paint (drillPaintMs, drillPaintCells: cells it drew),
  // and to the end of the frame with the side panels redrawn for the zone (drillSettledMs).
  drillStart: null, drillSnapshotMs: null, drillMs: null, drillPaintMs: null, drillPaintCells: null,
  drillSettledMs: null,
  drillZone: null,
};
// Main-thread tasks over 50 ms (the page would feel stuck): counted for the benchmark.
try {
  new PerformanceObserver((list) => {
    for (const e of list.getEntries()) { perf.longTasks++; perf.longTaskMs += e.duration; }
  }).observe({ type: "longtask", buffered: true });
} catch { /* not supported: stays 0 */ }
const store = new Store();
window.__floorhand = { perf, store };

// -- token ----------------------------------------------------------------------------------------

function readToken() {
  // A token may be handed over in the fragment (never sent to the server): #token=...
  const m = location.hash.match(/(?:^#|&)token=([^&]+)/);
  if (m) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem(TOKEN_KEY);
}
const token = () => sessionStorage.getItem(TOKEN_KEY);

const api = new Api(token, () => signOut("The controller rejected the token (401)."));

// -- views --------------------------------------------------------------------------------------

let grid, alerts, cover, ingestChart, picksChart, trendChart;
let selectedSku = null;
let selectedShelf = null; // id of the shelf whose detail panel is open
let plcTimer = null, orderTimer = null, trendTimer = null, tick = null, ticks = 0;
let lastOrdersAt = 0;
let connState = "connecting", connInfo = {};
let prevStats = null;
let pendingReveal = null; // shelf to select once its zone's snapshot is in (search)
let pageTimer = null;
// loaded: alerts read from the API's pages; shown: cards drawn (a page more per "More alerts",
// whether the next page comes from the API or is already in the page from a zone's snapshot).
const alertPages = { total: null, next: null, loaded: 0, shown: ALERT_PAGE };
const lowPages = new Map(); // state → {items, next, total}

function setup() {
  grid = new ShelfGrid($("grid"), $("legend"), { onSelect: selectShelf });
  alerts = new AlertFeed($("alerts"), $("alert-count"), api, {
    onChanged: (updated) => {
      if (updated && updated.key) {
        if (updated.active) store.alerts.set(updated.key, updated);
        else store.alerts.delete(updated.key);
      }
      store.dirty.alerts = true;
      scheduleRender();
    },
  });
  cover = new CoverEstimator(api, () => { store.dirty.lowStock = true; scheduleRender(); });
  ingestChart = new LineChart($("chart-ingest"), { series: [{ label: "readings/s", color: "#1c6dd0" }], windowS: 600 });
  picksChart = new LineChart($("chart-picks"), {
    series: [{ label: "picks confirmed", color: "#2e9e5b" }, { label: "units off scales", color: "#7d5ba6" }],
    windowS: 600,
  });
  trendChart = new LineChart($("chart-trend"), { series: [{ label: "units", color: "#17202b", step: true }], windowS: TREND_WINDOW_S });
  trendChart.setMessage("select a shelf or a low-stock row");
  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const value = $("token-input").value.trim();
    if (!value) return;
    sessionStorage.setItem(TOKEN_KEY, value);
    $("token-input").value = "";
    start();
  });
  $("logout").addEventListener("click", () => signOut(""));
  $("search-form").addEventListener("submit", (ev) => { ev.preventDefault(); search($("search").value.trim()); });
  $("alerts-more").addEventListener("click", () => loadAlerts(true));
  $("low-more").addEventListener("click", () => loadLow(true));
}

// -- scopes: overview, one zone, search -----------------------------------------------------------

function openZone(zone) {
  perf.drillStart = performance.now();
  perf.drillSnapshotMs = perf.drillMs = perf.drillPaintMs = perf.drillPaintCells = perf.drillSettledMs = null;
  performance.mark("drill:click");
  perf.drillZone = zone;
  live.send({ type: "subscribe", zone });
}

function openOverview() {
  pendingReveal = null;
  live.send({ type: "subscribe", scope: "overview" });
}

/** Shelves and SKUs whose text holds ``q`` (GET /api/v1/shelves and /stock with ``q``). */
async function search(q) {
  const box = $("search-results");
  if (!q) { box.hidden = true; clear(box); return; }
  const enc = encodeURIComponent(q);
  let shelves, skus;
  try {
    [shelves, skus] = await Promise.all([
      api.page(`/api/v1/shelves?q=${enc}&limit=${SEARCH_LIMIT}`),
      api.page(`/api/v1/stock?q=${enc}&limit=${SEARCH_LIMIT}`),
    ]);
  } catch (err) {
    box.hidden = false;
    box.replaceChildren(el("p", { class: "error" }, `Search failed: ${err.message}`));
    return;
  }
  const items = [];
  for (const sh of shelves.items) {
    items.push(el("button", {
      class: "result", type: "button", dataset: { shelf: sh.id, zone: sh.zone },
      onclick: () => openShelf(sh.id, sh.zone),
    }, `Shelf ${sh.id}${sh.location ? ` (${sh.location})` : ""} · zone ${sh.zone} · SKU ${sh.sku} · ${fmtNum(sh.units)} units`));
  }
  for (const k of skus.items) {
    const first = k.shelves[0];
    items.push(el("button", {
      class: "result", type: "button", dataset: { sku: k.sku },
      onclick: () => (first ? openShelf(first.id, first.zone) : selectSku(k.sku)),
    }, `SKU ${k.sku}${k.name ? ` ${k.name}` : ""} · level ${fmtNum(k.level)} · ${STATE_LABEL[k.state] || k.state} · ${k.shelves.map((x) => x.id).join(", ")}`));
  }
  const more = (shelves.total ?? 0) + (skus.total ?? 0) - items.length;
  box.replaceChildren(
    el("p", { class: "muted small" }, `${fmtNum(shelves.total)} shelves and ${fmtNum(skus.total)} SKUs match “${q}”${more > 0 ? ` (first ${SEARCH_LIMIT} of each)` : ""}.`),
    ...items,
    el("button", { class: "btn small", type: "button", onclick: () => { box.hidden = true; } }, "Close"));
  box.hidden = false;
}

/** Select a shelf found by search: at once if it is in the page, else after its zone's
 *  snapshot arrives. */
function openShelf(id, zone) {
  $("search-results").hidden = true;
  if (store.shelves.has(id)) {
    grid.select(id);
    grid.reveal(id);
    return;
  }
  pendingReveal = id;
  openZone(zone);
}

// -- pages of a large site (alerts, low stock) -----------------------------------------------------

async function loadAlerts(more) {
  const limit = more ? ALERT_PAGE : Math.min(5000, Math.max(ALERT_PAGE, alertPages.loaded));
  const cursor = more && alertPages.next ? `&cursor=${encodeURIComponent(alertPages.next)}` : "";
  if (more) alertPages.shown += ALERT_PAGE;
  if (more && !alertPages.next) {
    // Every page read: the next cards are alerts the zone's snapshot brought.
    store.dirty.alerts = true;
    scheduleRender();
    return;
  }
  try {
    const page = await api.page(`/api/v1/alerts?active=true&limit=${limit}${cursor}`);
    if (!more) {
      // The pages read again; the open zone's alerts (its snapshot, kept current by the live
      // alert messages) stay: its shelves' detail and the feed go on showing them.
      const zone = [...store.alerts.values()].filter((a) => inScope(a));
      store.alerts = new Map(zone.map((a) => [a.key, a]));
    }
    for (const a of page.items) store.alerts.set(a.key, a);
    if (!more) perf.alertReads++;
    alertPages.loaded = more ? alertPages.loaded + page.items.length : page.items.length;
    alertPages.total = page.total;
    alertPages.next = page.next;
  } catch (err) {
    $("alerts-more").hidden = true;
    return;
  }
  store.dirty.alerts = true;
  scheduleRender();
}

/** Whether an alert is of a SKU or a shelf in the page (the open zone). */
function inScope(a) {
  return a.key.startsWith("shelf:") ? store.shelves.has(a.key.slice("shelf:".length)) : store.skus.has(a.sku);
}

async function loadLow(more) {
  try {
    if (more) {
      const state = LOW_STATES.find((s) => lowPages.get(s) && lowPages.get(s).next);
      if (!state) return;
      const cur = lowPages.get(state);
      const page = await api.page(`/api/v1/stock?state=${state}&limit=${LOW_PAGE}&cursor=${encodeURIComponent(cur.next)}`);
      cur.items.push(...page.items);
      cur.next = page.next;
      cur.total = page.total;
    } else {
      const pages = await Promise.all(LOW_STATES.map((s) => {
        const had = lowPages.get(s);
        const limit = Math.min(5000, Math.max(LOW_PAGE, had ? had.items.length : 0));
        return api.page(`/api/v1/stock?state=${s}&limit=${limit}`);
      }));
      LOW_STATES.forEach((s, i) => lowPages.set(s, { items: pages[i].items, next: pages[i].next, total: pages[i].total ?? 0 }));
    }
  } catch (err) {
    $("low-note").textContent = `Low stock unavailable: ${err.message}`;
    return;
  }
  store.dirty.lowStock = true;
  scheduleRender();
}

function lowPaged() {
  const rows = [];
  let total = 0, more = false;
  for (const s of LOW_STATES) {
    const p = lowPages.get(s);
    if (!p) continue;
    rows.push(...p.items);
    total += p.total;
    more ||= Boolean(p.next);
  }
  return { rows, total, more };
}

function startPaging() {
  if (pageTimer) return;
  loadAlerts(false);
  loadLow(false);
  pageTimer = setInterval(() => { if (connState === "live") { loadAlerts(false); loadLow(false); } }, PAGE_POLL_MS);
}

/** The query of the live URL: the scope in view (``?zone=Z3`` after a drill-down); before the
 *  first snapshot, ``?zone=`` or ``?scope=`` of the page's own address, if any. */
function liveScope() {
  if (store.site) {
    if (store.scope.kind === "zone") return `?zone=${encodeURIComponent(store.scope.zone)}`;
    return store.scope.kind === store.scope.default ? "" : `?scope=${store.scope.kind}`;
  }
  const q = new URLSearchParams(location.search);
  if (q.get("zone")) return `?zone=${encodeURIComponent(q.get("zone"))}`;
  if (q.get("scope")) return `?scope=${encodeURIComponent(q.get("scope"))}`;
  return "";
}

const live = new LiveConnection({
  token,
  scope: liveScope,
  onMessages(msgs) {
    const t0 = performance.now();
    perf.frames++;
    perf.messages += msgs.length;
    for (const m of msgs) {
      if (m.type === "shelf" || m.type === "alert") perf.events++;
      else if (m.type === "snapshot") {
        perf.snapshotShelves = m.shelves.length;
        if (perf.drillStart !== null && m.scope && m.scope.zone === perf.drillZone) {
          perf.drillSnapshotMs = live.lastFrameAt - perf.drillStart;
        }
      }
      else if (m.type === "stats") onStats(m);
    }
    store.apply(msgs);
    perf.handleMs += performance.now() - t0;
    scheduleRender();
  },
  onState(state, info) {
    connState = state;
    connInfo = info;
    if (state === "unauthorized") { signOut(info.reason && info.reason !== "no token" ? `The controller rejected the token: ${info.reason}.` : ""); return; }
    if (state === "live" && !plcTimer) startPolling();
    renderStatus();
  },
});

function onStats(m) {
  const t = m.t;
  if (prevStats && t > prevStats.t && m.readings >= prevStats.readings) {
    ingestChart.push(0, t, (m.readings - prevStats.readings) / (t - prevStats.t));
  } else if (prevStats) {
    ingestChart.push(0, t, null); // counters restarted (controller restart)
  }
  prevStats = { t, readings: m.readings };
  const pm = store.perMinute(performance.now());
  picksChart.push(0, t, pm.picks);
  picksChart.push(1, t, pm.taken);
}

let renderPending = false;
function scheduleRender() {
  if (renderPending) return;
  renderPending = true;
  requestAnimationFrame(render);
}

/** One frame: apply what the store marked dirty since the last frame. */
function render() {
  renderPending = false;
  const t0 = performance.now();
  const d = store.dirty;
  if (d.structure) {
    $("site-name").textContent = store.site ? `· ${store.site.name || store.site.id}` : "";
    const b0 = performance.now();
    grid.build(store);
    perf.buildMs = performance.now() - b0;
    $("overview").hidden = !store.paged;
    if (store.paged) startPaging();
    if (perf.drillStart !== null && store.scope.kind === "zone" && store.scope.zone === perf.drillZone) {
      const t0 = perf.drillStart;
      perf.drillMs = performance.now() - t0;
      perf.drillStart = null;
      performance.mark("drill:built");
      afterFrame(() => {
        perf.drillPaintMs = performance.now() - t0;
        perf.drillPaintCells = $("grid").querySelectorAll(".cell").length;
        performance.mark("drill:painted");
        // The side panels follow in their own task (below), drawn in the next frame.
        setTimeout(() => requestAnimationFrame(() => afterFrame(() => {
          perf.drillSettledMs = performance.now() - t0;
          performance.mark("drill:settled");
        })), 0);
      });
    }
    if (pendingReveal && store.shelves.has(pendingReveal)) {
      const id = pendingReveal;
      pendingReveal = null;
      grid.select(id);
      grid.reveal(id);
    }
    if (perf.firstRenderMs === null && (store.shelves.size || store.paged)) {
      perf.firstRenderMs = performance.now();
      afterFrame(() => { perf.firstPaintMs = performance.now(); });
    }
  } else if (d.shelves.size || d.skus.size) {
    grid.update(d.shelves, d.skus);
  }
  // A level change moves the alerts of its SKU or shelf too (current level, recovering).
  panels.alerts ||= d.alerts || alertMoved(d);
  const sel = selectedShelf && store.shelves.get(selectedShelf);
  if (selectedShelf && (d.structure || d.alerts || d.shelves.has(selectedShelf) || (sel && d.skus.has(sel.sku)))) {
    renderDetail();
  }
  panels.lowStock ||= d.lowStock || d.structure;
  panels.events ||= d.events;
  const structure = d.structure;
  if (d.orders && performance.now() - lastOrdersAt > 2000) pollOrders();
  if (selectedSku && d.skus.has(selectedSku)) {
    const k = store.skus.get(selectedSku);
    trendChart.push(0, store.lastUpdate || Date.now() / 1000, k.level);
  }
  if (d.structure || d.links) renderStatus();
  if (d.overview && store.paged) {
    renderOverview($("overview"), store, { onZone: openZone, onOverview: openOverview });
    if (!d.structure) grid.refreshCounts();
  }
  store.resetDirty();
  const took = performance.now() - t0;
  perf.renders++;
  perf.renderMs += took;
  if (took > perf.maxRenderMs) perf.maxRenderMs = took;
  if (panels.alerts || panels.lowStock || panels.events) {
    // A new grid (a snapshot: first load, a drill-down) is painted first; the side panels,
    // hundreds of nodes when a zone brings its alerts, are built in the next task and drawn in
    // the next frame, not in this one.
    if (structure) setTimeout(() => renderPanels(true), 0);
    else renderPanels(false);
  }
}

/** ``fn`` once the current frame is drawn: render() runs in an animation frame callback, and a
 *  task queued from there runs after that frame's style, layout and paint. */
function afterFrame(fn) {
  setTimeout(fn, 0);
}

function alertMoved(d) {
  if (!store.alerts.size) return false;
  for (const sku of d.skus) if (store.alerts.has(sku)) return true;
  for (const id of d.shelves) if (store.alerts.has(`shelf:${id}`)) return true;
  return false;
}

// The side panels are lists rebuilt as a whole: at most every PANEL_MS, however fast the
// updates come (the grid, which is touched cell by cell, follows every frame).
const PANEL_MS = 500;
const panels = { alerts: false, lowStock: false, events: false };
let panelsAt = 0;
let panelTimer = null;

function renderPanels(now) {
  const wait = panelsAt + PANEL_MS - performance.now();
  if (!now && wait > 0) {
    if (!panelTimer) panelTimer = setTimeout(() => { panelTimer = null; renderPanels(true); }, wait);
    return;
  }
  const t0 = performance.now();
  panelsAt = t0;
  const paged = store.paged;
  if (panels.alerts) {
    const total = store.stats && typeof store.stats.alerts_active === "number" ? store.stats.alerts_active : alertPages.total;
    const shown = Math.max(alertPages.shown, alertPages.loaded);
    const more = Boolean(alertPages.next) || store.alerts.size > shown;
    alerts.render(store, paged ? { total, more, shown } : null);
    $("alerts-more").hidden = !(paged && more);
  }
  if (panels.lowStock) {
    const low = paged ? lowPaged() : null;
    renderLowStock($("lowstock").tBodies[0], $("low-count"), $("low-note"), store, cover, selectSku, low);
    $("low-more").hidden = !(low && low.more);
  }
  if (panels.events) renderEvents($("events"), store);
  panels.alerts = panels.lowStock = panels.events = false;
  const took = performance.now() - t0;
  perf.renders++;
  perf.renderMs += took;
  if (took > perf.maxRenderMs) perf.maxRenderMs = took;
}

function renderStatus() {
  const body = document.body;
  const pill = $("conn");
  const banner = $("banner");
  const since = store.lastUpdate ? ` Last update ${clock(store.lastUpdate)} (${duration(Date.now() / 1000 - store.lastUpdate)} ago).` : "";
  let state = connState, text, warn = "";
  switch (connState) {
    case "live": text = "Live"; break;
    case "connecting": text = "Connecting…"; warn = store.lastUpdate ? `Connecting to the controller…${since}` : ""; break;
    case "stale": text = "Stale"; warn = `No data from the controller for ${duration((connInfo.silentMs || 0) / 1000)}: the numbers below may be out of date.${since}`; break;
    case "disconnected": {
      const left = connInfo.due ? Math.max(0, (connInfo.due - performance.now()) / 1000) : null;
      text = "Disconnected";
      warn = `Disconnected from the controller${connInfo.reason ? ` (${connInfo.reason})` : ""}; reconnecting${left !== null ? ` in ${Math.ceil(left)} s` : ""}. The data below is stale.${since}`;
      if (connInfo.due) connInfo.tickDue = connInfo.due;
      break;
    }
    case "forbidden": text = "Refused"; warn = `The controller refused this page's origin (${connInfo.reason || "4403"}); add it to [api] allowed_origins.`; state = "disconnected"; break;
    default: text = connState;
  }
  pill.textContent = text;
  pill.dataset.state = state;
  body.dataset.conn = state;
  const mqtt = store.links.mqtt || (store.stats && store.stats.mqtt);
  const broker = $("broker");
  broker.textContent = `Scales: broker ${mqtt || "—"}`;
  broker.dataset.state = mqtt === "up" ? "up" : mqtt ? "down" : "unknown";
  if (!warn && connState === "live" && mqtt && mqtt !== "up") {
    warn = "The controller has lost its link to the MQTT broker: shelf counts are not being updated.";
  }
  if (!warn && connState === "live" && store.stats && store.stats.backpressure) {
    warn = "The controller's outbox is full (history backend down): it has stopped reading from the broker.";
  }
  banner.hidden = !warn;
  banner.textContent = warn;
  $("updated").textContent = store.lastUpdate ? `updated ${clock(store.lastUpdate)}` : "";
  $("who").textContent = store.principal ? `${store.principal.name} (${store.principal.role})` : "";
}

// -- selection and trend ----------------------------------------------------------------------

function selectShelf(sh) {
  if (!sh) return;
  selectedShelf = sh.id;
  renderDetail();
  selectSku(sh.sku);
}

const DETAIL_HINT = "Select a shelf for its details and its SKU's stock trend.";

/** The selected shelf as the store has it now: drawn on selection and again on every frame
 *  that changed the shelf, its SKU or the alerts, until closed or another shelf is selected. */
function renderDetail() {
  const box = $("detail");
  const sh = selectedShelf && store.shelves.get(selectedShelf);
  if (!sh) {
    box.className = "detail muted";
    delete box.dataset.shelf;
    delete box.dataset.state;
    box.replaceChildren(DETAIL_HINT);
    return;
  }
  const k = store.skus.get(sh.sku);
  const state = cellState(sh, k);
  const a = store.alerts.get(`shelf:${sh.id}`) || store.alerts.get(sh.sku);
  let alertText = "no active alert";
  if (a) {
    const now = alertNow(a, store);
    alertText = now.recovering
      ? `alert ${a.key}: recovering (raised ${STATE_LABEL[now.severity]}, now ${STATE_LABEL[now.state]})`
      : `alert ${a.key}: ${STATE_LABEL[now.severity] || now.severity}${a.since ? ` since ${clock(a.since)}` : ""}${a.acked_by ? `, acked by ${a.acked_by}` : ""}`;
  }
  box.className = "detail";
  box.dataset.shelf = sh.id;
  box.dataset.state = state;
  box.replaceChildren(
    el("span", { class: `badge s-${state}`, "data-field": "state" }, STATE_LABEL[state]), " ",
    el("strong", {}, sh.id), `${sh.location ? ` (${sh.location})` : ""} · zone ${sh.zone} · SKU ${sh.sku}${k && k.name ? ` ${k.name}` : ""} · `,
    el("span", { "data-field": "units" }, `${fmtNum(sh.units)}/${sh.capacity_units} units`), " · ",
    el("span", { "data-field": "weight" }, `${fmtNum(sh.weight_g)} g`),
    ` · shelf ${sh.status} · SKU level ${fmtNum(k && k.level)}, reorder at ${k ? k.reorder_point : "—"} · `,
    el("span", { "data-field": "alert" }, alertText),
    ` · last reading ${clock(sh.last_reading_ts)} `,
    el("button", {
      class: "btn small", type: "button", "data-action": "close-detail", "aria-label": "Close the shelf details",
      onclick: closeDetail,
    }, "Close"),
  );
}

function closeDetail() {
  selectedShelf = null;
  grid.select(null);
  renderDetail();
}

function selectSku(sku) {
  selectedSku = sku;
  $("trend-sku").textContent = sku;
  const k = store.skus.get(sku);
  trendChart.setMarks(k ? [
    { value: k.reorder_point, label: "reorder point", color: "#e0a800" },
    { value: k.safety_stock, label: "safety stock", color: "#e8590c" },
  ] : []);
  trendChart.set(0, []);
  loadTrend();
  clearInterval(trendTimer);
  trendTimer = setInterval(loadTrend, TREND_POLL_MS);
}

async function loadTrend() {
  const sku = selectedSku;
  if (!sku || connState === "disconnected") return;
  const to = Date.now() / 1000;
  try {
    const h = await api.get(`/api/v1/history?sku=${encodeURIComponent(sku)}&from=${Math.floor(to - TREND_WINDOW_S)}&to=${Math.ceil(to)}`);
    if (sku !== selectedSku) return;
    trendChart.set(0, sumSeries(h.series));
    trendChart.setMessage("");
    $("trend-note").textContent = `last ${duration(TREND_WINDOW_S)}, ${h.backend} history, buckets of ${duration(h.every_s)}; live values appended`;
  } catch (err) {
    if (sku !== selectedSku) return;
    trendChart.setMessage(err.status === 404 ? "no history on this controller: live values only" : "history unavailable: live values only");
    $("trend-note").textContent = err.message;
  }
}

/** Units of a SKU per bucket: the sum over its shelves, each carried forward. */
function sumSeries(series) {
  const times = new Set();
  for (const s of series) for (const b of s.buckets) times.add(b.t);
  const ts = [...times].sort((a, b) => a - b);
  const last = series.map(() => null);
  const idx = series.map(() => 0);
  const out = [];
  for (const t of ts) {
    let sum = 0, known = true;
    series.forEach((s, i) => {
      while (idx[i] < s.buckets.length && s.buckets[idx[i]].t <= t) {
        if (s.buckets[idx[i]].units !== null) last[i] = s.buckets[idx[i]].units;
        idx[i]++;
      }
      if (last[i] === null) known = false; else sum += last[i];
    });
    out.push([t, known ? sum : null]);
  }
  return out;
}

// -- polling (things the live stream does not carry in full) ---------------------------------

async function pollPlcs() {
  if (connState === "disconnected") return;
  try {
    const plcs = await api.get("/api/v1/plcs");
    renderPlcs($("plcs").tBodies[0], $("plc-note"), plcs, null);
  } catch (err) {
    renderPlcs($("plcs").tBodies[0], $("plc-note"), [], err.status === 403 ? "This token may not read device status (needs supervisor or engineer)." : err.message);
  }
}

async function pollOrders() {
  lastOrdersAt = performance.now();
  if (connState === "disconnected") return;
  try {
    const orders = await api.get("/api/v1/orders?limit=30");
    renderOrders($("orders").tBodies[0], $("orders-note"), orders, null);
  } catch (err) {
    renderOrders($("orders").tBodies[0], $("orders-note"), [], err.status === 404 ? "Order tracking is not available on this controller." : err.message);
  }
}

function startPolling() {
  pollPlcs();
  pollOrders();
  plcTimer = setInterval(pollPlcs, PLC_POLL_MS);
  orderTimer = setInterval(pollOrders, ORDER_POLL_MS);
}

function stopPolling() {
  clearInterval(plcTimer); clearInterval(orderTimer); clearInterval(trendTimer); clearInterval(pageTimer);
  plcTimer = orderTimer = trendTimer = pageTimer = null;
}

// -- lifecycle --------------------------------------------------------------------------------

function start() {
  $("login").hidden = true;
  $("main").hidden = false;
  $("logout").hidden = false;
  live.start();
  if (!tick) {
    tick = setInterval(() => {
      if (connState !== "live") renderStatus();
      else $("updated").textContent = store.lastUpdate ? `updated ${clock(store.lastUpdate)}` : "";
      // Alert ages ("since … (4 min)") move slowly: refresh the cards every 15 s.
      if (++ticks % 15 === 0 && store.alerts.size && !document.querySelector(".alerts form")) {
        store.dirty.alerts = true;
        scheduleRender();
      }
    }, 1000);
  }
}

function signOut(message) {
  live.stop();
  stopPolling();
  sessionStorage.removeItem(TOKEN_KEY);
  $("main").hidden = true;
  $("login").hidden = false;
  $("logout").hidden = true;
  $("banner").hidden = true;
  $("conn").textContent = "Signed out";
  $("conn").dataset.state = "unauthorized";
  $("login-error").textContent = message || "";
  $("token-input").focus();
}

setup();
if (readToken()) start();
else signOut("");
