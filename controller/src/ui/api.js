// The JSON API as the page uses it: the token (kept in sessionStorage, sent as a bearer header,
// and shared with the services' data plane as a cookie), JSON calls with the API's {error, field}
// errors, server-sent events read through fetch() (EventSource cannot send a header), polling,
// and log following that resumes by byte offset.

const TOKEN_KEY = "runyard.token";

// The cookie the data plane (`/s/NAME/...`) accepts in place of a bearer header (the
// controller's TOKEN_COOKIE). A service link opened in a new tab is a plain navigation, which
// cannot carry a header; with this cookie a browser opens a service (a JupyterLab, a demo page)
// signed in. It is scoped to `Path=/s/` so the API never sees it (the API takes the bearer header
// only, so a cookie can never be used against it by another site), `SameSite=Strict` so another
// site cannot make the browser send it to a service, `Secure` over https. The data plane strips
// it before a request reaches a replica. It is not HttpOnly (script sets it): a service's own
// pages run on this origin and are trusted with it, as they are with the user's requests.
const TOKEN_COOKIE = "runyard_token";

function shareWithServices(t) {
  const secure = location.protocol === "https:" ? "; Secure" : "";
  // Tokens are [A-Za-z0-9_]: encodeURIComponent leaves them as they are.
  document.cookie = t
    ? `${TOKEN_COOKIE}=${encodeURIComponent(t)}; Path=/s/; SameSite=Strict${secure}`
    : `${TOKEN_COOKIE}=; Path=/s/; Max-Age=0; SameSite=Strict${secure}`;
}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

/** Keeps `t` for this tab (and for service links: see TOKEN_COOKIE); null signs out. */
export function setToken(t) {
  if (t) sessionStorage.setItem(TOKEN_KEY, t);
  else sessionStorage.removeItem(TOKEN_KEY);
  shareWithServices(t);
}

// Who is signed in ({name, role} from /api/v1/whoami); the page hides what the role may not do
// (the API refuses it anyway).
let who = null;

export function me() {
  return who;
}

export function setMe(m) {
  who = m;
}

/** Whether the signed-in token may submit runs. */
export function maySubmit() {
  return !!who && who.role !== "viewer";
}

/** Whether the signed-in token may stop or delete `job`: an admin, or the user who owns it. */
export function mayChange(job) {
  return !!who && (who.role === "admin" || (who.role === "user" && job.owner === who.name));
}

/** An error the API answered with (status, message, and the field at fault when there is one). */
export class ApiError extends Error {
  constructor(status, message, field) {
    super(message);
    this.status = status;
    this.field = field || null;
  }
}

// Called when the API says the token is wrong (set by the app: back to sign-in).
let onUnauthorized = () => {};
export function whenUnauthorized(f) {
  onUnauthorized = f;
}

function headers(extra) {
  return Object.assign({ Authorization: `Bearer ${token() || ""}` }, extra || {});
}

async function failure(resp, quiet) {
  let body = null;
  try {
    body = await resp.json();
  } catch (_) {
    // not JSON: keep the status line
  }
  const err = new ApiError(resp.status, (body && body.error) || `${resp.status} ${resp.statusText}`, body && body.field);
  if (resp.status === 401 && !quiet) onUnauthorized(err);
  return err;
}

/**
 * Calls the API; returns the parsed JSON body or throws ApiError. A 401 signs the page out,
 * unless `opts.checkingToken` (the sign-in form's own check).
 */
export async function api(path, opts = {}) {
  const init = { method: opts.method || "GET", headers: headers(), signal: opts.signal };
  if (opts.body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = typeof opts.body === "string" ? opts.body : JSON.stringify(opts.body);
  }
  const resp = await fetch(path, init);
  if (!resp.ok) throw await failure(resp, opts.checkingToken);
  return resp.json();
}

/** Fetches a binary resource with the token; returns a Blob and the response. */
export async function blob(path, signal) {
  const resp = await fetch(path, { headers: headers(), signal });
  if (!resp.ok) throw await failure(resp);
  return { blob: await resp.blob(), resp };
}

/**
 * Runs `f(signal)` now and then every `ms` until `signal` aborts; skipped while the tab is
 * hidden, run at once when it shows again. For what has no event stream (services).
 */
export async function poll(f, ms, signal) {
  const visible = () => new Promise((resolve) => {
    if (!document.hidden || signal.aborted) return resolve();
    const shown = () => {
      if (document.hidden && !signal.aborted) return;
      document.removeEventListener("visibilitychange", shown);
      resolve();
    };
    document.addEventListener("visibilitychange", shown);
    signal.addEventListener("abort", shown, { once: true });
  });
  while (!signal.aborted) {
    await visible();
    if (signal.aborted) return;
    try {
      await f(signal);
    } catch (_) {
      // f shows its own errors; the next round retries.
    }
    await sleep(ms, signal);
  }
}

