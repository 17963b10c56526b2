"""A self-contained HTML view of an SMC run over tokens (``Result.to_html``).

One page, inline CSS and JavaScript, no network: per step, every particle's text (the token the step
added highlighted), its normalised weight before the step's selection, its parent at the previous
step and how many copies the selection made of it (0: dropped), whether its line survives to the
end; the ESS and the resampling events per step, ``log Ẑ`` after each step; a genealogy chart
(steps × particles, each particle joined to its parent, the lines that survive to the end drawn
dark). The view llamppl's and genlm-control's visualisers give.

It reads what SMC records with ``history=True`` (the default): ``result.extras["filtering"]`` (each
step's choices, pre-selection log weights and active flags), ``result.ancestors``, ``result.ess``,
``result.resampled``, ``result.log_evidence_history``.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ppinfer.errors import ConfigError

__all__ = ["smc_token_view", "write_smc_html"]


def smc_token_view(result: Any, tokenizer: Any = None, site: str = "tok") -> dict:
    """The data the page shows, as plain Python (lists, floats): ``steps`` (one dict per step that
    ran: ``texts``, ``pieces`` (the text the step added), ``weights`` (normalised, pre-selection),
    ``parents`` (index at the previous step; -1 at the first), ``copies`` (offspring after the
    selection), ``active``, ``lineage`` (an ancestor of some final particle)), ``ess``,
    ``resampled``, ``log_z`` per step, and ``final`` (``texts``, ``weights``, ``nodes``: each final
    particle's index at the last step)."""
    records = result.extras.get("filtering") if isinstance(result.extras, dict) else None
    if records is None or result.ancestors is None or result.ess is None:
        raise ConfigError(
            "to_html needs the per-step records of an SMC run over tokens (pp.SMC with history=True)"
        )
    if site not in records["choices"]:
        raise ConfigError(f"no step site {site!r} in this run (step sites: {sorted(records['choices'])})")
    tokens = np.asarray(records["choices"][site])
    active = np.asarray(records["active"], bool)
    log_w = np.asarray(records["log_weights"], np.float64)
    ancestors = np.asarray(result.ancestors)
    n = result.num_particles
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer) or tokens.shape[1] != n:
        raise ConfigError(
            f"site {site!r} must hold one token id per particle and step ([T, N] integers, N = {n}), "
            f"got {tokens.shape} {tokens.dtype} (Steer's N·K children are not supported)"
        )
    decode = _decoder(result, tokenizer)
    ran = np.flatnonzero(active.any(axis=1))
    num_steps = int(ran[-1]) + 1 if ran.size else 0
    # lineage: nodes (t, j) that some final particle descends from
    lineage = np.zeros((num_steps, n), bool)
    alive = np.asarray(ancestors[num_steps - 1]) if num_steps else np.arange(n)
    for t in range(num_steps - 1, -1, -1):
        lineage[t, alive] = True
        if t > 0:
            alive = np.unique(ancestors[t - 1, alive])
    steps, prefixes = [], [[] for _ in range(n)]
    previous_texts = [""] * n
    for t in range(num_steps):
        parents = np.arange(n) if t == 0 else ancestors[t - 1]
        prefixes = [
            prefixes[p] + ([int(tokens[t, j])] if active[t, j] else []) for j, p in enumerate(parents)
        ]
        texts = [decode(prefix) for prefix in prefixes]
        parent_texts = [previous_texts[p] for p in parents]
        pieces = [
            text[len(pt) :] if active[t, j] and text.startswith(pt) else ""
            for j, (text, pt) in enumerate(zip(texts, parent_texts, strict=True))
        ]
        steps.append(
            {
                "texts": texts,
                "pieces": pieces,
                "weights": _normalised(log_w[t]),
                "parents": [int(p) for p in parents] if t else [-1] * n,
                "copies": np.bincount(ancestors[t], minlength=n).tolist(),
                "active": active[t].tolist(),
                "lineage": lineage[t].tolist(),
            }
        )
        previous_texts = texts
    final_nodes = ancestors[num_steps - 1] if num_steps else np.arange(n)
    last_texts = steps[-1]["texts"] if steps else [""] * n
    return {
        "num_particles": n,
        "num_steps": num_steps,
        "algorithm": str(result.algorithm),
        "log_evidence": _number(result.log_evidence),
        "final_ess": _number(result.final_ess),
        "ess": [_number(x) for x in np.asarray(result.ess)[:num_steps]],
        "resampled": np.asarray(result.resampled, bool)[:num_steps].tolist(),
        "log_z": [_number(x) for x in np.asarray(result.log_evidence_history)[:num_steps]],
        "steps": steps,
        "final": {
            "texts": [last_texts[int(j)] for j in final_nodes],
            "weights": _normalised(np.asarray(result.log_weights, np.float64)),
            "nodes": [int(j) for j in final_nodes],
        },
    }


