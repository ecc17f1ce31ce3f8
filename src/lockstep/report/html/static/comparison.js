/* The comparison report (compare, diff, replay): banner, heatmap, error through depth, first
   divergence, pairs, coverage. */
LS.LAYER_RE = /(?:^|[._\-])(?:layers?|h|blocks?|blk)[._\-](\d+)[._\-:](.+)$/;

/* where a pair sits in the heatmap: {layer: number or null, op} */
LS.cellOf = function (p) {
  var name = p.canonical || p.reference || "";
  var m = LS.LAYER_RE.exec(name);
  if (m) return {layer: Number(m[1]), op: m[2]};
  return {layer: null, op: name || "(root)"};
};

LS.pairName = function (p) {
  return p.reference === p.candidate ? p.reference : p.reference + " ~ " + p.candidate;
};

LS.pairTip = function (p, extra) {
  var m = p.metrics || {};
  return [LS.el("div", {className: "mono", style: "font-weight:600;margin-bottom:4px", text: LS.pairName(p)}),
    LS.kv([["step", String(p.step)], ["canonical", p.canonical], ["shapes", LS.shape(p.reference_shape) + " " +
      (p.reference_dtype || "") + " vs " + LS.shape(p.candidate_shape) + " " + (p.candidate_dtype || "")],
      ["rel. error", LS.fmt(p.error)], ["tolerance", LS.fmt(p.tolerance) + " (noise " + LS.fmt(p.noise_tolerance) + ")"],
      ["cosine", m.cosine === undefined ? "-" : LS.fmt(m.cosine, 7)], ["max abs", LS.fmt(m.max_abs)],
      ["status", p.status], ["transform", p.transform || "none"], ["paired by", p.paired_by],
      ["note", p.note], ["also here", extra]])];
};

LS.renderComparison = function (root, d, words) {
  var pairs = d.pairs || [], fd = d.first_divergence;
  var steps = (d.summary && d.summary.steps) || [];
  var sentence = (words && words[d.verdict]) || "", head = d.verdict;
  var st = d.statistics;  // measured from statistics alone: never called a match
  if (st && st.meaning) { head = "statistics agree"; sentence = st.meaning + "."; }
  root.appendChild(LS.banner(d.verdict, head, sentence +
    (fd ? " First divergence: step " + fd.step + ", " + LS.pairName(fd) + "." : "")));
  var sides = LS.el("div", {className: "sides"});
  [["reference", d.reference_dump], ["candidate", d.candidate_dump]].forEach(function (s) {
    var x = s[1] || {}, meta = x.meta || {};
    sides.appendChild(LS.el("div", {className: "side"}, LS.el("h3", {text: s[0]}),
      LS.kv([["dump", x.path], ["engine", meta.engine], ["model", meta.model], ["dtype", meta.dtype],
             ["label", meta.label], ["records", String(x.records)], ["steps", (x.steps || []).join(", ")],
             ["complete", x.complete === false ? "NO: the writer stopped before closing the dump" : null],
             ["error", x.error]])));
  });
  root.appendChild(sides);
  var s = d.summary || {};
  root.appendChild(LS.el("p", {className: "muted", text: s.pairs + " pairs compared, " + s.over_tolerance +
    " over tolerance, " + s.incomparable + " incomparable; " + s.reference_only + " reference and " +
    s.candidate_only + " candidate records unpaired."}));
  if (fd || d.diagnosis) LS.firstDivergence(LS.section(root, "First divergence", "first-divergence-panel"), d);
  if (pairs.length) {
    LS.heatmap(LS.section(root, "Relative error by layer and op", "heatmap-section"), d);
    LS.depthChart(LS.section(root, "Error through depth", "depth-section"), d);
  }
  LS.pairsTable(LS.section(root, "Pairs", "pairs-section"), d);
  LS.coverage(LS.section(root, "Coverage", "coverage-section"), d);
};

