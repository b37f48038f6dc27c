// New run: a form with every field of the job spec. The API validates (the same rules as the
// CLI); its error names a field and the message is shown next to that field. "Run again" opens
// this form prefilled from an earlier job's spec (#/new?from=ID).

import { api, ApiError, maySubmit, me } from "./api.js";
import { fill, h } from "./dom.js";

// name -> [label, hint, kind]
const FIELDS = [
  ["repo", "Repository", "Git URL: https, ssh, git, file, or user@host:path", "text", true],
  ["revision", "Revision", "Branch, tag or commit; empty for the default branch", "text"],
  ["script", "Script", "Path of the Python script in the repository, e.g. train.py", "text"],
  ["entry_point", "Entry point", "Or an MLproject entry point (main when there is no script)", "text"],
  ["name", "Name", "Defaults to the script's file name", "text"],
  ["args", "Arguments", "One argument per line, passed as is (no shell)", "lines", true],
  ["parameters", "Parameters", "An entry point's parameters, one NAME=VALUE per line", "lines"],
  ["requirements", "Requirements", "One pip requirement per line, e.g. lightning>=2", "lines"],
  ["requirements_file", "Requirements file", "A requirements file in the repository", "text"],
  ["env", "Environment", "One KEY=VALUE per line", "lines"],
  ["compute", "Compute", "cpu-small, one GPU, or several GPUs on one machine", "compute"],
  ["timeout", "Timeout", "Per attempt, e.g. 30m or 2h; empty for no limit", "text"],
  ["retries", "Retries", "How many times a failing script runs again", "number"],
  ["stop_grace", "Stop grace", "Between SIGTERM and SIGKILL on stop, e.g. 10s", "text"],
];

