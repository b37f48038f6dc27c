// Small DOM and formatting helpers shared by the pages. Text always goes in as text nodes, never
// as HTML: job names, logs and reasons come from users' scripts.

/** Creates an element: h("a", {href: "#/"}, "text", child, ...). */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

/** Replaces the children of `el`. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export const TERMINAL = ["succeeded", "failed", "stopped"];
export const STATUSES = ["pending", "scheduled", "preparing", "running", "succeeded", "failed", "stopping", "stopped", "lost"];

export function statusBadge(job) {
  const label = job.desired === "stop" && !TERMINAL.includes(job.status) && job.status !== "stopping"
    ? `${job.status} (stopping)`
    : job.status;
  return h("span", { class: `status ${job.status}`, "data-status": job.status }, label);
}

/** "3 min ago" style age of an RFC 3339 time. */
export function age(iso, now = Date.now()) {
  if (!iso) return "";
  const s = Math.max(0, Math.round((now - Date.parse(iso)) / 1000));
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

export function when(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return `${d.toLocaleString()} (${age(iso)})`;
}

export function bytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${v.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

export function score(v) {
  if (v === null || v === undefined) return "";
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(3) : String(Number(v.toPrecision(5)));
}

export function shortCommit(c) {
  return c ? c.slice(0, 8) : "";
}

/** The repository's last path part without `.git`, for compact tables. */
export function repoName(url) {
  const tail = (url || "").replace(/\/+$/, "").split(/[/:]/).pop() || url;
  return tail.replace(/\.git$/, "");
}

/** A progress bar for `progress` (fraction 0..1), or null when the job reports none. */
export function progressBar(progress, big) {
  if (!progress) return null;
  const pct = Math.round((progress.fraction || 0) * 1000) / 10;
  const parts = [];
  if (progress.max_epochs) parts.push(`epoch ${progress.epoch}/${progress.max_epochs}`);
  if (progress.max_steps) parts.push(`step ${progress.step}/${progress.max_steps}`);
  else if (progress.step) parts.push(`step ${progress.step}`);
  const bar = h("div", { class: "bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": pct },
    h("span", { style: null }));
  bar.firstChild.style.width = `${pct}%`;
  return h("div", { class: `progress-line${big ? " progress-big" : ""}`, "data-fraction": progress.fraction },
    bar, h("span", { class: "num" }, `${pct}%`), big && parts.length ? h("span", { class: "muted" }, parts.join(", ")) : null);
}

export function bestText(best) {
  if (!best || best.score === null || best.score === undefined) return "";
  return `${best.monitor ? best.monitor + " " : ""}${score(best.score)}`;
}
