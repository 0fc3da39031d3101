// lens-server dashboard: the caller's jobs with live status, and a page per job that draws its
// result. Plain JS and SVG, no build step, no network beyond this server's /v1 API.
"use strict";

(() => {
  const KEY_STORE = "lens.apiKey";
  const POLL_MS = 2000;
  const FINAL = new Set(["succeeded", "failed", "cancelled"]);
  const TOP_K = 5;
  const SVG_NS = "http://www.w3.org/2000/svg";
  const ROLES = [
    // code, name, colour: the consensus roles of a chg result's taxonomy tensor.
    [1, "facilitating", "#1a9850"],
    [0, "irrelevant", "#d9d9d9"],
    [2, "interfering", "#d73027"],
    [3, "inconsistent", "#fdae61"],
    [4, "undetermined", "#9e9ac8"],
  ];
  const SERIES_COLOURS = ["#4477aa", "#228833", "#ee6677", "#ccbb44", "#66ccee", "#aa3377"];

  const view = document.getElementById("view");
  let timer = null; // the current view's poll timer
  let generation = 0; // bumped on navigation, so late answers of an old view draw nothing

  // ---------------------------------------------------------------- DOM helpers

  function el(tag, attrs = {}, ...children) {
    return build(document.createElement(tag), attrs, children);
  }

  function svg(tag, attrs = {}, ...children) {
    return build(document.createElementNS(SVG_NS, tag), attrs, children);
  }

  function build(node, attrs, children) {
    for (const [name, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      // Through the CSSOM: the page's CSP refuses style attributes set as markup.
      else if (name === "style") node.style.cssText = String(value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const fmt = (x, digits = 3) =>
    Number.isFinite(x) ? (Math.abs(x) >= 1000 ? x.toFixed(0) : x.toPrecision(digits)) : String(x);

  function when(iso) {
    return iso ? new Date(iso).toLocaleString() : "";
  }

  function took(doc) {
    if (!doc.started_at || !doc.finished_at) return "";
    return `${((new Date(doc.finished_at) - new Date(doc.started_at)) / 1000).toFixed(1)} s`;
  }

  function statusBadge(status) {
    return el("span", { class: `status status-${status}`, "data-status": status }, status);
  }

  function progressCell(doc) {
    const p = doc.progress;
    if (!p) return doc.queue_position != null ? `queue #${doc.queue_position}` : "";
    const loss = p.loss != null ? `, loss ${fmt(p.loss)}` : "";
    return el("span", { class: "progress" },
      el("progress", { max: p.total, value: p.step }),
      ` ${p.stage} ${p.step}/${p.total}${loss}`);
  }

  function message(text, kind = "error") {
    return el("p", { class: `message message-${kind}` }, text);
  }

  // ---------------------------------------------------------------- API

  function apiKey() {
    return localStorage.getItem(KEY_STORE) || "";
  }

  function formatDetail(detail) {
    if (Array.isArray(detail)) {
      return detail.map((d) => {
        const loc = (d.loc || []).filter((p) => !["body", "query", "path"].includes(p));
        return loc.length ? `${loc.join(".")}: ${d.msg}` : d.msg;
      }).join("; ");
    }
    return typeof detail === "string" ? detail : JSON.stringify(detail);
  }

  async function api(path, { raw = false } = {}) {
    const headers = {};
    if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
    const response = await fetch(path, { headers });
    if (!response.ok) {
      let detail = response.statusText;
      try {
        const body = await response.json();
        detail = formatDetail(body.detail ?? body);
      } catch (_) { /* not JSON: keep the status text */ }
      const error = new Error(`${response.status}: ${detail}`);
      error.status = response.status;
      throw error;
    }
    return raw ? response.arrayBuffer() : response.json();
  }

  function explain(error) {
    if (error.status === 401) return "This server needs an API key: enter yours above and save.";
    return `Request failed: ${error.message}`;
  }

  // ---------------------------------------------------------------- safetensors

  const scratch = new DataView(new ArrayBuffer(4));

  function bf16ToFloat(bits) {
    scratch.setUint32(0, bits << 16);
    return scratch.getFloat32(0);
  }

  function f16ToFloat(bits) {
    const sign = bits & 0x8000 ? -1 : 1;
    const exponent = (bits >> 10) & 0x1f;
    const fraction = bits & 0x3ff;
    if (exponent === 0) return sign * 2 ** -14 * (fraction / 1024);
    if (exponent === 31) return fraction ? NaN : sign * Infinity;
    return sign * 2 ** (exponent - 15) * (1 + fraction / 1024);
  }

  // dtype → [bytes per item, reader(DataView, offset)]; safetensors data are little-endian.
  const READERS = {
    F64: [8, (dv, o) => dv.getFloat64(o, true)],
    F32: [4, (dv, o) => dv.getFloat32(o, true)],
    F16: [2, (dv, o) => f16ToFloat(dv.getUint16(o, true))],
    BF16: [2, (dv, o) => bf16ToFloat(dv.getUint16(o, true))],
    I64: [8, (dv, o) => Number(dv.getBigInt64(o, true))],
    I32: [4, (dv, o) => dv.getInt32(o, true)],
    I16: [2, (dv, o) => dv.getInt16(o, true)],
    I8: [1, (dv, o) => dv.getInt8(o)],
    U8: [1, (dv, o) => dv.getUint8(o)],
    BOOL: [1, (dv, o) => dv.getUint8(o)],
  };

  // A tensor read lazily: only the slices a view draws are decoded (results can be large).
  class Tensor {
    constructor(name, dtype, shape, view, offset) {
      if (!(dtype in READERS)) throw new Error(`tensor ${name}: unsupported dtype ${dtype}`);
      Object.assign(this, { name, dtype, shape, view, offset });
      [this.itemSize, this.read] = READERS[dtype];
    }

    get size() {
      return this.shape.reduce((a, b) => a * b, 1);
    }

    // Values of the sub-tensor at leading indices `prefix`, flattened (a Float64Array).
    slice(prefix = []) {
      let start = 0;
      prefix.forEach((index, axis) => {
        if (index < 0 || index >= this.shape[axis]) throw new RangeError(`${this.name}: index ${index}`);
        start = start * this.shape[axis] + index;
      });
      const rest = this.shape.slice(prefix.length).reduce((a, b) => a * b, 1);
      const out = new Float64Array(rest);
      let offset = this.offset + start * rest * this.itemSize;
      for (let i = 0; i < rest; i++, offset += this.itemSize) out[i] = this.read(this.view, offset);
      return out;
    }

    // A 2-D tensor as rows, or a 3-D one averaged over its first axis (gates over masks).
    matrix() {
      const [rows, cols] = this.shape.slice(-2);
      const sets = this.shape.length === 3 ? this.shape[0] : 1;
      const sum = new Float64Array(rows * cols);
      for (let s = 0; s < sets; s++) {
        const values = this.shape.length === 3 ? this.slice([s]) : this.slice();
        values.forEach((v, i) => { sum[i] += v; });
      }
      return Array.from({ length: rows }, (_, r) =>
        Array.from(sum.subarray(r * cols, (r + 1) * cols), (v) => v / sets));
    }
  }

  function parseSafetensors(buffer) {
    const view = new DataView(buffer);
    const length = Number(view.getBigUint64(0, true));
    if (8 + length > buffer.byteLength) throw new Error("not a safetensors file");
    const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 8, length)));
    const metadata = header.__metadata__ || {};
    const tensors = {};
    for (const [name, info] of Object.entries(header)) {
      if (name === "__metadata__") continue;
      tensors[name] = new Tensor(name, info.dtype, info.shape, view, 8 + length + info.data_offsets[0]);
    }
    const json = (key) => { try { return JSON.parse(metadata[key] || "{}"); } catch (_) { return {}; } };
    return { tensors, metadata, params: json("params"), summary: json("summary") };
  }

  // ---------------------------------------------------------------- numbers

  function topK(values, k) {
    let max = -Infinity;
    for (const v of values) if (v > max) max = v;
    let total = 0;
    for (const v of values) total += Math.exp(v - max);
    const best = []; // [value, index], kept sorted descending
    values.forEach((v, i) => {
      if (best.length < k || v > best[best.length - 1][0]) {
        best.push([v, i]);
        best.sort((a, b) => b[0] - a[0]);
        if (best.length > k) best.pop();
      }
    });
    return best.map(([v, id]) => ({ id, prob: Math.exp(v - max) / total }));
  }

  // id → string from what the result itself decodes: input tokens, and the summary's predictions.
  function vocabulary(result) {
    const map = new Map();
    const tokens = result.summary.tokens;
    const ids = result.tensors.input_ids;
    if (Array.isArray(tokens) && ids) {
      tokens.forEach((row, b) => {
        const rowIds = ids.slice([b]);
        row.forEach((token, s) => map.set(rowIds[s], token));
      });
    }
    for (const text of result.summary.texts || []) {
      if (text && text.next_token_id != null) map.set(text.next_token_id, text.next_token);
    }
    return map;
  }

  function tokenLabel(vocab, id) {
    return vocab.has(id) ? JSON.stringify(vocab.get(id)).slice(1, -1) : `#${id}`;
  }

  // ---------------------------------------------------------------- charts

  function mix(a, b, t) {
    const pa = [1, 3, 5].map((i) => parseInt(a.slice(i, i + 2), 16));
    const pb = [1, 3, 5].map((i) => parseInt(b.slice(i, i + 2), 16));
    return `rgb(${pa.map((v, i) => Math.round(v + (pb[i] - v) * t)).join(",")})`;
  }

  function gateColour(value) {
    const t = Math.min(1, Math.max(0, value));
    return t < 0.5 ? mix("#f7fbff", "#6baed6", t * 2) : mix("#6baed6", "#08306b", (t - 0.5) * 2);
  }

  function roleColour(code) {
    return (ROLES.find(([c]) => c === code) || [null, null, "#000000"])[2];
  }

  function roleName(code) {
    return (ROLES.find(([c]) => c === code) || [null, `code ${code}`])[1];
  }

  // One rect per (layer, head); layers down, heads across.
  function heatmap(id, title, matrix, { colour = gateColour, label = (v) => fmt(v, 2) } = {}) {
    const layers = matrix.length;
    const heads = matrix[0].length;
    const cell = Math.max(6, Math.min(26, Math.floor(340 / heads), Math.floor(420 / layers)));
    const left = 30;
    const top = 16;
    const every = Math.ceil(14 / cell);
    const chart = svg("svg", {
      id, class: "heatmap", role: "img", "aria-label": title,
      width: left + heads * cell + 4, height: top + layers * cell + 4,
      "data-layers": layers, "data-heads": heads,
    });
    for (let h = 0; h < heads; h += every) {
      chart.append(svg("text", { x: left + h * cell + cell / 2, y: top - 4, class: "tick",
        "text-anchor": "middle" }, h));
    }
    for (let l = 0; l < layers; l++) {
      if (l % every === 0) {
        chart.append(svg("text", { x: left - 4, y: top + l * cell + cell / 2 + 4, class: "tick",
          "text-anchor": "end" }, l));
      }
      for (let h = 0; h < heads; h++) {
        const value = matrix[l][h];
        chart.append(svg("rect", {
          x: left + h * cell, y: top + l * cell, width: cell - 1, height: cell - 1,
          fill: colour(value), class: "cell",
          "data-layer": l, "data-head": h, "data-value": value,
        }, svg("title", {}, `layer ${l}, head ${h}: ${label(value)}`)));
      }
    }
    return el("figure", { class: "chart" }, el("figcaption", {}, title), chart,
      el("div", { class: "axis-note muted" }, "rows: layers · columns: heads"));
  }

  function gateLegend() {
    return el("div", { class: "legend" }, "0 ",
      ...[0, 0.25, 0.5, 0.75, 1].map((v) => el("span", { class: "swatch", style: `background:${gateColour(v)}` })),
      " 1");
  }

  function roleLegend(counts = {}) {
    return el("div", { class: "legend" }, ...ROLES.map(([, name, colour]) =>
      el("span", { class: "legend-item" }, el("span", { class: "swatch", style: `background:${colour}` }),
        ` ${name}${counts[name] != null ? ` (${counts[name]})` : ""}`)));
  }

  // Lines over a shared x axis (update index); `series` is [{name, values, offset?}], where
  // `offset` shifts a series right (regularised CHG stages start where stage none ended).
  function lineChart(id, title, series, { xLabel = "update", yLabel = "NLL" } = {}) {
    const width = 560;
    const height = 230;
    const m = { left: 52, right: 12, top: 10, bottom: 34 };
    const all = series.flatMap((s) => Array.from(s.values)).filter(Number.isFinite);
    if (!all.length) return message("no finite values to plot", "info");
    let lo = Math.min(...all);
    let hi = Math.max(...all);
    if (lo === hi) { lo -= 0.5; hi += 0.5; }
    const pad = (hi - lo) * 0.05;
    lo -= pad; hi += pad;
    const n = Math.max(...series.map((s) => (s.offset || 0) + s.values.length));
    const x = (i) => m.left + (n > 1 ? (i / (n - 1)) : 0.5) * (width - m.left - m.right);
    const y = (v) => m.top + (1 - (v - lo) / (hi - lo)) * (height - m.top - m.bottom);
    const chart = svg("svg", { id, class: "linechart", width, height, role: "img", "aria-label": title });
    chart.append(svg("line", { x1: m.left, y1: height - m.bottom, x2: width - m.right,
      y2: height - m.bottom, class: "axis" }));
    chart.append(svg("line", { x1: m.left, y1: m.top, x2: m.left, y2: height - m.bottom, class: "axis" }));
    for (let t = 0; t <= 4; t++) {
      const v = lo + ((hi - lo) * t) / 4;
      chart.append(svg("text", { x: m.left - 6, y: y(v) + 4, class: "tick", "text-anchor": "end" }, fmt(v)));
      chart.append(svg("line", { x1: m.left, x2: width - m.right, y1: y(v), y2: y(v), class: "grid" }));
    }
    for (const i of new Set([0, Math.floor((n - 1) / 2), n - 1])) {
      chart.append(svg("text", { x: x(i), y: height - m.bottom + 14, class: "tick",
        "text-anchor": "middle" }, i + 1));
    }
    chart.append(svg("text", { x: (m.left + width) / 2, y: height - 4, class: "tick",
      "text-anchor": "middle" }, xLabel));
    chart.append(svg("text", { x: 12, y: height / 2, class: "tick", "text-anchor": "middle",
      transform: `rotate(-90 12 ${height / 2})` }, yLabel));
    const items = [];
    series.forEach((s, k) => {
      const colour = SERIES_COLOURS[k % SERIES_COLOURS.length];
      const shift = s.offset || 0;
      const points = Array.from(s.values, (v, i) => (Number.isFinite(v) ? `${x(i + shift)},${y(v)}` : null))
        .filter(Boolean).join(" ");
      chart.append(svg("polyline", { points, fill: "none", stroke: colour, "stroke-width": 2,
        class: "series", "data-series": s.name }, svg("title", {}, s.name)));
      const last = s.values[s.values.length - 1];
      items.push(el("span", { class: "legend-item" },
        el("span", { class: "swatch", style: `background:${colour}` }), ` ${s.name} (last ${fmt(last)})`));
    });
    return el("figure", { class: "chart wide" }, el("figcaption", {}, title), chart,
      el("div", { class: "legend" }, items));
  }

  // A 1-D series from a tensor: per-update values, averaged over any trailing axis.
  function seriesValues(tensor) {
    const flat = tensor.slice();
    const steps = tensor.shape[0] || 0;
    const per = steps ? flat.length / steps : 0;
    return Array.from({ length: steps }, (_, i) => {
      let s = 0;
      for (let j = 0; j < per; j++) s += flat[i * per + j];
      return s / per;
    });
  }

  function table(headers, rows, attrs = {}) {
    return el("table", attrs,
      el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
      el("tbody", {}, rows.map((r) => el("tr", {}, r.map((c) => el("td", {}, c))))));
  }

  function probBar(prob) {
    return el("span", { class: "bar" }, el("span", { class: "bar-fill", style: `width:${(prob * 100).toFixed(1)}%` }));
  }

  // ---------------------------------------------------------------- result views

  function drawChg(result) {
    const t = result.tensors;
    const s = result.summary;
    const parts = [];
    const maps = el("div", { class: "row" });
    if (t["masks.positive"]) maps.append(heatmap("heatmap-gplus", "G+ (keep pressure), mean over masks", t["masks.positive"].matrix()));
    if (t["masks.negative"]) maps.append(heatmap("heatmap-gminus", "G− (removal pressure), mean over masks", t["masks.negative"].matrix()));
    if (t.taxonomy) {
      maps.append(heatmap("heatmap-taxonomy", "Head taxonomy", t.taxonomy.matrix(),
        { colour: roleColour, label: roleName }));
    }
    parts.push(maps, el("div", { class: "row legends" }, gateLegend(), roleLegend(s.role_counts)));
    const stages = ["none", "positive", "negative"].filter((st) => t[`nll.${st}`]);
    if (stages.length) {
      const first = t["nll.none"] ? t["nll.none"].shape[0] : 0;
      parts.push(lineChart("nll-chart", "Target NLL per update: stage none, then both regularised fits from its end",
        stages.map((st) => ({ name: st, values: seriesValues(t[`nll.${st}`]), offset: st === "none" ? 0 : first }))));
    }
    if (s.facilitating_heads) {
      parts.push(el("p", {}, `Facilitating heads (layer, head): ${
        s.facilitating_heads.map(([l, h]) => `(${l}, ${h})`).join(" ") || "none"}`));
    }
    return parts;
  }

  function drawCchg(result) {
    const t = result.tensors;
    const s = result.summary;
    const parts = [];
    const row = el("div", { class: "row" });
    if (t["masks.contrastive"]) {
      row.append(heatmap("heatmap-contrastive", "Contrastive gates, mean over masks", t["masks.contrastive"].matrix()));
    }
    if (s.all_heads && s.gated_mean) {
      const sides = ["retain", "forget"];
      row.append(el("div", { class: "panel" }, el("h3", {}, "Accuracy"),
        table(["set", "all heads", "gated (mean over masks)"], sides.map((side) => [
          side,
          el("span", {}, probBar(s.all_heads[`${side}_accuracy`]), ` ${fmt(s.all_heads[`${side}_accuracy`])}`),
          el("span", {}, probBar(s.gated_mean[`${side}_accuracy`]), ` ${fmt(s.gated_mean[`${side}_accuracy`])}`),
        ]), { id: "cchg-accuracy" }),
        el("p", { class: "muted" }, `evaluated on ${s.evaluated_on || "?"} pairs (${s.num_pairs ?? "?"})`)));
    }
    parts.push(row, gateLegend());
    const sides = ["retain", "forget"].filter((side) => t[`nll.${side}`]);
    if (sides.length) {
      parts.push(lineChart("nll-chart", "NLL per update", sides.map((side) => ({ name: side, values: seriesValues(t[`nll.${side}`]) }))));
    }
    return parts;
  }

  function textLabel(texts, b) {
    const text = Array.isArray(texts) ? texts[b] : texts;
    if (typeof text !== "string") return `text ${b + 1}`;
    return `${b + 1}: ${text.length > 40 ? `${text.slice(0, 40)}…` : text}`;
  }

  function drawTrace(result) {
    const t = result.tensors;
    const vocab = vocabulary(result);
    const layers = Object.keys(t).filter((n) => /^logits\.\d+$/.test(n))
      .map((n) => Number(n.split(".")[1])).sort((a, b) => a - b);
    const final = t.final_logits;
    if (!final) return [message("This trace has no final_logits tensor.", "info")];
    const batch = final.shape[0];
    const positions = final.shape.length === 3 ? final.shape[1] : 1;
    const tokens = result.summary.tokens || [];
    const textSelect = el("select", { id: "trace-text" },
      Array.from({ length: batch }, (_, b) => el("option", { value: b }, textLabel(result.params.texts, b))));
    const positionSelect = el("select", { id: "trace-position" });
    const holder = el("div", { class: "panel" });

    const positionLabel = (b, p) => {
      const explicit = t.positions ? t.positions.slice(t.positions.shape.length === 2 ? [b] : [])[p] : p;
      const token = tokens[b] && tokens[b][explicit];
      return `${explicit}: ${token !== undefined ? JSON.stringify(token) : ""}`;
    };
    const fillPositions = () => {
      const b = Number(textSelect.value);
      const real = t.positions ? positions : Math.min(positions, (tokens[b] || []).length || positions);
      positionSelect.replaceChildren(...Array.from({ length: real }, (_, p) =>
        el("option", { value: p }, positionLabel(b, p))));
      positionSelect.value = String(real - 1);
    };
    const rowFor = (tensor, b, p) => (tensor.shape.length === 3 ? tensor.slice([b, p]) : tensor.slice([b]));
    const redraw = () => {
      const b = Number(textSelect.value);
      const p = Number(positionSelect.value);
      const rows = layers.map((layer) => [`layer ${layer}`, t[`logits.${layer}`]]);
      rows.push(["final", final]);
      holder.replaceChildren(table(
        ["layer", ...Array.from({ length: TOP_K }, (_, i) => `top ${i + 1}`)],
        rows.map(([name, tensor]) => [name, ...topK(rowFor(tensor, b, p), TOP_K).map(({ id, prob }) =>
          el("span", { class: "token", style: `background:rgba(8,48,107,${(0.08 + 0.6 * prob).toFixed(3)})`,
            title: `id ${id}`, "data-token-id": id },
          el("b", {}, tokenLabel(vocab, id)), ` ${(prob * 100).toFixed(1)}%`))]),
        { id: "logit-lens", class: "lens" }));
    };
    textSelect.addEventListener("change", () => { fillPositions(); redraw(); });
    positionSelect.addEventListener("change", redraw);
    fillPositions();
    redraw();
    const note = layers.length ? null
      : message("No per-layer logits in this trace (trace the `logits` site for a logit lens); showing the final layer only.", "info");
    return [el("h3", {}, "Logit lens: most likely next tokens per layer"),
      el("div", { class: "controls" }, el("label", {}, "Text ", textSelect), el("label", {}, " Position ", positionSelect)),
      note, holder];
  }

  function drawScore(result) {
    const t = result.tensors;
    const final = t.final_token_logits || null;
    if (!final) return [message("No final_token_logits in this result.", "info")];
    const vocab = vocabulary(result);
    const texts = result.params.texts;
    const select = el("select", { id: "score-text" }, Array.from({ length: final.shape[0] }, (_, b) =>
      el("option", { value: b }, textLabel(texts, b))));
    const holder = el("div", { class: "panel" });
    const redraw = () => {
      const b = Number(select.value);
      const text = Array.isArray(texts) ? texts[b] : texts;
      holder.replaceChildren(
        el("p", { class: "prompt" }, text ? `“${text}” →` : ""),
        table(["token", "probability", ""], topK(final.slice([b]), 10).map(({ id, prob }) => [
          el("b", { title: `id ${id}` }, tokenLabel(vocab, id)), `${(prob * 100).toFixed(2)}%`, probBar(prob),
        ]), { id: "score-top", class: "topk" }));
    };
    select.addEventListener("change", redraw);
    redraw();
    return [el("h3", {}, "Most likely next tokens"), el("div", { class: "controls" }, select), holder];
  }

  function drawAblate(result) {
    const s = result.summary;
    const parts = [];
    if (s.baseline_nll != null) {
      parts.push(table(["", "all heads", "masked", "change"], ["nll", "accuracy"].map((k) => [
        k, fmt(s[`baseline_${k}`]), fmt(s[`masked_${k}`]), fmt(s[`delta_${k}`]),
      ]), { id: "ablate-figures" }));
      parts.push(el("p", { class: "muted" }, `${s.heads_on} of ${s.heads_total} heads on, ${s.num_examples} examples`));
    }
    if (result.tensors.head_mask) {
      parts.push(heatmap("heatmap-mask", "Head mask (1 on, 0 off)", result.tensors.head_mask.matrix()));
    }
    return parts;
  }

  function drawAttribute(result) {
    const scores = result.summary.scores || [];
    const sentences = result.params.sentences || [];
    const finite = scores.filter(Number.isFinite);
    const top = finite.length ? Math.max(...finite.map(Math.abs)) : 1;
    return [el("h3", {}, "Sentence importance"),
      table(["#", "sentence", "score", ""], sentences.map((sentence, i) => [
        i + 1, sentence, fmt(scores[i]), Number.isFinite(scores[i]) ? probBar(Math.abs(scores[i]) / (top || 1)) : "",
      ]), { id: "attribute-scores" })];
  }

  const DRAW = { chg: drawChg, cchg: drawCchg, trace: drawTrace, score: drawScore,
    ablate: drawAblate, attribute: drawAttribute };

  function tensorList(result) {
    return el("details", {}, el("summary", {}, `${Object.keys(result.tensors).length} tensors`),
      table(["name", "dtype", "shape"], Object.values(result.tensors).map((tensor) =>
        [tensor.name, tensor.dtype, `[${tensor.shape.join(", ")}]`])));
  }

  // ---------------------------------------------------------------- pages

  function stop() {
    generation += 1;
    if (timer) clearTimeout(timer);
    timer = null;
  }

  function every(ms, task) {
    const mine = generation;
    const tick = async () => {
      if (mine !== generation) return;
      const again = await task(mine);
      if (again !== false && mine === generation) timer = setTimeout(tick, ms);
    };
    tick();
  }

  function jobsPage() {
    const filter = el("select", { id: "status-filter" },
      ["", "queued", "running", "succeeded", "failed", "cancelled"].map((s) => el("option", { value: s }, s || "all")));
    filter.value = sessionStorage.getItem("lens.filter") || "";
    const body = el("tbody");
    const notice = el("div");
    const models = el("div", { id: "models" });
    filter.addEventListener("change", () => { sessionStorage.setItem("lens.filter", filter.value); stop(); jobsPage(); });
    view.replaceChildren(
      el("section", {}, el("div", { class: "title-row" }, el("h1", {}, "Your jobs"),
        el("label", {}, "Status ", filter)), notice,
      el("table", { id: "jobs-table", class: "jobs" },
        el("thead", {}, el("tr", {}, ["job", "kind", "model", "status", "progress", "created", "took", "error"].map((h) => el("th", {}, h)))),
        body)),
      el("section", {}, el("h2", {}, "Models"), models));
    every(POLL_MS, async (mine) => {
      try {
        const query = filter.value ? `?status=${filter.value}&limit=100` : "?limit=100";
        const [jobs, served] = await Promise.all([api(`v1/jobs${query}`), api("v1/models")]);
        if (mine !== generation) return false;
        notice.replaceChildren(jobs.jobs.length ? "" : message("No jobs yet. Submit one with the client or `lens submit`.", "info"));
        body.replaceChildren(...jobs.jobs.map((doc) => el("tr", { "data-job-id": doc.id, "data-status": doc.status, "data-kind": doc.kind },
          el("td", {}, el("a", { href: `#/jobs/${doc.id}`, class: "mono" }, doc.id.slice(0, 12))),
          el("td", {}, doc.kind), el("td", {}, doc.model), el("td", {}, statusBadge(doc.status)),
          el("td", {}, progressCell(doc)), el("td", {}, when(doc.created_at)), el("td", {}, took(doc)),
          el("td", { class: "error-cell" }, doc.error ? `${doc.error.type}: ${doc.error.message}` : ""))));
        models.replaceChildren(table(["name", "architecture", "layers × heads", "vocab", "workers", "queued", "running"],
          served.models.map((m) => [m.name, m.architecture || "?", `${m.layers ?? "?"} × ${m.heads ?? "?"}`,
            m.vocab_size ?? "?", m.worker_alive ? String(m.resident.length) : "none", m.queue_depth, m.running])));
        setServerState(`${served.models.length} model(s)`);
      } catch (error) {
        if (mine !== generation) return false;
        notice.replaceChildren(message(explain(error)));
        setServerState("unreachable or refused");
      }
      return true;
    });
  }

  function setServerState(text) {
    document.getElementById("server-state").textContent = text;
  }

  function jobPage(id) {
    const head = el("div");
    const result = el("div", { id: "result" });
    view.replaceChildren(el("p", {}, el("a", { href: "#/" }, "← all jobs")), head, result);
    let loaded = false;
    every(POLL_MS, async (mine) => {
      let doc;
      try {
        doc = await api(`v1/jobs/${encodeURIComponent(id)}`);
      } catch (error) {
        if (mine === generation) head.replaceChildren(message(explain(error)));
        return error.status !== 404 && error.status !== 401;
      }
      if (mine !== generation) return false;
      head.replaceChildren(jobHeader(doc));
      if (doc.status === "succeeded" && !loaded) {
        loaded = true;
        await showResult(doc, result, mine);
      }
      return !FINAL.has(doc.status);
    });
  }

  function jobHeader(doc) {
    const facts = [
      ["status", statusBadge(doc.status)], ["model", doc.model], ["progress", progressCell(doc)],
      ["created", when(doc.created_at)], ["started", when(doc.started_at)],
      ["finished", when(doc.finished_at)], ["took", took(doc)],
    ].filter(([, v]) => v);
    return el("div", {},
      el("h1", {}, `${doc.kind} job `, el("span", { class: "mono" }, doc.id)),
      el("dl", { class: "facts" }, facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])),
      doc.error ? message(`${doc.error.type}: ${doc.error.message}`) : null,
      el("details", {}, el("summary", {}, "parameters"), el("pre", {}, JSON.stringify(doc.params, null, 2))));
  }

  async function showResult(doc, holder, mine) {
    holder.replaceChildren(message("Loading the result…", "info"));
    try {
      const buffer = await api(`v1/jobs/${encodeURIComponent(doc.id)}/result`, { raw: true });
      if (mine !== generation) return;
      const result = parseSafetensors(buffer);
      if (!Object.keys(result.summary).length && doc.summary) result.summary = doc.summary;
      if (!Object.keys(result.params).length && doc.params) result.params = doc.params;
      const url = URL.createObjectURL(new Blob([buffer], { type: "application/octet-stream" }));
      const draw = DRAW[doc.kind] || (() => []);
      holder.replaceChildren(
        el("p", {}, el("a", { id: "download", href: url, download: `${doc.kind}-${doc.id}.safetensors` },
          `Download result (${(buffer.byteLength / 1024).toFixed(1)} KiB, safetensors)`)),
        ...draw(result).filter(Boolean),
        tensorList(result),
        el("details", {}, el("summary", {}, "summary"), el("pre", {}, JSON.stringify(result.summary, null, 2))));
    } catch (error) {
      if (mine === generation) holder.replaceChildren(message(error.status ? explain(error) : `Cannot draw this result: ${error.message}`));
    }
  }

  function route() {
    stop();
    const match = location.hash.match(/^#\/jobs\/([^/]+)$/);
    if (match) jobPage(decodeURIComponent(match[1]));
    else jobsPage();
  }

  // ---------------------------------------------------------------- start

  const keyInput = document.getElementById("api-key");
  keyInput.value = apiKey();
  document.getElementById("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = keyInput.value.trim();
    if (key) localStorage.setItem(KEY_STORE, key);
    else localStorage.removeItem(KEY_STORE);
    document.getElementById("key-state").textContent = key ? "saved" : "cleared";
    route();
  });
  window.addEventListener("hashchange", route);
  window.lensDashboard = { parseSafetensors, topK }; // for tests and the curious
  route();
})();
