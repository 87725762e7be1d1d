// A small canvas time-series chart (no library): lines over time, optional horizontal marks
// (reorder point, safety stock), y from 0, crisp on high-DPI screens, redrawn on resize.

const PAD = { l: 38, r: 8, t: 8, b: 18 };

export class LineChart {
  /**
   * @param {HTMLCanvasElement} canvas
   * @param {{series: {label: string, color: string, step?: boolean}[], windowS?: number}} o
   */
  constructor(canvas, { series, windowS = null }) {
    this.canvas = canvas;
    this.series = series.map((s) => ({ ...s, points: [] }));
    this.marks = [];
    this.windowS = windowS; // show the last windowS seconds (null: the data's own range)
    this.message = "";
    this.pending = false;
    new ResizeObserver(() => this.draw()).observe(canvas);
  }

  /** Points are [unixSeconds, value|null]. */
  set(i, points) { this.series[i].points = points; this.schedule(); }

  push(i, t, v, max = 3600) {
    const pts = this.series[i].points;
    pts.push([t, v]);
    if (pts.length > max) pts.splice(0, pts.length - max);
    this.schedule();
  }

  setMarks(marks) { this.marks = marks; this.schedule(); }
  setMessage(text) { this.message = text; this.schedule(); }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => { this.pending = false; this.draw(); });
  }

  draw() {
    const c = this.canvas;
    const dpr = window.devicePixelRatio || 1;
    const w = c.clientWidth;
    const h = c.clientHeight;
    if (!w || !h) return;
    if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
      c.width = Math.round(w * dpr);
      c.height = Math.round(h * dpr);
    }
    const g = c.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    g.font = "11px system-ui, sans-serif";
    g.fillStyle = "#5c6773";
    let t0 = Infinity, t1 = -Infinity, vmax = 0;
    for (const s of this.series) {
      for (const [t, v] of s.points) {
        if (t < t0) t0 = t;
        if (t > t1) t1 = t;
        if (v !== null && v > vmax) vmax = v;
      }
    }
    for (const m of this.marks) if (m.value > vmax) vmax = m.value;
    if (this.windowS) { t1 = Math.max(t1, Date.now() / 1000); t0 = t1 - this.windowS; }
    if (!isFinite(t0) || t1 <= t0) {
      g.fillText(this.message || "no data yet", PAD.l, h / 2);
      return;
    }
    const vtop = niceMax(vmax);
    const x = (t) => PAD.l + ((t - t0) / (t1 - t0)) * (w - PAD.l - PAD.r);
    const y = (v) => h - PAD.b - (v / vtop) * (h - PAD.t - PAD.b);
    // grid and axes
    g.strokeStyle = "#e9ecef";
    g.lineWidth = 1;
    g.textAlign = "right";
    g.textBaseline = "middle";
    for (let k = 0; k <= 2; k++) {
      const v = (vtop * k) / 2;
      g.beginPath(); g.moveTo(PAD.l, y(v) + 0.5); g.lineTo(w - PAD.r, y(v) + 0.5); g.stroke();
      g.fillText(fmtAxis(v), PAD.l - 4, y(v));
    }
    g.textAlign = "center";
    g.textBaseline = "top";
    for (const t of [t0, (t0 + t1) / 2, t1]) g.fillText(hhmm(t), Math.min(w - 20, Math.max(PAD.l + 14, x(t))), h - PAD.b + 3);
    for (const m of this.marks) {
      g.strokeStyle = m.color; g.setLineDash([4, 3]);
      g.beginPath(); g.moveTo(PAD.l, y(m.value) + 0.5); g.lineTo(w - PAD.r, y(m.value) + 0.5); g.stroke();
      g.setLineDash([]);
      g.fillStyle = m.color; g.textAlign = "left";
      const below = y(m.value) < PAD.t + 12;
      g.textBaseline = below ? "top" : "bottom";
      g.fillText(m.label, PAD.l + 3, y(m.value) + (below ? 2 : -1));
    }
    for (const s of this.series) {
      g.strokeStyle = s.color; g.lineWidth = 1.6;
      g.beginPath();
      let pen = false, lastY = null;
      for (const [t, v] of s.points) {
        if (t < t0) continue;
        if (v === null) { pen = false; continue; }
        const px = x(t), py = y(v);
        if (!pen) { g.moveTo(px, py); pen = true; }
        else if (s.step) { g.lineTo(px, lastY); g.lineTo(px, py); }
        else g.lineTo(px, py);
        lastY = py;
      }
      // A stock level holds until the next change: carry the last one to the right edge.
      if (pen && s.step) g.lineTo(x(t1), lastY);
      g.stroke();
    }
    // legend
    g.textAlign = "right"; g.textBaseline = "top";
    let lx = w - PAD.r;
    for (const s of [...this.series].reverse()) {
      const tw = g.measureText(s.label).width;
      g.fillStyle = s.color; g.fillText(s.label, lx, PAD.t);
      lx -= tw + 12;
    }
    if (this.message) { g.fillStyle = "#5c6773"; g.textAlign = "left"; g.fillText(this.message, PAD.l + 4, PAD.t + 14); }
  }
}

function niceMax(v) {
  if (v <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function fmtAxis(v) {
  if (v >= 10000) return `${Math.round(v / 1000)}k`;
  if (v >= 1000) return `${(v / 1000).toFixed(1)}k`;
  return Number.isInteger(v) ? String(v) : v.toFixed(1);
}

const HHMM = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", hour12: false });

function hhmm(t) {
  return HHMM.format(t * 1000);
}
