// Small helpers shared by the dashboard modules. Data goes into the page with textContent,
// never innerHTML: site names, SKUs and reasons are untrusted text.

/** Create an element: el("td", {class: "num", title: "x"}, "text", child, ...). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) {
    if (c === undefined || c === null || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

export function clear(node) {
  node.replaceChildren();
}

// Formatters are built once: toLocale*String builds a new one on every call (slow in lists).
const TIME = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
const NUMBER = [0, 1, 2].map((d) => new Intl.NumberFormat(undefined, { maximumFractionDigits: d }));

/** HH:MM:SS of a Unix time in seconds. */
export function clock(ts) {
  if (ts === null || ts === undefined) return "—";
  return TIME.format(ts * 1000);
}

/** "12 s", "4 min", "3 h", "2 d" ago-style duration. */
export function duration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "—";
  const s = Math.max(0, seconds);
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.round(s / 60)} min`;
  if (s < 86400) return `${(s / 3600).toFixed(s < 36000 ? 1 : 0)} h`;
  return `${(s / 86400).toFixed(1)} d`;
}

export function fmtNum(v, digits = 0) {
  if (v === null || v === undefined || !isFinite(v)) return "—";
  return NUMBER[Math.min(2, digits)].format(v);
}

export const STATES = ["ok", "low", "critical", "out", "stale", "unknown"];
export const STATE_LABEL = {
  ok: "OK", low: "LOW", critical: "CRITICAL", out: "OUT", stale: "STALE", unknown: "UNKNOWN",
};
export const SEVERITY_RANK = { out: 3, critical: 2, low: 1, ok: 0, unknown: -1 };
