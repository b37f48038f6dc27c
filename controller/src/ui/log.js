// A log view that keeps up with thousands of lines per second: text is buffered and rendered
// once per animation frame; the DOM holds at most `maxDom` lines (older ones are dropped from the
// DOM but counted), memory keeps the last `maxKept` lines for search.

import { h } from "./dom.js";

export class LogView {
  constructor({ maxDom = 5000, maxKept = 100000 } = {}) {
    this.maxDom = maxDom;
    this.maxKept = maxKept;
    this.lines = []; // strings, or { sep } for attempt separators
    this.forgotten = 0; // lines dropped from memory too
    this.total = 0; // every line received
    this.partial = "";
    this.pending = []; // lines received since the last frame
    this.domCount = 0; // line elements in the pane
    this.follow = true;
    this.query = "";
    this.scheduled = false;

    this.info = h("span", { class: "muted", id: "log-info" }, "");
    this.search = h("input", { type: "search", id: "log-search", placeholder: "Search loaded lines", "aria-label": "Search the log" });
    this.end = h("button", { type: "button", id: "log-end" }, "Jump to end");
    this.dropped = h("div", { class: "dropped", id: "log-dropped", hidden: true });
    this.tail = h("div", { class: "l partial" });
    this.pane = h("div", { class: "log", id: "log", tabindex: 0, "data-total": 0 }, this.dropped, this.tail);
    this.element = h("div", { class: "logview" },
      h("div", { class: "log-tools" }, this.search, this.end, this.info), this.pane);

    this.pane.addEventListener("scroll", () => {
      this.follow = this.atBottom();
    });
    this.end.addEventListener("click", () => {
      this.follow = true;
      this.pane.scrollTop = this.pane.scrollHeight;
    });
    let timer = null;
    const changed = () => {
      clearTimeout(timer);
      timer = setTimeout(() => {
        if (this.search.value.trim().toLowerCase() !== this.query) this.setQuery(this.search.value);
      }, 150);
    };
    // `change` too: clearing the box by script or WebDriver sends no `input`.
    for (const kind of ["input", "change", "search"]) this.search.addEventListener(kind, changed);
  }

  atBottom() {
    return this.pane.scrollTop + this.pane.clientHeight >= this.pane.scrollHeight - 8;
  }

  /** Adds raw text; complete lines are rendered on the next frame. */
  append(text) {
    const parts = (this.partial + text).split("\n");
    this.partial = parts.pop();
    for (const line of parts) this.push(line);
    this.schedule();
  }

  /** A marker line between attempts. */
  separator(label) {
    if (this.partial) {
      this.push(this.partial);
      this.partial = "";
    }
    this.push({ sep: label });
    this.schedule();
  }

  push(line) {
    this.lines.push(line);
    this.pending.push(line);
    if (typeof line === "string") this.total += 1;
    if (this.lines.length > this.maxKept * 1.1) {
      const cut = this.lines.length - this.maxKept;
      this.forgotten += this.lines.slice(0, cut).filter((l) => typeof l === "string").length;
      this.lines.splice(0, cut);
    }
  }

  schedule() {
    if (this.scheduled) return;
    this.scheduled = true;
    requestAnimationFrame(() => {
      this.scheduled = false;
      this.render();
    });
  }

  lineElement(line) {
    if (typeof line !== "string") return h("div", { class: "l sep" }, `── ${line.sep} ──`);
    const el = h("div", { class: "l" });
    if (!this.query) {
      el.textContent = line;
      return el;
    }
    const lower = line.toLowerCase();
    let at = 0;
    for (;;) {
      const i = lower.indexOf(this.query, at);
      if (i < 0) break;
      el.append(line.slice(at, i), h("mark", {}, line.slice(i, i + this.query.length)));
      at = i + this.query.length;
    }
    el.append(line.slice(at));
    return el;
  }

  matches(line) {
    return !this.query || (typeof line === "string" && line.toLowerCase().includes(this.query));
  }

  render() {
    const follow = this.follow;
    let fresh = this.pending.filter((l) => this.matches(l));
    this.pending = [];
    if (fresh.length > this.maxDom) fresh = fresh.slice(fresh.length - this.maxDom);
    const frag = document.createDocumentFragment();
    for (const line of fresh) frag.append(this.lineElement(line));
    this.pane.insertBefore(frag, this.tail);
    this.domCount += fresh.length;
    while (this.domCount > this.maxDom) {
      this.dropped.nextSibling.remove();
      this.domCount -= 1;
    }
    this.tail.textContent = this.query ? "" : this.partial;
    this.updateInfo();
    if (follow) this.pane.scrollTop = this.pane.scrollHeight;
  }

  updateInfo() {
    const shown = this.pane.querySelectorAll(".l:not(.sep):not(.partial)").length;
    this.pane.dataset.total = String(this.total);
    if (this.query) {
      const n = this.lines.filter((l) => this.matches(l)).length;
      const loaded = this.total - this.forgotten;
      this.info.textContent = `${n} matching of ${loaded} loaded lines${n > this.maxDom ? ` (last ${this.maxDom} shown)` : ""}`;
      this.dropped.hidden = true;
      return;
    }
    const hidden = this.total - shown;
    this.info.textContent = `${this.total} lines`;
    this.dropped.hidden = hidden <= 0;
    this.dropped.textContent = hidden > 0 ? `… ${hidden} earlier lines not shown (search covers the last ${this.maxKept})` : "";
  }

  setQuery(q) {
    this.query = q.trim().toLowerCase();
    // Rebuild the pane from memory: matching lines (or the tail of the log) up to maxDom.
    while (this.dropped.nextSibling !== this.tail) this.dropped.nextSibling.remove();
    this.domCount = 0;
    this.pending = this.lines.filter((l) => this.matches(l));
    this.follow = true;
    this.render();
  }

  /** The text of the lines in the DOM (for tests and copying). */
  text() {
    return [...this.pane.querySelectorAll(".l:not(.sep)")].map((e) => e.textContent).join("\n");
  }
}
