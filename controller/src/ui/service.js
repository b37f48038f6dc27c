// One service: what `runyard service status` says (status, URL, replicas with their state,
// traffic, the last scaling decision and why, the policy error, the reason), a plot of its last
// hour (replicas, ready replicas, requests per second), and for whoever may change it the scale
// form (min, max) and Stop. Read again every POLL_MS (services send no events).

import { api, ApiError, mayChange, poll } from "./api.js";
import { fill, h, repoName, when } from "./dom.js";
import { ms, readyCount, serviceBadge, serviceLink } from "./services.js";
import { historyPlot } from "./plot.js";

const POLL_MS = 2000;
const HISTORY_MS = 5000; // the controller keeps a point every 5 s

function replicaState(r) {
  if (r.draining) return "draining";
  if (r.unhealthy) return "unhealthy";
  if (r.ready) return "ready";
  return "starting";
}

function replicaRow(r) {
  const job = r.status || "creating";
  return h("tr", { "data-index": r.index, "data-job": r.job },
    h("td", { class: "num" }, String(r.index)),
    h("td", {}, h("a", { href: `#/runs/${encodeURIComponent(r.job)}`, class: "mono replica-job" }, r.job)),
    h("td", {}, r.agent || h("span", { class: "muted" }, "none")),
    h("td", {}, h("span", { class: `status ${job}`, "data-status": job }, job)),
    h("td", { class: "state", "data-state": replicaState(r) }, replicaState(r)),
    h("td", { class: "num in-flight" }, String(r.in_flight)),
    h("td", { class: "num served" }, String(r.served)),
    h("td", { class: "hide-narrow" }, r.path || h("span", { class: "muted" }, "unknown")));
}

function replicaTable(id, replicas) {
  return h("div", { class: "table-wrap" },
    h("table", { id },
      h("thead", {}, h("tr", {},
        h("th", { class: "num" }, "#"), h("th", {}, "Job"), h("th", {}, "Agent"), h("th", {}, "Status"),
        h("th", {}, "State"), h("th", { class: "num" }, "In flight"), h("th", { class: "num" }, "Served"),
        h("th", { class: "hide-narrow" }, "Path"))),
      h("tbody", { id: `${id}-body` }, replicas.map(replicaRow))));
}