LS.firstDivergence = function (sec, d) {
  var fd = d.first_divergence, dg = d.diagnosis, m = (fd && fd.metrics) || {};
  if (dg) {
    sec.appendChild(LS.el("div", {className: "panel", id: "diagnosis"},
      LS.el("div", {style: "font-weight:600", text: "diagnosis (" + dg.kind + "): " + dg.title}),
      dg.evidence && dg.evidence.length ? [LS.el("h3", {text: "evidence"}),
        LS.el("ul", {className: "plain"}, dg.evidence.map(function (e) { return LS.el("li", {text: e}); }))] : null,
      dg.checks && dg.checks.length ? [LS.el("h3", {text: "what to check"}),
        LS.el("ol", null, dg.checks.map(function (e) { return LS.el("li", {text: e}); }))] : null));
  }
  if (fd) {
    var grow = LS.num(fd.growth);
    sec.appendChild(LS.el("div", {className: "panel"}, LS.kv([
      ["step", String(fd.step)], ["reference", fd.reference], ["candidate", fd.candidate],
      ["canonical", fd.canonical],
      ["shapes", LS.shape(fd.reference_shape) + " " + fd.reference_dtype + " vs " + LS.shape(fd.candidate_shape) + " " + fd.candidate_dtype],
      ["compared as", fd.transform ? fd.transform + " (paired by " + fd.paired_by + ")" : null],
      ["error", "relative L2 " + LS.fmt(fd.error) + " (tolerance " + LS.fmt(fd.tolerance) + ", noise allowance " + LS.fmt(fd.noise_tolerance) + ")"],
      ["introduced", "inherited error " + LS.fmt(fd.inherited_error) + ", grew " + (isFinite(grow) ? LS.fmt(grow) + "x" : "from zero") + " here"],
      ["worst element", m.worst_index ? "index " + LS.shape(m.worst_index) + ": reference " + LS.fmt(m.worst_ref) + ", candidate " + LS.fmt(m.worst_cand) : null],
      ["max / mean abs", m.max_abs !== undefined ? LS.fmt(m.max_abs) + " / " + LS.fmt(m.mean_abs) + ", cosine " + LS.fmt(m.cosine, 7) : null],
      ["NaN / Inf", (m.ref_nan || m.cand_nan || m.ref_inf || m.cand_inf) ? "reference " + m.ref_nan + " / " + m.ref_inf + ", candidate " + m.cand_nan + " / " + m.cand_inf : null],
      ["top-1", m.top1 ? m.top1.agree + "/" + m.top1.rows + " positions agree (" + m.top1.near_ties + " near-ties)" : null],
      ["note", fd.note]])));
  }
  var rp = d.replay;
  if (rp && rp.ops && rp.ops.length) {
    sec.appendChild(LS.el("h3", {text: "replay: the reference's ops run on the candidate's inputs" +
      (rp.precision ? " (candidate precision measured: " + rp.precision + ")" : "")}));
    sec.appendChild(LS.table([
      {label: "step", get: function (o) { return o.step; }, num: true},
      {label: "op", get: function (o) { return o.module || o.reference; }, name: true},
      {label: "total", get: function (o) { return o.total; }, num: true},
      {label: "introduced", get: function (o) { return o.introduced; }, num: true},
      {label: "inherited", get: function (o) { return o.inherited; }, num: true},
      {label: "where", get: function (o) { return o.where; }},
      {label: "rounding", get: function (o) { return Object.keys(o.rounding || {}).map(function (k) { return k + " " + LS.fmt(o.rounding[k]); }).join(", "); }},
      {label: "explained by", get: function (o) { return o.explained_by; }}].concat(
      /* the other way: the candidate's op on the reference's input (its own error) */
      rp.ops.some(function (o) { return o.reverse !== null && o.reverse !== undefined; })
        ? [{label: "cand op on ref input", get: function (o) { return o.reverse; }, num: true}] : [],
      [{label: "note", get: function (o) {
        var why = o.reverse_note ? "not run the other way: " + o.reverse_note : null;
        return [o.note, why].filter(Boolean).join("; ") || null; }}]), rp.ops, {id: "replay-table"}));
  }
};

