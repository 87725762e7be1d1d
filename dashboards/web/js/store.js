// The page's picture of the site, built from the live snapshot and kept current by deltas.
// Applying messages only records what changed (dirty sets); the views render once per frame.

import { SEVERITY_RANK } from "./util.js";

/** The colour of a shelf: its own staleness/unknown count first, empty is OUT, else the state
 *  of its SKU (the sum of the SKU's shelves against its reorder point and safety stock). */
export function cellState(shelf, sku) {
  if (shelf.status === "stale") return "stale";
  if (shelf.units === null || shelf.units === undefined || shelf.status === "unknown") return "unknown";
  if (shelf.units <= 0) return "out";
  return (sku && sku.state) || "unknown";
}

export class Store {
  constructor() {
    this.site = null;
    this.zones = [];
    this.shelves = new Map();
    this.skus = new Map();
    this.alerts = new Map();   // active episodes by key
    this.links = {};
    this.plcs = [];
    this.stats = null;
    this.statsAt = 0;
    this.lastUpdate = null;    // Unix s of the newest message
    this.principal = null;
    this.dropped = { count: 0, total: 0 };
    this.pickTimes = [];       // ms timestamps of confirmed picks (last 10 min)
    this.takenTimes = [];      // [ms, units] decreases seen on the scales (last 10 min)
    this.events = [];          // recent notable events for the feed (newest first, ≤ 50)
    this.scope = { kind: "site", zone: null }; // what the live stream covers (hello/snapshot)
    this.overview = [];        // [{zone, shelves, states: {ok: n, …}}]: the whole site's counts
    this.resetDirty();
  }

  resetDirty() {
    this.dirty = {
      structure: false, shelves: new Set(), skus: new Set(), alerts: false,
      links: false, lowStock: false, events: false, orders: false, overview: false,
    };
  }

  /** Apply one frame's messages; returns nothing, marks dirty. */
  apply(msgs) {
    for (const m of msgs) {
      if (typeof m.t === "number") this.lastUpdate = m.t;
      switch (m.type) {
        case "hello": this.principal = m.principal; break;
        case "snapshot": this.applySnapshot(m); break;
        case "shelf": this.applyShelf(m.shelf, m.t); break;
        case "alert": this.applyAlert(m); break;
        case "link": this.applyLink(m.event); break;
        case "device": this.pushEvent(m.t, describeDevice(m.event)); break;
        case "pick": this.applyPick(m.event, m.t); break;
        case "order": this.dirty.orders = true; this.pushEvent(m.t, describeOrder(m.event)); break;
        case "stats": this.stats = m; this.statsAt = performance.now(); break;
        case "overview": this.overview = m.zones; this.dirty.overview = true; break;
        case "dropped":
          this.dropped = { count: m.count, total: m.total };
          this.pushEvent(m.t, `${m.count} live update(s) dropped (this page was too slow); resyncing`);
          break;
        default: break;
      }
    }
  }

  /** Only part of the site is in the page (a zone or the overview): the alerts and the
   *  low-stock list come a page at a time from the API. */
  get paged() { return this.scope.kind !== "site"; }

  applySnapshot(s) {
    this.site = s.site;
    this.zones = s.zones;
    this.scope = s.scope || { kind: "site", zone: null };
    this.overview = s.overview || [];
    this.shelves = new Map(s.shelves.map((sh) => [sh.id, sh]));
    this.skus = new Map(s.skus.map((k) => [k.sku, k]));
    if (this.paged) for (const a of s.alerts) this.alerts.set(a.key, a); // with the API's pages
    else this.alerts = new Map(s.alerts.map((a) => [a.key, a]));
    this.dirty.overview = true;
    this.links = s.links;
    this.plcs = s.plcs;
    if (s.stats) { this.stats = s.stats; this.statsAt = performance.now(); }
    this.dirty.structure = true;
    this.dirty.alerts = true;
    this.dirty.links = true;
    this.dirty.lowStock = true;
  }

  applyShelf(d, t) {
    const sh = this.shelves.get(d.id);
    if (!sh) return;
    if (typeof sh.units === "number" && typeof d.units === "number" && d.units < sh.units) {
      this.takenTimes.push([performance.now(), sh.units - d.units]);
      if (this.takenTimes.length > 20000) this.takenTimes.splice(0, 10000);
    }
    sh.status = d.status;
    sh.units = d.units;
    sh.weight_g = d.weight_g;
    sh.last_reading_ts = d.last_reading_ts;
    this.dirty.shelves.add(d.id);
    const k = d.sku && this.skus.get(d.sku.sku);
    if (k && (k.level !== d.sku.level || k.state !== d.sku.state)) {
      k.level = d.sku.level;
      k.state = d.sku.state;
      this.dirty.skus.add(k.sku);
      this.dirty.lowStock = true;
    }
  }