export async function servicePage(main, params, signal) {
  const name = params.name;
  const path = `/api/v1/services/${encodeURIComponent(name)}`;
  let svc;
  try {
    svc = await api(path, { signal });
  } catch (err) {
    if (!signal.aborted) fill(main, h("h1", {}, "Service"), h("p", { class: "error", id: "service-error" }, err.message));
    return;
  }

  const title = h("h1", { id: "service-name" }, name);
  const badge = h("span", { id: "service-status" });
  const stop = h("button", { type: "button", class: "danger", id: "stop-service" }, "Stop");
  const actionError = h("p", { class: "error", role: "alert", id: "action-error" });
  const loadError = h("p", { class: "error", role: "alert", id: "service-load-error" });
  const reason = h("div", { class: "reason", id: "service-reason", hidden: true });
  const facts = h("dl", { class: "facts", id: "service-facts" });
  const traffic = h("dl", { class: "facts", id: "traffic" });
  const decision = h("p", { id: "service-decision" });
  const policyError = h("p", { class: "error", id: "service-policy-error", hidden: true });
  const replicas = h("div", { id: "replicas-section" });
  const ended = h("div", { id: "ended-section" });
  const plot = h("figure", { class: "plot", id: "service-plot" },
    h("p", { class: "muted", id: "no-history" }, "No history yet (a point every 5 s)."));

  // ---- scale (min, max), for whoever may change the service
  const minInput = h("input", { id: "scale-min", name: "min", type: "number", min: 0, step: 1, inputmode: "numeric" });
  const maxInput = h("input", { id: "scale-max", name: "max", type: "number", min: 1, step: 1, inputmode: "numeric" });
  const errors = {
    min: h("p", { class: "field-error", id: "err-min", "data-field": "min", role: "alert" }),
    max: h("p", { class: "field-error", id: "err-max", "data-field": "max", role: "alert" }),
  };
  const inputs = { min: minInput, max: maxInput };
  const scaleError = h("p", { class: "error", id: "scale-error", role: "alert" });
  const scaleButton = h("button", { type: "submit", class: "primary", id: "scale-submit" }, "Scale");
  const scaleForm = h("form", { class: "scale", id: "scale", novalidate: true },
    h("div", { class: "field", "data-field": "min" }, h("label", { for: "scale-min" }, "Min replicas"), minInput, errors.min),
    h("div", { class: "field", "data-field": "max" }, h("label", { for: "scale-max" }, "Max replicas"), maxInput, errors.max),
    h("div", { class: "submit" }, scaleButton, scaleError));
  const scaleSection = h("section", { id: "scale-section", hidden: true },
    h("h2", {}, "Scale"),
    h("p", { class: "muted" }, "The autoscaler keeps the replica count within these bounds."),
    scaleForm);
  let edited = false; // the user is typing: polling does not overwrite the inputs
  // `change` too: clearing a box by script or WebDriver sends no `input`.
  for (const i of [minInput, maxInput]) {
    for (const kind of ["input", "change"]) i.addEventListener(kind, () => { edited = true; });
  }

  fill(main,
    h("div", { class: "head" }, title, badge, h("div", { class: "actions" }, stop)),
    actionError, loadError, reason, policyError, facts,
    h("section", {}, h("h2", {}, "Traffic"), traffic, decision),
    h("section", {}, h("h2", {}, "Last hour"), plot,
      h("p", { class: "legend" },
        h("span", { class: "key replicas" }, "replicas"), h("span", { class: "key ready" }, "ready"),
        h("span", { class: "key rate" }, "req/s (right axis)"))),
    h("section", {}, h("h2", {}, "Replicas"), replicas, ended),
    scaleSection);

  function clearErrors() {
    for (const k of Object.keys(errors)) {
      fill(errors[k]);
      errors[k].parentElement.classList.remove("invalid");
    }
    fill(scaleError);
  }

  // The API names the spec's field (`replicas.min`); the form's own checks name `min`/`max`.
  function showError(field, message) {
    const key = (field || "").split(".").pop();
    if (errors[key]) {
      fill(errors[key], message);
      errors[key].parentElement.classList.add("invalid");
      inputs[key].focus();
    } else {
      fill(scaleError, message);
    }
  }

  function bound(key) {
    const v = inputs[key].value.trim();
    if (v === "") return undefined;
    const n = Number(v);
    if (!Number.isInteger(n) || n < 0) throw new ApiError(400, `\`${v}\` is not a whole number`, key);
    return n;
  }

  scaleForm.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearErrors();
    scaleButton.disabled = true;
    try {
      const body = { min: bound("min"), max: bound("max") };
      const next = await api(`${path}/scale`, { method: "POST", body, signal });
      edited = false;
      update(next);
    } catch (err) {
      if (signal.aborted) return;
      if (err instanceof ApiError && err.status === 400) showError(err.field, err.message);
      else fill(scaleError, err.message);
    } finally {
      scaleButton.disabled = false;
    }
  });

  stop.addEventListener("click", async () => {
    stop.disabled = true;
    fill(actionError);
    try {
      update(await api(`${path}/stop`, { method: "POST", signal }));
    } catch (err) {
      if (!signal.aborted) fill(actionError, err.message);
      stop.disabled = false;
    }
  });

  function renderFacts() {
    const sp = svc.spec || {};
    const rows = [
      ["URL", serviceLink(svc, { id: "service-url" })],
      ["Repository", h("span", { title: sp.repo || "" }, repoName(sp.repo))],
      ["Script", h("code", {}, [sp.script, ...(sp.args || [])].join(" "))],
      ["Replicas", h("span", { id: "service-replicas" },
        `${readyCount(svc)} ready, target ${svc.target} in [${svc.min}, ${svc.max}]`)],
      ["Generation", String(svc.generation)],
      ["Access", svc.public ? "public (no token needed)" : "any valid token"],
      ["Owner", svc.owner || h("span", { class: "muted" }, "none")],
      ["Created", when(svc.created_at)],
      ["Updated", when(svc.updated_at)],
    ];
    fill(facts, rows.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
  }

  function renderTraffic() {
    const t = svc.traffic;
    const rows = [
      ["Requests/s", "traffic-rate", t.rate.toFixed(1)],
      ["Latency p50 / p99", "traffic-latency", `${ms(t.p50_ms)} / ${ms(t.p99_ms)} ms`],
      ["Pending", "traffic-pending", `${t.pending} (${t.queued} queued)`],
      ["Served", "traffic-total", String(t.total)],
      ["Failed", "traffic-failed", String(t.failed)],
    ];
    if (t.mean_batch !== null && t.mean_batch !== undefined) rows.push(["Mean batch", "traffic-batch", t.mean_batch.toFixed(1)]);
    fill(traffic, rows.map(([k, id, v]) => [h("dt", {}, k), h("dd", { id }, v)]));
    const d = svc.decision;
    fill(decision, d
      ? [h("strong", {}, `Scaled ${d.from} → ${d.to}`), ` ${when(d.at)}: `, h("span", { id: "decision-why" }, d.why)]
      : h("span", { class: "muted" }, "No scaling decision yet."));
  }

  function renderReplicas() {
    fill(replicas, svc.replicas.length
      ? replicaTable("replicas", svc.replicas)
      : h("p", { class: "muted", id: "no-replicas" }, svc.status === "idle" ? "Scaled to zero: the next request starts one." : "No replica."));
    fill(ended, svc.ended.length
      ? h("details", {}, h("summary", {}, `Ended replicas (${svc.ended.length})`), replicaTable("ended", svc.ended))
      : null);
  }

  function update(next) {
    svc = next;
    fill(badge, serviceBadge(svc));
    document.title = `${svc.name} · Runyard`;
    const stopping = svc.desired === "stop";
    stop.hidden = stopping || !mayChange(svc);
    stop.disabled = stopping;
    scaleSection.hidden = !mayChange(svc);
    if (!edited && document.activeElement !== minInput && document.activeElement !== maxInput) {
      minInput.value = String(svc.min);
      maxInput.value = String(svc.max);
    }
    reason.hidden = !svc.reason;
    fill(reason, svc.reason || "");
    policyError.hidden = !svc.policy_error;
    fill(policyError, svc.policy_error ? `Policy error (the default policy applies): ${svc.policy_error}` : "");
    renderFacts();
    renderTraffic();
    renderReplicas();
  }

  update(svc);
  poll(async () => {
    try {
      update(await api(path, { signal }));
      fill(loadError);
    } catch (err) {
      if (signal.aborted) return;
      if (err instanceof ApiError && err.status === 404) {
        stop.hidden = true;
        scaleSection.hidden = true;
        fill(loadError, "This service was removed.");
      } else {
        fill(loadError, err.message);
      }
    }
  }, POLL_MS, signal);
  poll(async () => {
    const r = await api(`${path}/history`, { signal });
    const svg = historyPlot(r.points);
    if (svg) fill(plot, svg);
  }, HISTORY_MS, signal);
}
