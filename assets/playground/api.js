// The server's API as the playground calls it: relative URLs (the page works at / and at
// /playground, and behind a proxy that mounts the server under a prefix), the API key from
// localStorage, problem+json errors as ApiError, and Server-Sent Events read with fetch()
// (EventSource cannot send an Authorization header).

const KEY_STORE = "fewstep.apiKey";

export function apiKey() {
  return localStorage.getItem(KEY_STORE) || "";
}

export function setApiKey(key) {
  if (key) localStorage.setItem(KEY_STORE, key);
  else localStorage.removeItem(KEY_STORE);
}

/** An error answer (or no answer) from the server, with the problem's fields. */
export class ApiError extends Error {
  constructor(status, { title, detail, code, retryAfter } = {}) {
    super(detail || title || `HTTP ${status}`);
    this.status = status;
    this.title = title || (status ? `HTTP ${status}` : "Network error");
    this.detail = detail || "";
    this.code = code || "";
    this.retryAfter = retryAfter || "";
  }

  /** From a response whose body was `text`: problem+json natively, OpenAI's shape under /v1. */
  static from(res, text) {
    const body = parseJson(text);
    const problem = body && typeof body === "object" ? body : {};
    const openai = problem.error && typeof problem.error === "object" ? problem.error : null;
    return new ApiError(res.status, {
      title: problem.title || res.statusText,
      detail: problem.detail || openai?.message || (body === null ? text.slice(0, 300) : ""),
      code: problem.code || openai?.code || "",
      retryAfter: res.headers.get("retry-after") || "",
    });
  }
}

/** JSON.parse that keeps integers a double cannot hold (seeds go up to 2^63-1) as BigInt. */
export function parseJson(text) {
  try {
    return JSON.parse(text, (_key, value, context) =>
      typeof value === "number" && !Number.isSafeInteger(value) && /^\d+$/.test(context?.source ?? "")
        ? BigInt(context.source)
        : value,
    );
  } catch {
    return null;
  }
}

function headers(extra = {}) {
  const h = new Headers(extra);
  const key = apiKey();
  if (key) h.set("Authorization", `Bearer ${key}`);
  return h;
}

async function send(method, path, { json, headers: extra = {}, signal } = {}) {
  const init = { method, headers: headers({ Accept: "application/json", ...extra }), signal, cache: "no-store" };
  if (json !== undefined) {
    init.headers.set("Content-Type", "application/json");
    init.body = json;
  }
  try {
    return await fetch(path, init);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, { title: "Network error", detail: `The server could not be reached (${e.message}).` });
  }
}

/** Calls the API; resolves to the parsed JSON body, throws ApiError on any non-2xx answer. */
export async function call(method, path, options) {
  const res = await send(method, path, options);
  const text = await res.text();
  if (!res.ok) throw ApiError.from(res, text);
  return text ? parseJson(text) : null;
}

/**
 * A job's events (`GET /jobs/{id}/events`) as {event, data} objects, until the server ends
 * the stream or `signal` aborts it.
 */
export async function* jobEvents(id, signal) {
  const res = await send("GET", `jobs/${encodeURIComponent(id)}/events`, {
    headers: { Accept: "text/event-stream" },
    signal,
  });
  if (!res.ok) throw ApiError.from(res, await res.text());
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer = (buffer + value).replace(/\r\n?/g, "\n");
      // An event ends at a blank line.
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = parseEvent(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (event) yield event;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

/** One SSE block: `event:` names it, `data:` lines are its payload; `:` lines are keep-alives. */
function parseEvent(block) {
  let name = "";
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") name = value;
    else if (field === "data") data.push(value);
  }
  if (!name && !data.length) return null;
  return { event: name || "message", data: data.length ? parseJson(data.join("\n")) : null };
}
