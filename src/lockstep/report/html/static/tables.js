/* The checkpoint, loaded-weights, zoo and bench reports: tables. */
LS.col = function (label, key, opts) {
  var c = {label: label, get: typeof key === "function" ? key : function (r) { return r[key]; }};
  for (var k in opts || {}) c[k] = opts[k];
  return c;
};

LS.renderInspect = function (root, d) {
  var s = d.summary || {}, bad = (d.bad_tensors || []).length, unread = (d.unreadable_tensors || []).length;
  root.appendChild(LS.banner(bad || unread ? "fail" : "pass", bad || unread ? "bad tensors" : "clean",
    s.tensors + " tensors, " + LS.fmt(s.elements) + " elements: " + bad + " with NaN or Inf, " + unread + " unreadable."));
  root.appendChild(LS.kv([["checkpoint", d.path], ["format", d.kind], ["adapter", d.adapter ? JSON.stringify(d.adapter) : null]]));
  root.appendChild(LS.section(root, "Components", "components")).appendChild(LS.table([
    LS.col("component", "component"), LS.col("tensors", "tensors", {num: true}), LS.col("elements", "elements", {num: true}),
    LS.col("bad tensors", "bad_tensors", {num: true}), LS.col("NaN", "nan", {num: true}), LS.col("Inf", "inf", {num: true})],
    d.components || [], {rowClass: function (r) { return r.bad_tensors ? "bad" : ""; }}));
  var comps = [];
  (d.tensors || []).forEach(function (t) { if (comps.indexOf(t.component) < 0) comps.push(t.component); });
  LS.section(root, "Tensors", "tensors").appendChild(LS.table([
    LS.col("name", "name", {name: true}), LS.col("component", "component"), LS.col("dtype", "dtype"),
    LS.col("shape", function (t) { return LS.shape(t.shape); }),
    LS.col("NaN", function (t) { return (t.stats || {}).nan; }, {num: true}), LS.col("Inf", function (t) { return (t.stats || {}).inf; }, {num: true}),
    LS.col("min", function (t) { return (t.stats || {}).min; }, {num: true}), LS.col("max", function (t) { return (t.stats || {}).max; }, {num: true}),
    LS.col("mean", function (t) { return (t.stats || {}).mean; }, {num: true}), LS.col("std", function (t) { return (t.stats || {}).std; }, {num: true}),
    LS.col("unreadable", "unreadable")], d.tensors || [],
    {id: "tensor-table", search: "search tensor names", filters: [{label: "component", values: comps, get: function (t) { return t.component; }},
      {label: "NaN/Inf", values: ["yes", "no"], get: function (t) { return t.bad ? "yes" : "no"; }}],
     rowClass: function (t) { return t.bad || t.unreadable ? "bad" : ""; }}));
};

