"use strict";
/* lockstep HTML report: shared helpers. Every string that came from a dump or a checkpoint
   reaches the page through text nodes (textContent), never as markup. */
var LS = {};

LS.el = function (tag, props) {
  var node = document.createElement(tag);
  if (props) {
    for (var key in props) {
      if (!Object.prototype.hasOwnProperty.call(props, key)) continue;
      var v = props[key];
      if (v === null || v === undefined || v === false) continue;
      if (key === "className") node.className = v;
      else if (key === "text") node.textContent = String(v);
      else if (key === "style") node.style.cssText = v;
      else node.setAttribute(key, String(v));
    }
  }
  for (var i = 2; i < arguments.length; i++) LS.append(node, arguments[i]);
  return node;
};

LS.append = function (node, child) {
  if (child === null || child === undefined || child === false) return node;
  if (Array.isArray(child)) { child.forEach(function (c) { LS.append(node, c); }); return node; }
  node.appendChild(typeof child === "object" ? child : document.createTextNode(String(child)));
  return node;
};

LS.svg = function (tag, attrs) {
  var node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (var key in attrs || {}) {
    if (key === "text") node.textContent = String(attrs[key]);
    else node.setAttribute(key, String(attrs[key]));
  }
  return node;
};

/* the data block: packed lists of objects ({"__table__": columns, "rows": [...]}) back to
   objects, all through */
LS.unpack = function (v) {
  if (Array.isArray(v)) return v.map(LS.unpack);
  if (v && typeof v === "object") {
    if (Array.isArray(v.__table__)) {
      var cols = v.__table__;
      return v.rows.map(function (row) {
        var o = {};
        for (var i = 0; i < cols.length; i++) o[cols[i]] = LS.unpack(row[i]);
        return o;
      });
    }
    var out = {};
    for (var k in v) if (Object.prototype.hasOwnProperty.call(v, k)) out[k] = LS.unpack(v[k]);
    return out;
  }
  return v;
};

/* JSON numbers, with the report's "nan", "inf", "-inf" strings */
LS.num = function (x) {
  if (typeof x === "number") return x;
  if (x === "inf") return Infinity;
  if (x === "-inf") return -Infinity;
  if (x === "nan") return NaN;
  return x === null || x === undefined ? NaN : Number(x);
};

LS.fmt = function (x, digits) {
  if (x === null || x === undefined) return "-";
  if (typeof x === "boolean") return x ? "yes" : "no";
  var n = LS.num(x);
  if (typeof x === "string" && isNaN(n) && x !== "nan") return x;
  if (isNaN(n)) return "nan";
  if (!isFinite(n)) return n > 0 ? "inf" : "-inf";
  if (Number.isInteger(n) && Math.abs(n) < 1e15) return String(n);
  var a = Math.abs(n);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return n.toExponential((digits || 4) - 1);
  return String(Number(n.toPrecision(digits || 4)));
};

LS.shape = function (s) { return s ? "[" + s.join(", ") + "]" : "-"; };

LS.kv = function (rows) {
  var dl = LS.el("dl", {className: "kv"});
  rows.forEach(function (r) {
    if (r[1] === null || r[1] === undefined || r[1] === "") return;
    dl.appendChild(LS.el("dt", {text: r[0]}));
    dl.appendChild(LS.el("dd", null, r[1]));
  });
  return dl;
};

LS.banner = function (cls, head, sentence) {
  return LS.el("div", {className: "banner " + cls, id: "verdict"},
    LS.el("div", {className: "verdict", text: head}),
    sentence ? LS.el("div", {text: sentence}) : null);
};

LS.section = function (root, title, id) {
  var sec = LS.el("section", {id: id || null}, LS.el("h2", {text: title}));
  root.appendChild(sec);
  return sec;
};

/* the one tooltip: show(event, content) next to the pointer, hide() */
LS.tip = {
  node: null,
  show: function (ev, content) {
    var t = this.node || (this.node = document.getElementById("tooltip"));
    t.textContent = "";
    LS.append(t, content);
    t.hidden = false;
    var x = ev.clientX + 14, y = ev.clientY + 14;
    var w = t.offsetWidth, h = t.offsetHeight;
    if (x + w > window.innerWidth - 8) x = Math.max(8, ev.clientX - w - 14);
    if (y + h > window.innerHeight - 8) y = Math.max(8, ev.clientY - h - 14);
    t.style.left = x + "px";
    t.style.top = y + "px";
  },
  hide: function () { if (this.node) this.node.hidden = true; }
};

/* A sortable, searchable table. columns: [{label, get(row), num, fmt, cls(row)}];
   opts: {search: placeholder or null, rowClass(row), id, filters: [{label, values, get}]} */
