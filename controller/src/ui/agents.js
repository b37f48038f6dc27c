// Agents: each agent with its compute, GPUs (name, memory, utilisation), the jobs placed on it
// and when it was last seen; refreshed by the event stream's `agents` events.

import { api, events } from "./api.js";
import { age, bytes, fill, h } from "./dom.js";

export function agentsPage(main, _params, signal) {
  const tbody = h("tbody", { id: "agents-body" });
  const empty = h("div", { class: "empty", hidden: true }, "No agent has connected yet.");
  const error = h("p", { class: "error", role: "alert" });
  fill(main,
    h("h1", {}, "Agents"),
    error,
    h("div", { class: "table-wrap" },
      h("table", { id: "agents" },
        h("thead", {}, h("tr", {},
          h("th", {}, "Agent"), h("th", {}, "Compute"), h("th", {}, "GPUs"),
          h("th", { class: "hide-narrow" }, "Machine"), h("th", {}, "Jobs"), h("th", {}, "Last seen"))),
        tbody),
      empty));

  function gpu(g) {
    const mem = `${bytes(g.memory_used_bytes)} / ${bytes(g.memory_total_bytes)}`;
    return h("div", { class: "gpu" }, `#${g.index} ${g.name}, ${mem}, ${g.utilization_percent}% busy`);
  }

  function render(agents) {
    fill(tbody, agents.map((a) => {
      const compute = [];
      if (a.gpus.length) compute.push(`gpu ×${a.gpus.length}`);
      if (a.cpu_small_slots) compute.push(`cpu-small ×${a.cpu_small_slots}`);
      return h("tr", { "data-agent": a.name },
        h("td", {}, a.name, " ", h("span", { class: `status ${a.connected ? "running" : "lost"}` }, a.connected ? "connected" : "disconnected")),
        h("td", {}, compute.join(", ") || "none"),
        h("td", {}, a.gpus.length ? a.gpus.map(gpu) : h("span", { class: "muted" }, "none")),
        h("td", { class: "hide-narrow" }, `${a.cpus} CPUs, ${bytes(a.memory_bytes)}`, h("div", { class: "muted" }, `v${a.version}`)),
        h("td", {}, a.jobs.length
          ? a.jobs.map((id) => h("div", {}, h("a", { href: `#/runs/${encodeURIComponent(id)}` }, id)))
          : h("span", { class: "muted" }, "idle")),
        h("td", {}, a.connected ? "now" : age(a.last_seen)));
    }));
    empty.hidden = agents.length > 0;
  }

  api("/api/v1/agents", { signal }).then((r) => render(r.agents)).catch((err) => {
    if (!signal.aborted) fill(error, err.message);
  });
  events("", { agents: render }, signal);
}
