"""EmoDistill, the pipeline of the paper (arXiv 2605.26785) as one command per stage.

    python emodistill.py collect --out runs/NAME   # offline corpus: teacher vs counterparty, a random emotion a turn
    python emodistill.py judge   --out runs/NAME   # the judge's score of every focal turn (the reward)
    python emodistill.py iql     --out runs/NAME   # which emotion: the IQL selector pi(e|s)        (iql.py)
    python emodistill.py sft     --out runs/NAME   # how to say it: LoRA SFT on the top-K% turns    (lora.py)
    python emodistill.py jpo     --out runs/NAME   # Judge Policy Optimization of that adapter      (jpo.py)
    python emodistill.py eval    --out runs/NAME   # every method on held-out scenarios -> results.md

Each stage function reads "load inputs -> call the algorithm -> save", with explicit parameters
whose defaults are the command line's. Around them, in the back room: run folders, hashes and
resuming (runs.py), model loading (models.py), results.md (report.py), the studies and the
tournament (studies.py), the benchmark (bench.py).
"""
from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
import time
from dataclasses import asdict

import emomas
import negotiate as ng
import report
from domains import SIDES, TEST_IDS, TRAIN_IDS, DomainConfigError, check_emotions, load_config, make_scenarios, pick_domains
from methods import (ADAPTER_METHODS, STUDENT_MAX_NEW_TOKENS, STUDENT_REDRAFTS, STUDENT_TEMPERATURE, TEACHER_METHODS,
                     adapter_folder, adapter_sha, best_fixed_emotions, chooser, play, side_agent, uses_selector)
from models import lm_cost, load_lm, make_agent, make_judge
from runs import (PartialJsonl, StageError, domains_sha, machine_facts, mark_complete, need, parse_ids, prepare_out,
                  progress_bar, read_json, read_jsonl, settings_diff, sha, step_bar, write_json_atomic)

ALL_DOMAINS = "crad,disaster,hospital,student"


# ----------------------------------------------------------------------------------------
# 1. collect: the offline corpus (teacher vs counterparty, a uniformly random emotion each focal turn)
# ----------------------------------------------------------------------------------------

def collect(out="runs/default", domains_file="domains.yaml", side="focal", domains=ALL_DOMAINS, teacher="sim",
            counterparty="sim", seeds_per_scenario=50, scenarios="train", emotions="", persona=None, seed=0,
            scenario_seed=0, scenarios_csv=None, batch_size=None, lm_batch=64, on_bad_line="error", force=False):
    """Play teacher vs counterparty on the chosen scenarios with a uniformly random emotion per
    focal turn and write one trajectory per line to corpus.jsonl."""
    cfg = load_config(domains_file, side=side)
    doms = pick_domains(cfg, domains)
    subset = check_emotions(emotions.split(",")) if emotions else None
    ids = parse_ids(scenarios)
    csv_shas = emomas.use_csv_scenarios(scenarios_csv, cfg, doms, out, scenario_seed, domains_file)
    settings = {"domains": doms, "scenario_seed": scenario_seed, "teacher": teacher, "counterparty": counterparty,
                "seeds_per_scenario": seeds_per_scenario, "scenarios": scenarios, "seed": seed,
                "emotions": subset, "persona": persona, "max_turns": cfg.max_turns,
                "domains_file_sha": domains_sha(domains_file, side)}
    if csv_shas:                      # (only then, so that runs made before the importer still match)
        settings["scenarios_csv"] = csv_shas
    path = os.path.join(out, "corpus.jsonl")
    fresh = prepare_out(out, "collect.json", settings, force)  # refuses other settings first
    if fresh and os.path.exists(path):
        print(f"[collect] {path} is complete; skipping (use --force to redo)")
        return path
    sink = PartialJsonl(path)
    if force and os.path.exists(sink.partial):
        os.remove(sink.partial)
    done = set(sink.resume(on_bad_line))
    scs = {d: {sc.id: sc for sc in make_scenarios(cfg.domains[d], scenario_seed, persona)} for d in doms}
    jobs = [(d, i, s) for d in doms for i in ids if i in scs[d] for s in range(seeds_per_scenario)]
    cache = {}
    focal = make_agent(teacher, "focal", cfg, seed, lm_batch, model_cache=cache)
    cp = make_agent(counterparty, "counterparty", cfg, seed + 1, lm_batch, model_cache=cache)
    policy = ng.random_emotion_policy(subset)
    perceiver = ng.Perceiver(cfg.emotions)
    todo = [j for j in jobs if f"{j[0]}-{j[1]}-{j[2]}" not in done]
    uses_lm = isinstance(focal, ng.LMAgent) or isinstance(cp, ng.LMAgent)
    chunk_size = batch_size or (lm_batch if uses_lm else 256)  # bounds key/value cache memory
    if done:
        print(f"[collect] resuming: {len(done)} of {len(jobs)} trajectories already in {sink.partial}")
    t0, bar = time.time(), progress_bar(len(jobs), "collect", len(jobs) - len(todo))
    for s in range(0, len(todo), chunk_size):
        chunk = todo[s:s + chunk_size]
        eps = [ng.new_episode(cfg.domains[d], scs[d][i], k, seed) for d, i, k in chunk]
        ng.run_episodes(cfg, eps, focal, cp, policy, perceiver)
        sink.append([ng.to_record(ep) for ep in eps])
        bar.update(len(eps))
    bar.close()
    sink.finish("collect.json")      # the output is whole: the stage is fresh
    print(f"[collect] {len(todo)} new trajectories in {time.time() - t0:.1f}s -> {path}")
    return path