LS.renderAgainst = function (root, d) {
  var s = d.summary || {};
  root.appendChild(LS.banner(d.passed ? "pass" : "fail", d.passed ? "same weights" : "differ",
    s.pairs + " tensors: " + s.ok + " ok, " + s.mismatch + " beyond what the dtypes explain, " + s.shape + " of another shape, " +
    s.missing + " missing from B, " + s.extra + " only in B."));
  root.appendChild(LS.kv([["A", (d.a || {}).path + " (" + (d.a || {}).kind + ")"], ["B", (d.b || {}).path + " (" + (d.b || {}).kind + ")"],
    ["heads", d.heads ? "n_head " + d.heads.n_head + ", n_kv " + d.heads.n_kv + ", head_dim " + d.heads.head_dim : null]]));
  LS.section(root, "By storage type", "by-dtype").appendChild(LS.table([
    LS.col("A dtype", "dtype_a"), LS.col("B dtype", "dtype_b"), LS.col("tensors", "tensors", {num: true}),
    LS.col("failed", "failed", {num: true}), LS.col("max rel. L2", "max_rel_l2", {num: true}), LS.col("max abs", "max_abs", {num: true}),
    LS.col("budget", "budget", {num: true}),
    LS.col("transforms", function (r) { return Object.keys(r.transforms || {}).map(function (k) { return k + " " + r.transforms[k]; }).join(", "); })],
    d.by_dtype || [], {rowClass: function (r) { return r.failed ? "bad" : ""; }}));
  var statuses = [];
  (d.pairs || []).forEach(function (p) { if (statuses.indexOf(p.status) < 0) statuses.push(p.status); });
  LS.section(root, "Tensors", "tensors").appendChild(LS.table([
    LS.col("A", "name_a", {name: true}), LS.col("B", "name_b", {name: true}), LS.col("dtypes", function (p) { return (p.dtype_a || "-") + " / " + (p.dtype_b || "-"); }),
    LS.col("shape", function (p) { return LS.shape(p.shape_a || p.shape_b); }), LS.col("rel. L2", "rel_l2", {num: true}),
    LS.col("budget", "budget", {num: true}), LS.col("max abs", "max_abs", {num: true}),
    LS.col("status", "status", {cls: function (p) { return LS.statusClass(p.status); }}), LS.col("transform", "transform"), LS.col("note", "note")],
    d.pairs || [], {id: "tensor-table", search: "search tensor names", filters: [{label: "status", values: statuses, get: function (p) { return p.status; }}],
      rowClass: function (p) { return p.status !== "ok" ? "bad" : ""; }}));
};

LS.renderWeights = function (root, d) {
  var s = d.summary || {}, pl = d.placement || {};
  var ok = d.passed && !(pl.outliers || []).length;
  root.appendChild(LS.banner(ok ? "pass" : "fail", ok ? "pass" : "fail",
    s.tensors + " tensors: " + Object.keys(s).filter(function (k) { return k !== "tensors"; }).map(function (k) { return s[k] + " " + k; }).join(", ") +
    "; majority placement " + pl.device + ", " + pl.dtype + (d.not_loaded && d.not_loaded.length ? "; not loaded: " + d.not_loaded.join(", ") : "")));
  root.appendChild(LS.kv([["checkpoint", d.checkpoint + " (" + d.kind + ")"]]));
  LS.section(root, "By layer", "layers").appendChild(LS.table([
    LS.col("layer", "layer", {name: true}), LS.col("tensors", "tensors", {num: true}),
    LS.col("counts", function (r) { return Object.keys(r.counts || {}).map(function (k) { return r.counts[k] + " " + k; }).join(", "); }),
    LS.col("verdict", "verdict", {cls: function (r) { return LS.statusClass(r.verdict === "loaded" ? "ok" : "bad"); }})],
    d.layers || [], {search: "search layers", rowClass: function (r) { return r.verdict !== "loaded" ? "bad" : ""; }}));
  var statuses = [];
  (d.params || []).forEach(function (p) { if (statuses.indexOf(p.status) < 0) statuses.push(p.status); });
  LS.section(root, "Tensors", "tensors").appendChild(LS.table([
    LS.col("name", "name", {name: true}), LS.col("checkpoint name", "checkpoint_name", {name: true}), LS.col("dtype", "dtype"),
    LS.col("checkpoint dtype", "checkpoint_dtype"), LS.col("shape", function (p) { return LS.shape(p.shape); }),
    LS.col("rel. L2", "rel_l2", {num: true}), LS.col("max abs", "max_abs", {num: true}),
    LS.col("status", "status", {cls: function (p) { return LS.statusClass(p.status); }}), LS.col("transform", "transform"), LS.col("note", "note")],
    d.params || [], {id: "tensor-table", search: "search tensor names", filters: [{label: "status", values: statuses, get: function (p) { return p.status; }}],
      rowClass: function (p) { return p.status !== "equal" ? "bad" : ""; }}));
  LS.section(root, "Placement", "placement").appendChild(LS.table([
    LS.col("module", function (m) { return m.name || "(root)"; }, {name: true}), LS.col("device", "device"), LS.col("dtype", "dtype"),
    LS.col("parameters", "params", {num: true}), LS.col("apart because", "outlier")], pl.modules || [],
    {search: "search modules", rowClass: function (m) { return m.outlier ? "bad" : ""; }}));
};