LS.heatmap = function (sec, d) {
  var pairs = d.pairs, fd = d.first_divergence;
  var steps = [], bystep = {};
  var ops = {pre: [], layer: [], post: []}, seenLayer = false, layers = {}, maxLayer = -1;
  var pos = {};
  pairs.forEach(function (p) {
    if (!bystep[p.step]) { bystep[p.step] = []; steps.push(p.step); }
    bystep[p.step].push(p);
    var c = LS.cellOf(p);
    p._cell = c;
    if (c.layer !== null) {
      seenLayer = true;
      if (c.layer > maxLayer) maxLayer = c.layer;
      layers[c.layer] = true;
      if (!(("L" + c.op) in pos)) { pos["L" + c.op] = ops.layer.length; ops.layer.push(c.op); }
    } else {
      var where = seenLayer ? "post" : "pre";
      c.where = where;
      if (!(("N" + c.op) in pos)) { pos["N" + c.op] = ops[where].length; ops[where].push(c.op); c.first = where; }
    }
    if (p.step !== pairs[0].step) seenLayer = true;  /* later steps: where the op sat at the first */
  });
  var nonLayerRow = {};
  pairs.forEach(function (p) { if (p._cell.layer === null && !(p._cell.op in nonLayerRow)) nonLayerRow[p._cell.op] = p._cell.where; });
  var columns = ops.pre.concat(ops.layer, ops.post);
  var rowKeys = [];
  if (ops.pre.length) rowKeys.push("before");
  for (var l = 0; l <= maxLayer; l++) if (layers[l]) rowKeys.push(l);
  if (ops.post.length) rowKeys.push("after");
  var errs = pairs.map(function (p) { return LS.num(p.error); }).filter(function (e) { return isFinite(e) && e > 0; });
  var tol = pairs.map(function (p) { return p.tolerance; }), noise = pairs.map(function (p) { return p.noise_tolerance; });
  var tolMode = LS.mode(tol), noiseMode = LS.mode(noise);
  var lo = Math.floor(Math.log10(Math.min.apply(null, errs.concat([tolMode || 1]))));
  var hi = Math.ceil(Math.log10(Math.max.apply(null, errs.concat([(noiseMode || 1) * 10]))));
  if (hi <= lo) hi = lo + 1;
  function colour(e) {
    e = LS.num(e);
    if (isNaN(e)) return "#b794f4";
    if (e === 0) return "#d8efe0";
    return LS.ramp((Math.log10(e) - lo) / (hi - lo));
  }
  var controls = LS.el("div", {className: "controls"});
  var select = LS.el("select", {id: "step-select", "aria-label": "step"},
    steps.map(function (s) { return LS.el("option", {value: s, text: "step " + s + (s === 0 ? " (prefill)" : "")}); }));
  controls.appendChild(LS.el("label", null, "step ", select));
  controls.appendChild(LS.el("span", {className: "muted", text: "rows: layers; columns: ops in capture order; colour: relative L2 error (log scale); outlined: the first divergence; hover a cell for the pair"}));
  sec.appendChild(controls);
  /* legend: the scale with the tolerance and the noise allowance marked */
  var bar = LS.el("div", {style: "position:relative;width:420px;height:14px;border-radius:2px;background:linear-gradient(to right," +
    [0, .25, .5, .75, 1].map(function (t) { return LS.ramp(t); }).join(",") + ")"});
  function mark(v, label, colourName) {
    if (!(v > 0)) return;
    var t = (Math.log10(v) - lo) / (hi - lo);
    if (t < 0 || t > 1) return;
    bar.appendChild(LS.el("div", {className: "legend-mark", title: label, style: "position:absolute;top:-4px;height:22px;width:2px;background:" + colourName + ";left:" + (t * 100).toFixed(2) + "%"}));
  }
  mark(tolMode, "tolerance " + LS.fmt(tolMode), "#000");
  mark(noiseMode, "noise allowance " + LS.fmt(noiseMode), "#fff");
  sec.appendChild(LS.el("div", {className: "legend"}, LS.el("span", {text: "1e" + lo}), bar, LS.el("span", {text: "1e" + hi}),
    LS.el("span", {text: "| black: tolerance " + LS.fmt(tolMode) + "; white: noise allowance " + LS.fmt(noiseMode)}),
    LS.el("span", {className: "swatch", style: "background:#d8efe0"}), "exact",
    LS.el("span", {className: "swatch", style: "background:#b794f4"}), "incomparable"));
  var holder = LS.el("div", {className: "heatwrap"});
  sec.appendChild(holder);
  var current = [];
  function draw(step) {
    var cells = {};
    (bystep[step] || []).forEach(function (p) {
      var c = p._cell, row = c.layer !== null ? c.layer : nonLayerRow[c.op] === "pre" ? "before" : "after";
      var key = row + "\u0000" + c.op, cur = cells[key];
      if (!cur) cells[key] = {worst: p, all: [p]};
      else {
        cur.all.push(p);
        var e = LS.num(p.error), w = LS.num(cur.worst.error);
        if (isNaN(e) || e > w) cur.worst = p;
      }
    });
    var table = LS.el("table", {className: "heat", id: "heatmap", "data-step": step});
    var hr = LS.el("tr", null, LS.el("th"));
    columns.forEach(function (op) { hr.appendChild(LS.el("th", {scope: "col", text: op})); });
    table.appendChild(LS.el("thead", null, hr));
    var tb = LS.el("tbody");
    current = [];
    rowKeys.forEach(function (row) {
      var tr = LS.el("tr", null, LS.el("th", {scope: "row", text: typeof row === "number" ? "layer " + row : row}));
      columns.forEach(function (op) {
        var cell = cells[row + "\u0000" + op];
        var td = document.createElement("td");
        if (cell) {
          var p = cell.worst;
          td.className = "cell" + (p.status === "jump" ? " jump" : "");
          td.style.background = colour(p.error);
          td.setAttribute("data-layer", row);
          td.setAttribute("data-op", op);
          td.setAttribute("data-index", current.length);
          var isFirst = fd && cell.all.some(function (q) { return q.step === fd.step && q.reference === fd.reference && q.candidate === fd.candidate && q.call === fd.call; });
          if (isFirst) { td.className += " first"; td.id = "first-divergence"; cell.worst = cell.all.filter(function (q) { return q.reference === fd.reference && q.candidate === fd.candidate; })[0] || p; }
          current.push(cell);
        }
        tr.appendChild(td);
      });
      tb.appendChild(tr);
    });
    table.appendChild(tb);
    table.addEventListener("mousemove", function (ev) {
      var td = ev.target.closest ? ev.target.closest("td.cell") : null;
      if (!td) { LS.tip.hide(); return; }
      var cell = current[Number(td.getAttribute("data-index"))];
      LS.tip.show(ev, LS.pairTip(cell.worst, cell.all.length > 1 ? (cell.all.length - 1) + " more pair(s) in this cell; the worst is shown" : null));
    });
    table.addEventListener("mouseleave", function () { LS.tip.hide(); });
    holder.textContent = "";
    holder.appendChild(table);
  }
  select.addEventListener("change", function () { draw(Number(select.value)); LS.emit("step", Number(select.value)); });
  var start = fd ? fd.step : steps[0];
  select.value = String(start);
  draw(start);
};

