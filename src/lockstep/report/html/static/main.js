/* Draw the report the data block holds; mark the page ready (data-ready; data-render-ms: the
   drawing; data-ready-ms: since the navigation started). */
(function () {
  var t0 = performance.now();
  var root = document.getElementById("report");
  root.textContent = "";
  try {
    var doc = JSON.parse(document.getElementById("lockstep-data").textContent);
    var d = LS.unpack(doc.data);
    root.appendChild(LS.el("h1", {text: doc.title}));
    var draw = {comparison: LS.renderComparison, generation: LS.renderGeneration, inspect: LS.renderInspect,
                against: LS.renderAgainst, weights: LS.renderWeights, zoo: LS.renderZoo, bench: LS.renderBench}[doc.kind];
    draw(root, d, doc.words || {});
    root.appendChild(LS.el("p", {className: "muted small", text: "lockstep " + (doc.version || "") + " \u2014 this page is self-contained: the report's data is in the element #lockstep-data (JSON)."}));
  } catch (e) {
    root.appendChild(LS.el("pre", {className: "st-bad", text: "this report could not be drawn: " + e + "\n" + (e.stack || "")}));
    document.body.setAttribute("data-error", String(e));
    throw e;
  } finally {
    document.body.setAttribute("data-render-ms", (performance.now() - t0).toFixed(1));
    /* since the navigation started: fetching and parsing the file, then drawing */
    document.body.setAttribute("data-ready-ms", performance.now().toFixed(1));
    document.body.setAttribute("data-ready", "1");
  }
})();
