"""Not needed to follow the paper: the report. The statistics over episode records
(percentile-bootstrap confidence intervals, paired differences between two methods, the
expression rates and the outcome summary), results.md with the check of the paper's orderings,
the plots (when matplotlib is installed), the study sections and a run's summary table.
"""
from __future__ import annotations

import os

import numpy as np

from domains import EMOTIONS
from negotiate import move_followed
from runs import StageError, read_jsonl, write_json_atomic, write_text_atomic


def bootstrap_ci(values, n_boot=2000, alpha=0.05, seed=0):
    """Mean and percentile-bootstrap (1 - alpha) CI. Empty input gives NaNs."""
    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    r = np.random.default_rng(seed)
    means = v[r.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(v.mean()), float(lo), float(hi)


def paired_diff_ci(recs_a, recs_b, key="utility", n_boot=2000, seed=0):
    """Mean of (a - b) over the episodes both record lists played (matched on domain,
    scenario id, seed and persona: the same scenario against the same counterparty), with a
    percentile-bootstrap 95% CI over those pairs. Pairing removes the scenario-to-scenario
    spread, which is most of the variance when two methods play the same held-out scenarios.
    Returns (mean, lo, hi, n_pairs); NaNs when nothing matches."""
    def index(recs):
        return {(r["domain"], r["scenario_id"], r["seed"], r.get("persona")): r["outcome"][key] for r in recs}
    a, b = index(recs_a), index(recs_b)
    both = sorted(set(a) & set(b), key=str)
    m, lo, hi = bootstrap_ci([float(a[k]) - float(b[k]) for k in both], n_boot=n_boot, seed=seed)
    return m, lo, hi, len(both)


def expression_rates(rec):
    """How well the focal side *said* things in one trajectory: the share of its turns whose
    offer parses and lies inside the bargaining range [min(s0, b0), max(s0, b0)], the share
    of its emotion-conditioned turns whose perceived emotion is the requested one, and the
    offer fidelity, the share of its planned turns that did the planned move (the planned
    number read from the text, or an accept; negotiate.move_followed). Each None when the
    trajectory has no such turn."""
    lo, hi = min(rec["s0"], rec["b0"]), max(rec["s0"], rec["b0"])
    focal = [t for t in rec["turns"] if t["speaker"] == "focal"]
    emo = [t for t in focal if t.get("emotion")]
    in_range = [t.get("offer") is not None and lo <= t["offer"] <= hi for t in focal]
    followed = [f for f in map(move_followed, focal) if f is not None]
    return (sum(in_range) / len(in_range) if in_range else None,
            sum(t.get("perceived") == t["emotion"] for t in emo) / len(emo) if emo else None,
            sum(followed) / len(followed) if followed else None)


MOVE_OUTCOMES = ("offer followed", "accept followed", "offer: accepted instead", "offer: restated theirs",
                 "offer: no number", "offer: another number", "accept: restated theirs", "accept: other")


def move_outcome(turn):
    """What a planned focal turn did, one of MOVE_OUTCOMES (None without a plan): the planned
    move done, or how it missed. "restated theirs" is the echo rule at work: the reply's number
    was the counterparty's standing offer, read as neither an offer nor an accept."""
    ok = move_followed(turn)
    if ok is None:
        return None
    if turn["plan"]["move"] == "accept":
        return "accept followed" if ok else "accept: restated theirs" if turn.get("echo") else "accept: other"
    if ok:
        return "offer followed"
    if turn.get("accept"):
        return "offer: accepted instead"
    if turn.get("echo"):
        return "offer: restated theirs"
    return "offer: no number" if turn.get("offer") is None else "offer: another number"


def move_outcome_lines(results, names):
    """results.md's count of what the planned focal turns did, per method with planned turns:
    where offer fidelity is lost. "first draft followed" / "first draft emotion": turns whose
    first reply did the move / was perceived as the requested emotion (of the turns that asked
    for one), whichever draft was played; "redrafted": turns the student wrote again
    (LMAgent.redrafts); the outcome columns count the replies played."""
    rows = []
    for m in names:
        counts = dict.fromkeys(MOVE_OUTCOMES, 0)
        first = first_emo = asked = redrafted = 0
        for r in results[m]["records"]:
            for t in r["turns"]:
                k = move_outcome(t) if t["speaker"] == "focal" else None
                if k:
                    counts[k] += 1
                    redrafted += t.get("drafts", 1) > 1
                    fd = t.get("first_draft")                  # recorded when a rewrite was played
                    first += fd["move"] if fd else k.endswith(" followed")
                    if t.get("emotion"):
                        asked += 1
                        first_emo += fd["emotion"] if fd else t.get("perceived") == t["emotion"]
        if sum(counts.values()):
            emo = f"{first_emo} of {asked}" if asked else "-"
            rows.append(f"| {m} | {sum(counts.values())} | {first} | {emo} | {redrafted} | "
                        + " | ".join(str(counts[k]) for k in MOVE_OUTCOMES) + " |")
    if not rows:
        return []
    return ["## What the planned focal turns did (all domains)", "",
            "| method | planned turns | first draft followed | first draft emotion | redrafted | "
            + " | ".join(MOVE_OUTCOMES) + " |",
            "|---|---|---|---|---|" + "---|" * len(MOVE_OUTCOMES)] + rows + [""]


def summarize(records):
    """Outcome metrics over trajectory records, each (mean, lo, hi). The expression rates are
    per-trajectory shares (see `expression_rates`) averaged over trajectories."""
    outs = [r["outcome"] for r in records]
    succ = [o for o in outs if o["success"]]
    rates = [expression_rates(r) for r in records]
    return {"n": len(outs),
            "success": bootstrap_ci([o["success"] for o in outs]),
            "utility": bootstrap_ci([o["utility"] for o in outs]),
            "utility_on_success": bootstrap_ci([o["utility"] for o in succ]),
            "rounds": bootstrap_ci([o["rounds"] for o in outs]),
            "offer_in_range": bootstrap_ci([a for a, _, _ in rates if a is not None]),
            "emotion_match": bootstrap_ci([b for _, b, _ in rates if b is not None]),
            "offer_fidelity": bootstrap_ci([c for _, _, c in rates if c is not None])}


def write_results(out, eval_dir, results, names, doms, best, seeds, seed, split, selector_methods):
    """results.md (results-<eval_dir>.md for another eval folder): per domain and pooled, each
    method's success, utility, rounds, offers in range and emotion match, mean [95% bootstrap
    CI]; the paper's orderings; the plots; the saved study sections. Printed too."""
    where = "held-out scenarios 80-99" if split == "test" else "training scenarios 0-79 (validation)"
    lines = [f"# Results: {where} x {seeds} seeds, run seed {seed} (mean [95% bootstrap CI])", ""]
    if best:
        lines += ["Best fixed emotion per domain (chosen on training scenarios 0-79): "
                  + ", ".join(f"{d} {e}" for d, e in best.items()), ""]
    for d in doms:
        lines += [f"## {d}", "", "| method | n | success % | utility | utility on success | rounds "
                  "| offer in range % | emotion match % | offer fidelity % |", "|---|---|---|---|---|---|---|---|---|"]
        for m in names:
            s = results[m]["summary"][d]
            lines.append(f"| {m} | {s['n']} | {fmt(s['success'], True)} | {fmt(s['utility'])} | "
                         f"{fmt(s['utility_on_success'])} | {fmt(s['rounds'])} | "
                         f"{fmt(s.get('offer_in_range', (float('nan'),) * 3), True)} | "
                         f"{fmt(s.get('emotion_match', (float('nan'),) * 3), True)} | "
                         f"{fmt(s.get('offer_fidelity', (float('nan'),) * 3), True)} |")
        lines.append("")
    lines += ["## all domains (pooled)", "", "| method | n | success % | utility | rounds | offer in range % "
              "| emotion match % | offer fidelity % |", "|---|---|---|---|---|---|---|---|"]
    for m in names:
        s = summarize(results[m]["records"])
        lines.append(f"| {m} | {s['n']} | {fmt(s['success'], True)} | {fmt(s['utility'])} | {fmt(s['rounds'])} | "
                     f"{fmt(s['offer_in_range'], True)} | {fmt(s['emotion_match'], True)} | "
                     f"{fmt(s['offer_fidelity'], True)} |")
    lines += ["", "offer in range: share of the focal turns whose offer parses and lies between the two openings; "
              "emotion match: share of emotion-conditioned focal turns whose perceived emotion (cue lexicon) is the "
              "requested one; offer fidelity: share of planned focal turns whose played reply did the planner's "
              "move (stated its number, or accepted when told to; a trained student may redraft a reply that "
              "missed, and the next table counts the turns done at the first draft; with --offers free the "
              "prompt does not name the move, so this is how often the model chose the planner's number). All are per-episode shares averaged over "
              "episodes.", ""]
    lines += move_outcome_lines(results, names)
    lines += ordering_lines(results, names, doms)
    lines += machine_lines(results, names)
    lines += plots(os.path.join(out, eval_dir), results, names, doms, selector_methods)
    if eval_dir == "eval":
        lines += study_sections(out)
    text = "\n".join(lines)
    path = os.path.join(out, "results.md" if eval_dir == "eval" else f"results-{eval_dir}.md")
    write_text_atomic(path, text)
    print(text)


def machine_lines(results, names):
    """Where each row was computed (rows cached from another machine say so): float results,
    the selector's greedy choices among them, can differ between CPUs."""
    machines = {}
    for m in names:
        f = results[m].get("machine")
        key = (f"{f['cpu']} ({f['cpu_capability']}{', ' + f['cuda'] if f.get('cuda') else ''}), torch {f['torch']}, "
               f"{f['threads']} thread(s)") if f else "not recorded (a row from before machine facts were saved)"
        machines.setdefault(key, []).append(m)
    return [("Computed on " if len(machines) == 1 else "Computed on several machines: ")
            + "; ".join(k + ("" if len(machines) == 1 else ": " + ", ".join(ms)) for k, ms in machines.items())
            + ".", ""]


# The paper's claims about the LLM rows, as (better, worse, strict): EmoDistill >= IQL+SFT >=
# IQL >= vanilla, and EmoDistill > the emotion-free distillation.
PAPER_ORDERINGS = [("emodistill", "iql+sft", False), ("iql+sft", "iql", False), ("iql", "vanilla", False),
                   ("emodistill", "jpo-emotion-free", True)]


def ordering_lines(results, methods, domains):
    """results.md's check of the paper's orderings: for each pair whose two rows ran, the mean
    utility difference per domain and pooled, with a paired 95% bootstrap CI (same scenarios,
    seeds and counterparty), and in how many domains the ordering holds in the means. A domain
    whose mean difference is exactly 0 (both rows alike on every episode, e.g. no deal in either)
    is a tie: counted apart, never as a domain where the ordering holds. A difference whose CI
    covers 0 is not evidence either way."""
    pairs = [(a, b, strict) for a, b, strict in PAPER_ORDERINGS if a in methods and b in methods]
    if not pairs:
        return []
    lines = ["## The paper's orderings (mean utility difference, paired 95% bootstrap CI)", "",
             "| ordering | " + " | ".join(domains) + " | pooled | holds in |",
             "|---|" + "---|" * (len(domains) + 2)]
    for a, b, strict in pairs:
        ra, rb = results[a]["records"], results[b]["records"]
        cells, holds, ties = [], 0, 0
        for d in domains:
            m, lo, hi, n = paired_diff_ci([r for r in ra if r["domain"] == d], [r for r in rb if r["domain"] == d])
            tie = n > 0 and abs(m) < 1e-12
            ties += tie
            holds += n > 0 and not tie and m > 0
            cells.append(("tie " if tie else "") + f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]" if n else "-")
        m, lo, hi, n = paired_diff_ci(ra, rb)
        tied = f" ({ties} tie{'s' if ties > 1 else ''})" if ties else ""
        lines.append(f"| {a} {'>' if strict else '≥'} {b} | " + " | ".join(cells)
                     + f" | {m:+.3f} [{lo:+.3f}, {hi:+.3f}] | {holds} of {len(domains)}{tied} |")
    return lines + ["", "Each cell: mean of (left - right) utility over the episodes both rows played, the same "
                    "scenario and seed; an ordering holds in a domain when that mean is > 0. A mean of exactly 0 "
                    "(the two rows alike on every episode) is a tie, counted apart and not as holding, for >= "
                    "too. A CI that covers 0 means the two rows are not told apart at this sample size.", ""]


def plots(folder, results, methods, domains, selector_methods):
    """utility.png (mean utility with 95% CI by method and domain) and emotions_by_turn.png
    (which emotion each selector-driven method chose at each focal turn), when matplotlib is
    installed. Returns the lines to add to results.md."""
    plt = pyplot("[eval] plots")
    if plt is None:
        return ["(plots skipped: matplotlib is not installed)"]
    import numpy as np
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(methods) * len(domains) / 3), 4))
    w = 0.8 / len(methods)
    for k, m in enumerate(methods):
        u = [results[m]["summary"][d]["utility"] for d in domains]
        x = np.arange(len(domains)) + (k - (len(methods) - 1) / 2) * w
        ax.bar(x, [a[0] for a in u], w, yerr=[[a[0] - a[1] for a in u], [a[2] - a[0] for a in u]], label=m, capsize=2)
    ax.set_xticks(np.arange(len(domains)), domains)
    ax.set_ylabel("mean utility (95% CI)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "utility.png"), dpi=120)
    plt.close(fig)
    chosen = [m for m in methods if m in selector_methods]
    if chosen:
        fig, axes = plt.subplots(1, len(chosen), figsize=(4.5 * len(chosen), 5), squeeze=False)
        for ax, m in zip(axes[0], chosen):
            counts = np.zeros((len(EMOTIONS), 10))
            for r in results[m]["records"]:
                focal = [t for t in r["turns"] if t["speaker"] == "focal" and t.get("emotion")]
                for k, t in enumerate(focal[:10]):
                    counts[EMOTIONS.index(t["emotion"]), k] += 1
            share = counts / np.maximum(counts.sum(0, keepdims=True), 1)
            ax.imshow(share, aspect="auto", cmap="viridis", vmin=0, vmax=1)
            ax.set_yticks(range(len(EMOTIONS)), EMOTIONS, fontsize=6)
            ax.set_xticks(range(10), range(1, 11))
            ax.set_xlabel("focal turn")
            ax.set_title(m, fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(folder, "emotions_by_turn.png"), dpi=120)
        plt.close(fig)
    rel = os.path.basename(folder)
    return [f"![utility by method and domain]({rel}/utility.png)"] + (
        [f"![emotion chosen by focal turn]({rel}/emotions_by_turn.png)"] if chosen else [])


def study_section(out, name, lines):
    """Save a study's markdown as studies/<name>.md and put it into results.md between
    markers, replacing an older copy (eval keeps these sections when it rewrites the file)."""
    text = "\n".join(lines).rstrip() + "\n"
    os.makedirs(os.path.join(out, "studies"), exist_ok=True)
    path = os.path.join(out, "studies", f"{name}.md")
    write_text_atomic(path, text)
    report = os.path.join(out, "results.md")
    old = open(report).read() if os.path.exists(report) else "# Results\n"
    begin, end = f"<!-- study:{name} -->", f"<!-- /study:{name} -->"
    if begin in old and end in old:
        old = old[:old.index(begin)].rstrip() + "\n" + old[old.index(end) + len(end):].lstrip("\n")
    write_text_atomic(report, old.rstrip() + f"\n\n{begin}\n{text}{end}\n")
    return path


def study_sections(out):
    """The saved study sections, with their markers, for eval to append to results.md."""
    folder, lines = os.path.join(out, "studies"), []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".md"):
            with open(os.path.join(folder, name)) as f:
                lines += ["", f"<!-- study:{name[:-3]} -->", f.read().rstrip(), f"<!-- /study:{name[:-3]} -->"]
    return lines


