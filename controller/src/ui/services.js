// Services: every service with its status, ready replicas against target and max, traffic and
// its URL (opened in a new tab: the token cookie signs it in). Services send no events: the list
// is read again every POLL_MS while the page shows.

import { api, poll } from "./api.js";
import { fill, h } from "./dom.js";

const POLL_MS = 2000;

/** The badge of a service's status (starting, ready, idle, stopping, stopped). */
export function serviceBadge(s) {
  return h("span", { class: `status ${s.status}`, "data-status": s.status }, s.status);
}

/** Ready replicas of a service view: passing their check and not draining. */
export function readyCount(s) {
  return s.replicas.filter((r) => r.ready && !r.draining).length;
}

/** Milliseconds as the CLI shows them, or "-". */
export function ms(v) {
  return v === null || v === undefined ? "-" : v.toFixed(2);
}

/** A link that opens the service in a new tab. */
export function serviceLink(s, attrs) {
  return h("a", Object.assign({ href: s.url, target: "_blank", rel: "noopener", class: "mono" }, attrs || {}), s.url);
}

export function servicesPage(main, _params, signal) {
  const tbody = h("tbody", { id: "services-body" });
  const empty = h("div", { class: "empty", id: "services-empty", hidden: true },
    "No services yet. Serve one with `runyard serve` (or POST /api/v1/services).");
  const error = h("p", { class: "error", role: "alert", id: "services-error" });
  fill(main,
    h("h1", {}, "Services"),
    error,
    h("div", { class: "table-wrap" },
      h("table", { id: "services" },
        h("thead", {}, h("tr", {},
          h("th", {}, "Name"), h("th", {}, "Status"),
          h("th", { title: "ready / target / max" }, "Replicas"),
          h("th", { class: "num" }, "req/s"), h("th", { class: "num hide-narrow" }, "p50 / p99 ms"),
          h("th", { class: "num hide-narrow" }, "Pending"), h("th", {}, "URL"))),
        tbody),
      empty));

  function row(s) {
    return h("tr", { "data-service": s.name },
      h("td", {}, h("a", { href: `#/services/${encodeURIComponent(s.name)}`, class: "service-link" }, s.name)),
      h("td", {}, serviceBadge(s)),
      h("td", { class: "replicas", "data-ready": readyCount(s) }, `${readyCount(s)} / ${s.target} / ${s.max}`),
      h("td", { class: "num rate" }, s.traffic.rate.toFixed(1)),
      h("td", { class: "num hide-narrow" }, `${ms(s.traffic.p50_ms)} / ${ms(s.traffic.p99_ms)}`),
      h("td", { class: "num hide-narrow" }, String(s.traffic.pending)),
      h("td", {}, serviceLink(s)));
  }

  poll(async () => {
    try {
      const r = await api("/api/v1/services", { signal });
      fill(tbody, r.services.map(row));
      empty.hidden = r.services.length > 0;
      fill(error);
    } catch (err) {
      if (!signal.aborted) fill(error, err.message);
    }
  }, POLL_MS, signal);
}
