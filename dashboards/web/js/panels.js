// Side panels: alert feed (ack / snooze), recent events, low-stock table with days of cover,
// conveyors and sorters, order tracker.

import { el, clear, clock, duration, fmtNum, STATE_LABEL, SEVERITY_RANK } from "./util.js";

const MAX_CARDS = 40; // alert cards shown, worst first

// -- alerts ------------------------------------------------------------------------------------

/** An alert's level and state now, and whether it is recovering. A SKU alert follows its SKU
 *  in the store (`shelf` messages carry the SKU's level and state after each change); a shelf
 *  alert its settled shelf count. Recovering: the level is already better than the episode's
 *  severity and the controller waits for it to hold for the dwell before it de-escalates or
 *  resolves (the API's `state` is then better than its `severity`). */
export function alertNow(a, store) {
  let level = a.level, state = a.state;
  const k = a.key === a.sku ? store.skus.get(a.sku) : null;
  if (k) { level = k.level; state = k.state; }
  else if (a.key.startsWith("shelf:")) {
    const sh = store.shelves.get(a.key.slice("shelf:".length));
    if (sh && sh.status === "ok" && typeof sh.units === "number") { level = sh.units; state = classify(level, a); }
  }
  const severity = a.severity || state;
  const rank = SEVERITY_RANK[state] ?? -1;
  const recovering = rank >= 0 && rank < (SEVERITY_RANK[severity] ?? -1);
  return { level, state, severity, recovering, rank: recovering ? rank : (SEVERITY_RANK[severity] ?? -1) };
}

/** As the controller classifies a level against a policy (without hysteresis). */
function classify(level, p) {
  if (level <= 0) return "out";
  if (level <= p.safety_stock) return "critical";
  if (level <= p.reorder_point) return "low";
  return "ok";
}

export class AlertFeed {
  constructor(root, countEl, api, { onChanged }) {
    this.root = root;
    this.countEl = countEl;
    this.api = api;
    this.onChanged = onChanged;
    this.open = new Set();       // keys whose snooze form is open
    this.errors = new Map();     // key → message of the last failed action
    this.busy = new Set();
  }

  /** ``paged`` (a large site): the alerts in the page (the API's pages loaded so far and the
   *  open zone's, from its snapshot), the worst ``paged.shown`` drawn; ``paged.total`` active
   *  in all, ``paged.more`` whether "More alerts" has more to show. */
  render(store, paged = null) {
    // Worst first by the situation now: a recovering alert ranks by its current level.
    const now_ = new Map([...store.alerts.values()].map((a) => [a.key, alertNow(a, store)]));
    const alerts = [...store.alerts.values()].sort((a, b) =>
      now_.get(b.key).rank - now_.get(a.key).rank || (b.since ?? 0) - (a.since ?? 0));
    const maxCards = paged ? Math.max(MAX_CARDS, paged.shown || 0) : MAX_CARDS;
    this.countEl.textContent = String(paged && paged.total !== null ? Math.max(paged.total, alerts.length) : alerts.length);
    // Keep a snooze form the user is typing in: rebuild the others only.
    const keep = new Map();
    for (const node of this.root.children) {
      if (this.open.has(node.dataset.key) && node.contains(document.activeElement)) keep.set(node.dataset.key, node);
    }
    clear(this.root);
    const now = Date.now() / 1000;
    for (const a of alerts.slice(0, maxCards)) {
      if (keep.has(a.key)) { this.root.append(keep.get(a.key)); continue; }
      this.root.append(this.card(a, store, now, now_.get(a.key)));
    }
    if (paged && paged.more) {
      const drawn = Math.min(alerts.length, maxCards);
      this.root.append(el("p", { class: "muted small" }, `${drawn} of ${paged.total} shown, worst first among the ${alerts.length} loaded: "More alerts" shows the next page.`));
    } else if (alerts.length > maxCards) {
      this.root.append(el("p", { class: "muted small" }, `${alerts.length - MAX_CARDS} more (less severe or older): see the low-stock table.`));
    }
  }