# ----------------------------------------------------------------------------------------
# 2. judge: a score for every focal turn (the rubric, or an LLM judge)
# ----------------------------------------------------------------------------------------

def judge(out="runs/default", domains_file="domains.yaml", side="focal", judge="rubric", lm_batch=64,
          on_bad_line="error", force=False):
    """Add per-focal-turn judge scores (and their components) to every trajectory."""
    cfg = load_config(domains_file, side=side)
    llm = None if judge == "rubric" else make_judge(judge, cfg, lm_batch)
    src = os.path.join(out, "corpus.jsonl")
    if not os.path.exists(src):
        hint = " (collect was interrupted: re-run collect to finish it)" if os.path.exists(src + ".partial") else ""
        raise StageError(f"{src} not found{hint}")
    path = os.path.join(out, "judged.jsonl")
    # a corpus that changed since judging (another seed, --force) is caught here, not reused
    fresh = prepare_out(out, "judge.json", {"judge": judge, "corpus_sha": sha(src)}, force)
    if fresh and os.path.exists(path):
        print(f"[judge] {path} is complete; skipping (use --force to redo)")
        return path
    records, bad = read_jsonl(src, on_bad=on_bad_line)
    if bad:
        print(f"[judge] skipped {len(bad)} corrupt line(s) of {src}: {bad[:20]}{' ...' if len(bad) > 20 else ''}")
    sink = PartialJsonl(path)
    if force and os.path.exists(sink.partial):
        os.remove(sink.partial)
    done = set(sink.resume(on_bad_line))
    todo = [r for r in records if r["key"] not in done]
    bar = progress_bar(len(records), "judge", len(records) - len(todo))
    for s in range(0, len(todo), 512):
        chunk = todo[s:s + 512]
        for rec in chunk:
            ng.add_judge_scores(rec, cfg)
            rec["judge"] = judge
        if llm is not None:  # the LLM's score replaces the rubric total; components stay
            asks = [(rec, i) for rec in chunk for i, t in enumerate(rec["turns"]) if t["speaker"] == "focal"]
            answers = llm([ng.judge_messages(rec, i, cfg) for rec, i in asks])
            for (rec, i), text in zip(asks, answers):
                rec["turns"][i].update(score=ng.parse_score(text), judge_answer=text[:200])
            missing = sum(ng.parse_score(a) is None for a in answers)
            if missing:
                bar.write(f"[judge] {missing} of {len(answers)} answers had no parseable SCORE (recorded as missing)")
        sink.append(chunk)
        bar.update(len(chunk))
    bar.close()
    sink.finish("judge.json")        # the output is whole: the stage is fresh
    print(f"[judge] scored {len(todo)} trajectories -> {path}")
    return path


def load_judged(out, on_bad_line="error"):
    """The judged corpus of a run (a StageError if judge has not run)."""
    path = os.path.join(out, "judged.jsonl")
    if not os.path.exists(path):
        raise StageError(f"{path} not found; run judge first")
    records, bad = read_jsonl(path, on_bad=on_bad_line)
    if bad:
        print(f"[iql] skipped {len(bad)} corrupt line(s) of {path}: {bad[:20]}")
    return records


# ----------------------------------------------------------------------------------------
# 3. iql: which emotion (iql.py)
# ----------------------------------------------------------------------------------------

