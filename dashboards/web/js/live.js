// The live WebSocket: connects with the token as the "bearer" subprotocol, hands every frame's
// messages to the page, reconnects by itself with capped, jittered exponential backoff, and
// says when the data is stale (the server sends a stats message every second).

export const STALE_AFTER_MS = 3500;      // ~3 missed stats messages
export const RECONNECT_AFTER_MS = 12000; // silent for this long while "open": drop and redial
const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 15000;

export class LiveConnection {
  /**
   * @param {object} o
   * @param {() => string|null} o.token
   * @param {(msgs: object[]) => void} o.onMessages
   * @param {(state: string, info: object) => void} o.onState
   *   states: connecting, live, stale, disconnected (info.retryInMs), unauthorized, forbidden
   */
  constructor({ token, onMessages, onState, url, scope }) {
    this.token = token;
    this.scope = scope || (() => "");
    this.onMessages = onMessages;
    this.onState = onState;
    this.url = url || LiveConnection.defaultUrl();
    this.ws = null;
    this.attempt = 0;
    this.timer = null;
    this.watchdog = null;
    this.lastFrameAt = 0;
    this.state = "idle";
    this.stopped = true;
  }

  static defaultUrl() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    return `${scheme}//${location.host}/api/v1/live`;
  }

  start() {
    this.stopped = false;
    this.connect();
    if (!this.watchdog) this.watchdog = setInterval(() => this.check(), 1000);
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    clearInterval(this.watchdog);
    this.watchdog = null;
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.close(1000, "bye");
    }
  }

  send(obj) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(obj));
  }

  setState(state, info = {}) {
    this.state = state;
    this.onState(state, info);
  }

  connect() {
    clearTimeout(this.timer);
    const tok = this.token();
    if (!tok) { this.setState("unauthorized", { reason: "no token" }); return; }
    this.setState("connecting", { attempt: this.attempt });
    let ws;
    try {
      // The scope the page shows (a zone after a drill-down) survives a reconnect.
      ws = new WebSocket(this.url + this.scope(), ["bearer", tok]);
    } catch (err) {
      this.scheduleReconnect(String(err));
      return;
    }
    this.ws = ws;
    ws.onmessage = (ev) => {
      if (ws !== this.ws) return;
      this.lastFrameAt = performance.now();
      let msgs;
      try { msgs = JSON.parse(ev.data); } catch { return; }
      if (!Array.isArray(msgs)) return;
      if (this.state !== "live") {
        this.attempt = 0;
        this.setState("live");
      }
      this.onMessages(msgs);
    };
    ws.onclose = (ev) => {
      if (ws !== this.ws) return;
      this.ws = null;
      if (this.stopped) return;
      if (ev.code === 4401) { this.setState("unauthorized", { reason: ev.reason }); return; }
      if (ev.code === 4403) { this.setState("forbidden", { reason: ev.reason }); return; }
      // An unknown zone or scope (4400): dial again with the controller's default scope.
      if (ev.code === 4400) this.scope = () => "";
      this.scheduleReconnect(ev.reason || `closed (${ev.code})`);
    };
    ws.onerror = () => { /* onclose follows and decides */ };
  }

  scheduleReconnect(reason) {
    if (this.stopped) return;
    const base = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** this.attempt);
    const delay = Math.round(base * (0.5 + Math.random() * 0.5));
    this.attempt += 1;
    const due = performance.now() + delay;
    this.setState("disconnected", { reason, retryInMs: delay, due });
    this.timer = setTimeout(() => this.connect(), delay);
  }

  /** Once a second: staleness while open; a silent "open" socket is closed and redialled. */
  check() {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) {
      if (this.state === "disconnected") this.onState("disconnected", { tick: true });
      return;
    }
    const silent = performance.now() - this.lastFrameAt;
    if (silent > RECONNECT_AFTER_MS) {
      const ws = this.ws;
      this.ws = null;
      ws.close(4000, "silent");
      this.scheduleReconnect("no data");
    } else if (silent > STALE_AFTER_MS) {
      this.setState("stale", { silentMs: silent });
    }
  }
}
