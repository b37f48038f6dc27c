// One run: status and reason, commit, environment, progress, metric plots (SVG drawn by the
// controller), best score with the checkpoint download, stop, "run again", and the live log.
// The job stays current through the event stream (?job=ID); the log follows by byte offset.

import { api, blob, events, followLog, mayChange, maySubmit } from "./api.js";
import { bytes, fill, h, progressBar, score, shortCommit, statusBadge, TERMINAL, when } from "./dom.js";
import { LogView } from "./log.js";

const PLOT_EVERY_MS = 2000;

export async function runPage(main, params, signal) {
  const id = params.id;
  let job;
  try {
    job = await api(`/api/v1/jobs/${encodeURIComponent(id)}`, { signal });
  } catch (err) {
    if (!signal.aborted) fill(main, h("h1", {}, "Run"), h("p", { class: "error" }, err.message));
    return;
  }

  const title = h("h1", { id: "run-name" });
  const badge = h("span", { id: "run-status" });
  const stop = h("button", { type: "button", class: "danger", id: "stop" }, "Stop");
  const again = h("a", { class: "button", id: "run-again", href: `#/new?from=${encodeURIComponent(id)}` }, "Run again");
  const actionError = h("p", { class: "error", role: "alert", id: "action-error" });
  const reason = h("div", { class: "reason", id: "run-reason", hidden: true });
  const facts = h("dl", { class: "facts", id: "run-facts" });
  const progress = h("div", { id: "run-progress" });
  const best = h("div", { class: "best", id: "run-best" });
  const plots = h("div", { class: "plots", id: "plots" });
  const env = h("div", { id: "run-env" });
  const log = new LogView();

  fill(main,
    h("div", { class: "head" }, title, badge, h("div", { class: "actions" }, again, stop)),
    actionError, reason, progress, facts,
    h("section", { id: "best-section" }, h("h2", {}, "Best checkpoint"), best),
    h("section", { id: "metrics-section" }, h("h2", {}, "Metrics"), plots),
    h("section", {}, h("h2", {}, "Log"), log.element),
    h("section", {}, h("h2", {}, "Environment"), env));

  stop.addEventListener("click", async () => {
    stop.disabled = true;
    fill(actionError);
    try {
      update(await api(`/api/v1/jobs/${encodeURIComponent(id)}/stop`, { method: "POST", signal }));
    } catch (err) {
      if (!signal.aborted) fill(actionError, err.message);
      stop.disabled = false;
    }
  });

  // ---- plots: one image per metric, reloaded at most every PLOT_EVERY_MS while metrics change
  const figures = new Map(); // metric -> { img, url }
  let plotTimer = null;
  let plotsDirty = false;
  let lastMetrics = "";

  async function loadPlot(name) {
    const f = figures.get(name);
    const width = Math.max(320, Math.min(900, Math.round(f.img.parentElement.clientWidth || 640)));
    try {
      const q = new URLSearchParams({ metric: name, width: String(width), height: String(Math.round(width * 0.45)) });
      const { blob: b } = await blob(`/api/v1/jobs/${encodeURIComponent(id)}/metrics.svg?${q}`, signal);
      const url = URL.createObjectURL(b);
      if (f.url) URL.revokeObjectURL(f.url);
      f.url = url;
      f.img.src = url;
      f.img.dataset.loaded = String(Number(f.img.dataset.loaded || 0) + 1);
    } catch (_) {
      // The next change retries.
    }
  }

  function refreshPlots() {
    plotsDirty = true;
    if (plotTimer) return;
    const run = () => {
      plotTimer = null;
      if (!plotsDirty || signal.aborted) return;
      plotsDirty = false;
      for (const name of figures.keys()) loadPlot(name);
      plotTimer = setTimeout(run, PLOT_EVERY_MS);
    };
    run();
  }
  signal.addEventListener("abort", () => {
    clearTimeout(plotTimer);
    for (const f of figures.values()) if (f.url) URL.revokeObjectURL(f.url);
  }, { once: true });

  function renderPlots() {
    const names = Object.keys(job.metrics || {});
    for (const name of names) {
      if (figures.has(name)) continue;
      const img = h("img", { alt: `${name} over training`, "data-metric": name });
      figures.set(name, { img, url: null });
      plots.append(h("figure", { "data-metric": name }, img));
    }
    if (!names.length) fill(plots, h("p", { class: "muted", id: "no-metrics" }, "No metrics reported (yet)."));
    else plots.querySelector("#no-metrics")?.remove();
    const key = JSON.stringify(job.metrics || {}) + job.attempt;
    if (key !== lastMetrics) {
      lastMetrics = key;
      if (names.length) refreshPlots();
    }
  }

  // ---- checkpoint download
  async function download(button, status) {
    button.disabled = true;
    fill(status, "Downloading…");
    try {
      const { blob: b, resp } = await blob(`/api/v1/jobs/${encodeURIComponent(id)}/checkpoint`, signal);
      const disposition = resp.headers.get("content-disposition") || "";
      const m = /filename="([^"]+)"/.exec(disposition);
      const a = h("a", { href: URL.createObjectURL(b), download: m ? m[1] : `${id}.ckpt` });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(a.href), 60000);
      fill(status, `Downloaded ${bytes(b.size)}.`);
    } catch (err) {
      fill(status, h("span", { class: "error" }, err.message));
    } finally {
      button.disabled = false;
    }
  }

  function renderBest() {
    const b = job.best;
    if (!b) {
      fill(best, h("span", { class: "muted" }, "No checkpoint reported (yet)."));
      return;
    }
    const parts = [];
    parts.push(h("span", { id: "best-score", "data-score": b.score ?? "" },
      b.score !== null && b.score !== undefined ? `${b.monitor || "score"} = ${score(b.score)}` : "no score"));
    if (b.mode) parts.push(h("span", { class: "muted" }, `(${b.mode})`));
    if (b.epoch !== null && b.epoch !== undefined) parts.push(h("span", { class: "muted" }, `epoch ${b.epoch}`));
    if (b.upload_error) {
      parts.push(h("span", { class: "error" }, `upload failed: ${b.upload_error}`));
    } else if (b.sha256) {
      const status = h("span", { class: "muted", id: "download-status" });
      const button = h("button", { type: "button", class: "primary", id: "download" }, `Download (${bytes(b.size)})`);
      button.addEventListener("click", () => download(button, status));
      parts.push(button, status);
    } else {
      parts.push(h("span", { class: "muted" }, TERMINAL.includes(job.status) ? "not uploaded" : "uploaded when the run ends"));
    }
    // Keep an in-flight download's status line.
    if (best.querySelector("#download") && b.sha256 && best.dataset.sha === b.sha256 && best.dataset.score === String(b.score)) return;
    best.dataset.sha = b.sha256 || "";
    best.dataset.score = String(b.score);
    fill(best, parts);
  }

  function renderFacts() {
    const s = job.spec;
    const rows = [
      ["Id", h("code", {}, job.id)],
      ["Repository", s.repo],
      ["Revision", s.revision || "(default branch)"],
      ["Commit", job.commit ? h("code", { id: "run-commit", title: job.commit }, shortCommit(job.commit)) : h("span", { class: "muted" }, "not resolved yet")],
      s.script
        ? ["Script", h("code", {}, [s.script, ...(s.args || [])].join(" "))]
        : ["Entry point", h("code", { id: "run-entry" }, job.project ? job.project.argv.join(" ") : [s.entry_point, ...Object.entries(s.parameters || {}).map(([k, v]) => `${k}=${v}`)].join(" "))],
      ["Compute", s.compute + (job.gpus && job.gpus.length ? ` (GPU ${job.gpus.join(", ")})` : "")],
      ["Agent", job.agent || h("span", { class: "muted" }, "none")],
      ["Attempt", String(job.attempt) + (s.retries ? ` (retries: ${s.retries})` : "")],
      ["Created", when(job.created_at)],
      ["Started", when(job.started_at)],
      ["Finished", when(job.finished_at)],
    ];
    if (job.exit_code !== null && job.exit_code !== undefined) rows.push(["Exit code", String(job.exit_code)]);
    if (job.mlflow) {
      const link = /^https?:\/\//.test(job.mlflow.url)
        ? h("a", { id: "run-mlflow", href: job.mlflow.url, target: "_blank", rel: "noopener" }, `run ${job.mlflow.run_id}`)
        : h("code", { id: "run-mlflow" }, job.mlflow.run_id);
      rows.push(["MLflow", link]);
    }
    fill(facts, rows.filter(([, v]) => v !== "").map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
  }

  function renderEnv() {
    const e = job.environment;
    if (!e) {
      fill(env, h("span", { class: "muted" }, "Not built yet."));
      return;
    }
    fill(env,
      h("p", { id: "env-summary" }, `${e.installer}, ${e.packages.length} packages, built in ${e.seconds.toFixed(1)} s`),
      e.packages.length ? h("details", {}, h("summary", {}, "Pinned packages"), h("pre", { class: "packages" }, e.packages.join("\n"))) : null);
  }

  function update(next) {
    if (next.id !== id) return;
    job = next;
    fill(title, job.name);
    fill(badge, statusBadge(job));
    document.title = `${job.name} · Runyard`;
    const over = TERMINAL.includes(job.status);
    stop.disabled = over || job.desired === "stop";
    stop.hidden = over || !mayChange(job);
    again.hidden = !maySubmit();
    reason.hidden = !job.reason;
    reason.className = `reason ${job.status}`;
    fill(reason, job.reason || "");
    fill(progress, progressBar(job.progress, true));
    renderFacts();
    renderBest();
    renderPlots();
    renderEnv();
  }

  update(job);
  events(`job=${encodeURIComponent(id)}`, {
    job: update,
    removed: () => {
      reason.hidden = false;
      reason.className = "reason failed";
      fill(reason, "this run was deleted");
      stop.hidden = true;
    },
  }, signal);
  followLog(id, () => job, (n) => {
    if (n > 1) log.separator(`attempt ${n}`);
  }, (text) => log.append(text), signal);
}