def write_smc_html(
    result: Any, path: str | Path, tokenizer: Any = None, site: str = "tok", title: str | None = None
) -> Path:
    """Write the page for ``result`` (an SMC run of a token-level program) to ``path``; returns the
    path. ``tokenizer``: to decode the tokens (not needed for ``tokens.constrained`` programs, which
    carry their vocabulary); ``site``: the step site holding the sampled token."""
    view = smc_token_view(result, tokenizer, site)
    view["title"] = title or f"{view['algorithm']} over tokens: N={view['num_particles']}"
    data = json.dumps(view, ensure_ascii=False, allow_nan=False).replace("</", "<\\/")
    page = _PAGE.replace("__TITLE__", html.escape(view["title"])).replace("__DATA__", data)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def _decoder(result: Any, tokenizer: Any):
    from ppinfer.tokens import ConstrainedState

    if tokenizer is not None:
        eos = getattr(tokenizer, "eos_id", None)
        return lambda ids: tokenizer.decode([t for t in ids if t != eos])
    state = result.state
    if isinstance(state, ConstrainedState):
        return state.decoder.decode
    raise ConfigError("to_html(path, tokenizer=lm.tokenizer): pass the tokenizer to decode the tokens")


def _normalised(log_w: np.ndarray) -> list[float]:
    finite = np.isfinite(log_w)
    if not finite.any():
        return [0.0] * len(log_w)
    w = np.where(finite, np.exp(log_w - log_w[finite].max()), 0.0)
    return (w / w.sum()).tolist()