def train_iql(out="runs/default", domains_file="domains.yaml", side="focal", steps=10000, expectile=0.7, beta=3.0,
              seed=0, save_every=2000, on_bad_line="error", force=False):
    """Train the IQL emotion selector on the judged corpus -> runs/NAME/iql.pt (resumable)."""
    import iql
    cfg = load_config(domains_file, side=side)
    hp = iql.IQLConfig(steps=steps, expectile=expectile, beta=beta, seed=seed)
    path, judged = os.path.join(out, "iql.pt"), os.path.join(out, "judged.jsonl")
    prepare_out(out, "iql.json", {"judged_sha": sha(judged) if os.path.exists(judged) else None,
                                  "config": {k: v for k, v in asdict(hp).items() if k != "steps"},
                                  "max_turns": cfg.max_turns}, force)
    if force and os.path.exists(path):   # a redo starts over: a failed one must not leave the old selector
        os.remove(path)
    records = load_judged(out, on_bad_line)
    doms = [d for d in cfg.domains if any(r["domain"] == d for r in records)]
    data = iql.transitions(records, doms, hp, cfg.max_turns)
    model = targets = opt = None
    step = 0
    if os.path.exists(path) and not force:
        model, targets, opt, step, _ = iql.load(path, doms, hp)
        if step >= hp.steps:
            print(f"[iql] {path} is complete ({step} steps); skipping (use --force to redo)")
            return path
        print(f"[iql] resuming from step {step}")
    print(f"[iql] {len(data['a'])} transitions from {len(records)} trajectories, {data['s'].shape[1]} features, "
          f"domains {doms}")
    bar = progress_bar(hp.steps, "iql", step, unit="step")
    t0 = time.time()
    while step < hp.steps:
        stop = min(step + save_every, hp.steps)
        model, targets, opt, new_step = iql.train(data, hp, model, targets, opt, start=step, stop_at=stop,
                                                  log=bar.write)
        bar.update(new_step - step)
        step = new_step
        iql.save(path, model, targets, opt, step, hp, doms, cfg.max_turns)
    bar.close()
    mark_complete(out, "iql.json")
    print(f"[iql] {path}: {step} steps in {time.time() - t0:.1f}s")
    return path


# ----------------------------------------------------------------------------------------
# 4. sft and 5. jpo: how to say it (lora.py, jpo.py)
# ----------------------------------------------------------------------------------------

def _adapter_stage(out, stage, name, settings, force, retrain_stale=False):
    """Shared start of the sft and jpo stages: refuse other settings (or, with retrain_stale,
    retrain), skip a finished adapter (returns None), drop a stale checkpoint on a redo.
    Returns the checkpoint path."""
    folder = os.path.join(out, name)
    force = force or (retrain_stale and bool(settings_diff(os.path.join(out, f"{name}.json"), settings)))
    fresh = prepare_out(out, f"{name}.json", settings, force)
    if fresh and os.path.exists(os.path.join(folder, "adapter_config.json")):
        print(f"[{stage}] {folder} is complete; skipping (use --force to redo)")
        return None
    ckpt = os.path.join(out, f"{name}.state.pt")
    if force and os.path.exists(ckpt):
        os.remove(ckpt)
    return ckpt


def sft_prompt(cfg, tok, rec, turn_index, emotion_free=False, offers="planned"):
    """The exact text LMAgent feeds the model before focal turn `turn_index` of `rec` (the
    compact state prompt with that turn's planned move and emotion)."""
    ep = ng.episode_from_record(cfg, rec, turn_index)
    turn = rec["turns"][turn_index]
    if offers == "planned" and "plan" not in turn:
        raise StageError(f"record {rec.get('key')} has no planned moves (a corpus collected before the offer "
                         f"planner): re-run collect with --force, or use --offers free")
    return tok.apply_chat_template(ng.build_messages(cfg, ep, "focal", turn.get("emotion"), emotion_free, offers,
                                                     turn.get("plan")),
                                   add_generation_prompt=True, tokenize=False)


