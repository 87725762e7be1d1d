// The zone/shelf grid: one element per shelf, built once per snapshot; updates touch only the
// cells whose shelf (or whose SKU) changed, and only their class and text.
// One zone at a time (the "zone" scope of a large site) the grid is virtual: every shelf has a
// slot at a fixed pitch, but only the cells of the rows in view (and a few around) are in the
// DOM; scrolling moves cells in and out, updates touch the rendered ones only.

import { el, clear, STATES, STATE_LABEL, fmtNum, clock } from "./util.js";
import { cellState } from "./store.js";

const COMPACT_OVER = 400; // shelves: above this the cells carry no number (tooltip only)
const OVERSCAN_ROWS = 3;  // rows rendered above and below the view
const GAP_PX = 3;         // as .cells { gap }

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
    this.virtual = null; // {ids, slots, pitchX, pitchY, cols, first, last} in the zone scope
    let pending = false;
    const repaint = () => {
      if (!this.virtual || pending) return;
      pending = true;
      requestAnimationFrame(() => { pending = false; this.paintVirtual(); });
    };
    root.addEventListener("scroll", repaint, { passive: true });
    window.addEventListener("resize", repaint);
  }

  /** Build every zone and cell from the store (after a snapshot); one zone's virtual grid in
   *  the zone scope; nothing in the overview scope (the zone tiles show the site). */
  build(store) {
    this.store = store;
    clear(this.root);
    this.virtual = null;
    const kind = store.scope ? store.scope.kind : "site";
    if (kind !== "site") {
      this.cells.clear();
      this.cellState.clear();
      this.bySku.clear();
      this.zoneHeads.clear();
      this.root.classList.remove("compact");
      this.root.classList.toggle("virtual", kind === "zone");
      this.compact = false;
      if (kind === "zone") this.buildVirtual(store);
      this.refreshCounts();
      return;
    }
    this.cells.clear();
    this.cellState.clear();
    this.bySku.clear();
    this.zoneHeads.clear();
    this.root.classList.remove("virtual");
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

  /** One zone (the zone scope): a slot per shelf in site order, cells for the rows in view. */
  buildVirtual(store) {
    const zone = store.scope.zone;
    const ids = [];
    for (const sh of store.shelves.values()) {
      ids.push(sh.id);
      if (!this.bySku.has(sh.sku)) this.bySku.set(sh.sku, []);
      this.bySku.get(sh.sku).push(sh.id);
    }
    const z = store.zones.find((x) => x.id === zone);
    // The zone's full height (a slot per shelf) holds one block of rows, moved to the rows in
    // view: its cells flow in order (no style of their own, so Chromium shares their styles).
    const rowsBox = el("div", { class: "vrows", role: "list", "aria-label": `Shelves of zone ${zone}` });
    const cells = el("div", { class: "vcells" }, rowsBox);
    this.root.append(el("section", { class: "zone", dataset: { zone } },
      el("h3", {}, `Zone ${zone}${z && z.name ? ` · ${z.name}` : ""} `,
        el("small", {}, `${fmtNum(ids.length)} shelves`)), cells));
    // The cell pitch as the stylesheet draws it (it differs by screen width).
    const probe = el("div", { class: "cell" });
    rowsBox.append(probe);
    const pitchX = probe.offsetWidth + GAP_PX, pitchY = probe.offsetHeight + GAP_PX;
    probe.remove();
    this.virtual = {
      ids, slots: new Map(ids.map((id, i) => [id, i])), box: cells, rows: rowsBox,
      pitchX: Math.max(pitchX, 8), pitchY: Math.max(pitchY, 8), cols: 1, first: 0, last: -1,
    };
    this.paintVirtual();
  }

  /** Cells for the rows in view (plus OVERSCAN_ROWS), in slot order in the block of rows, which
   *  is as wide as ``cols`` cells and moved down to the first of those rows; the others removed. */
  paintVirtual() {
    const v = this.virtual;
    if (!v || !this.store) return;
    const width = v.box.clientWidth || this.root.clientWidth;
    v.cols = Math.max(1, Math.floor((width + GAP_PX) / v.pitchX));
    const rows = Math.ceil(v.ids.length / v.cols);
    v.box.style.height = `${rows * v.pitchY}px`;
    const top = this.root.scrollTop - v.box.offsetTop + this.root.offsetTop;
    const view = this.root.clientHeight || 600;
    const r0 = Math.max(0, Math.floor(top / v.pitchY) - OVERSCAN_ROWS);
    const r1 = Math.min(rows - 1, Math.ceil((top + view) / v.pitchY) + OVERSCAN_ROWS);
    const first = r0 * v.cols, last = Math.min(v.ids.length - 1, (r1 + 1) * v.cols - 1);
    for (const [id, cell] of this.cells) {
      const i = v.slots.get(id);
      if (i < first || i > last) { cell.remove(); this.cells.delete(id); this.cellState.delete(id); }
    }
    // The cells kept are a run of slots: the new ones go before it or after it.
    const kept = this.cells.size ? Math.max(first, v.first) : last + 1;
    const before = document.createDocumentFragment(), after = document.createDocumentFragment();
    const store = this.store;
    for (let i = first; i <= last; i++) {
      const id = v.ids[i];
      let cell = this.cells.get(id);
      if (!cell) {
        const sh = store.shelves.get(id);
        const state = cellState(sh, store.skus.get(sh.sku));
        cell = el("div", {
          class: cellClass(sh, state, id === this.selected),
          role: "listitem", tabindex: "0", dataset: { id, state },
          "aria-label": `${id} ${STATE_LABEL[state]}`,
        }, label(sh));
        this.cells.set(id, cell);
        this.cellState.set(id, state);
        (i < kept ? before : after).append(cell);
      }
    }
    v.rows.prepend(before);
    v.rows.append(after);
    v.rows.style.width = `${v.cols * v.pitchX - GAP_PX}px`;
    v.rows.style.transform = `translateY(${r0 * v.pitchY}px)`;
    v.first = first;
    v.last = last;
  }

  /** Scroll the grid so that shelf ``id`` is in view (the zone scope: its cell is then made). */
  reveal(id) {
    const v = this.virtual;
    if (v && v.slots.has(id)) {
      const row = Math.floor(v.slots.get(id) / v.cols);
      this.root.scrollTop = v.box.offsetTop - this.root.offsetTop + row * v.pitchY - this.root.clientHeight / 3;
      this.paintVirtual();
    }
    const cell = this.cells.get(id);
    if (cell && !v) cell.scrollIntoView({ block: "nearest" });
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
    if (this.store && this.store.scope && this.store.scope.kind !== "site") {
      // One zone or none in the page: the site's counts are the overview's.
      const total = Object.fromEntries(STATES.map((s) => [s, 0]));
      for (const z of this.store.overview) for (const s of STATES) total[s] += z.states[s] || 0;
      this.renderLegend(total);
      return;
    }
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
    this.renderLegend(total);
  }

  renderLegend(total) {
    clear(this.legend);
    for (const s of STATES) {
      this.legend.append(el("span", { dataset: { state: s } }, el("i", { class: `s-${s}` }), `${STATE_LABEL[s]} ${fmtNum(total[s])}`));
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

function cellClass(sh, state, selected) {
  return `cell s-${state}${moving(sh) ? " moving" : ""}${selected ? " selected" : ""}`;
}

function moving(sh) {
  return sh.status === "settling" || sh.status === "ambiguous";
}

function label(sh) {
  return sh.units === null || sh.units === undefined ? "?" : String(sh.units);
}
