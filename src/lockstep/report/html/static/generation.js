/* The generation report: both outputs token by token, KL per step, the tensor comparison at
   the split. */
LS.renderGeneration = function (root, d, words) {
  var s = d.summary || {};
  root.appendChild(LS.banner(d.ok ? "pass" : "fail", d.ok ? "pass" : "fail",
    s.prompts + " prompt(s): " + s.prompts_split + " with a real split, " + s.prompts_over_kl +
    " over the KL limit, " + s.prompts_garbage + " with garbage; teacher-forced, " + s.same_top + " of " +
    s.steps + " steps agree on the " + (s.same_argmax === undefined || s.same_argmax === s.same_top ? "top token (" :
    "token chosen, " + s.same_argmax + " on the logits' top token (") + s.near_ties + " near-ties, " + s.splits + " splits); mean KL " +
    LS.fmt(s.kl && s.kl.mean) + " nats."));
  var sides = LS.el("div", {className: "sides"});
  [["reference", d.reference], ["candidate", d.candidate]].forEach(function (x) {
    var meta = (x[1] && x[1].meta) || {};
    sides.appendChild(LS.el("div", {className: "side"}, LS.el("h3", {text: x[0]}),
      LS.kv([["engine", x[1] && x[1].spec], ["dtype", meta.dtype], ["model", meta.model]])));
  });
  root.appendChild(sides);
  var st = d.settings || {};
  root.appendChild(LS.el("p", {className: "muted", text: "greedy, " + st.max_new_tokens + " new tokens per prompt; top-k " +
    st.top_k + "; near-tie within " + st.near_tie + " nats; KL limit " + st.max_kl + " nats (mean per prompt)."}));
  root.appendChild(LS.el("div", {className: "legend"},
    LS.el("span", {className: "token same", text: "same"}), LS.el("span", {className: "token near_tie", text: "near-tie"}),
    LS.el("span", {className: "token split", text: "real split"}), LS.el("span", {className: "token after", text: "after the split (own context)"}),
    "hover a token for both sides' top-k"));
  (d.prompts || []).forEach(function (p, i) { LS.renderPrompt(root, d, p, i, words); });
};

LS.tokenText = function (p, t) {
  var piece = p.pieces ? p.pieces[String(t)] : undefined;
  return piece === undefined || piece === null ? "\u27e8" + t + "\u27e9" : piece;
};

LS.topTip = function (p, s, label) {
  function list(top) {
    return LS.el("ol", {style: "margin:2px 0;padding-left:18px"}, (top || []).map(function (x) {
      return LS.el("li", {className: "mono", text: JSON.stringify(LS.tokenText(p, x[0])) + " (" + x[0] + ")  " + LS.fmt(x[1], 3)});
    }));
  }
  return [LS.el("div", {style: "font-weight:600", text: label}),
    LS.kv([["kind", s.kind], ["KL", LS.fmt(s.kl)], ["reference token", JSON.stringify(LS.tokenText(p, s.reference_token)) + " p=" + LS.fmt(s.reference_prob, 3)],
           ["candidate token", JSON.stringify(LS.tokenText(p, s.candidate_token))],
           ["candidate p(ref token)", LS.fmt(s.candidate_prob, 3)],
           ["gaps", "reference " + LS.fmt(s.reference_gap, 3) + ", candidate " + LS.fmt(s.candidate_gap, 3) + " nats"]]),
    LS.el("div", {style: "display:flex;gap:18px"},
      LS.el("div", null, LS.el("div", {text: "reference top-k"}), list(s.reference_top_k)),
      LS.el("div", null, LS.el("div", {text: "candidate top-k"}), list(s.candidate_top_k)))];
};