def train_sft(out="runs/default", domains_file="domains.yaml", side="focal", student="smollm2", emotion_free=False,
              offers="planned", name=None, selector=None, top_k=10.0, max_examples=64, epochs=3.0, lr=2e-3, r=16, alpha=32,
              batch_size=8, grad_accum=1, prompt_grad=True, min_move_share=0.2, seed=0, on_bad_line="error", force=False,
              retrain_stale=False):
    """LoRA SFT of the student on the top-K% advantage focal turns -> runs/NAME/<name>/ (adapter).
    prompt_grad=False: no gradient through the prompt tokens (lora.response_logprobs).
    retrain_stale: retrain an adapter made from other inputs instead of refusing it."""
    import torch

    import iql
    import lora
    cfg = load_config(domains_file, side=side)
    name = name or ("sft-emotion-free" if emotion_free else "sft")
    folder = os.path.join(out, name)
    need(os.path.join(out, "judged.jsonl"), "run judge first")
    sel_path = need(selector or os.path.join(out, "iql.pt"), "sft ranks turns with the IQL value net: run iql first")
    hp = lora.SFTConfig(r=r, alpha=alpha, lr=lr, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum,
                        prompt_grad=prompt_grad, min_move_share=min_move_share, seed=seed)
    settings = {"student": student, "emotion_free": emotion_free, "offers": offers, "top_k": top_k,
                "max_examples": max_examples,
                "config": asdict(hp), "selector_sha": sha(sel_path), "judged_sha": sha(os.path.join(out, "judged.jsonl")),
                "domains_file_sha": domains_sha(domains_file, side)}
    ckpt = _adapter_stage(out, "sft", name, settings, force, retrain_stale)
    if ckpt is None:
        return folder
    # load: the judged corpus ranked by the selector's advantage A = r + gamma V(s') (1-d) - V(s)
    records = load_judged(out, on_bad_line)
    model_q, _, _, _, spec = iql.load(sel_path)
    records = [rec for rec in records if rec["domain"] in spec["domains"]]
    data = iql.transitions(records, spec["domains"], iql.IQLConfig(**spec["config"]), spec["max_turns"])
    adv = iql.advantages(model_q, data, spec["config"]["gamma"]).tolist()
    picked = lora.select_sft_turns(records, adv, data["where"], top_k, max_examples, seed, hp.min_per_emotion,
                                    hp.min_move_share)
    model, tok = load_lm(student)
    rows = [{"key": records[ri]["key"], "turn": ti, "domain": records[ri]["domain"],
             "emotion": records[ri]["turns"][ti].get("emotion"), "advantage": round(a, 4),
             "move": (records[ri]["turns"][ti].get("plan") or {}).get("move"),
             "prompt": sft_prompt(cfg, tok, records[ri], ti, emotion_free, offers),
             "response": records[ri]["turns"][ti]["text"]} for ri, ti, a in picked]
    n_all, adv_mean = len(adv), sum(adv) / len(adv)
    del records, data, adv                                  # the corpus is not needed while training
    sink = PartialJsonl(os.path.join(out, f"{name}_data.jsonl"))
    if os.path.exists(sink.partial):
        os.remove(sink.partial)
    sink.append(rows)
    sink.finish()
    per_dom = {d: [x["emotion"] for x in rows if x["domain"] == d] for d in sorted({x["domain"] for x in rows})}
    print(f"[sft] {len(rows)} examples: top {top_k}% (~{math.ceil(n_all * top_k / 100)}) of {n_all} focal turns "
          f"by IQL advantage per domain, topped up to {hp.min_per_emotion} per emotion and "
          f"{hp.min_move_share:.0%} per move ({sum(x['move'] == 'accept' for x in rows)} accept turns)"
          + (f", capped at {max_examples}" if max_examples else "")
          + " (" + ", ".join(f"{d} {len(e)} with {len(set(e) - {None})} emotions" for d, e in per_dom.items())
          + f"); mean advantage {sum(x['advantage'] for x in rows) / len(rows):.3f} (all turns "
          f"{adv_mean:.3f}){'; emotion-free prompts' if emotion_free else ''}")
    examples = [lora.encode_example(tok, x["prompt"], x["response"]) for x in rows]
    lens = sorted(len(e["input_ids"]) for e in examples)
    print(f"[sft] tokens per example: median {lens[len(lens) // 2]}, max {lens[-1]}; "
          f"response tokens per example: {sum(sum(x != -100 for x in e['labels']) for e in examples) / len(examples):.1f}")
    # the algorithm: LoRA on the frozen student, loss on the response tokens only
    torch.manual_seed(seed)
    lora.inject(model, r=hp.r, alpha=hp.alpha, dropout=hp.dropout)
    bar, tick = step_bar("sft")
    stats = lora.train_sft(model, examples, tok.pad_token_id or 0, hp, ckpt=ckpt, log=bar.write, progress=tick)
    bar.close()
    # save: the adapter in PEFT's layout, and its training statistics
    lora.save_adapter(model, folder, student)
    write_json_atomic(os.path.join(folder, "train_stats.json"), {**stats, "machine": machine_facts()})
    mark_complete(out, f"{name}.json")
    print(f"[sft] {folder}: held-out loss {stats.get('initial_heldout', float('nan')):.4f} before training, "
          f"best {stats['best']:.4f} at step {stats['best_step']} of "
          f"{stats['total_steps']} ({stats['n_train']} train / {stats['n_heldout']} held-out examples), "
          f"{stats['tokens']} tokens in {stats['seconds']}s")
    return folder