def transfer_table(domains, rows, util):
    """Markdown lines of a trained-on x tested-on utility table, the in-domain cells in bold."""
    lines = ["| trained on \\ tested on | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for name, _ in rows:
        cells = [("**" + fmt(util[name][d]) + "**") if name == f"{d} only" else fmt(util[name][d]) for d in domains]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def spearman(a, b):
    import numpy as np
    ra, rb = (np.argsort(np.argsort(x)).astype(float) for x in (a, b))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def pyplot(what):
    """matplotlib.pyplot on the file-only backend, or None (with a message) when matplotlib,
    an optional extra, is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{what} skipped: matplotlib is not installed (pip install matplotlib)")
        return None
    return plt


def emotion_heatmap(out, table, domains):
    plt = pyplot("[study-emotions] heatmap")
    if plt is None:
        return ["(heatmap skipped: matplotlib is not installed)"]
    import numpy as np
    u = np.array([[table[d][e]["utility"][0] for d in domains] for e in EMOTIONS])   # (28, domains)
    fig, ax = plt.subplots(figsize=(2 + 1.3 * len(domains), 8))
    im = ax.imshow(u, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(EMOTIONS)), EMOTIONS, fontsize=7)
    ax.set_xticks(range(len(domains)), domains)
    fig.colorbar(im, ax=ax, label="mean utility")
    fig.tight_layout()
    os.makedirs(os.path.join(out, "studies"), exist_ok=True)
    fig.savefig(os.path.join(out, "studies", "emotions_heatmap.png"), dpi=120)
    plt.close(fig)
    return ["![mean utility by fixed emotion and domain](studies/emotions_heatmap.png)"]


def fmt(m, pct=False):
    mean, lo, hi = m
    if mean != mean:
        return "-"
    f = 100 if pct else 1
    return f"{mean * f:.1f} [{lo * f:.1f}, {hi * f:.1f}]" if pct else f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def return_correlation_rows(records):
    """The IQL reward's check (iql.return_correlations, default IQLConfig): per domain, the
    Pearson correlation across trajectories of the discounted return with the episode length
    and with the utility, as table rows. None when a focal turn has no judge score yet."""
    if not any(t["speaker"] == "focal" for r in records for t in r["turns"]) or any(
            "score" not in t for r in records for t in r["turns"] if t["speaker"] == "focal" and t.get("emotion")):
        return None
    import iql   # only here: the report does not need the learner otherwise
    cfg = iql.IQLConfig()
    table = iql.return_correlations(records, cfg)
    rows = [f"IQL discounted return (gamma {cfg.gamma}, judge part centred at "
            f"{iql.judge_centre(records, cfg):+.3f}, closing counted once) vs episode outcome:",
            "| domain | n | corr(return, length) | corr(return, utility) | mean return |", "|" + "---|" * 5]
    rows += [f"| {d} | {c['n']} | {c['length']:.3f} | {c['utility']:.3f} | {c['mean_return']:.3f} |"
             for d, c in table.items()]
    return {"table": table, "rows": rows}


def summary(out="runs/default", on_bad_line="error"):
    """Per-domain outcome table (mean [95% bootstrap CI]) and judge score of a run."""
    path = os.path.join(out, "judged.jsonl")
    if not os.path.exists(path):
        path = os.path.join(out, "corpus.jsonl")
    if not os.path.exists(path):
        raise StageError(f"no corpus in {out}; run collect first")
    records, _ = read_jsonl(path, on_bad=on_bad_line)
    rows, table = [], {}
    header = "| domain | n | success % | utility | utility on success | rounds | judge score |"
    rows += [header, "|" + "---|" * 7]
    for d in sorted({r["domain"] for r in records}) + ["all"]:
        recs = [r for r in records if d == "all" or r["domain"] == d]
        s = summarize(recs)
        scores = [t["score"] for r in recs for t in r["turns"] if t.get("score") is not None]
        judge_m = bootstrap_ci(scores) if scores else (float("nan"),) * 3
        table[d] = dict(s, judge=judge_m)
        rows.append(f"| {d} | {s['n']} | {fmt(s['success'], True)} | {fmt(s['utility'])} | "
                    f"{fmt(s['utility_on_success'])} | {fmt(s['rounds'])} | {fmt(judge_m)} |")
    comps = {}
    for r in records:
        for t in r["turns"]:
            for k, v in t.get("components", {}).items():
                comps.setdefault(k, []).append(v)
    text = "\n".join(rows)
    if comps:
        text += "\n\njudge components (mean over focal turns): " + ", ".join(
            f"{k} {sum(v) / len(v):.3f}" for k, v in comps.items())
    corr = return_correlation_rows(records)
    if corr:
        text += "\n\n" + "\n".join(corr["rows"])
        for d, c in corr["table"].items():
            table.setdefault(d, {})["return_correlation"] = c
    print(text)
    write_json_atomic(os.path.join(out, "summary.json"), table)
    return table
