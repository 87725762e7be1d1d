// The site overview of a large site: one tile per zone with its shelves per state (the cell
// colours), from the live `overview` message; a tile opens that zone's grid.

import { el, clear, fmtNum, STATES, STATE_LABEL } from "./util.js";

const ATTENTION = ["out", "critical", "low", "stale", "unknown"];

/** Tiles into ``root``; ``onZone(id)`` when one is chosen, ``onOverview()`` for "All zones". */
export function renderOverview(root, store, { onZone, onOverview }) {
  const current = store.scope.kind === "zone" ? store.scope.zone : null;
  const names = new Map(store.zones.map((z) => [z.id, z.name]));
  clear(root);
  const head = el("div", { class: "overview-head" },
    el("strong", {}, current ? `Zone ${current}` : "Site overview"),
    el("span", { class: "muted small" }, current
      ? " · other zones below; search finds any shelf"
      : ` · ${fmtNum(store.overview.reduce((n, z) => n + z.shelves, 0))} shelves in ${store.overview.length} zones: choose a zone to see its shelves`));
  if (current) {
    head.append(" ", el("button", {
      class: "btn small", type: "button", id: "overview-back", onclick: onOverview,
    }, "All zones"));
  }
  root.append(head);
  const tiles = el("div", { class: "zone-tiles", role: "list" });
  for (const z of store.overview) {
    const bar = el("span", { class: "bar", "aria-hidden": "true" });
    for (const s of STATES) {
      const n = z.states[s] || 0;
      if (!n) continue;
      const part = el("i", { class: `s-${s}` });
      part.style.flexGrow = String(n); // CSSOM, allowed by the page's style-src 'self'
      bar.append(part);
    }
    const counts = el("span", { class: "zone-counts" });
    for (const s of ATTENTION) {
      const n = z.states[s] || 0;
      if (n) counts.append(el("span", { dataset: { state: s } }, `${fmtNum(n)} ${STATE_LABEL[s]}`));
    }
    if (!counts.childNodes.length) counts.append(el("span", { dataset: { state: "ok" } }, "all OK"));
    const name = names.get(z.zone);
    tiles.append(el("button", {
      class: `zone-tile${z.zone === current ? " current" : ""}`, type: "button", role: "listitem",
      dataset: { zone: z.zone }, "aria-pressed": z.zone === current ? "true" : "false",
      onclick: () => onZone(z.zone),
    },
    el("span", { class: "zone-name" }, `Zone ${z.zone}${name ? ` · ${name}` : ""}`),
    el("span", { class: "muted small" }, `${fmtNum(z.shelves)} shelves`), bar, counts));
  }
  root.append(tiles);
}