const sleep = (ms, signal) =>
  new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    if (signal) signal.addEventListener("abort", () => { clearTimeout(t); resolve(); }, { once: true });
  });

// Connection state shown in the header: how many streams are reconnecting now.
const reconnecting = new Set();
let onConnection = () => {};
export function whenConnectionChanges(f) {
  onConnection = f;
}
function markDown(key, down) {
  const had = reconnecting.size;
  if (down) reconnecting.add(key);
  else reconnecting.delete(key);
  if (had !== reconnecting.size) onConnection(reconnecting.size > 0);
}

/**
 * Reads `GET /api/v1/events` until `signal` aborts, reconnecting with backoff.
 * `handlers`: { job(job), removed(id), agents(list), open() } — `open` runs on every (re)connect so the caller
 * can re-read what it shows and miss nothing that changed while disconnected.
 */
export async function events(query, handlers, signal) {
  const key = {};
  let delay = 500;
  while (!signal.aborted) {
    try {
      const resp = await fetch(`/api/v1/events${query ? "?" + query : ""}`, { headers: headers(), signal });
      if (!resp.ok) throw await failure(resp);
      markDown(key, false);
      delay = 500;
      if (handlers.open) handlers.open();
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          dispatch(block, handlers);
        }
      }
    } catch (err) {
      if (signal.aborted) return;
      if (err instanceof ApiError && (err.status === 401 || err.status === 404)) {
        if (handlers.error) handlers.error(err);
        return;
      }
    }
    if (signal.aborted) return;
    markDown(key, true);
    await sleep(delay, signal);
    delay = Math.min(delay * 2, 5000);
  }
  markDown(key, false);
}

function dispatch(block, handlers) {
  let kind = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue;
    if (line.startsWith("event:")) kind = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
  }
  if (!data.length) return;
  let value;
  try {
    value = JSON.parse(data.join("\n"));
  } catch (_) {
    return;
  }
  if (kind === "job" && handlers.job) handlers.job(value);
  if (kind === "removed" && handlers.removed) handlers.removed(value.id);
  if (kind === "agents" && handlers.agents) handlers.agents(value.agents || []);
}

/**
 * Follows a job's log from its first attempt on: `onText(text)` gets decoded text as it comes,
 * `onAttempt(n)` runs before each attempt's lines. Each attempt is read by byte offset, so after a
 * cut connection (network, controller restart) it resumes exactly where it stopped: no line is lost
 * or repeated. `currentJob()` returns the page's latest copy of the job.
 */
export async function followLog(id, currentJob, onAttempt, onText, signal) {
  const key = {};
  let attempt = 1;
  let offset = 0;
  let delay = 500;
  let decoder = new TextDecoder();
  let announced = 0;
  while (!signal.aborted) {
    let job = currentJob();
    if (!job || job.attempt < attempt) {
      // Not placed yet: the page's event stream updates the job; look again shortly.
      await sleep(300, signal);
      continue;
    }
    if (announced < attempt) {
      onAttempt(attempt);
      announced = attempt;
    }
    let ended = false;
    try {
      const url = `/api/v1/jobs/${encodeURIComponent(id)}/logs?follow=true&attempt=${attempt}&offset=${offset}`;
      const resp = await fetch(url, { headers: headers(), signal });
      if (!resp.ok) throw await failure(resp);
      markDown(key, false);
      delay = 500;
      const reader = resp.body.getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        offset += value.byteLength;
        const text = decoder.decode(value, { stream: true });
        if (text) onText(text);
      }
      ended = true;
    } catch (err) {
      if (signal.aborted) return;
      if (err instanceof ApiError && err.status === 404) return;
    }
    if (ended) {
      // The stream ends when this attempt is over: its log is complete.
      try {
        job = await api(`/api/v1/jobs/${encodeURIComponent(id)}`, { signal });
      } catch (_) {
        job = null;
      }
      if (job && job.attempt > attempt) {
        const tail = decoder.decode();
        if (tail) onText(tail);
        decoder = new TextDecoder();
        attempt += 1;
        offset = 0;
        continue;
      }
      if (job && job.attempt === attempt && ["succeeded", "failed", "stopped"].includes(job.status)) {
        const tail = decoder.decode();
        if (tail) onText(tail);
        markDown(key, false);
        return;
      }
    }
    if (signal.aborted) return;
    markDown(key, true);
    await sleep(delay, signal);
    delay = Math.min(delay * 2, 5000);
  }
  markDown(key, false);
}