LS.renderPrompt = function (root, d, p, i, words) {
  var sec = LS.section(root, "Prompt " + (i + 1) + (p.ok ? "" : " \u2014 diverged at step " + p.diverged_step), "prompt-" + i);
  var label = p.text !== undefined && p.text !== null ? p.text : (p.prompt !== undefined ? p.prompt : null);
  if (label !== null && label !== undefined) sec.appendChild(LS.el("div", {className: "panel mono", text: typeof label === "string" ? label : JSON.stringify(label)}));
  var fr = p.free_running || {}, tf = (p.teacher_forced && p.teacher_forced.steps_detail) || [];
  var split = fr.split_step;
  function row(title, tokens, side) {
    var line = LS.el("div", {className: "tokens"}, LS.el("span", {className: "muted", text: title + ": "}));
    tokens.forEach(function (t, k) {
      var kind, step;
      if (side === "reference") { step = tf[k]; kind = step ? step.kind : "same"; }
      else if (split === null || split === undefined || k < split) { kind = "same"; step = tf[k]; }
      else if (k === split) { kind = fr.split ? fr.split.kind : "split"; step = fr.split; }
      else { kind = "after"; step = null; }
      var span = LS.el("span", {className: "token " + kind, "data-step": k, text: LS.tokenText(p, t)});
      if (step) span.addEventListener("mousemove", function (ev) {
        LS.tip.show(ev, LS.topTip(p, step, "step " + k + (side === "reference" ? " (teacher-forced: the candidate fed the reference's tokens)" : " (free-running)")));
      });
      span.addEventListener("mouseleave", function () { LS.tip.hide(); });
      line.appendChild(span);
    });
    return line;
  }
  sec.appendChild(LS.el("h3", {text: "outputs, free-running" + (split !== null && split !== undefined ? " (the tokens part at step " + split + ")" : " (identical)")}));
  sec.appendChild(row("reference", fr.reference_tokens || [], "reference"));
  sec.appendChild(row("candidate", fr.candidate_tokens || [], "candidate"));
  var flags = (p.garbage || []).map(function (f) { return "garbage: " + f.kind + " at step " + f.step + ": " + f.detail; });
  if (p.decode_check && p.decode_check.broken) flags.push("decode step 1 differs from the candidate's own prefill (KL " + LS.fmt(p.decode_check.kl) + ")");
  if (p.kl_step !== null && p.kl_step !== undefined) flags.push("mean KL over the limit; first step over it: " + p.kl_step);
  if (flags.length) sec.appendChild(LS.el("ul", {className: "plain st-bad"}, flags.map(function (f) { return LS.el("li", {text: f}); })));
  if (tf.length) {
    sec.appendChild(LS.el("h3", {text: "KL(reference || candidate) per step, teacher-forced"}));
    var kls = tf.map(function (s) { return [s.step, Math.max(LS.num(s.kl), 1e-6)]; });
    var limit = (d.settings && d.settings.max_kl) || 0.05;
    var marks = tf.filter(function (s) { return s.kind !== "same"; }).map(function (s) { return {x: s.step, y: Math.max(LS.num(s.kl), 1e-6), label: s.kind + " at step " + s.step, color: s.kind === "split" ? "#c53030" : "#b7791f"}; });
    sec.appendChild(LS.chart({series: [{points: kls, color: "#2b4f8c", width: 2, dots: true, label: "KL"},
      {points: tf.map(function (s) { return [s.step, limit]; }), color: "#c53030", dash: "5 4", width: 1, label: "KL limit " + limit}],
      marks: marks, logY: true, height: 220, xLabel: "step", yLabel: "KL (nats)"}));
  }
  var loc = p.localization;
  if (loc) {
    sec.appendChild(LS.el("h3", {text: "tensors at step " + loc.step + " (where the tokens split)"}));
    if (loc.error) sec.appendChild(LS.el("p", {className: "st-bad", text: "could not compare: " + loc.error}));
    if (loc.report) {
      var holder = LS.el("div", {className: "panel", id: "localization-" + i});
      sec.appendChild(holder);
      LS.renderComparison(holder, loc.report, words);
    } else if (loc.first_divergence) {
      sec.appendChild(LS.el("div", {className: "panel"}, LS.kv([["verdict", loc.verdict], ["first divergence", LS.pairName(loc.first_divergence)],
        ["error", LS.fmt(loc.first_divergence.error)], ["dumps", loc.reference_dump + ", " + loc.candidate_dump]])));
    }
  }
};
