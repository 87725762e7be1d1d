// REST calls with the bearer token; errors become ApiError with the problem+json detail.

export class ApiError extends Error {
  constructor(status, title, detail) {
    super(detail ? `${status} ${title}: ${detail}` : `${status} ${title}`);
    this.status = status;
    this.title = title;
    this.detail = detail;
  }
}

export class Api {
  /** @param {() => string|null} token  @param {() => void} onUnauthorized */
  constructor(token, onUnauthorized) {
    this.token = token;
    this.onUnauthorized = onUnauthorized;
  }

  async request(method, path, body) {
    return (await this.exchange(method, path, body)).data;
  }

  /** One page of a list read (docs/api.md, "Pages"): its items, X-Total-Count and the cursor
   *  of the next page (null on the last). */
  async page(path) {
    const { data, resp } = await this.exchange("GET", path);
    const total = Number(resp.headers.get("X-Total-Count"));
    return {
      items: Array.isArray(data) ? data : [],
      total: Number.isFinite(total) ? total : null,
      next: resp.headers.get("X-Next-Cursor"),
    };
  }

  async exchange(method, path, body) {
    const headers = { Accept: "application/json" };
    const tok = this.token();
    if (tok) headers.Authorization = `Bearer ${tok}`;
    const init = { method, headers, cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(path, init);
    } catch (err) {
      throw new ApiError(0, "Network error", "the controller is unreachable");
    }
    if (resp.status === 401) this.onUnauthorized();
    const text = await resp.text();
    let data = null;
    if (text) {
      try { data = JSON.parse(text); } catch { data = null; }
    }
    if (!resp.ok) {
      const title = (data && data.title) || resp.statusText || "Error";
      const detail = data && typeof data.detail === "string" ? data.detail : "";
      const err = new ApiError(resp.status, title, detail);
      err.retryAfter = Number(resp.headers.get("Retry-After")) || null;
      throw err;
    }
    return { data, resp };
  }

  get(path) { return this.request("GET", path); }
  post(path, body) { return this.request("POST", path, body); }
}