def train_jpo(out="runs/default", domains_file="domains.yaml", side="focal", student="smollm2", emotion_free=False,
              offers="planned", name=None, jpo_mode="resample", states_per_domain=8, group_size=4, states_per_step=2,
              epochs=2.0, lr=2e-4, clip_eps=0.2, kl_coef=0.04, batch_size=8, grad_accum=1,
              max_new_tokens=STUDENT_MAX_NEW_TOKENS, seed=0, on_bad_line="error", force=False):
    """JPO of the SFT adapter -> runs/NAME/<name>/. A group is one state (domain, scenario,
    focal turn index). jpo_mode offline (the paper): `group_size` judged corpus turns of each
    state, with their stored scores. resample: `group_size` replies a state sampled from the
    current policy, each scored by the rubric judge after one simulated counterparty reply
    (negotiate.judge_reply), `states_per_step` states a step, each reply at most `max_new_tokens`."""
    import functools

    import torch

    import jpo
    import lora
    cfg = load_config(domains_file, side=side)
    name = name or ("jpo-emotion-free" if emotion_free else "jpo")
    init = os.path.join(out, "sft-emotion-free" if emotion_free else "sft")
    folder = os.path.join(out, name)
    need(os.path.join(out, "judged.jsonl"), "run judge first")
    if jpo_mode not in jpo.JPO_MODES:
        raise ValueError(f"jpo_mode must be one of {jpo.JPO_MODES}, got '{jpo_mode}'")
    if not os.path.exists(os.path.join(init, "adapter_model.safetensors")):
        raise StageError(f"jpo starts from the SFT adapter {init}, which is missing; run "
                         f"`emodistill.py sft{' --emotion-free' if emotion_free else ''}` first")
    hp = jpo.JPOConfig(clip_eps=clip_eps, kl_coef=kl_coef, lr=lr, epochs=epochs, batch_size=batch_size,
                       grad_accum=grad_accum, seed=seed, mode=jpo_mode, group_size=group_size,
                       states_per_step=states_per_step, max_new_tokens=max_new_tokens)
    settings = {"student": student, "emotion_free": emotion_free, "offers": offers, "config": asdict(hp),
                "states_per_domain": states_per_domain,
                "sft_sha": sha(os.path.join(init, "adapter_model.safetensors")),
                "judged_sha": sha(os.path.join(out, "judged.jsonl")), "domains_file_sha": domains_sha(domains_file, side)}
    ckpt = _adapter_stage(out, "jpo", name, settings, force)
    if ckpt is None:
        return folder
    # load: the training states (groups), and the SFT adapter (also the frozen reference)
    records = [rec for rec in load_judged(out, on_bad_line) if rec["domain"] in cfg.domains]
    resample = jpo_mode == "resample"
    picked = (jpo.select_jpo_turns(records, states_per_domain, 1, seed, min_group=1) if resample
              else jpo.select_jpo_turns(records, states_per_domain, group_size, seed))
    if not picked:
        raise StageError("no judged focal turns to optimise on")
    model, tok = load_lm(student)
    lora.load_adapter(model, init)
    prompts = [sft_prompt(cfg, tok, records[ri], ti, emotion_free, offers) for ri, ti, _ in picked]
    pad_id = tok.pad_token_id or 0
    torch.manual_seed(seed)
    bar, tick = step_bar("jpo")
    if resample:
        # each state: its corpus record and focal turn; G fresh replies a step from the policy,
        # judged after one simulated counterparty reply (the same counterparty draws for the G)
        states = [(records[ri], ti) for ri, ti, _ in picked]
        del records
        perceiver = ng.Perceiver(cfg.emotions)

        def score(state, texts):
            rec, ti = state
            return [ng.judge_reply(cfg, rec, ti, t, perceiver) for t in texts]
        sample = functools.partial(jpo.sample_replies, model, tok, cfg=hp, clean=ng._clean_reply)
        print(f"[jpo] re-sample mode: {len(states)} states, {group_size} sampled replies each, {states_per_step} "
              f"states a step; corpus judge score of those turns {sum(r['turns'][t]['score'] for r, t in states) / len(states):.2f}; "
              f"starting from {init}{'; emotion-free prompts' if emotion_free else ''}")
        # the algorithm: clipped ratio to the frozen SFT policy plus the k3 KL anchor, on fresh samples
        stats = jpo.train_jpo_resample(model, states, prompts, sample, score,
                                       functools.partial(lora.encode_example, tok), pad_id, hp, ckpt=ckpt,
                                       log=bar.write, progress=tick)
    else:
        examples = [lora.encode_example(tok, p, records[ri]["turns"][ti]["text"]) for p, (ri, ti, _) in zip(prompts, picked)]
        rewards = [records[ri]["turns"][ti]["score"] for ri, ti, _ in picked]
        groups = [g for _, _, g in picked]
        del records
        print(f"[jpo] {len(examples)} offline focal turns in {len(set(groups))} same-state groups (domain, scenario, "
              f"turn); judge score mean {sum(rewards) / len(rewards):.2f}; starting from "
              f"{init}{'; emotion-free prompts' if emotion_free else ''}")
        # the algorithm: clipped ratio to the frozen SFT policy plus the k3 KL anchor
        stats = jpo.train_jpo(model, examples, rewards, groups, pad_id, hp, ckpt=ckpt, log=bar.write, progress=tick)
    bar.close()
    lora.save_adapter(model, folder, student)
    write_json_atomic(os.path.join(folder, "train_stats.json"), {**stats, "machine": machine_facts()})
    mark_complete(out, f"{name}.json")
    last = stats["history"][-1]
    print(f"[jpo] {folder}: {stats['total_steps']} steps in {stats['seconds']}s; last step ratio {last['ratio']:.3f} "
          f"approx-KL {last['approx_kl']:.4f} clip fraction {last['clip_frac']:.2f}"
          + (f"; sample judge score {stats['history'][0]['score']:.2f} at step 1, {last['score']:.2f} at the last"
             if resample else ""))
    return folder