LS.mode = function (values) {
  var counts = {}, best = null, n = 0;
  values.forEach(function (v) { var k = String(v); counts[k] = (counts[k] || 0) + 1; if (counts[k] > n) { n = counts[k]; best = v; } });
  return LS.num(best);
};

LS.listeners = {};
LS.on = function (name, f) { (LS.listeners[name] = LS.listeners[name] || []).push(f); };
LS.emit = function (name, v) { (LS.listeners[name] || []).forEach(function (f) { f(v); }); };

LS.depthChart = function (sec, d) {
  var pairs = d.pairs, fd = d.first_divergence, bystep = {}, steps = [];
  pairs.forEach(function (p) { if (!bystep[p.step]) { bystep[p.step] = []; steps.push(p.step); } bystep[p.step].push(p); });
  var errs = pairs.map(function (p) { return LS.num(p.error); }).filter(function (e) { return e > 0 && isFinite(e); });
  var floor = errs.length ? Math.min.apply(null, errs) : 1e-12;
  function y(e) { e = LS.num(e); return e > 0 ? e : floor; }
  var holder = LS.el("div");
  sec.appendChild(LS.el("p", {className: "muted", text: "Relative error of each pair against its position in capture order, one line per step (the selected step drawn thick). Green band: within tolerance; yellow band: within the noise allowance (drift); the circle: the first divergence."}));
  sec.appendChild(holder);
  function draw(sel) {
    var ref = bystep[sel] || bystep[steps[0]];
    var series = steps.map(function (s, k) {
      return {points: bystep[s].map(function (p, i) { return [i, y(p.error)]; }), color: LS.ramp(steps.length > 1 ? k / (steps.length - 1) * 0.85 : 0),
              width: s === sel ? 2.5 : 1, opacity: s === sel ? 1 : 0.45, label: "step " + s};
    });
    var lowest = ref.map(function (p, i) { return [i, floor / 10]; });
    var tolLine = ref.map(function (p, i) { return [i, LS.num(p.tolerance)]; });
    var noiseLine = ref.map(function (p, i) { return [i, LS.num(p.noise_tolerance)]; });
    var marks = [];
    if (fd && bystep[fd.step]) bystep[fd.step].forEach(function (p, i) {
      if (p.reference === fd.reference && p.candidate === fd.candidate && p.call === fd.call) marks.push({x: i, y: y(p.error), label: "first divergence: " + LS.pairName(p)});
    });
    holder.textContent = "";
    holder.appendChild(LS.chart({series: series, logY: true, marks: marks,
      bands: [{lo: lowest, hi: tolLine, color: "rgba(31,138,76,.12)"}, {lo: tolLine, hi: noiseLine, color: "rgba(214,158,46,.18)"}],
      xLabel: "capture order (pair index within the step)", yLabel: "relative L2 error"}));
    holder.appendChild(LS.el("div", {className: "legend"}, steps.map(function (s, k) {
      return [LS.el("span", {className: "swatch", style: "background:" + series[k].color}), "step " + s];
    })));
  }
  LS.on("step", draw);
  draw(fd ? fd.step : steps[0]);
};

