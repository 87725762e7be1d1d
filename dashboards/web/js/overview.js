// The site overview of a large site: one tile per zone with its shelves per state (the cell
// colours), from the live `overview` message; a tile opens that zone's grid.
// The tiles are built once per set of zones and then updated in place: rebuilding them would
// remove the tile just clicked (it has the focus), and Chromium then recalculates the style of
// the whole page at once, in the middle of drawing the zone's grid.

import { el, clear, fmtNum, STATES, STATE_LABEL } from "./util.js";

const ATTENTION = ["out", "critical", "low", "stale", "unknown"];
const views = new WeakMap(); // root → {key, head, tiles: Map(zone → {tile, shelves, bar, counts})}

/** Tiles into ``root``; ``onZone(id)`` when one is chosen, ``onOverview()`` for "All zones". */
export function renderOverview(root, store, { onZone, onOverview }) {
  const current = store.scope.kind === "zone" ? store.scope.zone : null;
  const names = new Map(store.zones.map((z) => [z.id, z.name]));
  const key = store.overview.map((z) => `${z.zone}\u0000${names.get(z.zone) || ""}`).join("\u0001");
  let view = views.get(root);
  if (!view || view.key !== key) {
    view = build(root, store, names, onZone);
    view.key = key;
    views.set(root, view);
  }
  view.head.replaceChildren(
    el("strong", {}, current ? `Zone ${current}` : "Site overview"),
    el("span", { class: "muted small" }, current
      ? " · other zones below; search finds any shelf"
      : ` · ${fmtNum(store.overview.reduce((n, z) => n + z.shelves, 0))} shelves in ${store.overview.length} zones: choose a zone to see its shelves`));
  if (current) {
    view.head.append(" ", el("button", {
      class: "btn small", type: "button", id: "overview-back", onclick: onOverview,
    }, "All zones"));
  }
  for (const z of store.overview) {
    const t = view.tiles.get(z.zone);
    t.tile.classList.toggle("current", z.zone === current);
    t.tile.setAttribute("aria-pressed", z.zone === current ? "true" : "false");
    t.shelves.textContent = `${fmtNum(z.shelves)} shelves`;
    const sig = STATES.map((s) => z.states[s] || 0).join(",");
    if (t.sig === sig) continue;
    t.sig = sig;
    const parts = [];
    for (const s of STATES) {
      const n = z.states[s] || 0;
      if (!n) continue;
      const part = el("i", { class: `s-${s}` });
      part.style.flexGrow = String(n); // CSSOM, allowed by the page's style-src 'self'
      parts.push(part);
    }
    t.bar.replaceChildren(...parts);
    const counts = [];
    for (const s of ATTENTION) {
      const n = z.states[s] || 0;
      if (n) counts.push(el("span", { dataset: { state: s } }, `${fmtNum(n)} ${STATE_LABEL[s]}`));
    }
    if (!counts.length) counts.push(el("span", { dataset: { state: "ok" } }, "all OK"));
    t.counts.replaceChildren(...counts);
  }
}

function build(root, store, names, onZone) {
  clear(root);
  const head = el("div", { class: "overview-head" });
  const list = el("div", { class: "zone-tiles", role: "list" });
  const tiles = new Map();
  for (const z of store.overview) {
    const shelves = el("span", { class: "muted small" });
    const bar = el("span", { class: "bar", "aria-hidden": "true" });
    const counts = el("span", { class: "zone-counts" });
    const name = names.get(z.zone);
    const tile = el("button", {
      class: "zone-tile", type: "button", role: "listitem", dataset: { zone: z.zone },
      onclick: () => onZone(z.zone),
    }, el("span", { class: "zone-name" }, `Zone ${z.zone}${name ? ` · ${name}` : ""}`), shelves, bar, counts);
    tiles.set(z.zone, { tile, shelves, bar, counts, sig: null });
    list.append(tile);
  }
  root.append(head, list);
  return { key: null, head, tiles };
}