# ----------------------------------------------------------------------------------------
# 6. eval: every method on the held-out scenarios, the same counterparty draws for each
# ----------------------------------------------------------------------------------------

def evaluate(out="runs/default", domains_file="domains.yaml", side="focal", methods=",".join(TEACHER_METHODS),
             domains=ALL_DOMAINS, seeds=5, select_seeds=3, student="smollm2", counterparty="sim", persona=None,
             sample=False, seed=0, scenario_seed=0, scenarios_csv=None, split="test", eval_dir="eval", lm_batch=64,
             offers="planned", temperature=STUDENT_TEMPERATURE, redrafts=STUDENT_REDRAFTS,
             max_new_tokens=STUDENT_MAX_NEW_TOKENS, write_report=True, force=False):
    """Run methods on held-out scenarios (80-99) x seeds; write eval/<method>.json and results.md.
    `redrafts`: how many times a trained student (an adapter row) may rewrite a reply that missed
    the planned move or the requested emotion (methods.STUDENT_REDRAFTS); `max_new_tokens`: the
    cap on each student reply (methods.STUDENT_MAX_NEW_TOKENS)."""
    cfg = load_config(domains_file, side=side)
    doms = pick_domains(cfg, domains)
    csv_shas = emomas.use_csv_scenarios(scenarios_csv, cfg, doms, out, scenario_seed, domains_file)
    names = [m.strip() for m in methods.split(",") if m.strip()]
    for m in names:                   # every name and adapter checked before the first row runs
        chooser(m)
        adapter_folder(out, m)
    os.makedirs(os.path.join(out, eval_dir), exist_ok=True)
    dsha = domains_sha(domains_file, side)
    best = (best_fixed_emotions(cfg, out, doms, select_seeds, seed, scenario_seed, dsha, csv_shas)
            if any("best-fixed" in m for m in names) else {})
    cache, results = {}, {}
    iql_path = os.path.join(out, "iql.pt")
    for m in names:
        path = os.path.join(out, eval_dir, f"{m.replace(':', '_')}.json")
        settings = {"domains": doms, "seeds": seeds, "seed": seed, "split": split, "scenario_seed": scenario_seed,
                    "persona": persona, "counterparty": counterparty,
                    "student": None if m.startswith("teacher-") else student, "sample": sample,
                    "offers": None if m.startswith("teacher-") else offers,
                    "temperature": None if m.startswith("teacher-") else temperature,
                    "max_new_tokens": None if m.startswith("teacher-") else max_new_tokens,
                    "best_fixed": best if "best-fixed" in m else None, "domains_file_sha": dsha,
                    "selector_sha": sha(iql_path) if uses_selector(m) and os.path.exists(iql_path) else None,
                    "adapter_sha": adapter_sha(out, m)}
        if m in ADAPTER_METHODS and offers == "planned":
            settings["redrafts"] = redrafts
            if redrafts:
                settings["redraft_rule"] = ng.REDRAFT_RULE
        if csv_shas:
            settings["scenarios_csv"] = csv_shas
        if os.path.exists(path) and not force:
            cached = read_json(path)
            if cached.get("settings") == settings:
                results[m] = cached
                print(f"[eval] {m}: cached in {path}")
                continue
            print(f"[eval] {m}: {path} was made with other settings (or another selector); re-running")
        focal, policy = side_agent(m, cfg, out, doms, student, lm_batch, sample, seed, cache, best, offers,
                                   temperature, redrafts, max_new_tokens)
        cp = make_agent(counterparty, "counterparty", cfg, seed + 1, lm_batch, model_cache=cache)
        t0 = time.time()
        recs = play(cfg, doms, TEST_IDS if split == "test" else TRAIN_IDS, seeds, focal, cp, policy, seed, persona,
                    scenario_seed)
        summ = {d: report.summarize([r for r in recs if r["domain"] == d]) for d in doms}
        results[m] = {"method": m, "settings": settings, "summary": summ, "seconds": round(time.time() - t0, 1),
                      "machine": machine_facts(), "records": recs}
        write_json_atomic(path, results[m])
        print(f"[eval] {m}: {len(recs)} episodes in {time.time() - t0:.1f}s -> {path}")
        if isinstance(focal, ng.LMAgent):
            print(f"       {lm_cost(focal)}")
    if write_report:                  # (not with --no-report, nor for a study reusing the main eval)
        report.write_results(out, eval_dir, results, names, doms, best, seeds, seed, split,
                             [m for m in names if uses_selector(m)])
        import viewer
        print(f"[eval] transcripts and figures: {viewer.write_page(out, eval_dir, domains_file, side)}")
    return results


