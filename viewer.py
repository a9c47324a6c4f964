"""The transcript page of a run: `eval/transcripts.html`, one self-contained static file (no server,
no network, no external script). Not needed to follow the paper.

eval writes it after results.md; `python emodistill.py show RUN` (re)builds it and prints its path.
It holds every episode of `eval/<method>.json` (and the games played with `emodistill.py chat`,
saved under RUN/chat/) as one JSON blob, and a small vanilla script that lists them with filters
by method, domain and outcome, shows a transcript turn by turn (speaker, text, the emotion chosen
and the one the counterparty perceived, the planned move, the offer the parser read, the rubric
judge's score), and puts two methods side by side on the same scenario and seed. The run's
figures are inline SVG drawn here (no matplotlib): utility by method and domain with 95%
bootstrap CIs, the emotion each selector-driven method chose at each focal turn, and the
per-emotion utility heatmap when the emotions study ran.

The view is kept in the URL hash, so a link (or `chromium --headless --dump-dom`) opens it:
`#method=emodistill&domain=crad&outcome=deal`, `#episode=emodistill|crad-80-0`,
`#compare=iql+sft,emodistill&key=crad-80-0` (the key is domain-scenario-seed).
"""
from __future__ import annotations

import datetime
import glob
import html
import json
import os

import negotiate as ng
from domains import EMOTIONS, load_config
from methods import uses_selector
from offers import format_offer
from report import bootstrap_ci
from runs import StageError, read_json, write_text_atomic

# the order of the README's table; other names follow, sorted
ORDER = ["teacher-random", "teacher-best-fixed", "teacher-iql", "vanilla", "random", "best-fixed", "iql", "iql+sft",
         "sft-emotion-free", "emodistill", "jpo-emotion-free"]
PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac", "#17becf", "#8c564b"]
VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b",
           "#fde725"]


def _rgb(h):
    return tuple(int(h[i:i + 2], 16) for i in (1, 3, 5))


def viridis(x):
    """A colour of the viridis map for x in [0, 1] (linear between ten stops)."""
    x = min(1.0, max(0.0, x if x == x else 0.0)) * (len(VIRIDIS) - 1)
    i = min(int(x), len(VIRIDIS) - 2)
    a, b, f = _rgb(VIRIDIS[i]), _rgb(VIRIDIS[i + 1]), x - i
    return "#%02x%02x%02x" % tuple(round(p + (q - p) * f) for p, q in zip(a, b))


def method_order(names):
    return [m for m in ORDER if m in names] + sorted(m for m in names if m not in ORDER)


def load_run(out, eval_dir="eval"):
    """{method: records} of the run's eval folder (every <method>.json with records), and the
    chat games of RUN/chat/ as [(label, record)]."""
    folder = os.path.join(out, eval_dir)
    if not os.path.isdir(folder):
        raise StageError(f"{folder} not found; run `emodistill.py eval --out {out}` first")
    runs = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        data = read_json(path)
        if isinstance(data, dict) and isinstance(data.get("records"), list) and data.get("method"):
            runs[data["method"]] = data["records"]
    if not runs:
        raise StageError(f"no eval/<method>.json with records in {folder}; run eval first")
    games = []
    for path in sorted(glob.glob(os.path.join(out, "chat", "*.json"))):
        rec = read_json(path)
        if isinstance(rec, dict) and "turns" in rec and "chat" in rec:
            c = rec["chat"]
            label = f"chat: {c['agent']} vs you" if c.get("human") == "counterparty" else f"chat: you vs {c['agent']}"
            games.append((label, rec))
    return runs, games


def _fmt(x, unit):
    return None if x is None else format_offer(x, unit)


