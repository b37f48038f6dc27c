// Runs: every job, newest first, filtered by status, a page at a time ("load more" follows the
// API's `next` cursor), kept current by the event stream.

import { api, events, maySubmit } from "./api.js";
import { age, bestText, fill, h, progressBar, repoName, shortCommit, STATUSES, statusBadge } from "./dom.js";

const PAGE = 50;

export function runsPage(main, params, signal) {
  const status = params.status || "";
  const rows = new Map(); // job id -> { tr, job }
  let next = null;
  let loading = false;

  const filter = h("select", { id: "status-filter", "aria-label": "Status" },
    h("option", { value: "" }, "all statuses"),
    STATUSES.map((s) => h("option", { value: s, selected: s === status }, s)));
  filter.addEventListener("change", () => {
    location.hash = filter.value ? `#/runs?status=${filter.value}` : "#/runs";
  });
  const tbody = h("tbody", { id: "runs-body" });
  const empty = h("div", { class: "empty", id: "runs-empty", hidden: true }, "No runs yet.");
  const more = h("button", { type: "button", id: "load-more", hidden: true }, "Load more");
  const error = h("p", { class: "error", role: "alert" });
  fill(main,
    h("div", { class: "head" }, h("h1", {}, "Runs"),
      h("div", { class: "actions" }, h("a", { class: "button primary", href: "#/new", id: "new-run", hidden: !maySubmit() }, "New run"))),
    h("div", { class: "toolbar" }, h("label", { for: "status-filter" }, "Show"), filter),
    error,
    h("div", { class: "table-wrap" },
      h("table", { id: "runs" },
        h("thead", {}, h("tr", {},
          h("th", {}, "Name"), h("th", {}, "Repository"), h("th", { class: "hide-narrow" }, "Compute"),
          h("th", { class: "hide-narrow" }, "Agent"), h("th", {}, "Status"), h("th", {}, "Progress"),
          h("th", {}, "Best"), h("th", { class: "hide-narrow" }, "Age"))),
        tbody),
      empty),
    h("div", { class: "toolbar" }, more));

  const matches = (job) => !status || job.status === status;

  function row(job) {
    const commit = shortCommit(job.commit);
    const tr = h("tr", { "data-id": job.id },
      h("td", {}, h("a", { href: `#/runs/${encodeURIComponent(job.id)}`, class: "run-link" }, job.name)),
      h("td", { title: job.spec.repo }, repoName(job.spec.repo), commit ? h("span", { class: "muted mono" }, `@${commit}`) : null),
      h("td", { class: "hide-narrow" }, job.spec.compute),
      h("td", { class: "hide-narrow" }, job.agent || ""),
      h("td", {}, statusBadge(job)),
      h("td", {}, progressBar(job.progress, false)),
      h("td", { class: "num" }, bestText(job.best)),
      h("td", { class: "hide-narrow age", "data-created": job.created_at }, age(job.created_at)));
    return tr;
  }

  // Rows stay in id order (ids sort by creation time, newest first). A job that is not shown is
  // added only when it falls within the loaded range, so "load more" never shows it twice.
  function upsert(job, fromPage) {
    const had = rows.get(job.id);
    if (had) {
      const tr = row(job);
      had.tr.replaceWith(tr);
      rows.set(job.id, { tr, job });
      return;
    }
    if (!matches(job)) return;
    const last = tbody.lastElementChild;
    if (!fromPage && next && last && job.id < last.dataset.id) return;
    const tr = row(job);
    rows.set(job.id, { tr, job });
    let before = null;
    for (const other of tbody.children) {
      if (other.dataset.id < job.id) {
        before = other;
        break;
      }
    }
    tbody.insertBefore(tr, before);
  }

  async function load(cursor) {
    if (loading) return;
    loading = true;
    more.disabled = true;
    try {
      const q = new URLSearchParams({ limit: String(PAGE) });
      if (status) q.set("status", status);
      if (cursor) q.set("cursor", cursor);
      const page = await api(`/api/v1/jobs?${q}`, { signal });
      if (!cursor) {
        tbody.replaceChildren();
        rows.clear();
      }
      for (const job of page.jobs) upsert(job, true);
      next = page.next;
      more.hidden = !next;
      empty.hidden = rows.size > 0;
      fill(error);
    } catch (err) {
      if (!signal.aborted) fill(error, err.message);
    } finally {
      loading = false;
      more.disabled = false;
    }
  }

  more.addEventListener("click", () => load(next));

  events("", {
    // On every (re)connect re-read the first page: nothing changed while away is missed.
    open: () => load(null),
    job: (job) => {
      upsert(job, false);
      empty.hidden = rows.size > 0;
    },
    removed: (id) => {
      const had = rows.get(id);
      if (!had) return;
      had.tr.remove();
      rows.delete(id);
      empty.hidden = rows.size > 0;
    },
  }, signal);

  const timer = setInterval(() => {
    for (const td of tbody.querySelectorAll("td.age")) td.textContent = age(td.dataset.created);
  }, 10000);
  signal.addEventListener("abort", () => clearInterval(timer), { once: true });
}
