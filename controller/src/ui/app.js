// The page's entry: sign-in, the hash router (#/runs, #/new, #/runs/ID, #/services,
// #/services/NAME, #/agents) and the header. Each page is a function (main, params, signal) that
// renders into `main` and stops its streams (and polling) when `signal` aborts (on navigation or
// sign-out).

import { api, maySubmit, me, setMe, setToken, token, whenConnectionChanges, whenUnauthorized } from "./api.js";
import { fill, h } from "./dom.js";
import { runsPage } from "./runs.js";
import { formPage } from "./form.js";
import { runPage } from "./run.js";
import { agentsPage } from "./agents.js";
import { servicesPage } from "./services.js";
import { servicePage } from "./service.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const conn = document.getElementById("conn");
const whoLabel = document.getElementById("who");
let current = null;

function route() {
  const hash = location.hash.replace(/^#/, "") || "/runs";
  const [path, query] = hash.split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean);
  if (parts[0] === "runs" && parts[1]) return { page: runPage, name: "runs", params: { id: decodeURIComponent(parts[1]) } };
  if (parts[0] === "new") return { page: formPage, name: "new", params: { from: params.get("from") } };
  if (parts[0] === "services" && parts[1]) return { page: servicePage, name: "services", params: { name: decodeURIComponent(parts[1]) } };
  if (parts[0] === "services") return { page: servicesPage, name: "services", params: {} };
  if (parts[0] === "agents") return { page: agentsPage, name: "agents", params: {} };
  return { page: runsPage, name: "runs", params: { status: params.get("status") || "" } };
}

async function render() {
  if (current) current.abort();
  current = new AbortController();
  if (!token()) {
    signIn();
    return;
  }
  if (!me()) {
    // A reload: ask again who the stored token is.
    try {
      setMe(await api("/api/v1/whoami", { checkingToken: true }));
      // Share it with service links again (another tab's sign-out clears the cookie).
      setToken(token());
    } catch (err) {
      setToken(null);
      signIn(err.status === 401 ? "The token was refused; sign in again." : `Cannot reach the controller: ${err.message}`);
      return;
    }
  }
  fill(whoLabel, `${me().name} (${me().role})`);
  nav.querySelector("a[data-nav=new]").hidden = !maySubmit();
  nav.hidden = false;
  const r = route();
  for (const a of nav.querySelectorAll("a[data-nav]")) a.classList.toggle("active", a.dataset.nav === r.name);
  fill(main);
  r.page(main, r.params, current.signal);
}

function signIn(message) {
  if (current) current.abort();
  current = new AbortController();
  nav.hidden = true;
  conn.hidden = true;
  const input = h("input", { id: "token", name: "token", type: "password", autocomplete: "current-password", required: true });
  const error = h("p", { id: "signin-error", class: "error", role: "alert" }, message || "");
  const button = h("button", { type: "submit", class: "primary", id: "signin-submit" }, "Sign in");
  const form = h("form", { class: "signin", id: "signin" },
    h("h1", {}, "Sign in to Runyard"),
    h("p", { class: "muted" }, "Paste your API token: one made with `runyard token create`, or the controller's admin token (admin.token in its data dir)."),
    h("p", {}, h("label", { for: "token" }, "API token"), input),
    error,
    button);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const t = input.value.trim();
    if (!t) return;
    button.disabled = true;
    setToken(t);
    try {
      setMe(await api("/api/v1/whoami", { checkingToken: true }));
      if (!location.hash || location.hash === "#/" || location.hash === "#") location.hash = "#/runs";
      render();
    } catch (err) {
      setToken(null);
      setMe(null);
      fill(error, err.status === 401 ? "That token is not valid." : `Cannot reach the controller: ${err.message}`);
      button.disabled = false;
    }
  });
  fill(main, form);
  input.focus();
}

whenUnauthorized(() => {
  setToken(null);
  setMe(null);
  signIn("The token was refused; sign in again.");
});

whenConnectionChanges((down) => {
  conn.hidden = !down;
  fill(conn, down ? "Reconnecting to the controller…" : "");
});

document.getElementById("sign-out").addEventListener("click", () => {
  setToken(null);
  setMe(null);
  signIn();
});

window.addEventListener("hashchange", render);
render();