  card(a, store, now, cur) {
    const sku = store.skus.get(a.sku);
    const sev = cur.severity;
    // Re-computed from the current level (the alert's own figure is from its last transition).
    let order = cur.recovering ? null : a.suggested_order_qty;
    // Suppliers sell in packs: an order is the shortfall rounded up to whole packs.
    const pack = sku && Number.isInteger(sku.pack_multiple) && sku.pack_multiple > 1 ? sku.pack_multiple : 1;
    if (!cur.recovering && a.key === a.sku && sku && typeof sku.max_stock === "number" && typeof cur.level === "number") {
      order = Math.ceil(Math.max(sku.max_stock - cur.level, 0) / pack) * pack;
    }
    const packs = order && pack > 1 && order % pack === 0 ? ` (${order / pack} × ${pack})` : "";
    const flags = [];
    if (a.acked_by) flags.push(`acked by ${a.acked_by}${a.ack_note ? ` — ${a.ack_note}` : ""}`);
    if (a.snoozed_until && a.snoozed_until > now) flags.push(`snoozed by ${a.snoozed_by} for ${duration(a.snoozed_until - now)}${a.snooze_reason ? ` — ${a.snooze_reason}` : ""}`);
    const badge = cur.recovering
      ? el("span", {
        class: "badge recovering",
        title: `Raised ${STATE_LABEL[sev]}; the level is ${STATE_LABEL[cur.state]} now and must hold for the dwell before the alert ${cur.state === "ok" ? "resolves" : "de-escalates"}.`,
      }, "RECOVERING")
      : el("span", { class: `badge s-${sev}` }, STATE_LABEL[sev] || sev);
    const node = el("article", { class: `alert sev-${sev}${cur.recovering ? " recovering" : ""}`, dataset: { key: a.key }, "aria-label": `Alert ${a.key}` },
      el("div", { class: "row" },
        badge,
        el("span", { class: "title" }, a.key.startsWith("shelf:") ? a.key : `${a.sku}${sku && sku.name ? ` · ${sku.name}` : ""}`)),
      el("div", { class: "meta" },
        `level ${fmtNum(cur.level)}`,
        cur.recovering ? ` (${STATE_LABEL[cur.state]}, raised ${STATE_LABEL[sev]})` : "",
        ` · reorder at ${a.reorder_point} · safety ${a.safety_stock}`,
        order ? ` · order ${order}${packs}` : "",
        a.since ? ` · since ${clock(a.since)} (${duration(now - a.since)})` : ""),
      flags.length ? el("div", { class: "meta" }, flags.join(" · ")) : null,
    );
    const actions = el("div", { class: "row" });
    if (!a.acked_by) {
      actions.append(el("button", {
        class: "btn small", type: "button", "data-action": "ack", disabled: this.busy.has(a.key),
        onclick: () => this.ack(a.key),
      }, "Acknowledge"));
    }
    actions.append(el("button", {
      class: "btn small", type: "button", "data-action": "snooze",
      onclick: () => { this.open.has(a.key) ? this.open.delete(a.key) : this.open.add(a.key); this.onChanged(); },
    }, this.open.has(a.key) ? "Cancel" : "Snooze…"));
    node.append(actions);
    if (this.open.has(a.key)) node.append(this.snoozeForm(a.key));
    const err = this.errors.get(a.key);
    if (err) node.append(el("div", { class: "msg error", role: "alert" }, err));
    return node;
  }

  snoozeForm(key) {
    const minutes = el("select", { name: "minutes", "aria-label": "Snooze for" },
      el("option", { value: "15" }, "15 min"), el("option", { value: "60", selected: true }, "1 h"),
      el("option", { value: "240" }, "4 h"), el("option", { value: "1440" }, "24 h"));
    const reason = el("input", { name: "reason", required: true, maxlength: "500", placeholder: "reason (required)", "aria-label": "Snooze reason" });
    return el("form", {
      onsubmit: (ev) => { ev.preventDefault(); this.snooze(key, Number(minutes.value), reason.value.trim()); },
    }, minutes, reason, el("button", { class: "btn small primary", type: "submit" }, "Snooze"));
  }

  async ack(key) {
    await this.act(key, `/api/v1/alerts/${encodeURIComponent(key)}/ack`, { note: "" });
  }

  async snooze(key, minutes, reason) {
    if (!reason) { this.errors.set(key, "a reason is required"); this.onChanged(); return; }
    const ok = await this.act(key, `/api/v1/alerts/${encodeURIComponent(key)}/snooze`, { minutes, reason });
    if (ok) this.open.delete(key);
  }

  async act(key, path, body) {
    this.busy.add(key);
    this.errors.delete(key);
    this.onChanged();
    try {
      const updated = await this.api.post(path, body);
      this.onChanged(updated);
      return true;
    } catch (err) {
      const msg = err.status === 404 && !err.detail ? "this controller has no such action (404)" : err.message;
      this.errors.set(key, msg);
      return false;
    } finally {
      this.busy.delete(key);
      this.onChanged();
    }
  }
}

export function renderEvents(root, store) {
  clear(root);
  for (const e of store.events.slice(0, 30)) {
    root.append(el("li", {}, el("time", {}, clock(e.ts)), e.text));
  }
}

// -- low stock ---------------------------------------------------------------------------------

const COVER_TTL_MS = 10 * 60 * 1000;
const COVER_GAP_MS = 1500;  // between history requests (the API rate-limits per token)
const COVER_ROWS = 15;      // days of cover is looked up for the worst rows only

/** Days of cover = level ÷ units taken per day, from the last 24 h of history (15 min buckets):
 *  the sum of the decreases of each shelf's unit count, over the span the history covers. */
export class CoverEstimator {
  constructor(api, onUpdate) {
    this.api = api;
    this.onUpdate = onUpdate;
    this.cache = new Map(); // sku → {at, perDay, note}
    this.queue = [];
    this.running = false;
    this.disabled = null;   // reason when the controller has no history
  }

  get(sku) { return this.cache.get(sku); }

  want(skus) {
    if (this.disabled) return;
    const now = performance.now();
    for (const s of skus) {
      const c = this.cache.get(s);
      if ((!c || now - c.at > COVER_TTL_MS) && !this.queue.includes(s)) this.queue.push(s);
    }
    if (!this.running) this.run();
  }

