// A service's recent history as one small inline SVG: replicas and ready replicas (steps, on the
// left axis, a count) and the request rate (on the right axis, req/s) over time. Drawn here from
// the history route's points; colours come from the stylesheet (classes), never inline styles.

const NS = "http://www.w3.org/2000/svg";
const W = 640;
const H = 200;
const M = { left: 34, right: 46, top: 22, bottom: 22 };

function s(tag, attrs, ...children) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined) el.setAttribute(k, String(v));
  }
  for (const c of children) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

/** The smallest of 1, 2, 5 × 10^k that is at least `v` (at least `floor`). */
function niceCeil(v, floor) {
  if (!(v > floor)) return floor;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function rateLabel(v) {
  return v >= 100 || v === 0 ? String(Math.round(v)) : String(Number(v.toPrecision(2)));
}

function clock(t) {
  return new Date(t).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

/**
 * The plot of `points` ([{at, replicas, ready, rate}], oldest first) as an <svg> element, or
 * null when there are none.
 */
export function historyPlot(points) {
  if (!points.length) return null;
  const times = points.map((p) => Date.parse(p.at));
  const t1 = times[times.length - 1];
  const t0 = Math.min(times[0], t1 - 60000); // at least a minute wide
  const countMax = niceCeil(Math.max(...points.map((p) => Math.max(p.replicas, p.ready))), 1);
  const rateMax = niceCeil(Math.max(...points.map((p) => p.rate)), 1);
  const x = (t) => M.left + ((t - t0) / (t1 - t0)) * (W - M.left - M.right);
  const y = (v, max) => H - M.bottom - (v / max) * (H - M.top - M.bottom);
  const f = (n) => n.toFixed(1);

  // Counts change at a point and hold until the next: steps. The rate is a line.
  const steps = (key) => {
    const out = [];
    points.forEach((p, i) => {
      if (i > 0) out.push(`${f(x(times[i]))},${f(y(points[i - 1][key], countMax))}`);
      out.push(`${f(x(times[i]))},${f(y(p[key], countMax))}`);
    });
    return out.join(" ");
  };
  const rate = points.map((p, i) => `${f(x(times[i]))},${f(y(p.rate, rateMax))}`).join(" ");

  const axes = [];
  const countStep = Math.max(1, Math.ceil(countMax / 4));
  for (let v = 0; v <= countMax; v += countStep) {
    axes.push(s("line", { class: "grid", x1: M.left, x2: W - M.right, y1: f(y(v, countMax)), y2: f(y(v, countMax)) }));
    axes.push(s("text", { x: M.left - 6, y: f(y(v, countMax) + 4), "text-anchor": "end", class: "count" }, v));
  }
  for (const v of [0, rateMax / 2, rateMax]) {
    axes.push(s("text", { x: W - M.right + 6, y: f(y(v, rateMax) + 4), class: "rate" }, rateLabel(v)));
  }
  axes.push(s("text", { x: M.left, y: H - 6 }, clock(t0)));
  axes.push(s("text", { x: W - M.right, y: H - 6, "text-anchor": "end" }, clock(t1)));
  axes.push(s("text", { x: 2, y: M.top - 10, class: "count" }, "replicas"));
  axes.push(s("text", { x: W - 2, y: M.top - 10, "text-anchor": "end", class: "rate" }, "req/s"));

  // The newest value of each series as a dot: a single point shows too.
  const last = points[points.length - 1];
  const dot = (cls, v, max) => s("circle", { class: `dot ${cls}`, cx: f(x(t1)), cy: f(y(v, max)), r: 3 });
  return s("svg", {
    viewBox: `0 0 ${W} ${H}`, role: "img", "data-points": points.length,
    "aria-label": `Replicas, ready replicas and requests per second since ${clock(t0)}; now ${last.replicas} replicas, ${last.ready} ready, ${rateLabel(last.rate)} req/s`,
  },
  ...axes,
  s("polyline", { class: "series rate", points: rate, "data-series": "rate" }),
  s("polyline", { class: "series replicas", points: steps("replicas"), "data-series": "replicas" }),
  s("polyline", { class: "series ready", points: steps("ready"), "data-series": "ready" }),
  dot("rate", last.rate, rateMax), dot("replicas", last.replicas, countMax), dot("ready", last.ready, countMax));
}