LS.pairsTable = function (sec, d) {
  var fd = d.first_divergence;
  var statuses = [];
  d.pairs.forEach(function (p) { if (statuses.indexOf(p.status) < 0) statuses.push(p.status); });
  sec.appendChild(LS.table([
    {label: "step", get: function (p) { return p.step; }, num: true},
    {label: "reference", get: function (p) { return p.reference; }, name: true},
    {label: "candidate", get: function (p) { return p.candidate; }, name: true},
    {label: "op", get: function (p) { return p.canonical; }},
    {label: "shape", get: function (p) { return LS.shape(p.reference_shape); }, search: false},
    {label: "rel. error", get: function (p) { return p.error; }, num: true},
    {label: "tolerance", get: function (p) { return p.tolerance; }, num: true},
    {label: "max abs", get: function (p) { return p.metrics ? p.metrics.max_abs : null; }, num: true},
    {label: "cosine", get: function (p) { return p.metrics ? p.metrics.cosine : null; }, num: true, fmt: function (v) { return LS.fmt(v, 7); }},
    {label: "status", get: function (p) { return p.status; }, cls: function (p) { return LS.statusClass(p.status); }},
    {label: "transform", get: function (p) { return p.transform; }}
  ], d.pairs, {id: "pairs", search: "search names, ops, status", filters: [{label: "status", values: statuses, get: function (p) { return p.status; }}],
    rowClass: function (p) { return fd && p.step === fd.step && p.reference === fd.reference && p.candidate === fd.candidate && p.call === fd.call ? "first" : ""; }}));
};