def episode_row(method_index, rec, cfg):
    """One episode of the page's data blob: short keys, offers already in words, judge scores."""
    unit = rec["unit"]
    scores = {}
    if any(t["speaker"] == "focal" and "score" not in t for t in rec["turns"]):
        scores = {j["turn"]: j["score"] for j in ng.judge_record(rec, cfg)}
    turns = []
    for i, t in enumerate(rec["turns"]):
        plan = t.get("plan")
        plan_s = None if not plan else (f"accept {_fmt(plan['offer'], unit)}" if plan["move"] == "accept"
                                         else f"offer {_fmt(plan['offer'], unit)}")
        flags = ("a" if t.get("accept") else "") + ("w" if t.get("walk_away") else "") + ("e" if t.get("echo") else "")
        score = t.get("score", scores.get(i))
        turns.append([0 if t["speaker"] == "focal" else 1, t["text"], t.get("emotion"), t.get("perceived"),
                      _fmt(t.get("offer"), unit), plan_s, flags, None if score is None else round(score, 2)])
    o = rec["outcome"]
    focal_scores = [tt[7] for tt in turns if tt[0] == 0 and tt[7] is not None]
    return {"m": method_index, "k": rec["key"], "d": rec["domain"], "sc": rec["scenario_id"], "s": rec["seed"],
            "p": rec.get("persona"), "s0": _fmt(rec["s0"], unit), "b0": _fmt(rec["b0"], unit),
            "r": _fmt(rec.get("reservation"), unit), "end": o["end"], "ok": bool(o["success"]),
            "a": _fmt(o.get("agreement"), unit), "u": round(o["utility"], 3), "n": o["rounds"],
            "j": round(sum(focal_scores) / len(focal_scores), 2) if focal_scores else None, "t": turns}


# ----------------------------------------------------------------------------------------
# The figures, as inline SVG
# ----------------------------------------------------------------------------------------

def _svg(w, h, body, label):
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
            f'aria-label="{html.escape(label)}" font-family="sans-serif" font-size="11">{"".join(body)}</svg>')