LS.table = function (columns, rows, opts) {
  opts = opts || {};
  var wrap = LS.el("div", {className: "datatable", id: opts.id || null});
  var controls = LS.el("div", {className: "controls"});
  var input = null, selects = [];
  var count = LS.el("span", {className: "muted count"});
  if (opts.search) {
    input = LS.el("input", {type: "search", placeholder: opts.search, "aria-label": opts.search,
                            className: "search"});
    controls.appendChild(input);
  }
  (opts.filters || []).forEach(function (f) {
    var sel = LS.el("select", {"aria-label": f.label},
      LS.el("option", {value: "", text: f.label + ": all"}),
      f.values.map(function (v) { return LS.el("option", {value: v, text: v}); }));
    sel.filterGet = f.get;
    selects.push(sel);
    controls.appendChild(sel);
  });
  controls.appendChild(count);
  wrap.appendChild(controls);
  var table = LS.el("table", {className: "data"});
  var headRow = LS.el("tr");
  table.appendChild(LS.el("thead", null, headRow));
  var body = LS.el("tbody");
  table.appendChild(body);
  wrap.appendChild(LS.el("div", {className: "scroll"}, table));
  var items = rows.map(function (row, index) {
    var tr = document.createElement("tr");
    var cls = opts.rowClass ? opts.rowClass(row) : "";
    if (cls) tr.className = cls;
    var text = [];
    columns.forEach(function (c) {
      var v = c.get(row);
      var shown = c.fmt ? c.fmt(v, row) : (c.num ? LS.fmt(v) : (v === null || v === undefined ? "-" : String(v)));
      var td = document.createElement("td");
      td.textContent = shown;
      var tcls = (c.num ? "num" : "") + (c.name ? " name" : "") + (c.cls ? " " + c.cls(row) : "");
      if (tcls.trim()) td.className = tcls.trim();
      tr.appendChild(td);
      if (c.search !== false && !c.num) text.push(shown);
    });
    return {row: row, tr: tr, index: index, text: text.join("\u0000").toLowerCase()};
  });
  var order = items.slice();
  function fill() {
    var frag = document.createDocumentFragment();
    order.forEach(function (it) { frag.appendChild(it.tr); });
    body.appendChild(frag);
  }
  function filter() {
    var q = input ? input.value.trim().toLowerCase() : "";
    var shown = 0;
    items.forEach(function (it) {
      var ok = !q || it.text.indexOf(q) >= 0;
      selects.forEach(function (s) { if (ok && s.value) ok = String(s.filterGet(it.row)) === s.value; });
      it.tr.hidden = !ok;
      if (ok) shown++;
    });
    count.textContent = shown === items.length ? items.length + " rows" : shown + " of " + items.length + " rows";
  }
  columns.forEach(function (c, ci) {
    var th = LS.el("th", {text: c.label, title: "sort by " + c.label});
    th.addEventListener("click", function () {
      var desc = th.className !== "sorted-asc";
      Array.prototype.forEach.call(headRow.children, function (h) { h.className = ""; });
      th.className = desc ? "sorted-asc" : "sorted-desc";
      desc = !desc;
      order.sort(function (a, b) {
        var x = c.get(a.row), y = c.get(b.row), r;
        if (c.num) {
          x = LS.num(x); y = LS.num(y);
          if (isNaN(x)) x = Infinity; if (isNaN(y)) y = Infinity;
          r = x < y ? -1 : x > y ? 1 : 0;
        } else r = String(x === null || x === undefined ? "" : x).localeCompare(String(y === null || y === undefined ? "" : y));
        return (desc ? -r : r) || a.index - b.index;
      });
      fill();
    });
    headRow.appendChild(th);
  });
  if (input) input.addEventListener("input", filter);
  selects.forEach(function (s) { s.addEventListener("change", filter); });
  fill();
  filter();
  return wrap;
};

/* A line chart in SVG. spec: {series: [{points: [[x, y]], color, width, label}], logY,
   bands: [{lo: [[x, y]], hi: [[x, y]], color}], marks: [{x, y, label}], xLabel, yLabel,
   width, height} */