LS.coverage = function (sec, d) {
  var cov = d.coverage;
  // how the two runs were lined up: steps matched, ranks merged, steps cut and joined
  [["steps", "How the steps were matched", d.step_match && d.step_match.line ? [d.step_match.line] : []],
   ["ranks", "Tensor-parallel ranks merged", (d.ranks && d.ranks.lines) || []],
   ["chunks", "Steps cut and joined along their tokens (chunked prefill, prefix cache, speculative decoding)",
    (d.chunks && d.chunks.lines) || []],
   ["precision", "A declared precision not taken as noise",
    d.precision ? [d.precision.sentence] : []]].forEach(function (x) {
    if (x[2].length)
      sec.appendChild(LS.el("div", {className: "panel", id: x[0]},
        LS.el("div", {style: "font-weight:600", text: x[1]}),
        LS.el("ul", {className: "plain"}, x[2].map(function (t) { return LS.el("li", {text: t}); }))));
  });
  if (cov) {
    sec.appendChild(LS.el("p", {text: cov.complete ? "Everything decisive was compared." : "Something decisive was not compared: the verdict cannot be trusted."}));
    if (cov.decisive && cov.decisive.length)
      sec.appendChild(LS.el("ul", {className: "plain"}, cov.decisive.map(function (t) { return LS.el("li", {text: t}); })));
    (cov.incomplete_because || []).forEach(function (g) {
      sec.appendChild(LS.el("div", {className: "panel"}, LS.el("div", {style: "font-weight:600", text: g.reason}),
        g.records && g.records.length ? LS.el("div", {className: "mono", text: "uncompared: " + g.records.join(", ")}) : null,
        (g.closest || []).map(function (c) { return LS.el("div", {className: "mono", text: "closest unpaired candidate record for " + c.reference + ": " + c.candidate + " " + LS.shape(c.shape)}); }),
        g.rule ? LS.el("pre", {className: "mono", text: g.rule}) : null));
    });
    if (cov.steps && cov.steps.length) sec.appendChild(LS.table([
      {label: "step", get: function (r) { return r.step; }, num: true},
      {label: "reference compared", get: function (r) { return r.paired; }, num: true},
      {label: "reference unpaired", get: function (r) { return r.unpaired; }, num: true},
      {label: "incomparable", get: function (r) { return r.incomparable; }, num: true},
      {label: "candidate unpaired", get: function (r) { return r.candidate_unpaired; }, num: true}], cov.steps, {id: "coverage-steps"}));
  }
  [["reference only", d.reference_only, "reference-only"], ["candidate only", d.candidate_only, "candidate-only"]].forEach(function (x) {
    var rows = x[1] || [];
    sec.appendChild(LS.el("h3", {text: x[0] + " (" + rows.length + " records with no partner)"}));
    if (rows.length) sec.appendChild(LS.table([
      {label: "step", get: function (r) { return r.step; }, num: true},
      {label: "name", get: function (r) { return r.name; }, name: true},
      {label: "call", get: function (r) { return r.call; }, num: true},
      {label: "shape", get: function (r) { return LS.shape(r.shape); }},
      {label: "dtype", get: function (r) { return r.dtype; }}], rows, {id: x[2], search: "search names"}));
  });
};