LS.renderZoo = function (root, d) {
  root.appendChild(LS.banner(d.ok ? "pass" : "fail", d.ok ? "pass" : "miss",
    d.passed + " of " + d.results.length + " bugs localized to their step and tensor with the right diagnosis; bug-free controls: " +
    ((d.controls || []).map(function (c) { return c.family + " " + c.dtype + ": " + c.verdict; }).join(", ") || "not run") + "; " + LS.fmt(d.seconds, 3) + " s"));
  LS.section(root, "Bugs", "bugs").appendChild(LS.table([
    LS.col("", function (r) { return r.ok ? "ok" : "MISS"; }, {cls: function (r) { return LS.statusClass(r.ok ? "ok" : "miss"); }}),
    LS.col("bug", "bug", {name: true}), LS.col("family", "family"),
    LS.col("lockstep found", function (r) { return r.step !== null && r.step !== undefined ? "step " + r.step + " " + r.tensor : r.verdict; }, {name: true}),
    LS.col("expected", function (r) { return "step " + r.expected.step + " " + r.expected.tensor; }, {name: true}),
    LS.col("class", "diagnosis"), LS.col("expected class", function (r) { return r.expected.diagnosis; }),
    LS.col("diagnosis", "title"), LS.col("seconds", "seconds", {num: true})], d.results || [],
    {id: "zoo-table", search: "search bugs", rowClass: function (r) { return r.ok ? "" : "bad"; }}));
};

LS.renderBench = function (root, d) {
  root.appendChild(LS.banner(d.noisy ? "drift" : "pass", "benchmark", d.reference + " (reference) against " + d.candidate + " (candidate)" +
    (d.noisy ? "; some figures vary too much to trust (noisy)" : "")));
  function ci(x) { return x ? LS.fmt(x[0], 3) + " \u2013 " + LS.fmt(x[1], 3) : "-"; }
  LS.section(root, "Figures", "figures").appendChild(LS.table([
    LS.col("figure", "name"), LS.col("unit", "unit"),
    LS.col("reference median", function (f) { return f.reference.median; }, {num: true}),
    LS.col("95% CI", function (f) { return ci(f.reference.ci); }),
    LS.col("candidate median", function (f) { return f.candidate.median; }, {num: true}),
    LS.col("95% CI", function (f) { return ci(f.candidate.ci); }),
    LS.col("candidate / reference", function (f) { return f.ratio.value; }, {num: true}),
    LS.col("ratio CI", function (f) { return ci(f.ratio.ci); }),
    LS.col("noisy", function (f) { return f.noisy ? "noisy" : ""; })], d.figures || [], {id: "figures"}));
  var skipped = Object.keys(d.skipped || {});
  if (skipped.length) root.appendChild(LS.el("ul", {className: "plain"}, skipped.map(function (k) { return LS.el("li", {text: k + ": " + d.skipped[k]}); })));
  var mem = Object.keys(d.memory || {});
  if (mem.length) LS.section(root, "Peak memory", "memory").appendChild(LS.kv(mem.map(function (k) { return [k, JSON.stringify(d.memory[k])]; })));
  Object.keys(d.modules || {}).forEach(function (side) {
    LS.section(root, "Time per module: " + side, "modules-" + side).appendChild(LS.el("pre", {className: "mono small", text: JSON.stringify(d.modules[side], null, 1)}));
  });
  LS.section(root, "Settings", "settings").appendChild(LS.el("pre", {className: "mono small", text: JSON.stringify(d.settings, null, 1)}));
};
