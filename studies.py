"""The paper's studies beyond the main table, each adding its section to results.md. Not needed
to follow the method itself.

    study-emotions        each of the 28 emotions held fixed for whole episodes (the motivating study)
    study-transfer        a selector trained on one domain, tested on every domain (cross-domain transfer)
    study-counterparties  every method against unseen counterparties (held-out persona, an LM)
    tournament            trained focal methods against methods trained on the other side
"""
from __future__ import annotations

import os
import re
import time

import emodistill
import negotiate as ng
import report
from domains import EMOTIONS, TEST_IDS, load_config, pick_domains
from methods import (STUDENT_MAX_NEW_TOKENS, STUDENT_REDRAFTS, STUDENT_TEMPERATURE, adapter_sha, play, policy_for,
                     side_agent, uses_selector)
from models import lm_cost, make_agent
from report import fmt
from runs import StageError, domains_sha, parse_ids, progress_bar, read_json, sha, write_json_atomic

ALL_DOMAINS = emodistill.ALL_DOMAINS


def study_emotions(out="runs/default", domains_file="domains.yaml", side="focal", domains=ALL_DOMAINS, seeds=5,
                   seed=0, scenarios="train", persona=None, scenario_seed=0, force=False):
    """The paper's motivating study: each of the 28 emotions held fixed for whole episodes
    (SimTeacher as expresser, sim counterparty) on the training scenarios of each domain,
    ranked by mean utility, next to how often the IQL selector picks each emotion there."""
    cfg = load_config(domains_file, side=side)
    doms = pick_domains(cfg, domains)
    teacher, cp = ng.SimTeacher(cfg), ng.SimCounterparty(cfg)
    ids = parse_ids(scenarios)
    iql_path = os.path.join(out, "iql.pt")
    settings = {"domains": doms, "seeds": seeds, "seed": seed, "scenarios": scenarios, "persona": persona,
                "scenario_seed": scenario_seed, "domains_file_sha": domains_sha(domains_file, side),
                "selector_sha": sha(iql_path) if os.path.exists(iql_path) else None}
    done = os.path.join(out, "studies", "emotions.json")
    if os.path.exists(done) and not force and read_json(done).get("settings") == settings:
        print(f"[study-emotions] {done} is complete; skipping (use --force to redo)")
        return
    t0 = time.time()
    table = {}                                             # domain -> emotion -> summary
    bar = progress_bar(len(doms) * len(EMOTIONS), "emotions")
    for d in doms:
        table[d] = {}
        for e in EMOTIONS:
            recs = play(cfg, [d], ids, seeds, teacher, cp, ng.fixed_emotion_policy(e), seed, persona, scenario_seed)
            table[d][e] = report.summarize(recs)
            bar.update(1)
    bar.close()
    chosen, sel_summary = {}, {}
    if os.path.exists(iql_path):                           # what the learned selector picks on the same scenarios
        policy = policy_for("teacher-iql", out, doms, sample=False, best={})
        for d in doms:
            recs = play(cfg, [d], ids, seeds, teacher, cp, policy, seed, persona, scenario_seed)
            sel_summary[d] = report.summarize(recs)
            emos = [t["emotion"] for r in recs for t in r["turns"] if t["speaker"] == "focal" and t.get("emotion")]
            chosen[d] = {e: emos.count(e) / max(len(emos), 1) for e in EMOTIONS}
    where = {"train": "training scenarios 0-79", "test": "held-out scenarios 80-99"}.get(scenarios,
                                                                                     f"scenarios {scenarios}")
    lines = [f"## Study: one emotion held fixed for whole episodes ({where} x {seeds} seeds, SimTeacher vs "
             f"SimCounterparty{', persona ' + persona if persona else ''})", "",
             f"Command: `python emodistill.py study-emotions --out {out} --seeds {seeds} --scenarios "
             f"{scenarios}" + (f" --persona {persona}" if persona else "") + "`."
             + (" Selector share: how often the IQL selector (iql.pt, greedy) picks the emotion on the same "
                "episodes." if chosen else " (No iql.pt in the run: the selector columns are left out.)"), ""]
    for d in doms:
        ranked = sorted(EMOTIONS, key=lambda e: -table[d][e]["utility"][0])
        neutral = table[d]["neutral"]["utility"][0]
        lines += [f"### {d}", "", "| rank | emotion | utility | success % | utility - neutral |"
                  + (" selector share % |" if chosen else ""), "|---|---|---|---|---|" + ("---|" if chosen else "")]
        for k, e in enumerate(ranked, 1):
            s = table[d][e]
            lines.append(f"| {k} | {e} | {fmt(s['utility'])} | {fmt(s['success'], True)} | "
                         f"{s['utility'][0] - neutral:+.3f} |" + (f" {100 * chosen[d][e]:.1f} |" if chosen else ""))
        if chosen:
            top = sorted(EMOTIONS, key=lambda e: -chosen[d][e])[:3]
            rho = report.spearman([table[d][e]["utility"][0] for e in EMOTIONS], [chosen[d][e] for e in EMOTIONS])
            lines += ["", f"Best fixed: {ranked[0]} {table[d][ranked[0]]['utility'][0]:.3f}; the selector (changing "
                      f"emotion by state) {fmt(sel_summary[d]['utility'])}. Its most chosen emotions: "
                      + ", ".join(f"{e} {100 * chosen[d][e]:.0f}%" for e in top)
                      + f". Spearman rank correlation between an emotion's fixed-episode utility and the selector's "
                      f"share: {rho:+.2f}."]
        lines.append("")
    lines += report.emotion_heatmap(out, table, doms)
    path = report.study_section(out, "emotions", lines)
    write_json_atomic(os.path.join(out, "studies", "emotions.json"),
                      {"settings": settings,
                       "utility": {d: {e: table[d][e]["utility"] for e in EMOTIONS} for d in table},
                       "success": {d: {e: table[d][e]["success"] for e in EMOTIONS} for d in table},
                       "selector_share": chosen})
    print("\n".join(lines))
    print(f"[study-emotions] {len(doms) * 28} emotion x domain cells in {time.time() - t0:.1f}s -> {path}")