# ----------------------------------------------------------------------------------------
# The command line: one subcommand per stage; each flag's default is its function's
# ----------------------------------------------------------------------------------------

def _positive(text):
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def shared_flags():
    """Parent parsers for the flags several commands share, by name."""
    def flags(*specs):
        p = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
        for name, kw in specs:
            p.add_argument(name, **kw)
        return p
    return {
        "out": flags(("--out", dict(help="run folder"))),
        "run": flags(("--domains-file", dict(help="domain and emotion definitions")),
                     ("--force", dict(action="store_true", help="redo the stage even if its output exists")),
                     ("--side", dict(choices=SIDES, help="counterparty = every domain with its roles swapped "
                                     "(domains.yaml swap: sections), to train the other side for the tournament; "
                                     "use its own --out"))),
        "seed": flags(("--seed", dict(type=int, help="episode and training randomness"))),
        "domains": flags(("--domains", dict(help="comma-separated domain keys"))),
        "bad": flags(("--on-bad-line", dict(choices=["error", "skip"], help="a corrupt input line: stop, or skip it"))),
        "student": flags(("--student", dict(help="the LM expresser: smollm2 | hf:<model> | a local folder"))),
        "lm_batch": flags(("--lm-batch", dict(type=int, help="sequences decoded together by LM agents"))),
        "scenarios": flags(("--scenario-seed", dict(type=int, help="which 100 scenarios per domain")),
                           ("--persona", dict(help="one counterparty persona: a name, or 'heldout' for each "
                                              "domain's held-out one"))),
        "csv": flags(("--scenarios-csv", dict(metavar="PATH", help="play the EmoMAS scenario CSVs (a folder with "
                                              "each domain's file) instead of generated scenarios"))),
        "adapter": flags(("--emotion-free", dict(action="store_true", help="prompts without the emotion block (the "
                                                 "ablation; adapter '<stage>-emotion-free')")),
                         ("--name", dict(help="adapter folder under the run")),
                         ("--epochs", dict(type=float)), ("--lr", dict(type=float)),
                         ("--batch-size", dict(type=int, help="sequences per forward pass")),
                         ("--grad-accum", dict(type=int, help="forward passes per optimiser step"))),
        "offers": flags(("--offers", dict(choices=ng.OFFER_MODES, help="planned: the prompt states the offer "
                                          "planner's move for the turn; free: the LM picks the number (the paper's "
                                          "setting)"))),
        "eval": flags(("--methods", dict(help="comma-separated: vanilla, random, fixed:<emotion>, best-fixed, iql, "
                                         "iql+sft, emodistill, sft-emotion-free, jpo-emotion-free, and "
                                         "teacher-<chooser> for the SimTeacher as expresser")),
                      ("--seeds", dict(type=int, help="seeds per held-out scenario")),
                      ("--select-seeds", dict(type=int, help="seeds per training scenario for best-fixed")),
                      ("--counterparty", dict(help="sim | smollm2 | hf:<model> | api:<model>")),
                      ("--sample", dict(action="store_true", help="sample the selector's emotion instead of greedy")),
                      ("--split", dict(choices=["test", "train"], help="train = validation on training scenarios "
                                       "(use another --seed than collect's)")),
                      ("--eval-dir", dict(help="folder under the run for <method>.json"))),
    }


