// The zone/shelf grid: one element per shelf, built once per snapshot; updates touch only the
// cells whose shelf (or whose SKU) changed, and only their class and text.

import { el, clear, STATES, STATE_LABEL, fmtNum, clock } from "./util.js";
import { cellState } from "./store.js";

const COMPACT_OVER = 400; // shelves: above this the cells carry no number (tooltip only)

export class ShelfGrid {
  constructor(root, legend, { onSelect }) {
    this.root = root;
    this.legend = legend;
    this.onSelect = onSelect;
    this.cells = new Map();     // shelf id → element
    this.cellState = new Map(); // shelf id → "ok" | … (as rendered)
    this.bySku = new Map();     // sku → [shelf ids]
    this.zoneHeads = new Map(); // zone id → small element with its counts
    this.selected = null;
    this.store = null;
    root.addEventListener("click", (ev) => {
      const cell = ev.target.closest(".cell");
      if (cell) this.select(cell.dataset.id);
    });
    root.addEventListener("keydown", (ev) => {
      const cell = ev.target.closest(".cell");
      if (cell && (ev.key === "Enter" || ev.key === " ")) { ev.preventDefault(); this.select(cell.dataset.id); }
    });
    // Tooltips are built on demand: keeping 2,000 titles current would cost on every update.
    root.addEventListener("mouseover", (ev) => {
      const cell = ev.target.closest(".cell");
      if (cell && this.store) cell.title = this.describe(cell.dataset.id);
    });
  }

  /** Build every zone and cell from the store (after a snapshot). */
  build(store) {
    this.store = store;
    clear(this.root);
    this.cells.clear();
    this.cellState.clear();
    this.bySku.clear();
    this.zoneHeads.clear();
    const compact = store.shelves.size > COMPACT_OVER;
    this.root.classList.toggle("compact", compact);
    const byZone = new Map(store.zones.map((z) => [z.id, []]));
    for (const sh of store.shelves.values()) {
      if (!byZone.has(sh.zone)) byZone.set(sh.zone, []);
      byZone.get(sh.zone).push(sh);
      if (!this.bySku.has(sh.sku)) this.bySku.set(sh.sku, []);
      this.bySku.get(sh.sku).push(sh.id);
    }
    const frag = document.createDocumentFragment();
    const zoneNames = new Map(store.zones.map((z) => [z.id, z.name]));
    for (const [zone, shelves] of byZone) {
      const counts = el("small");
      this.zoneHeads.set(zone, counts);
      const cells = el("div", { class: "cells", role: "list" });
      for (const sh of shelves) {
        const state = cellState(sh, store.skus.get(sh.sku));
        const cell = el("div", {
          class: `cell s-${state}${moving(sh) ? " moving" : ""}${sh.id === this.selected ? " selected" : ""}`,
          role: "listitem", tabindex: "0", dataset: { id: sh.id, state },
          "aria-label": `${sh.id} ${STATE_LABEL[state]}`,
        }, compact ? "" : label(sh));
        this.cells.set(sh.id, cell);
        this.cellState.set(sh.id, state);
        cells.append(cell);
      }
      const name = zoneNames.get(zone);
      frag.append(el("section", { class: "zone", dataset: { zone } },
        el("h3", {}, `Zone ${zone}${name ? ` · ${name}` : ""} `, counts), cells));
    }
    this.root.append(frag);
    this.compact = compact;
    this.refreshCounts();
  }

  /** Re-colour the cells of changed shelves and of every shelf of changed SKUs. */
  update(shelfIds, skuIds) {
    const store = this.store;
    if (!store) return 0;
    const ids = new Set(shelfIds);
    for (const sku of skuIds) for (const id of this.bySku.get(sku) || []) ids.add(id);
    let changed = 0;
    for (const id of ids) {
      const cell = this.cells.get(id);
      const sh = store.shelves.get(id);
      if (!cell || !sh) continue;
      const state = cellState(sh, store.skus.get(sh.sku));
      const cls = `cell s-${state}${moving(sh) ? " moving" : ""}${id === this.selected ? " selected" : ""}`;
      if (cell.className !== cls) {
        cell.className = cls;
        cell.dataset.state = state;
        cell.setAttribute("aria-label", `${id} ${STATE_LABEL[state]}`);
        changed++;
      }
      if (this.cellState.get(id) !== state) this.cellState.set(id, state);
      if (!this.compact) {
        const text = label(sh);
        if (cell.textContent !== text) cell.textContent = text;
      }
    }
    if (changed) this.refreshCounts();
    return ids.size;
  }

  refreshCounts() {
    const total = Object.fromEntries(STATES.map((s) => [s, 0]));
    const perZone = new Map();
    for (const [id, state] of this.cellState) {
      total[state]++;
      const zone = this.store.shelves.get(id).zone;
      if (!perZone.has(zone)) perZone.set(zone, { n: 0, bad: 0 });
      const z = perZone.get(zone);
      z.n++;
      if (state !== "ok") z.bad++;
    }
    for (const [zone, node] of this.zoneHeads) {
      const z = perZone.get(zone) || { n: 0, bad: 0 };
      node.textContent = `${z.n} shelves${z.bad ? `, ${z.bad} need attention` : ""}`;
    }
    clear(this.legend);
    for (const s of STATES) {
      this.legend.append(el("span", { dataset: { state: s } }, el("i", { class: `s-${s}` }), `${STATE_LABEL[s]} ${total[s]}`));
    }
    this.totals = total;
  }

  select(id) {
    const prev = this.selected;
    this.selected = id;
    for (const x of [prev, id]) {
      const cell = x && this.cells.get(x);
      if (cell) cell.classList.toggle("selected", x === id);
    }
    if (id && this.store) this.onSelect(this.store.shelves.get(id));
  }

  describe(id) {
    const sh = this.store.shelves.get(id);
    if (!sh) return id;
    const sku = this.store.skus.get(sh.sku);
    const state = cellState(sh, sku);
    return [
      `${sh.id}${sh.location ? ` (${sh.location})` : ""} · zone ${sh.zone}`,
      `${STATE_LABEL[state]} · shelf ${sh.status}, ${fmtNum(sh.units)} of ${sh.capacity_units} units`,
      `SKU ${sh.sku}: level ${fmtNum(sku && sku.level)}, reorder at ${sku ? sku.reorder_point : "—"}`,
      `last reading ${clock(sh.last_reading_ts)}`,
    ].join("\n");
  }
}

function moving(sh) {
  return sh.status === "settling" || sh.status === "ambiguous";
}

function label(sh) {
  return sh.units === null || sh.units === undefined ? "?" : String(sh.units);
}