export async function formPage(main, params, signal) {
  if (!maySubmit()) {
    fill(main, h("h1", {}, "New run"),
      h("p", { class: "error", id: "form-forbidden" }, `${me().name} is a ${me().role}: a viewer cannot submit runs.`));
    return;
  }
  const inputs = {};
  const errors = {};
  const fields = {};
  const formError = h("p", { class: "error", id: "form-error", role: "alert" });

  function control(name, kind) {
    if (kind === "lines") return h("textarea", { id: `f-${name}`, name, rows: 3, spellcheck: "false" });
    if (kind === "number") return h("input", { id: `f-${name}`, name, type: "number", min: 0, max: 100, step: 1, inputmode: "numeric" });
    return h("input", { id: `f-${name}`, name, type: "text", spellcheck: "false", autocapitalize: "off" });
  }

  const kindSel = h("select", { id: "f-compute", name: "compute" },
    h("option", { value: "cpu-small" }, "cpu-small"), h("option", { value: "gpu" }, "GPU"));
  const gpuCount = h("input", { id: "f-gpus", name: "gpus", type: "number", min: 1, max: 64, value: 1, "aria-label": "GPUs", hidden: true });
  kindSel.addEventListener("change", () => { gpuCount.hidden = kindSel.value !== "gpu"; });

  const form = h("form", { class: "spec", id: "new-run", novalidate: true });
  for (const [name, label, hint, kind, wide] of FIELDS) {
    const el = kind === "compute" ? h("div", { class: "compute" }, kindSel, gpuCount) : control(name, kind);
    inputs[name] = kind === "compute" ? kindSel : el;
    errors[name] = h("p", { class: "field-error", id: `err-${name}`, "data-field": name, role: "alert" });
    fields[name] = h("div", { class: `field${wide ? " wide" : ""}`, "data-field": name },
      h("label", { for: kind === "compute" ? "f-compute" : `f-${name}` }, label),
      el, h("span", { class: "hint" }, hint), errors[name]);
    form.append(fields[name]);
  }
  const submit = h("button", { type: "submit", class: "primary", id: "submit-run" }, "Start run");
  form.append(h("div", { class: "submit" }, submit, formError));

  fill(main, h("h1", {}, params.from ? "Run again" : "New run"), form);

  if (params.from) {
    try {
      const job = await api(`/api/v1/jobs/${encodeURIComponent(params.from)}`, { signal });
      prefill(job.spec);
    } catch (err) {
      if (!signal.aborted) fill(formError, `Cannot load run ${params.from}: ${err.message}`);
    }
  }

  function prefill(spec) {
    const set = (name, v) => { inputs[name].value = v === undefined || v === null ? "" : String(v); };
    set("repo", spec.repo);
    set("revision", spec.revision);
    set("script", spec.script);
    set("entry_point", spec.entry_point);
    set("parameters", Object.entries(spec.parameters || {}).map(([k, v]) => `${k}=${v}`).join("\n"));
    set("name", spec.name);
    set("args", (spec.args || []).join("\n"));
    set("requirements", (spec.requirements || []).join("\n"));
    set("requirements_file", spec.requirements_file);
    set("env", Object.entries(spec.env || {}).map(([k, v]) => `${k}=${v}`).join("\n"));
    set("timeout", spec.timeout);
    set("retries", spec.retries || "");
    set("stop_grace", spec.stop_grace);
    const compute = spec.compute || "cpu-small";
    if (compute === "cpu-small") {
      kindSel.value = "cpu-small";
    } else {
      kindSel.value = "gpu";
      gpuCount.value = compute === "gpu" ? 1 : compute.split(":")[1];
    }
    gpuCount.hidden = kindSel.value !== "gpu";
  }

  function clearErrors() {
    for (const name of Object.keys(errors)) {
      fill(errors[name]);
      fields[name].classList.remove("invalid");
    }
    fill(formError);
  }

  // Shows `message` next to the field an API error names (`requirements[2]` -> requirements).
  function showError(field, message) {
    const base = (field || "").split(/[.[]/)[0];
    if (errors[base]) {
      fill(errors[base], message);
      fields[base].classList.add("invalid");
      inputs[base].focus();
    } else {
      fill(formError, message);
    }
  }

  function lines(name) {
    return inputs[name].value.split("\n").map((l) => l.trim()).filter((l) => l !== "");
  }

  function spec() {
    const s = { repo: inputs.repo.value.trim() };
    for (const name of ["script", "entry_point", "name", "revision", "requirements_file", "timeout", "stop_grace"]) {
      const v = inputs[name].value.trim();
      if (v) s[name] = v;
    }
    const args = inputs.args.value.split("\n");
    while (args.length && args[args.length - 1] === "") args.pop();
    if (args.length) s.args = args;
    const reqs = lines("requirements").filter((l) => !l.startsWith("#"));
    if (reqs.length) s.requirements = reqs;
    const pairs = (field, what) => {
      const out = {};
      for (const line of lines(field)) {
        const eq = line.indexOf("=");
        if (eq <= 0) throw new ApiError(400, `\`${line}\` is not ${what}=VALUE`, field);
        out[line.slice(0, eq).trim()] = line.slice(eq + 1);
      }
      return out;
    };
    const env = pairs("env", "KEY");
    if (Object.keys(env).length) s.env = env;
    const parameters = pairs("parameters", "NAME");
    if (Object.keys(parameters).length) s.parameters = parameters;
    if (kindSel.value === "gpu") {
      const n = gpuCount.value.trim();
      s.compute = n === "" || n === "1" ? "gpu" : `gpu:${n}`;
    } else {
      s.compute = "cpu-small";
    }
    const retries = inputs.retries.value.trim();
    if (retries !== "") {
      const n = Number(retries);
      if (!Number.isInteger(n) || n < 0) throw new ApiError(400, `\`${retries}\` is not a whole number`, "retries");
      s.retries = n;
    }
    return s;
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearErrors();
    submit.disabled = true;
    try {
      const job = await api("/api/v1/jobs", { method: "POST", body: spec(), signal });
      location.hash = `#/runs/${encodeURIComponent(job.id)}`;
    } catch (err) {
      if (signal.aborted) return;
      if (err instanceof ApiError && err.status === 400) showError(err.field, err.message);
      else fill(formError, err.message);
    } finally {
      submit.disabled = false;
    }
  });
}