LS.chart = function (spec) {
  var W = spec.width || 1100, H = spec.height || 300, L = 62, R = 12, T = 12, B = 38;
  var xs = [], ys = [];
  spec.series.forEach(function (s) { s.points.forEach(function (p) { xs.push(p[0]); ys.push(p[1]); }); });
  (spec.bands || []).forEach(function (b) { b.lo.concat(b.hi).forEach(function (p) { ys.push(p[1]); }); });
  var fy = spec.logY ? function (v) { return Math.log10(v); } : function (v) { return v; };
  ys = ys.filter(function (v) { return isFinite(fy(v)); }).map(fy);
  var x0 = Math.min.apply(null, xs.concat([0])), x1 = Math.max.apply(null, xs.concat([1]));
  var y0 = ys.length ? Math.min.apply(null, ys) : 0, y1 = ys.length ? Math.max.apply(null, ys) : 1;
  if (spec.logY) { y0 = Math.floor(y0); y1 = Math.ceil(y1); }
  if (y1 <= y0) y1 = y0 + 1;
  function px(x) { return L + (x - x0) / ((x1 - x0) || 1) * (W - L - R); }
  function py(v) {
    var y = fy(v);
    if (!isFinite(y)) y = y > 0 ? y1 : y0;
    y = Math.min(y1, Math.max(y0, y));
    return T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  }
  var svg = LS.svg("svg", {viewBox: "0 0 " + W + " " + H, width: W, height: H, role: "img"});
  (spec.bands || []).forEach(function (b) {
    var pts = b.lo.map(function (p) { return px(p[0]) + "," + py(p[1]); })
      .concat(b.hi.slice().reverse().map(function (p) { return px(p[0]) + "," + py(p[1]); }));
    svg.appendChild(LS.svg("polygon", {points: pts.join(" "), fill: b.color, stroke: "none"}));
  });
  var ticks = spec.logY ? [] : null;
  if (spec.logY) for (var e = y0; e <= y1; e++) ticks.push(e);
  else for (var i = 0; i <= 4; i++) ticks.push(y0 + (y1 - y0) * i / 4);
  ticks.forEach(function (t) {
    var v = spec.logY ? Math.pow(10, t) : t, y = py(v);
    svg.appendChild(LS.svg("line", {x1: L, x2: W - R, y1: y, y2: y, stroke: "#eceef2"}));
    svg.appendChild(LS.svg("text", {x: L - 6, y: y + 4, "text-anchor": "end",
                                    text: spec.logY ? "1e" + t : LS.fmt(v, 3)}));
  });
  svg.appendChild(LS.svg("line", {x1: L, x2: L, y1: T, y2: H - B, stroke: "#9aa3b2"}));
  svg.appendChild(LS.svg("line", {x1: L, x2: W - R, y1: H - B, y2: H - B, stroke: "#9aa3b2"}));
  var xt = Math.max(1, Math.ceil((x1 - x0) / 12));
  for (var x = Math.ceil(x0); x <= x1; x += xt)
    svg.appendChild(LS.svg("text", {x: px(x), y: H - B + 14, "text-anchor": "middle", text: x}));
  if (spec.xLabel) svg.appendChild(LS.svg("text", {x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle", text: spec.xLabel}));
  if (spec.yLabel) svg.appendChild(LS.svg("text", {x: 12, y: T + (H - T - B) / 2, "text-anchor": "middle",
                                                    transform: "rotate(-90 12 " + (T + (H - T - B) / 2) + ")", text: spec.yLabel}));
  spec.series.forEach(function (s) {
    var d = s.points.map(function (p, k) { return (k ? "L" : "M") + px(p[0]).toFixed(1) + " " + py(p[1]).toFixed(1); }).join("");
    var path = LS.svg("path", {d: d, fill: "none", stroke: s.color, "stroke-width": s.width || 1.5,
                               "stroke-dasharray": s.dash || "none", opacity: s.opacity || 1});
    if (s.label) path.appendChild(LS.svg("title", {text: s.label}));
    svg.appendChild(path);
    if (s.dots) s.points.forEach(function (p) {
      svg.appendChild(LS.svg("circle", {cx: px(p[0]), cy: py(p[1]), r: 2.5, fill: s.color}));
    });
  });
  (spec.marks || []).forEach(function (m) {
    var c = LS.svg("circle", {cx: px(m.x), cy: py(m.y), r: 6, fill: "none", stroke: m.color || "#000", "stroke-width": 2.5});
    c.appendChild(LS.svg("title", {text: m.label}));
    svg.appendChild(c);
  });
  return LS.el("div", {className: "chart"}, svg);
};

/* colour of a value on [0, 1]: dark blue, teal, yellow, orange, dark red */
LS.ramp = function (t) {
  var stops = [[43, 79, 140], [74, 167, 160], [242, 209, 74], [228, 87, 46], [120, 0, 0]];
  t = Math.min(1, Math.max(0, t)) * (stops.length - 1);
  var i = Math.min(stops.length - 2, Math.floor(t)), f = t - i, a = stops[i], b = stops[i + 1];
  return "rgb(" + [0, 1, 2].map(function (k) { return Math.round(a[k] + (b[k] - a[k]) * f); }).join(",") + ")";
};

LS.statusClass = function (s) { return "st-" + String(s).replace(/[^a-z_]/gi, "_"); };