def utility_svg(methods, domains, stats):
    """Grouped bars: mean utility of each method in each domain and pooled, 95% CI whiskers.
    stats[method][domain] = (mean, lo, hi)."""
    groups = list(domains) + ["pooled"]
    bw, gap, left, top, ph = 11, 26, 46, 14, 220
    gw = bw * len(methods) + gap
    top_v = max([0.1] + [s[2] for m in methods for s in stats[m].values() if s[2] == s[2]])
    top_v = min(1.0, (int(top_v * 10) + 1) / 10)
    y = lambda v: top + ph * (1 - v / top_v)                      # noqa: E731
    w = left + gw * len(groups) + 10
    col_w = 22 + 7 * max(len(m) for m in methods)               # legend columns wide enough for the names
    per_row = max(1, (w - left) // col_w)
    legend_rows = (len(methods) + per_row - 1) // per_row
    h = top + ph + 30 + 16 * legend_rows
    body = []
    for k in range(int(round(top_v * 10)) + 1):
        v = k / 10
        body.append(f'<line x1="{left}" x2="{w - 10}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>'
                    f'<text x="{left - 4}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.1f}</text>')
    body.append(f'<text transform="translate(11,{top + ph / 2}) rotate(-90)" text-anchor="middle">mean utility '
                f'(95% CI)</text>')
    for gi, g in enumerate(groups):
        x0 = left + gi * gw + gap / 2
        body.append(f'<text x="{x0 + bw * len(methods) / 2:.1f}" y="{top + ph + 16}" text-anchor="middle" '
                    f'font-weight="{"bold" if g == "pooled" else "normal"}">{html.escape(g)}</text>')
        for mi, m in enumerate(methods):
            mean, lo, hi = stats[m].get(g, (float("nan"),) * 3)
            if mean != mean:
                continue
            x = x0 + mi * bw
            body.append(f'<rect class="bar" data-method="{html.escape(m)}" data-domain="{html.escape(g)}" x="{x:.1f}" '
                        f'y="{y(mean):.1f}" width="{bw - 2}" height="{max(0.0, y(0) - y(mean)):.1f}" '
                        f'fill="{PALETTE[mi % len(PALETTE)]}"><title>{html.escape(m)}, {html.escape(g)}: '
                        f'{mean:.3f} [{lo:.3f}, {hi:.3f}]</title></rect>'
                        f'<line x1="{x + bw / 2 - 1:.1f}" x2="{x + bw / 2 - 1:.1f}" y1="{y(lo):.1f}" y2="{y(hi):.1f}" '
                        f'stroke="#222"/>')
    body.append(f'<line x1="{left}" x2="{w - 10}" y1="{y(0):.1f}" y2="{y(0):.1f}" stroke="#444"/>')
    for mi, m in enumerate(methods):
        lx, ly = left + (mi % per_row) * col_w, top + ph + 32 + 16 * (mi // per_row)
        body.append(f'<rect x="{lx}" y="{ly - 9}" width="10" height="10" fill="{PALETTE[mi % len(PALETTE)]}"/>'
                    f'<text x="{lx + 14}" y="{ly}">{html.escape(m)}</text>')
    return _svg(w, h, body, "mean utility by method and domain")


def emotion_turn_counts(records, turns=10):
    """counts[emotion][k]: how often the emotion was chosen at focal turn k+1 (first `turns`)."""
    counts = {e: [0] * turns for e in EMOTIONS}
    for r in records:
        focal = [t for t in r["turns"] if t["speaker"] == "focal" and t.get("emotion")]
        for k, t in enumerate(focal[:turns]):
            if t["emotion"] in counts:
                counts[t["emotion"]][k] += 1
    return counts


def heatmap_svg(rows, cols, value, title, fmt_cell=None, cell_w=16, cell_h=11, vmin=0.0, vmax=1.0, xlabel=""):
    """A rows x cols grid coloured by value(r, c) on the viridis map; fmt_cell writes the value in
    the cell; every cell's tooltip gives its value."""
    left, top = 92, 30
    w, h = left + cell_w * len(cols) + 8, top + cell_h * len(rows) + 34
    body = [f'<text x="{left}" y="14" font-weight="bold">{html.escape(title)}</text>']
    for ci, c in enumerate(cols):
        body.append(f'<text x="{left + ci * cell_w + cell_w / 2:.1f}" y="{top - 4}" text-anchor="middle" '
                    f'font-size="9">{html.escape(str(c))}</text>')
    span = (vmax - vmin) or 1.0
    for ri, r in enumerate(rows):
        yy = top + ri * cell_h
        body.append(f'<text x="{left - 4}" y="{yy + cell_h - 2}" text-anchor="end" font-size="9">'
                    f'{html.escape(r)}</text>')
        for ci, c in enumerate(cols):
            v = value(r, c)
            z = (v - vmin) / span
            body.append(f'<rect x="{left + ci * cell_w}" y="{yy}" width="{cell_w}" height="{cell_h}" '
                        f'fill="{viridis(z)}"><title>{html.escape(r)}, {html.escape(str(c))}: {v:.3f}</title></rect>')
            if fmt_cell:
                body.append(f'<text x="{left + ci * cell_w + cell_w / 2:.1f}" y="{yy + cell_h - 2}" font-size="8" '
                            f'text-anchor="middle" fill="{"#fff" if z < 0.6 else "#000"}">{fmt_cell(v)}</text>')
    body.append(f'<text x="{left + cell_w * len(cols) / 2:.1f}" y="{h - 18}" text-anchor="middle">'
                f'{html.escape(xlabel)}</text>')
    body.append(f'<text x="{left}" y="{h - 4}" font-size="9">colour: {vmin:.2f} (dark) to {vmax:.2f} (yellow)</text>')
    return _svg(w, h, body, title)


def figures(out, runs, methods, domains):
    """The page's figures as (title, caption, [svg]) triples."""
    stats = {}
    for m in methods:
        recs = runs[m]
        stats[m] = {d: bootstrap_ci([r["outcome"]["utility"] for r in recs if r["domain"] == d]) for d in domains}
        stats[m]["pooled"] = bootstrap_ci([r["outcome"]["utility"] for r in recs])
    figs = [("Utility by method and domain", "Mean utility of the focal side per held-out episode (0 when no deal), "
             "whiskers: 95% percentile-bootstrap CI (as in results.md).", [utility_svg(methods, domains, stats)])]
    chosen = [m for m in methods if uses_selector(m)]
    if chosen:
        shares = {}
        for m in chosen:
            counts = emotion_turn_counts(runs[m])
            totals = [sum(counts[e][k] for e in EMOTIONS) for k in range(10)]
            shares[m] = {e: [c / n if n else 0.0 for c, n in zip(counts[e], totals)] for e in EMOTIONS}
        top_share = max([0.05] + [v for m in chosen for e in EMOTIONS for v in shares[m][e]])
        svgs = [heatmap_svg(EMOTIONS, list(range(1, 11)), lambda e, k, sh=shares[m]: sh[e][k - 1], m,
                            vmax=top_share, xlabel="focal turn") for m in chosen]
        figs.append(("Emotion chosen by focal turn", "Share of the episodes still running at focal turn k in which "
                     "the IQL selector chose each emotion (greedy), per method; one colour scale for all.", svgs))
    study = os.path.join(out, "studies", "emotions.json")
    if os.path.exists(study):
        util = read_json(study)["utility"]
        ds = [d for d in util]
        vals = [util[d][e][0] for d in ds for e in EMOTIONS if e in util[d]]
        figs.append(("Utility with one emotion held fixed (the emotions study)", "Mean utility of whole episodes "
                     "with one emotion held fixed (SimTeacher vs SimCounterparty), from studies/emotions.json.",
                     [heatmap_svg(EMOTIONS, ds, lambda e, d: util[d][e][0], "mean utility",
                                  fmt_cell=lambda v: f"{v:.2f}", cell_w=58, cell_h=13, vmin=min(vals), vmax=max(vals),
                                  xlabel="domain")]))
    return figs, stats


# ----------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------

def build_page(out, eval_dir="eval", domains_file="domains.yaml", side="focal"):
    """The page's HTML for run folder `out` (eval folder `eval_dir`)."""
    cfg = load_config(domains_file, side=side)
    runs, games = load_run(out, eval_dir)
    methods = method_order(list(runs))
    domains = [d for d in cfg.domains if any(r["domain"] == d for m in methods for r in runs[m])]
    domains += sorted({r["domain"] for m in methods for r in runs[m]} - set(domains))
    figs, stats = figures(out, runs, methods, domains)
    labels = methods + sorted({label for label, _ in games})
    episodes = [episode_row(labels.index(m), r, cfg) for m in methods for r in runs[m]]
    episodes += [episode_row(labels.index(label), r, cfg) for label, r in games]
    doms = {d: {"focal": dom.focal_role, "cp": dom.counterparty_role, "q": dom.quantity}
            for d, dom in cfg.domains.items() if d in domains or any(r["domain"] == d for _, r in games)}
    data = {"run": out, "methods": labels, "domains": doms, "episodes": episodes,
            "utility": {m: {g: [round(v, 3) for v in s] for g, s in stats[m].items()} for m in methods}}
    blob = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")
    fig_html = "".join(
        f'<figure class="fig"><figcaption><b>{html.escape(t)}</b>. {html.escape(c)}</figcaption>'
        f'<div class="svgs">{"".join(svgs)}</div></figure>' for t, c, svgs in figs)
    built = datetime.datetime.now().isoformat(timespec="seconds")
    return (PAGE.replace("%TITLE%", html.escape(f"EmoDistill transcripts: {out}"))
            .replace("%SUBTITLE%", html.escape(f"{len(episodes)} episodes, {len(labels)} methods, built {built}"))
            .replace("%FIGURES%", fig_html).replace("%DATA%", blob).replace("%SCRIPT%", SCRIPT))


def write_page(out, eval_dir="eval", domains_file="domains.yaml", side="focal"):
    """Write <out>/<eval_dir>/transcripts.html and return its path."""
    path = os.path.join(out, eval_dir, "transcripts.html")
    write_text_atomic(path, build_page(out, eval_dir, domains_file, side))
    return path


def show(out="runs/default", eval_dir="eval", domains_file="domains.yaml"):
    """(Re)build the run's transcript page and print its path."""
    path = write_page(out, eval_dir, domains_file)
    print(f"[show] {os.path.abspath(path)} ({os.path.getsize(path) / 1e6:.1f} MB): open it in a browser "
          f"(file://{os.path.abspath(path)})")
    return path


def add_command(command):
    """show's subcommand, through emodistill.build_parser's `command`."""
    command("show", show, "(re)build the run's transcript page eval/transcripts.html and print its path", [],
            ("out", dict(nargs="?", help="run folder")), ("--eval-dir", dict(help="eval folder under the run")),
            ("--domains-file", dict()))


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>%TITLE%</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;margin:0 18px 40px;color:#222;font-size:14px}
h1{font-size:20px;margin:14px 0 2px} h2{font-size:16px;margin:18px 0 6px} .sub{color:#666;margin-bottom:8px}
.fig{margin:8px 0 14px} .fig figcaption{margin-bottom:4px}
.svgs{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
#controls{display:flex;flex-wrap:wrap;gap:12px;align-items:center;background:#f4f4f4;padding:8px;border-radius:6px}
#controls label{font-size:13px} select{font-size:13px}
table.eps{border-collapse:collapse;margin-top:8px;font-size:13px}
table.eps td,table.eps th{padding:2px 8px;border-bottom:1px solid #eee;text-align:left}
table.eps tr.ep{cursor:pointer} table.eps tr.ep:hover{background:#eef4ff} table.eps tr.sel{background:#dde9ff}
.count{color:#555;margin:6px 0}
.pair{display:flex;gap:14px;align-items:flex-start} .pair>.transcript{flex:1;min-width:0}
.transcript{border:1px solid #ccc;border-radius:6px;padding:8px;margin-top:10px;background:#fff}
.transcript h3{font-size:15px;margin:0 0 4px} .meta{color:#555;font-size:12px;margin-bottom:6px}
.turn{border-radius:6px;padding:5px 8px;margin:4px 0;max-width:92%}
.turn.focal{background:#e8f0fe;margin-right:8%} .turn.counterparty{background:#f3f3f3;margin-left:8%}
.who{font-size:11px;color:#555;font-weight:bold} .text{margin:2px 0}
.tags span{display:inline-block;font-size:11px;border-radius:4px;padding:0 5px;margin:1px 3px 1px 0;
  background:#fff;border:1px solid #ccc}
.tags .emo{border-color:#8e6ac7} .tags .per{border-color:#c77b6a} .tags .off{border-color:#4e9a4e}
.tags .score{border-color:#c9a227}
.tags .bad{background:#fde8e8} .end{font-weight:bold;margin-top:6px}
</style></head><body>
<h1>%TITLE%</h1><div class="sub">%SUBTITLE%. The view lives in the address
(#method=…&amp;domain=…&amp;outcome=…, #episode=method|key, #compare=A,B&amp;key=…): copy it to share it.</div>
<details open id="figures"><summary><b>Figures</b></summary>%FIGURES%</details>
<h2>Episodes</h2>
<div id="controls">
<label>method <select id="f-method"></select></label>
<label>domain <select id="f-domain"></select></label>
<label>outcome <select id="f-outcome"></select></label>
<span>side by side: <select id="c-a"></select> vs <select id="c-b"></select>
<button id="c-go">compare</button> <button id="c-off">list</button></span>
</div>
<div id="view"></div>
<script type="application/json" id="data">%DATA%</script>
<script>%SCRIPT%</script>
</body></html>
"""

SCRIPT = r"""
(function(){
"use strict";
var D = JSON.parse(document.getElementById("data").textContent);
var M = D.methods, E = D.episodes;
var OUTCOMES = ["deal", "no deal", "accept", "converged", "walk_away", "max_turns", "interrupted"];
function el(tag, attrs, kids){
  var n = document.createElement(tag);
  for (var k in (attrs || {})) { if (k === "text") n.textContent = attrs[k]; else n.setAttribute(k, attrs[k]); }
  (kids || []).forEach(function(c){
    if (c != null) n.appendChild(typeof c === "string" ? document.createTextNode(c) : c); });
  return n;
}
function readHash(){
  var s = {};
  location.hash.replace(/^#/, "").split("&").forEach(function(p){
    if (!p) return; var i = p.indexOf("=");
    var k = decodeURIComponent(i < 0 ? p : p.slice(0, i)), v = i < 0 ? "" : decodeURIComponent(p.slice(i + 1));
    s[k] = v;
  });
  return s;
}
function writeHash(s){
  var parts = [];
  ["method", "domain", "outcome", "episode", "compare", "key"].forEach(function(k){
    if (s[k]) parts.push(k + "=" + encodeURIComponent(s[k]).replace(/%2C/g, ",").replace(/%7C/g, "|"));
  });
  location.hash = parts.join("&");
}
function outcomeOk(e, o){
  if (!o) return true;
  if (o === "deal") return e.ok;
  if (o === "no deal") return !e.ok;
  return e.end === o;
}
function filtered(s, method){
  return E.filter(function(e){
    return (!method || M[e.m] === method) && (!s.domain || e.d === s.domain) && outcomeOk(e, s.outcome);
  });
}
function fill(sel, values, current, blank){
  sel.innerHTML = "";
  if (blank) sel.appendChild(el("option", {value: "", text: blank}));
  values.forEach(function(v){
    var o = el("option", {value: v, text: v}); if (v === current) o.selected = true; sel.appendChild(o); });
}
function endText(e){
  if (e.end === "accept" || e.end === "converged") return "deal at " + e.a + " (" + e.end + ")";
  return "no deal (" + e.end + ")";
}
function transcript(e){
  var dom = D.domains[e.d] || {focal: "focal", cp: "counterparty", q: ""};
  var box = el("div", {"class": "transcript", "data-method": M[e.m], "data-key": e.k}, [
    el("h3", {text: M[e.m] + " \u00b7 " + e.k}),
    el("div", {"class": "meta", text: dom.q + ": focal target " + e.s0 + ", counterparty opening " + e.b0 +
      (e.r ? ", its limit " + e.r : "") + "; persona " + e.p + "; " + e.n + " round(s)"})]);
  e.t.forEach(function(t, i){
    var focal = t[0] === 0, tags = [];
    if (focal && t[2]) tags.push(el("span", {"class": "emo", text: "chose: " + t[2]}));
    if (focal && t[3]) tags.push(el("span", {"class": "per" + (t[2] && t[3] !== t[2] ? " bad" : ""),
                                             text: "perceived: " + t[3]}));
    if (t[5]) tags.push(el("span", {"class": "plan", text: "planned: " + t[5]}));
    var offer = t[4] ? "offer: " + t[4] : (t[6].indexOf("e") >= 0 ? "echo, no offer" : "no offer");
    tags.push(el("span", {"class": "off" + (t[4] ? "" : " bad"), text: offer}));
    if (t[6].indexOf("a") >= 0) tags.push(el("span", {"class": "acc", text: "accepts"}));
    if (t[6].indexOf("w") >= 0) tags.push(el("span", {"class": "walk bad", text: "walks away"}));
    if (t[7] != null) tags.push(el("span", {"class": "score", text: "judge " + t[7].toFixed(2)}));
    box.appendChild(el("div", {"class": "turn " + (focal ? "focal" : "counterparty"), "data-turn": String(i)}, [
      el("div", {"class": "who", text: (i + 1) + ". " + (focal ? dom.focal : dom.cp)}),
      el("div", {"class": "text", text: t[1]}), el("div", {"class": "tags"}, tags)]));
  });
  box.appendChild(el("div", {"class": "end", text: endText(e) + "; utility " + e.u.toFixed(3) +
    (e.j != null ? "; mean judge score " + e.j.toFixed(2) : "")}));
  return box;
}
function listView(s, view){
  var rows = filtered(s, s.method);
  view.appendChild(el("div", {"class": "count", id: "count", text: rows.length + " episode(s)" +
    (rows.length ? ", mean utility " + (rows.reduce(function(a, e){ return a + e.u; }, 0) / rows.length).toFixed(3)
                 : "")}));
  var tb = el("tbody");
  var head = el("tr", {}, ["method", "episode", "domain", "persona", "outcome", "utility", "rounds", "judge"]
    .map(function(h){ return el("th", {text: h}); }));
  var shown = null;
  rows.forEach(function(e){
    var id = M[e.m] + "|" + e.k;
    var tr = el("tr", {"class": "ep" + (s.episode === id ? " sel" : ""), "data-method": M[e.m], "data-key": e.k,
                      "data-domain": e.d, "data-end": e.end}, [
      el("td", {text: M[e.m]}), el("td", {text: e.k}), el("td", {text: e.d}), el("td", {text: e.p || ""}),
      el("td", {text: endText(e)}), el("td", {text: e.u.toFixed(3)}), el("td", {text: String(e.n)}),
      el("td", {text: e.j != null ? e.j.toFixed(2) : "-"})]);
    tr.addEventListener("click", function(){ s.episode = id; writeHash(s); });
    tb.appendChild(tr);
    if (s.episode === id) { shown = e;
      var cell = el("td", {colspan: "8"}, [transcript(e)]);
      tb.appendChild(el("tr", {"class": "open"}, [cell])); }
  });
  view.appendChild(el("table", {"class": "eps", id: "episodes"}, [el("thead", {}, [head]), tb]));
  if (s.episode && !shown) {
    var hit = E.filter(function(e){ return M[e.m] + "|" + e.k === s.episode; })[0];
    if (hit) view.insertBefore(transcript(hit), view.firstChild);
  }
}
function compareView(s, view){
  var ab = s.compare.split(","), a = ab[0], b = ab.slice(1).join(",");
  var byKey = {};
  filtered(s, b).forEach(function(e){ byKey[e.k] = e; });
  var pairs = filtered(s, a).filter(function(e){ return byKey[e.k]; }).map(function(e){ return [e, byKey[e.k]]; });
  var diff = pairs.reduce(function(x, p){ return x + p[0].u - p[1].u; }, 0) / (pairs.length || 1);
  var said = pairs.length + " scenario/seed pair(s) played by both " + a + " and " + b;
  if (pairs.length) said += "; mean utility difference (" + a + " \u2212 " + b + ") " + (diff >= 0 ? "+" : "") +
    diff.toFixed(3);
  view.appendChild(el("div", {"class": "count", id: "count", text: said}));
  var key = s.key && byKey[s.key] ? s.key : (pairs.length ? pairs[0][0].k : null);
  var sel = el("select", {id: "c-key"});
  pairs.forEach(function(p){
    var o = el("option", {value: p[0].k, text: p[0].k + ": " + p[0].u.toFixed(2) + " vs " + p[1].u.toFixed(2)});
    if (p[0].k === key) o.selected = true; sel.appendChild(o);
  });
  sel.addEventListener("change", function(){ s.key = sel.value; writeHash(s); });
  view.appendChild(el("div", {}, ["scenario and seed: ", sel]));
  var pair = pairs.filter(function(p){ return p[0].k === key; })[0];
  if (pair) view.appendChild(el("div", {"class": "pair", id: "pair"}, [transcript(pair[0]), transcript(pair[1])]));
}
function render(){
  var s = readHash(), view = document.getElementById("view");
  var domains = Object.keys(D.domains);
  fill(document.getElementById("f-method"), M, s.method, "all methods");
  fill(document.getElementById("f-domain"), domains, s.domain, "all domains");
  var present = OUTCOMES.filter(function(o){ return E.some(function(e){ return outcomeOk(e, o); }); });
  fill(document.getElementById("f-outcome"), present, s.outcome, "any outcome");
  var ab = (s.compare || "").split(",");
  fill(document.getElementById("c-a"), M, ab[0] || M[0]);
  fill(document.getElementById("c-b"), M, ab.length > 1 ? ab.slice(1).join(",") : M[M.length > 1 ? 1 : 0]);
  view.innerHTML = "";
  if (s.compare && s.compare.indexOf(",") > 0) compareView(s, view); else listView(s, view);
  document.body.setAttribute("data-view", s.compare ? "compare" : "list");
}
function control(id, key){
  document.getElementById(id).addEventListener("change", function(){
    var s = readHash(); s[key] = this.value; delete s.episode; writeHash(s); });
}
control("f-method", "method"); control("f-domain", "domain"); control("f-outcome", "outcome");
document.getElementById("c-go").addEventListener("click", function(){
  var s = readHash(); s.compare = document.getElementById("c-a").value + "," + document.getElementById("c-b").value;
  delete s.method; delete s.episode; writeHash(s); });
document.getElementById("c-off").addEventListener("click", function(){
  var s = readHash(); delete s.compare; delete s.key; writeHash(s); });
window.addEventListener("hashchange", render);
render();
})();
"""