def _number(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<script>
window.__ppErrors = [];
window.addEventListener("error", function (e) {
  window.__ppErrors.push(String(e.message));
  document.documentElement.setAttribute("data-pp-errors", window.__ppErrors.join(" | "));
});
</script>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px 24px; color: #222; }
h1 { font-size: 18px; margin: 0 0 6px; }
.summary span { margin-right: 18px; }
.charts { display: flex; gap: 24px; flex-wrap: wrap; margin: 12px 0; }
.chart { border: 1px solid #ddd; background: #fafafa; }
.chart text { font-size: 10px; fill: #555; }
.controls { margin: 10px 0; display: flex; gap: 10px; align-items: center; }
.controls input[type=range] { width: 360px; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #eee; padding: 2px 6px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; position: sticky; top: 0; }
td.num { width: 1%; text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.text { font-family: ui-monospace, monospace; white-space: pre-wrap; word-break: break-all; }
.piece { background: #ffe58a; }
.bar { display: inline-block; height: 9px; background: #3b7dd8; vertical-align: middle; }
tr.dropped td { color: #aaa; }
tr.dropped .bar { background: #bbb; }
tr.lineage td.idx { border-left: 4px solid #1a7f37; }
tr.finished td.text::after { content: " [finished]"; color: #888; }
.legend { color: #666; font-size: 12px; margin: 4px 0 8px; }
</style></head>
<body>
<h1 id="title"></h1>
<div class="summary" id="summary"></div>
<div class="charts">
  <svg id="ess-chart" class="chart" width="420" height="150"></svg>
  <svg id="logz-chart" class="chart" width="420" height="150"></svg>
</div>
<svg id="genealogy" class="chart"></svg>
<div class="controls">
  <button id="prev">&larr;</button>
  <input type="range" id="step" min="0" value="0">
  <button id="next">&rarr;</button>
  <span id="step-label"></span>
</div>
<div class="legend">Weight: normalised, after the step's reweighting and before its selection (bars
relative to the step's heaviest particle).
Copies: how many particles the selection made of this one (grey: dropped, or weight zero). Green edge: an
ancestor of a final particle. Highlighted: the text the step added.</div>
<table><thead><tr><th>#</th><th>parent</th><th>weight</th><th>copies</th><th>text</th></tr></thead>
<tbody id="particles"></tbody></table>
<script type="application/json" id="pp-data">__DATA__</script>
<script>
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("pp-data").textContent);
  var NS = "http://www.w3.org/2000/svg";
  var T = D.num_steps, N = D.num_particles;
  function fmt(x, d) { return x === null ? "\\u2212\\u221e" : x.toFixed(d); }
  function el(tag, attrs, text) {
    var e = document.createElementNS(NS, tag);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  document.getElementById("title").textContent = D.title;
  var s = document.getElementById("summary");
  [["algorithm", D.algorithm], ["particles", N], ["steps", T],
   ["log \\u1e90", fmt(D.log_evidence, 3)], ["final ESS", fmt(D.final_ess, 1)],
   ["resampled", D.resampled.filter(Boolean).length + " times"]].forEach(function (kv) {
    var span = document.createElement("span");
    span.textContent = kv[0] + ": " + kv[1];
    s.appendChild(span);
  });

  function lineChart(id, values, label, marks, ymax) {
    var svg = document.getElementById(id), W = 420, H = 150, L = 40, B = 20, P = 14;
    var finite = values.filter(function (v) { return v !== null; });
    var lo = Math.min.apply(null, finite.concat([ymax === undefined ? Infinity : 0]));
    var hi = ymax === undefined ? Math.max.apply(null, finite) : ymax;
    if (!finite.length) { lo = 0; hi = 1; }
    if (hi === lo) { hi = lo + 1; }
    var x = function (t) { return L + (T > 1 ? t * (W - L - P) / (T - 1) : 0); };
    var y = function (v) { return H - B - (v - lo) * (H - B - P) / (hi - lo); };
    svg.appendChild(el("text", {x: L, y: 11}, label));
    svg.appendChild(el("text", {x: 2, y: y(hi) + 4}, hi.toFixed(1)));
    svg.appendChild(el("text", {x: 2, y: y(lo) + 4}, lo.toFixed(1)));
    svg.appendChild(el("text", {x: W - P - 30, y: H - 4}, "step"));
    for (var t = 0; t < T; t++) {
      if (marks && marks[t]) svg.appendChild(el("line", {x1: x(t), x2: x(t), y1: P, y2: H - B,
        stroke: "#e07b00", "stroke-dasharray": "2,2", "class": "resample-mark"}));
    }
    var d = "";
    values.forEach(function (v, t) { if (v !== null) d += (d ? "L" : "M") + x(t) + "," + y(v); });
    svg.appendChild(el("path", {d: d, fill: "none", stroke: "#3b7dd8", "stroke-width": 1.5}));
  }
  lineChart("ess-chart", D.ess, "ESS per step (orange: resampled)", D.resampled, N);
  lineChart("logz-chart", D.log_z, "log \\u1e90 after each step", null);

  var G = document.getElementById("genealogy");
  var dx = Math.max(8, Math.min(28, 900 / Math.max(T, 1))), dy = Math.max(3, Math.min(12, 480 / N));
  G.setAttribute("width", 30 + dx * T); G.setAttribute("height", 10 + dy * N);
  for (var t = 0; t < T; t++) {
    var st = D.steps[t];
    for (var j = 0; j < N; j++) {
      var cx = 20 + dx * t, cy = 5 + dy * j;
      if (t > 0) G.appendChild(el("line", {x1: cx - dx, y1: 5 + dy * st.parents[j], x2: cx, y2: cy,
        stroke: st.lineage[j] ? "#1a7f37" : "#ccc", "stroke-width": st.lineage[j] ? 1.2 : 0.6}));
    }
    for (var j2 = 0; j2 < N; j2++) {
      var c = el("circle", {cx: 20 + dx * t, cy: 5 + dy * j2,
        r: Math.max(0.8, Math.min(dy / 2, 1 + Math.sqrt(st.weights[j2] * N) * dy / 4)),
        fill: st.copies[j2] && st.weights[j2] > 0 ? "#3b7dd8" : "#bbb", "data-step": t});
      c.addEventListener("click", function (e) { show(+e.target.getAttribute("data-step")); });
      G.appendChild(c);
    }
  }

  var slider = document.getElementById("step");
  slider.max = T;  // T: the final population
  function show(t) {
    t = Math.max(0, Math.min(T, t));
    slider.value = t;
    var body = document.getElementById("particles");
    while (body.firstChild) body.removeChild(body.firstChild);
    var rows = [];
    if (t === T) {
      document.getElementById("step-label").textContent = "final population (after the last selection)";
      for (var i = 0; i < N; i++) rows.push({i: i, parent: D.final.nodes[i], w: D.final.weights[i],
        copies: "", text: D.final.texts[i], piece: "", dropped: D.final.weights[i] === 0,
        lineage: true, finished: false});
    } else {
      var st = D.steps[t];
      document.getElementById("step-label").textContent = "step " + t + " of " + (T - 1) +
        ": ESS " + fmt(D.ess[t], 1) + (D.resampled[t] ? ", resampled" : ", not resampled") +
        ", log \\u1e90 " + fmt(D.log_z[t], 3);
      for (var k = 0; k < N; k++) rows.push({i: k, parent: st.parents[k], w: st.weights[k],
        copies: st.copies[k], text: st.texts[k], piece: st.pieces[k],
        dropped: st.copies[k] === 0 || st.weights[k] === 0,
        lineage: st.lineage[k], finished: !st.active[k]});
    }
    var wmax = Math.max.apply(null, rows.map(function (r) { return r.w; }).concat([1e-300]));
    rows.forEach(function (r) {
      var tr = document.createElement("tr");
      tr.className = "particle" + (r.dropped ? " dropped" : "") + (r.lineage ? " lineage" : "") +
        (r.finished ? " finished" : "");
      var cells = [r.i, r.parent < 0 ? "" : r.parent, null, r.copies, null];
      cells.forEach(function (v, c) {
        var td = document.createElement("td");
        if (c === 0) td.className = "num idx";
        else if (c === 4) td.className = "text";
        else td.className = "num";
        if (c === 2) {
          var bar = document.createElement("span");
          bar.className = "bar"; bar.style.width = Math.round(60 * r.w / wmax) + "px";
          td.appendChild(bar); td.appendChild(document.createTextNode(" " + r.w.toFixed(4)));
        } else if (c === 4) {
          var head = r.piece && r.text.slice(-r.piece.length) === r.piece
            ? r.text.slice(0, r.text.length - r.piece.length) : r.text;
          td.appendChild(document.createTextNode(head));
          if (r.piece && head !== r.text) {
            var mark = document.createElement("span");
            mark.className = "piece"; mark.textContent = r.piece; td.appendChild(mark);
          }
        } else td.textContent = String(v);
        tr.appendChild(td);
      });
      body.appendChild(tr);
    });
  }
  slider.addEventListener("input", function () { show(+slider.value); });
  document.getElementById("prev").addEventListener("click", function () { show(+slider.value - 1); });
  document.getElementById("next").addEventListener("click", function () { show(+slider.value + 1); });
  var start = window.location.hash.match(/step=(\\d+)/);
  show(start ? +start[1] : T);
  document.documentElement.setAttribute("data-pp-status", "rendered");
})();
</script>
</body></html>
"""