  applyAlert(m) {
    const ev = m.event || {};
    const a = m.alert;
    if (a) {
      if (a.active) this.alerts.set(a.key, a);
      else this.alerts.delete(a.key);
      this.dirty.alerts = true;
    }
    this.pushEvent(m.t, describeAlert(ev, a));
  }

  applyLink(ev) {
    if (!ev || !ev.link) return;
    this.links[ev.link] = ev.new;
    this.dirty.links = true;
    this.pushEvent(ev.ts, `${ev.link === "mqtt" ? "broker link" : ev.link} ${ev.old} → ${ev.new}`);
  }

  applyPick(ev, t) {
    if (ev && ev.kind === "pick_task" && ev.state === "CONFIRMED") {
      this.pickTimes.push(performance.now());
      if (this.pickTimes.length > 20000) this.pickTimes.splice(0, 10000);
    }
    this.dirty.orders = true;
  }

  pushEvent(ts, text) {
    if (!text) return;
    // A message replayed after a shared snapshot may arrive twice: one line in the feed.
    for (let i = 0; i < this.events.length && i < 10; i++) {
      if (this.events[i].ts === ts && this.events[i].text === text) return;
    }
    this.events.unshift({ ts, text });
    if (this.events.length > 50) this.events.length = 50;
    this.dirty.events = true;
  }

  /** Picks confirmed and units taken off the scales in the last 60 s. */
  perMinute(nowMs) {
    const from = nowMs - 60000;
    while (this.pickTimes.length && this.pickTimes[0] < nowMs - 600000) this.pickTimes.shift();
    while (this.takenTimes.length && this.takenTimes[0][0] < nowMs - 600000) this.takenTimes.shift();
    let picks = 0;
    for (let i = this.pickTimes.length - 1; i >= 0 && this.pickTimes[i] >= from; i--) picks++;
    let taken = 0;
    for (let i = this.takenTimes.length - 1; i >= 0 && this.takenTimes[i][0] >= from; i--) taken += this.takenTimes[i][1];
    return { picks, taken };
  }

  /** SKUs at or below their reorder point (or out), worst first. */
  lowSkus() {
    const out = [];
    for (const k of this.skus.values()) {
      if (k.state === "low" || k.state === "critical" || k.state === "out") out.push(k);
    }
    out.sort((a, b) => (SEVERITY_RANK[b.state] - SEVERITY_RANK[a.state])
      || ((a.level ?? 0) / Math.max(1, a.reorder_point)) - ((b.level ?? 0) / Math.max(1, b.reorder_point))
      || a.sku.localeCompare(b.sku));
    return out;
  }
}

function describeAlert(ev, a) {
  const key = ev.key || (a && a.key) || "?";
  switch (ev.kind) {
    case "alert_raised": return `${key}: ${String(ev.severity).toUpperCase()} (level ${ev.level})`;
    case "alert_escalated": return `${key}: worse, ${ev.old_severity} → ${ev.new_severity} (level ${ev.level})`;
    case "alert_deescalated": return `${key}: better, ${ev.old_severity} → ${ev.new_severity} (level ${ev.level})`;
    case "alert_resolved": return `${key}: resolved (level ${ev.level})`;
    case "alert_ack": return `${key}: acknowledged by ${ev.by ?? "?"}`;
    case "alert_snooze": return `${key}: snoozed by ${ev.by ?? "?"}${ev.reason ? ` (${ev.reason})` : ""}`;
    case "alert_snooze_ended": return `${key}: snooze ended`;
    default: return `${key}: ${ev.kind}`;
  }
}

function describeDevice(ev) {
  if (!ev) return null;
  if (ev.kind === "device_status") return `scale ${ev.device} ${ev.online ? "online" : "offline"}`;
  if (ev.kind === "seq_gap") return `scale ${ev.device}: ${ev.missing} reading(s) missing`;
  return `${ev.kind}`;
}

function describeOrder(ev) {
  if (!ev) return null;
  if (ev.kind === "order_state") return `order ${ev.order_id}: ${ev.old ?? "—"} → ${ev.new}${ev.reason ? ` (${ev.reason})` : ""}`;
  return null;
}
