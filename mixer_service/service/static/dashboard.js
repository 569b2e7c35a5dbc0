// mixer-service dashboard: polls the JSON API and draws SVG charts. No dependencies, no build step.
// URL parameters: token (bearer token for the API), job (selected job), source (repetition source),
// refresh (seconds between refreshes, default 3).
"use strict";

(() => {
  const params = new URLSearchParams(location.search);
  const TOKEN = params.get("token");
  const REFRESH_S = Math.min(600, Math.max(1, Number(params.get("refresh")) || 3));
  const COLORS = ["#2563eb", "#ea580c", "#16a34a", "#9333ea"];
  const SVG_NS = "http://www.w3.org/2000/svg";
  const MAX_SAMPLES = 60; // throughput samples kept per job (one per refresh)
  const TOP_DOCS = 40;

  const state = {
    job: params.get("job"),
    source: params.get("source"),
    samples: new Map(), // job -> [{t, batches, tokens, highWater}]
    refreshes: 0,
  };

  // ---- API ------------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  async function api(path, okStatuses = []) {
    const headers = TOKEN ? { Authorization: "Bearer " + TOKEN } : {};
    let response;
    try {
      response = await fetch(path, { headers, cache: "no-store" });
    } catch (err) {
      throw new ApiError(0, `cannot reach the server (${err.message})`);
    }
    if (!response.ok && !okStatuses.includes(response.status)) {
      let detail = response.statusText;
      try {
        const problem = await response.json();
        detail = problem.detail || problem.title || detail;
      } catch (_) { /* not problem+json */ }
      const hint = response.status === 401 ? " — open this page with ?token=<reader token>" : "";
      throw new ApiError(response.status, `GET ${path}: HTTP ${response.status} ${detail}${hint}`);
    }
    return response.json();
  }

  const jobPath = (job) => "v1/jobs/" + encodeURIComponent(job);

  // ---- formatting -----------------------------------------------------------------------------------

  const NUMBER = new Intl.NumberFormat("en-US");
  const fmt = (n) => (n === null || n === undefined || Number.isNaN(n) ? "–" : NUMBER.format(n));
  function fmtRate(x) {
    if (x === null || x === undefined || !Number.isFinite(x)) return "–";
    if (x >= 1e6) return (x / 1e6).toFixed(2) + "M";
    if (x >= 1e4) return (x / 1e3).toFixed(1) + "k";
    return x >= 100 ? x.toFixed(0) : x.toFixed(1);
  }
  const fmtTime = (epoch) => new Date(epoch * 1000).toLocaleString("en-GB", { hour12: false });
  const pct = (x) => (100 * x).toFixed(1) + "%";

  /** A weight as the server stores it: a number or an exact "p/q" string. */
  function weightValue(w) {
    if (typeof w === "number") return w;
    const [p, q] = String(w).split("/");
    return q === undefined ? Number(p) : Number(p) / Number(q);
  }

  function phasesText(schedule) {
    return (schedule.phases || []).map((p) => {
      const ws = Object.entries(p.weights || {}).filter(([, w]) => weightValue(w) !== 0)
        .map(([n, w]) => `${n}=${w}`).join(" ");
      return `${p.start_step}${p.ramp ? " ramp" : ""}: ${ws}`;
    }).join(" | ");
  }

  // ---- DOM helpers ----------------------------------------------------------------------------------

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs = {}, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") node.className = v; else node.setAttribute(k, v);
    }
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function svgEl(tag, attrs = {}, parent, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }

  function tooltip(node, text) { svgEl("title", {}, node, text); return node; }

  function kpi(label, value, sub) {
    const box = el("div", { class: "kpi" });
    box.append(el("div", { class: "label" }, label), el("div", { class: "value" }, value));
    if (sub) box.append(el("div", { class: "sub" }, sub));
    return box;
  }

  function swatch(color) {
    const s = el("span", { class: "swatch" });
    s.style.background = color;
    return s;
  }

  /** Round tick values from 0 up to the first one at or above `max` (so the last tick can be the scale). */
  function ticks(max, count = 5) {
    if (max <= 0) return [0, 1];
    const raw = max / count;
    const mag = 10 ** Math.floor(Math.log10(raw));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw);
    const out = [0];
    while (out[out.length - 1] < max - 1e-9) out.push(Math.round(out.length * step * 1e6) / 1e6);
    return out;
  }

  function newChart(container, width, height, label) {
    container.replaceChildren();
    return svgEl("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": label }, container);
  }

  // ---- schedule chart -------------------------------------------------------------------------------

  /** Index of the phase in force at `step` (the last one starting at or before it). */
  function phaseIndex(phases, step) {
    let i = 0;
    while (i + 1 < phases.length && phases[i + 1].start_step <= step) i++;
    return i;
  }

  /** Weight of `source` at `step` under phase `i`: constant, or interpolated when the phase ramps. */
  function phaseWeight(phases, i, source, step) {
    const here = weightValue((phases[i].weights || {})[source] || 0);
    const next = phases[i + 1];
    if (!phases[i].ramp || !next) return here;
    const there = weightValue((next.weights || {})[source] || 0);
    const f = (step - phases[i].start_step) / (next.start_step - phases[i].start_step);
    return here + (there - here) * f;
  }

  /**
   * Piecewise-linear weight curves over [0, total) from the schedule log: each version governs from its
   * effective step until the next version's; inside, its phases (constant or ramping) apply.
   */
  function scheduleCurves(versions, sources, total) {
    const cuts = new Set([0, total]);
    versions.forEach((v, k) => {
      const end = k + 1 < versions.length ? versions[k + 1].effective_step : total;
      cuts.add(Math.min(v.effective_step, total));
      for (const p of v.schedule.phases || []) {
        if (p.start_step > v.effective_step && p.start_step < end) cuts.add(p.start_step);
      }
    });
    const xs = [...cuts].sort((a, b) => a - b);
    const curves = Object.fromEntries(sources.map((s) => [s, []]));
    for (let j = 0; j + 1 < xs.length; j++) {
      const a = xs[j], b = xs[j + 1];
      let v = versions[0];
      for (const cand of versions) if (cand.effective_step <= a) v = cand;
      const phases = v.schedule.phases || [];
      const i = phaseIndex(phases, a);
      for (const s of sources) {
        curves[s].push([a, phaseWeight(phases, i, s, a)], [b, phaseWeight(phases, i, s, b)]);
      }
    }
    return curves;
  }

  function drawSchedule(job, versions) {
    const sources = job.config.sources.map((s) => s.name);
    const total = job.config.total_steps;
    const W = 900, H = 270, L = 44, R = 16, T = 22, B = 30;
    const svg = newChart($("schedule-chart"), W, H, "schedule weights over steps");
    const x = (step) => L + (W - L - R) * (step / total);
    const y = (w) => T + (H - T - B) * (1 - w);

    if (job.served_high_water >= 0) {
      tooltip(svgEl("rect", { class: "served", x: L, y: T, width: x(job.served_high_water + 1) - L,
        height: H - T - B }, svg), `steps 0..${job.served_high_water} served`);
    }
    for (const w of [0, 0.25, 0.5, 0.75, 1]) {
      svgEl("line", { class: "grid-line", x1: L, x2: W - R, y1: y(w), y2: y(w) }, svg);
      svgEl("text", { x: L - 6, y: y(w) + 4, "text-anchor": "end" }, svg, w.toFixed(2));
    }
    for (const t of ticks(total, 8).filter((t) => t <= total)) {
      svgEl("text", { x: x(t), y: H - B + 16, "text-anchor": "middle" }, svg, fmt(t));
    }
    svgEl("line", { class: "axis", x1: L, x2: W - R, y1: y(0), y2: y(0) }, svg);
    svgEl("line", { class: "axis", x1: L, x2: L, y1: T, y2: y(0) }, svg);
    svgEl("text", { x: W - R, y: H - 2, "text-anchor": "end" }, svg, "step");

    const markers = [];
    if (job.trained_step >= 0) markers.push(["trained", job.trained_step]);
    if (job.served_high_water >= 0) markers.push(["served", job.served_high_water]);
    for (const [name, step] of markers) {  // trained label left of its line, served label right of its own
      const right = name === "served";
      svgEl("line", { class: "progress-marker", x1: x(step), x2: x(step), y1: T, y2: y(0) }, svg);
      svgEl("text", { x: x(step) + (right ? 4 : -4), y: y(0) - 6, "text-anchor": right ? "start" : "end" }, svg,
        `${name} ${fmt(step)}`);
    }
    for (const v of versions) {
      const line = svgEl("line", { class: "version-marker", "data-version": v.version, x1: x(v.effective_step),
        x2: x(v.effective_step), y1: T - 4, y2: y(0) }, svg);
      tooltip(line, `v${v.version} from step ${v.effective_step}: ${v.reason || ""} (${v.author || "?"})`);
      svgEl("text", { class: "version-label", x: x(v.effective_step) + 3, y: T - 8 }, svg, `v${v.version}`);
    }

    const curves = scheduleCurves(versions, sources, total);
    sources.forEach((s, k) => {
      const d = curves[s].map(([step, w], n) => `${n ? "L" : "M"}${x(step).toFixed(1)},${y(w).toFixed(1)}`);
      const path = svgEl("path", { class: "series", "data-source": s, d: d.join(" "),
        stroke: COLORS[k % COLORS.length] }, svg);
      tooltip(path, s);
    });

    const legend = $("legend");
    legend.replaceChildren(...sources.map((s, k) => {
      const item = el("span", { class: "legend-item", "data-source": s });
      item.append(swatch(COLORS[k % COLORS.length]), document.createTextNode(s));
      return item;
    }));
  }

  // ---- other charts ---------------------------------------------------------------------------------

  function drawTokens(job) {
    const entries = job.config.sources.map((s) => [s.name, job.tokens_through_high_water[s.name] || 0]);
    const total = entries.reduce((acc, [, n]) => acc + n, 0);
    const max = Math.max(1, ...entries.map(([, n]) => n));
    const W = 440, rowH = 34, L = 70, R = 150, H = entries.length * rowH + 8;
    const svg = newChart($("tokens-chart"), W, H, "tokens per source");
    entries.forEach(([name, n], k) => {
      const top = 4 + k * rowH;
      svgEl("text", { x: L - 8, y: top + 19, "text-anchor": "end", class: "value-label" }, svg, name);
      const width = Math.max(1, (W - L - R) * (n / max));
      tooltip(svgEl("rect", { class: "token-bar", "data-source": name, x: L, y: top + 5, width, height: rowH - 12,
        rx: 3, fill: COLORS[k % COLORS.length] }, svg), `${name}: ${fmt(n)} tokens`);
      svgEl("text", { x: L + width + 6, y: top + 19, class: "value-label" }, svg,
        `${fmt(n)} (${total ? pct(n / total) : "–"})`);
    });
  }

  function drawHistogram(hist) {
    const bins = Object.entries(hist.histogram).map(([k, n]) => [Number(k), n]).sort((a, b) => a[0] - b[0]);
    const W = 440, H = 220, L = 56, R = 10, T = 12, B = 34;
    const svg = newChart($("histogram-chart"), W, H, "repetition histogram");
    if (!bins.length) return;
    const lo = bins[0][0], hi = bins[bins.length - 1][0];
    const slots = hi - lo + 1; // every count in range gets a slot, so gaps stay visible
    const scale = ticks(Math.max(...bins.map(([, n]) => n)), 4);
    const max = scale[scale.length - 1];
    const y = (n) => T + (H - T - B) * (1 - n / max);
    for (const t of scale) {
      svgEl("line", { class: "grid-line", x1: L, x2: W - R, y1: y(t), y2: y(t) }, svg);
      svgEl("text", { x: L - 6, y: y(t) + 4, "text-anchor": "end" }, svg, fmt(t));
    }
    const slotW = Math.min(64, (W - L - R) / slots);
    const labelEvery = Math.ceil(slots / 12);
    const x0 = L + ((W - L - R) - slots * slotW) / 2; // few slots: narrow bars, centred
    for (const [count, n] of bins) {
      const left = x0 + (count - lo) * slotW;
      tooltip(svgEl("rect", { class: "bar", "data-count": count, x: left + slotW * 0.1, y: y(n),
        width: Math.max(1, slotW * 0.8), height: y(0) - y(n) }, svg), `${fmt(n)} documents seen ${count}×`);
      if ((count - lo) % labelEvery === 0) {
        svgEl("text", { x: left + slotW / 2, y: H - B + 15, "text-anchor": "middle" }, svg, String(count));
      }
    }
    svgEl("line", { class: "axis", x1: L, x2: W - R, y1: y(0), y2: y(0) }, svg);
    svgEl("text", { x: (L + W - R) / 2, y: H - 3, "text-anchor": "middle" }, svg, "times seen");
    svgEl("text", { x: 12, y: T + (H - T - B) / 2, "text-anchor": "middle",
      transform: `rotate(-90 12 ${T + (H - T - B) / 2})` }, svg, "documents");
  }

  function drawForecast(fc) {
    const W = 900, H = 240, L = 56, R = 56, T = 12, B = 34;
    const svg = newChart($("forecast-chart"), W, H, "domain loss: observed vs forecast, repetitions");
    const turn = fc.turn_up_step === null ? "no turn-up forecast" : `turn-up at step ${fmt(fc.turn_up_step)}`;
    $("forecast-summary").textContent = fc.curve.length
      ? `(${fc.source}: ${turn}${fc.warning ? " — WARNING" : ""})` : `(${fc.notes.join("; ")})`;
    if (!fc.curve.length) return;
    const losses = fc.curve.flatMap((c) => [c[3], c[4]]).concat(fc.observed.map((o) => o[1]));
    const lo = Math.min(...losses), hi = Math.max(...losses), eMax = Math.max(...fc.curve.map((c) => c[1]));
    const x = (s) => L + (W - L - R) * (s / Math.max(1, fc.total_steps - 1));
    const y = (v) => T + (H - T - B) * (1 - (v - lo) / Math.max(1e-9, hi - lo));
    const yE = (e) => T + (H - T - B) * (1 - e / Math.max(1e-9, eMax));
    const line = (pts) => pts.map(([a, b], i) => `${i ? "L" : "M"}${a.toFixed(1)},${b.toFixed(1)}`).join("");
    const band = fc.curve.map((c) => [x(c[0]), y(c[4])]).concat(fc.curve.slice().reverse().map((c) => [x(c[0]), y(c[3])]));
    svgEl("path", { d: line(band) + "Z", fill: COLORS[0], opacity: 0.15 }, svg);
    svgEl("path", { d: line(fc.curve.map((c) => [x(c[0]), y(c[2])])), fill: "none", stroke: COLORS[0] }, svg);
    svgEl("path", { d: line(fc.curve.map((c) => [x(c[0]), yE(c[1])])), fill: "none", stroke: COLORS[1],
      "stroke-dasharray": "4 3" }, svg);
    for (const [step, loss] of fc.observed) {
      tooltip(svgEl("circle", { class: "eval-point", cx: x(step), cy: y(loss), r: 2.5, fill: COLORS[0] }, svg),
        `step ${fmt(step)}: ${loss.toFixed(4)}`);
    }
    if (fc.turn_up_step !== null) {
      svgEl("line", { class: "grid-line", x1: x(fc.turn_up_step), x2: x(fc.turn_up_step), y1: T, y2: H - B }, svg);
    }
    svgEl("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }, svg);
    svgEl("text", { x: L - 6, y: T + 8, "text-anchor": "end" }, svg, hi.toFixed(3));
    svgEl("text", { x: L - 6, y: H - B, "text-anchor": "end" }, svg, lo.toFixed(3));
    svgEl("text", { x: W - R + 6, y: T + 8 }, svg, `${eMax.toFixed(2)} E`);
    svgEl("text", { x: W - R + 6, y: H - B }, svg, "0 E");
    svgEl("text", { x: (L + W - R) / 2, y: H - 3, "text-anchor": "middle" }, svg, "step");
  }

  function drawThroughput(job) {
    const samples = state.samples.get(job.job_id) || [];
    const rates = [];
    for (let k = 1; k < samples.length; k++) {
      const dt = samples[k].t - samples[k - 1].t;
      if (dt > 0) {
        rates.push({ t: samples[k].t, tokens: Math.max(0, samples[k].tokens - samples[k - 1].tokens) / dt,
          batches: Math.max(0, samples[k].batches - samples[k - 1].batches) / dt,
          steps: Math.max(0, samples[k].highWater - samples[k - 1].highWater) / dt });
      }
    }
    const last = rates[rates.length - 1];
    const box = $("throughput");
    box.replaceChildren(kpi("steps/s", last ? fmtRate(last.steps) : "–", "all replicas"),
      kpi("batches/s", last ? fmtRate(last.batches) : "–", "this replica"),
      kpi("tokens/s", last ? fmtRate(last.tokens) : "–", "this replica"),
      kpi("tokens served", fmt(samples.length ? samples[samples.length - 1].tokens : 0), "this replica"));
    box.dataset.tokensPerSecond = last ? String(last.tokens) : "";

    const W = 440, H = 110, L = 56, R = 10, T = 8, B = 18;
    const svg = newChart($("throughput-chart"), W, H, "tokens per second");
    const scale = ticks(Math.max(1, ...rates.map((r) => r.tokens)), 3);
    const max = scale[scale.length - 1];
    const y = (v) => T + (H - T - B) * (1 - v / max);
    for (const t of scale) {
      svgEl("line", { class: "grid-line", x1: L, x2: W - R, y1: y(t), y2: y(t) }, svg);
      svgEl("text", { x: L - 6, y: y(t) + 4, "text-anchor": "end" }, svg, fmtRate(t));
    }
    svgEl("text", { x: W - R, y: H - 3, "text-anchor": "end" }, svg,
      `tokens/s, last ${rates.length} refreshes`);
    if (rates.length) {
      const x = (k) => L + (W - L - R) * (rates.length === 1 ? 1 : k / (rates.length - 1));
      const points = rates.map((r, k) => `${x(k).toFixed(1)},${y(r.tokens).toFixed(1)}`).join(" ");
      svgEl("polyline", { class: "spark", points }, svg);
    }
  }

  // ---- panels ---------------------------------------------------------------------------------------

  function recordSample(job, stats, now) {
    const counters = (stats.jobs || {})[job.job_id] || { batches: 0, tokens: {} };
    const tokens = Object.values(counters.tokens).reduce((a, b) => a + b, 0);
    const list = state.samples.get(job.job_id) || [];
    list.push({ t: now, batches: counters.batches, tokens, highWater: job.served_high_water });
    while (list.length > MAX_SAMPLES) list.shift();
    state.samples.set(job.job_id, list);
  }

  function lastRate(jobId, field) {
    const s = state.samples.get(jobId) || [];
    if (s.length < 2) return null;
    const a = s[s.length - 2], b = s[s.length - 1];
    return b.t > a.t ? Math.max(0, b[field] - a[field]) / (b.t - a.t) : null;
  }

  function renderJobs(jobs) {
    const body = $("jobs-table").tBodies[0];
    body.replaceChildren(...jobs.map((job) => {
      if (job.error) {  // listed, not hidden: this replica cannot serve it (e.g. a source is missing)
        const tr = el("tr", { "data-job": job.job_id, class: "broken" });
        tr.append(el("td", {}, job.job_id), el("td", { class: "wrap error-cell", colspan: "7" },
          `${job.error.type}: ${job.error.detail}`));
        return tr;
      }
      const total = job.config.total_steps;
      const tr = el("tr", { "data-job": job.job_id });
      if (job.job_id === state.job) tr.classList.add("selected");
      const track = el("span", { class: "bar-track" });
      const fill = el("span", { class: "bar-fill" });
      fill.style.width = pct(Math.max(0, job.trained_step + 1) / total);
      track.append(fill);
      const progress = el("td");
      progress.append(track, document.createTextNode(" " + pct(Math.max(0, job.trained_step + 1) / total)));
      tr.append(el("td", {}, job.job_id), el("td", {}, job.config.sources.map((s) => s.name).join(", ")),
        el("td", { class: "num" }, "v" + job.schedule_version),
        el("td", { class: "num" }, fmt(job.served_high_water)), el("td", { class: "num" }, fmt(job.trained_step)),
        progress, el("td", { class: "num" }, fmtRate(lastRate(job.job_id, "highWater"))),
        el("td", { class: "num" }, fmtRate(lastRate(job.job_id, "tokens"))));
      tr.addEventListener("click", () => select(job.job_id));
      return tr;
    }));
    $("no-jobs").hidden = jobs.length > 0;
  }

  function renderJob(job, versions, reps, hist, top) {
    $("job").hidden = false;
    $("job-title").textContent = "Job " + job.job_id;
    const current = versions[versions.length - 1];
    const total = job.config.total_steps;
    const tokens = Object.values(job.tokens_through_high_water).reduce((a, b) => a + b, 0);
    $("kpis").replaceChildren(
      kpi("schedule", "v" + job.schedule_version, `from step ${fmt(current.effective_step)} · ${current.author || "?"}`),
      kpi("current step", fmt(job.trained_step), "trained (reported by trainers)"),
      kpi("served high water", fmt(job.served_high_water), `lead over trained: ${fmt(job.served_high_water - job.trained_step)}`),
      kpi("total steps", fmt(total), pct(Math.max(0, job.trained_step + 1) / total) + " trained"),
      kpi("tokens served", fmt(tokens), `${job.config.global_batch} × ${job.config.seq_len} per step`));
    $("warnings").replaceChildren(...(job.warnings || []).map((w) => el("div", { class: "warning" }, w)));

    drawSchedule(job, versions);
    drawTokens(job);
    drawThroughput(job);

    $("rep-summary").replaceChildren(kpi("step", fmt(reps.step)), kpi("documents", fmt(reps.documents)),
      kpi("min / max", `${reps.min} / ${reps.max}`), kpi("mean", reps.mean.toFixed(3)),
      kpi("epoch", String(reps.epoch), pct(reps.epoch_progress) + " into the next"));
    drawHistogram(hist);

    const docs = $("top-docs");
    const more = top.total > top.documents.length ? ` (first ${top.documents.length} shown)` : "";
    const header = el("p", {}, top.k > 0
      ? `${fmt(top.total)} documents of ${top.source} seen ${top.k} times (the maximum) through step ${fmt(top.step)}${more}:`
      : `No document of ${top.source} has been fully seen yet at step ${fmt(top.step)}.`);
    const list = el("div", { class: "docs" });
    if (top.k > 0) list.append(...top.documents.map((d) => el("span", { class: "doc", "data-doc": d }, "#" + d)));
    docs.replaceChildren(header, list);

    $("history-table").tBodies[0].replaceChildren(...versions.slice().reverse().map((v) => {
      const tr = el("tr", { "data-version": v.version });
      tr.append(el("td", { class: "num" }, "v" + v.version), el("td", { class: "num" }, fmt(v.effective_step)),
        el("td", {}, fmtTime(v.time)), el("td", {}, v.author || "–"), el("td", { class: "wrap" }, v.reason || "–"),
        el("td", { class: "wrap" }, phasesText(v.schedule)));
      return tr;
    }));
  }

  function renderSourceSelect(job, source) {
    const select = $("rep-source");
    const names = job.config.sources.map((s) => `${s.name} (${s.role})`).join();
    if (select.dataset.names !== names) {
      select.replaceChildren(...job.config.sources.map((s) => el("option", { value: s.name }, `${s.name} (${s.role})`)));
      select.dataset.names = names;
    }
    select.value = source;
  }

  // ---- refresh loop ---------------------------------------------------------------------------------

  function select(jobId) {
    state.job = jobId;
    state.source = null;
    const url = new URL(location.href);
    url.searchParams.set("job", jobId);
    url.searchParams.delete("source");
    history.replaceState(null, "", url);
    refresh();
  }

  let inFlight = null;
  let again = false; // a refresh was asked for while one ran (e.g. another job was selected)
  let timer = null;

  async function refresh() {
    if (inFlight) { again = true; return inFlight; }
    clearTimeout(timer);
    inFlight = (async () => {
      try {
        const [ready, jobsDoc, stats] = await Promise.all([api("v1/ready", [503]), api("v1/jobs"), api("v1/stats")]);
        const now = stats.time;
        const pill = $("server-state");
        pill.textContent = ready.status === "ready" ? "ready" : `not ready: ${ready.detail || ready.status}`;
        pill.className = "pill " + (ready.status === "ready" ? "ok" : "bad");
        const jobs = jobsDoc.jobs;
        const servable = jobs.filter((j) => !j.error);
        for (const job of servable) recordSample(job, stats, now);
        if (!servable.some((j) => j.job_id === state.job)) state.job = servable.length ? servable[0].job_id : null;
        renderJobs(jobs);
        const job = servable.find((j) => j.job_id === state.job);
        if (job) {
          const names = job.config.sources.map((s) => s.name);
          if (!names.includes(state.source)) {
            const repeat = job.config.sources.find((s) => s.role === "repeat");
            state.source = (repeat || job.config.sources[0]).name;
          }
          const base = jobPath(job.job_id);
          const q = "?source=" + encodeURIComponent(state.source);
          const [log, reps, hist] = await Promise.all([api(base + "/schedule/history"),
            api(base + "/repetitions" + q), api(base + "/repetitions/histogram" + q)]);
          const top = await api(`${base}/repetitions/at-least/${reps.max}${q}&limit=${TOP_DOCS}`);
          renderSourceSelect(job, state.source);
          renderJob(job, log.versions, reps, hist, top);
          const forecast = job.config.sources.some((s) => s.role === "repeat")
            ? await api(base + "/forecast", [404, 422]) : null;
          if (forecast && forecast.curve) drawForecast(forecast);
        } else {
          $("job").hidden = true;
        }
        $("error").hidden = true;
        delete document.body.dataset.error;
        $("updated").textContent = "updated " + new Date().toLocaleTimeString("en-GB", { hour12: false });
        state.refreshes += 1;
        document.body.dataset.refreshes = String(state.refreshes);
      } catch (err) {
        $("error").textContent = err.message;
        $("error").hidden = false;
        document.body.dataset.error = err.message;
        const pill = $("server-state");
        if (err.status === 0) { pill.textContent = "unreachable"; pill.className = "pill bad"; }
      } finally {
        inFlight = null;
        timer = setTimeout(refresh, again ? 0 : REFRESH_S * 1000);
        again = false;
      }
    })();
    return inFlight;
  }

  $("rep-source").addEventListener("change", (event) => {
    state.source = event.target.value;
    const url = new URL(location.href);
    url.searchParams.set("source", state.source);
    history.replaceState(null, "", url);
    refresh();
  });
  $("interval").textContent = String(REFRESH_S);
  refresh();
})();