def study_counterparties(out="runs/default", counterparties="", name="counterparties", **eval_params):
    """Unseen counterparties: every method on the held-out scenarios against (a) the training
    personas (the main eval), (b) each domain's held-out SimCounterparty persona, and (c) each
    agent spec in `counterparties` (e.g. `smollm2`, `hf:<model>`, `api:<model>`), one eval
    folder each (eval, eval-heldout, eval-cp-<spec>), then one table of utility and success.
    `eval_params`: eval's own parameters (methods, seeds, student, ...), the same for each row."""
    rows = [("training personas (sim)", {"persona": None, "counterparty": "sim", "eval_dir": "eval",
                                         "write_report": False}),
            ("held-out persona (sim)", {"persona": "heldout", "counterparty": "sim", "eval_dir": "eval-heldout"})]
    for spec in [c.strip() for c in counterparties.split(",") if c.strip()]:
        rows.append((f"{spec} counterparty", {"persona": None, "counterparty": spec,
                                              "eval_dir": "eval-cp-" + re.sub(r"[^\w.-]+", "_", spec)}))
    results = {}
    for row, over in rows:
        print(f"[study-counterparties] {row}")
        results[row] = emodistill.evaluate(out, **{**eval_params, **over})
    params = {**_defaults(emodistill.evaluate), **eval_params}
    methods, seeds = params["methods"], params["seeds"]
    lines = [f"## Study: unseen counterparties (held-out scenarios 80-99 x {seeds} seeds, all domains pooled)",
             "", f"Command: `python emodistill.py study-counterparties --out {out} --methods {methods} "
             f"--seeds {seeds}" + (f" --counterparties {counterparties}" if counterparties else "")
             + (f" --name {name}" if name != "counterparties" else "")
             + "`. Utility, then success %, mean [95% bootstrap CI]; per-domain tables are in the "
             "results-eval-*.md files.", "",
             "| method | " + " | ".join(row for row, _ in rows) + " |", "|---|" + "---|" * len(rows)]
    for m in [m.strip() for m in methods.split(",") if m.strip()]:
        cells = []
        for row, _ in rows:
            sm = report.summarize(results[row][m]["records"])
            cells.append(f"{fmt(sm['utility'])}<br>{fmt(sm['success'], True)}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("")
    path = report.study_section(out, name, lines)
    print("\n".join(lines))
    print(f"[study-counterparties] -> {path}")


def _defaults(fn):
    import inspect
    return {k: p.default for k, p in inspect.signature(fn).parameters.items()}


def side_settings(method, out):
    """What a tournament pairing's cache depends on for one side's method."""
    return {"method": method, "adapter_sha": adapter_sha(out, method),
            "selector_sha": sha(os.path.join(out, "iql.pt")) if uses_selector(method) else None}


def tournament(out="runs/default", cp_run=None, domains_file="domains.yaml", side="focal",
               methods="vanilla,iql,emodistill", cp_methods="vanilla,iql,emodistill", domains=ALL_DOMAINS,
               scenarios_per_domain=20, seeds=1, seed=0, student="smollm2", sample=False, lm_batch=128,
               max_new_tokens=STUDENT_MAX_NEW_TOKENS, force=False):
    """Trained-vs-trained round robin (the paper's tournament study): every focal method of
    `out` against every counterparty method of `cp_run`, a run made with `--side counterparty`
    (the same pipeline with the roles swapped), on held-out scenarios of each domain. The
    counterparty agent sees each episode mirrored (negotiate.MirroredAgent), which is what it
    was trained on. Each side's utility is where the agreement lies between the other side's
    opening (0) and its own target (1), clipped to [0, 1]; 0 without agreement."""
    cfg = load_config(domains_file, side=side)
    if side != "focal":
        raise StageError("tournament runs from the focal side's run folder; --cp-run names the other side's")
    cp_cfg = load_config(domains_file, side="counterparty")
    doms = pick_domains(cfg, domains)
    meta = os.path.join(cp_run, "collect.json")
    want = domains_sha(domains_file, "counterparty")
    if not os.path.exists(meta) or read_json(meta).get("domains_file_sha") != want:
        raise StageError(f"{cp_run} is not a counterparty-side run of this domains file: collect it with "
                         f"`emodistill.py collect --side counterparty --out {cp_run}` (then judge, iql, sft, jpo "
                         f"with --side counterparty)")
    fms = [m.strip() for m in methods.split(",") if m.strip()]
    cms = [m.strip() for m in cp_methods.split(",") if m.strip()]
    ids = list(TEST_IDS)[:scenarios_per_domain]
    folder = os.path.join(out, "tournament")
    os.makedirs(folder, exist_ok=True)
    cache, table = {}, {}
    t0 = time.time()
    for fm in fms:
        for cm in cms:
            path = os.path.join(folder, f"{fm}__vs__{cm}.json".replace(":", "_"))
            settings = {"domains": doms, "ids": ids, "seeds": seeds, "seed": seed, "student": student,
                        "max_new_tokens": max_new_tokens, "domains_file_sha": domains_sha(domains_file),
                        "cp_domains_file_sha": want, "sample": sample,
                        "focal": side_settings(fm, out), "counterparty": side_settings(cm, cp_run)}
            cached = read_json(path) if os.path.exists(path) and not force else {}
            if cached.get("settings") == settings:
                table[fm, cm] = cached["records"]
                print(f"[tournament] {fm} vs {cm}: cached in {path}")
                continue
            focal, policy = side_agent(fm, cfg, out, doms, student, lm_batch, sample, seed, cache,
                                       max_new_tokens=max_new_tokens)
            cp_agent, cp_policy = side_agent(cm, cp_cfg, cp_run, doms, student, lm_batch, sample, seed + 1, cache,
                                             max_new_tokens=max_new_tokens)
            cp = ng.MirroredAgent(cp_agent, cp_cfg, cp_policy)
            t1 = time.time()
            recs = play(cfg, doms, ids, seeds, focal, cp, policy, seed)
            write_json_atomic(path, {"settings": settings, "seconds": round(time.time() - t1, 1), "records": recs})
            table[fm, cm] = recs
            print(f"[tournament] {fm} vs {cm}: {len(recs)} episodes in {time.time() - t1:.1f}s -> {path}")
            for a in (focal, cp_agent):
                if isinstance(a, ng.LMAgent):
                    print(f"       {lm_cost(a)}")
    n_ep = len(ids) * seeds * len(doms)
    lines = [f"## Study: trained-vs-trained tournament ({len(ids)} held-out scenarios per domain from 80 x "
             f"{seeds} seeds x {len(doms)} domains = {n_ep} episodes per pairing, all domains pooled)", "",
             f"Command: `python emodistill.py tournament --out {out} --cp-run {cp_run} --methods {methods} "
             f"--cp-methods {cp_methods} --scenarios-per-domain {scenarios_per_domain} --seeds {seeds}`. "
             "Rows: the focal side's method (trained in this run); columns: the counterparty side's method "
             f"(trained in {cp_run} with the roles swapped). Each cell: focal utility / counterparty utility, "
             "then success % and mean rounds. Utility: where the agreement lies between the other side's opening "
             "(0) and one's own target (1), 0 without agreement.", "",
             "| focal \\ counterparty | " + " | ".join(cms) + " |", "|---|" + "---|" * len(cms)]
    for fm in fms:
        cells = []
        for cm in cms:
            recs = table[fm, cm]
            sm = report.summarize(recs)
            cu = [1.0 - r["outcome"]["utility"] if r["outcome"]["success"] else 0.0 for r in recs]
            cells.append(f"{sm['utility'][0]:.3f} / {sum(cu) / len(cu):.3f}<br>{100 * sm['success'][0]:.0f}%, "
                         f"{sm['rounds'][0]:.1f} rounds")
        lines.append(f"| {fm} | " + " | ".join(cells) + " |")
    lines.append("")
    path = report.study_section(out, "tournament", lines)
    print("\n".join(lines))
    print(f"[tournament] {time.time() - t0:.1f}s -> {path}")


def study_transfer(out="runs/default", domains_file="domains.yaml", side="focal", domains=ALL_DOMAINS, steps=5000,
                   seeds=5, seed=0, adapters=False, student="smollm2", lm_scenarios=5, lm_seeds=1,
                   sft_max_examples=16, sft_epochs=2.0, lm_batch=128, redrafts=STUDENT_REDRAFTS,
                   max_new_tokens=STUDENT_MAX_NEW_TOKENS, on_bad_line="error", force=False):
    """Cross-domain transfer of the emotion selector: one IQL selector per domain, trained on
    that domain's part of the judged corpus only, then played (SimTeacher as expresser, sim
    counterparty) on the held-out scenarios of every domain. On a foreign domain the selector
    is shown the scenario as if it were its own domain (its one-hot domain feature); the
    other features are direction-normalised and mean the same everywhere. With `adapters`,
    the student's side too (_transfer_adapters)."""
    import iql
    cfg = load_config(domains_file, side=side)
    doms = pick_domains(cfg, domains)
    records = emodistill.load_judged(out, on_bad_line)
    hp = iql.IQLConfig(steps=steps, seed=seed)
    folder = os.path.join(out, "transfer")
    os.makedirs(folder, exist_ok=True)
    judged_sha = sha(os.path.join(out, "judged.jsonl"))
    teacher, cp = ng.SimTeacher(cfg), ng.SimCounterparty(cfg)
    t0 = time.time()
    util, models = {}, {}
    for src in doms:
        path, meta = os.path.join(folder, f"iql-{src}.pt"), os.path.join(folder, f"iql-{src}.json")
        settings = {"judged_sha": judged_sha, "steps": steps, "seed": seed}
        fresh = os.path.exists(path) and not force and os.path.exists(meta) and read_json(meta) == settings
        if not fresh:
            data = iql.transitions([r for r in records if r["domain"] == src], [src], hp, cfg.max_turns)
            if not len(data["a"]):
                raise StageError(f"judged.jsonl has no {src} trajectories to train a {src} selector on")
            print(f"[study-transfer] {src}: IQL on {len(data['a'])} {src} transitions, {steps} steps")
            model, targets, opt, step = iql.train(data, hp, log=lambda m: None)
            iql.save(path, model, targets, opt, step, hp, [src], cfg.max_turns)
            write_json_atomic(meta, settings)
        model, _, _, _, spec = iql.load(path)
        models[src] = (model, spec)
    rows = [(f"{src} only", src) for src in doms]
    if os.path.exists(os.path.join(out, "iql.pt")):
        model, _, _, _, spec = iql.load(os.path.join(out, "iql.pt"))
        if all(d in spec["domains"] for d in doms):
            rows.append(("all domains (iql.pt)", "all"))
            models["all"] = (model, spec)
    rows.append(("random emotion (floor)", "random"))
    for row, src in rows:
        util[row] = {}
        for dst in doms:
            if src == "random":
                policy = ng.random_emotion_policy()
            else:
                model, spec = models[src]
                policy = iql.Selector(model, spec, as_domain=None if src == "all" else src)
            recs = play(cfg, [dst], TEST_IDS, seeds, teacher, cp, policy, seed)
            util[row][dst] = report.summarize(recs)["utility"]
    lines = [f"## Study: cross-domain transfer of the emotion selector (held-out scenarios 80-99 x {seeds} "
             "seeds, SimTeacher vs SimCounterparty)", "",
             f"Command: `python emodistill.py study-transfer --out {out} --steps {steps} --seeds "
             f"{seeds}" + (f" --adapters --student {student} --lm-scenarios {lm_scenarios} --lm-seeds "
                           f"{lm_seeds} --sft-max-examples {sft_max_examples} --sft-epochs "
                           f"{sft_epochs:g}" if adapters else "")
             + f"`. Rows: the corpus the selector was trained on ({steps} IQL steps on one domain's "
             "transitions); columns: the domain it is tested on; mean utility [95% bootstrap CI]. The diagonal "
             "is in-domain.", "", *report.transfer_table(doms, rows, util)]
    lm_util = None
    if adapters:
        lm_util = _transfer_adapters(cfg, out, domains_file, side, doms, models, lines, student, lm_scenarios,
                                     lm_seeds, sft_max_examples, sft_epochs, lm_batch, redrafts, max_new_tokens, seed,
                                     on_bad_line, force)
    path = report.study_section(out, "transfer", lines)
    write_json_atomic(os.path.join(folder, "transfer.json"), {"utility": util, "seeds": seeds, "steps": steps,
                                                              "lm_utility": lm_util})
    print("\n".join(lines))
    print(f"[study-transfer] {time.time() - t0:.1f}s -> {path}")


def _transfer_adapters(cfg, out, domains_file, side, doms, models, lines, student, lm_scenarios, lm_seeds,
                       sft_max_examples, sft_epochs, lm_batch, redrafts, max_new_tokens, seed, on_bad_line, force):
    """The student's side of transfer: per domain an SFT adapter trained on that domain's top
    turns (ranked by that domain's selector), then selector + adapter (the iql+sft method) played
    by the student on the first `lm_scenarios` held-out scenarios of every domain. Each adapter
    and each row is cached under transfer/; appends a table to `lines`, returns the utilities."""
    import iql
    folder = os.path.join(out, "transfer")
    ids = list(TEST_IDS)[:lm_scenarios]
    cp = ng.SimCounterparty(cfg)
    util, rows = {}, [(f"{src} only", src) for src in doms]
    if os.path.exists(os.path.join(out, "sft", "adapter_model.safetensors")) and "all" in models:
        rows.append(("all domains (iql.pt + sft/)", "all"))
    for row, src in rows:
        selector = os.path.join(out, "iql.pt") if src == "all" else os.path.join(folder, f"iql-{src}.pt")
        if src == "all":
            adapter, policy = os.path.join(out, "sft"), iql.Selector(*models["all"])
        else:
            # this study's own adapter: one made from another selector (--steps, --seed) is retrained
            adapter = emodistill.train_sft(out, domains_file, side, student, name=f"transfer/sft-{src}",
                                           selector=selector, max_examples=sft_max_examples, epochs=sft_epochs,
                                           batch_size=2, grad_accum=4, seed=seed, on_bad_line=on_bad_line,
                                           force=force, retrain_stale=True)
            policy = iql.Selector(*models[src], as_domain=src)
        cache = os.path.join(folder, f"lm-{src}.json")
        settings = {"adapter_sha": sha(os.path.join(adapter, "adapter_model.safetensors")),
                    "selector_sha": sha(selector), "student": student, "lm_batch": lm_batch,
                    "scenarios": ids, "seeds": lm_seeds, "seed": seed, "domains": doms,
                    "domains_file_sha": domains_sha(domains_file, side), "temperature": STUDENT_TEMPERATURE,
                    "redrafts": redrafts, "redraft_rule": ng.REDRAFT_RULE, "max_new_tokens": max_new_tokens}
        got = read_json(cache) if os.path.exists(cache) and not force else None
        if got is None or got.get("settings") != settings:
            agent = make_agent(student, "focal", cfg, seed=seed, batch_size=lm_batch, adapter=adapter,
                               temperature=STUDENT_TEMPERATURE, redrafts=redrafts, max_new_tokens=max_new_tokens)
            print(f"[study-transfer] {row}: student + adapter {adapter} on {len(ids)} held-out scenarios "
                  f"x {lm_seeds} seeds of {len(doms)} domains")
            recs = play(cfg, doms, set(ids), lm_seeds, agent, cp, policy, seed)
            got = {"settings": settings, "utility": {d: report.summarize([r for r in recs if r["domain"] == d])["utility"]
                                                     for d in doms}}
            print(f"       {lm_cost(agent)}")
            write_json_atomic(cache, got)
        util[row] = {d: tuple(got["utility"][d]) for d in doms}
    lines += [f"Student ({student}) with an SFT adapter per domain (top 10% of that domain's turns by its "
              f"selector's advantage, sampled down to {sft_max_examples}, {sft_epochs:g} epochs) and "
              f"that domain's selector: the iql+sft method, played on held-out scenarios "
              f"{ids[0]}-{ids[-1]} x {lm_seeds} seed(s) of each domain; mean utility [95% bootstrap CI]. "
              "The diagonal is in-domain.", "", *report.transfer_table(doms, rows, util)]
    return util


def add_commands(command, positive):
    """The studies' subcommands, through emodistill.build_parser's `command`."""
    command("study-counterparties", study_counterparties, "methods against unseen counterparties",
            emodistill.EVAL_FLAGS + ["offers"], emodistill.REDRAFTS_FLAG, emodistill.MAX_NEW_FLAG,
            ("--counterparties", dict(help="extra counterparty agent specs, e.g. smollm2,api:<model>")),
            ("--name", dict(help="name of the study section in results.md")))
    command("study-emotions", study_emotions, "each of the 28 emotions held fixed for whole episodes",
            ["out", "run", "seed", "domains", "scenarios"], ("--seeds", dict(type=int, help="seeds per scenario")),
            ("--scenarios", dict(help="train (0-79), test (80-99) or ids like 0-9,12")))
    command("study-transfer", study_transfer, "a selector trained on one domain, tested on each",
            ["out", "run", "seed", "domains", "bad", "student", "lm_batch"],
            ("--steps", dict(type=int, help="IQL steps per single-domain selector")),
            ("--seeds", dict(type=int, help="seeds per held-out scenario")),
            ("--adapters", dict(action="store_true", help="also train an SFT adapter per domain and play selector + "
                                "adapter with the student")),
            ("--lm-scenarios", dict(type=positive, help="held-out scenarios per domain in each --adapters cell "
                                    "(from 20; LM play costs minutes)")),
            ("--lm-seeds", dict(type=positive, help="seeds per scenario in each --adapters cell")),
            ("--sft-max-examples", dict(type=positive, help="SFT examples per domain adapter")),
            ("--sft-epochs", dict(type=float)),
            ("--redrafts", dict(type=int, help="rewrites of the student's reply that missed the planned move or "
                                "emotion (adapter cells)")), emodistill.MAX_NEW_FLAG)
    command("tournament", tournament, "trained focal methods vs trained counterparty-side methods",
            ["out", "run", "seed", "domains", "student", "lm_batch"],
            ("--cp-run", dict(required=True, help="run folder of the counterparty side (made with --side counterparty)")),
            ("--methods", dict(help="focal methods (as in eval)")),
            ("--cp-methods", dict(help="counterparty-side methods")),
            ("--scenarios-per-domain", dict(type=positive, help="held-out scenarios used, from 80")),
            ("--seeds", dict(type=positive, help="seeds per scenario")),
            ("--sample", dict(action="store_true", help="sample the selectors' emotions instead of greedy")),
            emodistill.MAX_NEW_FLAG)