def build_parser():
    """One subcommand per stage; flags map one to one onto the stage function's parameters
    (dest = parameter name), and a flag left out takes the function's default."""
    import bench
    import chat
    import probe
    import studies
    import viewer
    p = argparse.ArgumentParser(prog="emodistill.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def command(name, fn, help, parents, *own):
        f = shared_flags()            # fresh flag objects: argparse shares a parent's actions between
                                      # subcommands, and each one's help gets its own default below
        sp = sub.add_parser(name, help=help, parents=[f[k] for k in parents],
                            argument_default=argparse.SUPPRESS)
        for flag, kw in own:
            sp.add_argument(flag, **kw)
        defaults = inspect.signature(fn).parameters
        for a in sp._actions:         # show each default, which lives in the function's signature
            if a.dest in defaults and defaults[a.dest].default is not inspect.Parameter.empty and \
                    not isinstance(a, argparse._StoreFalseAction):   # (a --no-X flag's default reads wrong)
                a.help = f"{a.help + ' ' if a.help else ''}(default {defaults[a.dest].default})"
        sp.set_defaults(stage=fn)
    agents = "sim | smollm2 | hf:<model> | api:<model>"
    command("collect", collect, "collect the offline corpus",
            ["out", "run", "seed", "domains", "bad", "lm_batch", "csv", "scenarios"],
            ("--teacher", dict(help=agents)), ("--counterparty", dict(help=agents)),
            ("--seeds-per-scenario", dict(type=int)),
            ("--scenarios", dict(help="train (0-79), test (80-99) or ids like 0-9,12")),
            ("--emotions", dict(help="comma-separated subset for the random behaviour policy")),
            ("--batch-size", dict(type=int, help="episodes advanced in lock step (default 256 with sim agents, "
                                  "--lm-batch with an LM)")))
    command("judge", judge, "score every focal turn", ["out", "run", "bad", "lm_batch"],
            ("--judge", dict(help="rubric | smollm2 | hf:<model> | api:<model>")))
    command("summary", report.summary, "outcome table of a run", ["out", "bad"])
    command("iql", train_iql, "train the IQL emotion selector", ["out", "run", "seed", "bad"], ("--steps", dict(type=int)),
            ("--expectile", dict(type=float)), ("--beta", dict(type=float, help="AWR inverse temperature")),
            ("--save-every", dict(type=_positive, help="checkpoint interval in steps")))
    command("sft", train_sft, "LoRA SFT of the student on the top-K%% advantage turns",
            ["out", "run", "seed", "bad", "student", "adapter", "offers"],
            ("--selector", dict(help="the IQL checkpoint that ranks the turns (default RUN/iql.pt)")),
            ("--top-k", dict(type=float, help="percent of focal turns kept, by IQL advantage")),
            ("--max-examples", dict(type=int, help="cap on examples (a seeded sample of the top-K%%, equal per "
                                    "domain); 0 = no cap")),
            ("--r", dict(type=int, help="LoRA rank")), ("--alpha", dict(type=int, help="LoRA alpha (scale alpha / r)")),
            ("--min-move-share", dict(type=float, help="least share of a domain's SFT examples for each planned "
                                      "move (offer, accept)")),
            ("--no-prompt-grad", dict(dest="prompt_grad", action="store_false", help="no gradient through the "
                                      "prompt tokens: one example at a time, ~40%% faster on the compact prompt")))
    command("jpo", train_jpo, "Judge Policy Optimization of the SFT adapter",
            ["out", "run", "seed", "bad", "student", "adapter", "offers"],
            ("--jpo-mode", dict(choices=["offline", "resample"], help="offline: corpus turns with their stored "
                                "judge scores (the paper); resample: replies sampled from the current policy, judged "
                                "after one simulated counterparty reply (GRPO-style)")),
            ("--states-per-domain", dict(type=int, help="training states (groups) per domain; a state is (scenario, "
                                         "focal turn index)")),
            ("--scenarios-per-domain", dict(type=int, dest="states_per_domain", help="old name of --states-per-domain")),
            ("--group-size", dict(type=int, help="turns per state group: corpus turns drawn (offline) or replies "
                                  "sampled (resample)")),
            ("--states-per-step", dict(type=int, help="resample: states whose sampled groups make one optimiser step")),
            ("--clip-eps", dict(type=float)), ("--kl-coef", dict(type=float)), MAX_NEW_FLAG)
    command("eval", evaluate, "evaluate methods on held-out scenarios", EVAL_FLAGS + ["offers"],
            ("--temperature", dict(type=float, help="the student's sampling temperature (0 = greedy)")),
            REDRAFTS_FLAG, MAX_NEW_FLAG,
            ("--no-report", dict(dest="write_report", action="store_false", help="only write eval/<method>.json "
                                 "(train.sh runs methods side by side this way, then one eval of all writes results.md)")))
    studies.add_commands(command, _positive)
    bench.add_command(command)
    probe.add_command(command)
    chat.add_command(command)
    viewer.add_command(command)
    return p


# the shared flags of eval and of the studies that run eval
REDRAFTS_FLAG = ("--redrafts", dict(type=int, help="rewrites of an adapter row's reply that missed the planned move or "
                                    "emotion"))
MAX_NEW_FLAG = ("--max-new-tokens", dict(type=_positive, help="the cap on each student reply, in tokens"))
EVAL_FLAGS = ["out", "run", "seed", "domains", "student", "lm_batch", "csv", "scenarios", "eval"]


def main(argv=None):
    args = vars(build_parser().parse_args(argv))
    cmd, stage = args.pop("cmd"), args.pop("stage")
    try:
        stage(**args)
    except (DomainConfigError, StageError, ValueError, RuntimeError, ng.ApiError) as e:
        print(f"emodistill {cmd}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:              # a full disk, a read-only run folder, a path that is a file
        where = f": {e.filename}" if e.filename else ""
        print(f"emodistill {cmd}: error: {e.strerror or e}{where} (files already complete are kept; "
              f"fix the folder and re-run to resume)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