  async run() {
    this.running = true;
    while (this.queue.length && !this.disabled) {
      const sku = this.queue.shift();
      const to = Date.now() / 1000;
      try {
        const h = await this.api.get(`/api/v1/history?sku=${encodeURIComponent(sku)}&from=${Math.floor(to - 86400)}&to=${Math.ceil(to)}&every=900`);
        this.cache.set(sku, { at: performance.now(), ...consumption(h) });
      } catch (err) {
        if (err.status === 404 && /history is disabled/.test(err.detail || "")) this.disabled = "history is disabled on this controller";
        else if (err.status === 403) this.disabled = "this token may not read history (needs supervisor or engineer)";
        this.cache.set(sku, { at: performance.now(), perDay: null, note: err.message });
      }
      this.onUpdate();
      await new Promise((r) => setTimeout(r, COVER_GAP_MS));
    }
    this.running = false;
  }
}

export function consumption(history) {
  let taken = 0, first = Infinity, last = -Infinity;
  for (const s of history.series || []) {
    let prev = null;
    for (const b of s.buckets) {
      if (b.units === null) continue;
      if (b.t < first) first = b.t;
      if (b.t > last) last = b.t;
      if (prev !== null && b.units < prev) taken += prev - b.units;
      prev = b.units;
    }
  }
  const spanS = last - first;
  if (!(spanS >= 3600)) return { perDay: null, note: "less than 1 h of history" };
  return { perDay: taken / (spanS / 86400), note: `${taken} units taken in ${duration(spanS)}` };
}

/** ``paged`` (a large site): ``{rows, total, more}`` from the API's pages (out, critical, low),
 *  their level and state taken from the stream when the SKU is in the page. */
export function renderLowStock(tbody, countEl, noteEl, store, cover, onSelectSku, paged = null) {
  const rows = paged ? paged.rows.map((k) => store.skus.get(k.sku) || k) : store.lowSkus();
  const shown = paged ? rows.length : 200;
  countEl.textContent = String(paged ? paged.total : rows.length);
  cover.want(rows.slice(0, COVER_ROWS).map((k) => k.sku));
  clear(tbody);
  for (const k of rows.slice(0, shown)) {
    const c = cover.get(k.sku);
    let coverText = "…";
    let title = "looking up the last 24 h of history";
    if (cover.disabled) { coverText = "—"; title = cover.disabled; }
    else if (c) {
      title = c.note || "";
      if (c.perDay === null) coverText = "—";
      else if (c.perDay === 0) coverText = "no use";
      else coverText = `${((k.level ?? 0) / c.perDay).toFixed(1)} d`;
    } else if (!rows.slice(0, COVER_ROWS).includes(k)) { coverText = "—"; title = `only the ${COVER_ROWS} worst SKUs are looked up`; }
    tbody.append(el("tr", { class: "clickable", dataset: { sku: k.sku }, onclick: () => onSelectSku(k.sku) },
      el("td", { title: k.name || "" }, k.sku),
      el("td", { class: "num" }, fmtNum(k.level)),
      el("td", { class: "num" }, String(k.reorder_point)),
      el("td", {}, el("span", { class: `badge s-${k.state}` }, STATE_LABEL[k.state])),
      el("td", { class: "num", title }, coverText)));
  }
  const hidden = paged ? paged.total - rows.length : rows.length - shown;
  noteEl.textContent = hidden > 0 ? `${hidden} more not shown${paged ? " (More loads the next page)" : ""}.` : (cover.disabled ? `Days of cover unavailable: ${cover.disabled}.` : "");
}

// -- conveyors, sorters, orders ---------------------------------------------------------------

export function renderPlcs(tbody, noteEl, plcs, err) {
  clear(tbody);
  if (err) { noteEl.textContent = err; return; }
  noteEl.textContent = plcs.length ? "" : "No conveyors or sorters configured.";
  for (const p of plcs) {
    tbody.append(el("tr", { dataset: { plc: p.id } },
      el("td", { title: p.endpoint }, p.id),
      el("td", {}, p.kind),
      el("td", {}, el("span", { class: `badge ${p.link}` }, p.link)),
      el("td", {}, p.health),
      el("td", { title: p.last_down_reason || "" }, p.fault || "")));
  }
}

export function renderOrders(tbody, noteEl, orders, err) {
  clear(tbody);
  if (err) { noteEl.textContent = err; return; }
  noteEl.textContent = orders.length ? "" : "No orders yet.";
  for (const o of orders.slice(0, 30)) {
    tbody.append(el("tr", { dataset: { order: o.order_id }, title: o.reason || "" },
      el("td", {}, o.external_id || o.order_id),
      el("td", {}, el("span", { class: `badge ${o.state === "EXCEPTION" ? "down" : o.state === "SHIPPED" ? "up" : ""}` }, o.state)),
      el("td", { class: "num" }, String((o.lines || []).length)),
      el("td", {}, o.pack_station || ""),
      el("td", {}, clock(o.updated_ts))));
  }
}
