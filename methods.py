"""The evaluation methods: what each method name of `eval` means (which emotion chooser, which
expresser, which adapter), and playing them on scenarios. Not needed to follow the paper: the
paper's Table of methods, as code that eval, the studies and the tournament share.

A method is `teacher-<chooser>` (the SimTeacher writes the turns) or `<chooser>` (the student LM
writes them), where the chooser is vanilla (no emotion block), random, fixed:<emotion>,
best-fixed (chosen on training scenarios 0-79) or iql (the selector); iql+sft, emodistill and
the emotion-free rows add the run's LoRA adapters (ADAPTER_METHODS).
"""
from __future__ import annotations

import os

import negotiate as ng
from domains import EMOTIONS, TRAIN_IDS, check_emotions, make_scenarios
from models import make_agent
from runs import StageError, progress_bar, read_json, sha, write_json_atomic

TEACHER_METHODS = ("teacher-random", "teacher-best-fixed", "teacher-iql")
# methods that run the student with a trained adapter: (emotion chooser, adapter folder in the run)
ADAPTER_METHODS = {"iql+sft": ("iql", "sft"), "sft-emotion-free": ("vanilla", "sft-emotion-free"),
                   "emodistill": ("iql", "jpo"), "jpo-emotion-free": ("vanilla", "jpo-emotion-free")}


def chooser(method):
    """The emotion chooser a method name means (vanilla, random, fixed:<emotion>, best-fixed or
    iql), or a StageError naming an unknown method or emotion."""
    base = method[len("teacher-"):] if method.startswith("teacher-") else method
    base = ADAPTER_METHODS.get(base, (base,))[0]
    if base.startswith("fixed:"):
        check_emotions([base[6:]])
    elif base not in ("vanilla", "random", "best-fixed", "iql"):
        raise StageError(f"unknown method '{method}'")
    return base


def policy_for(method, out, doms, sample=False, best=None):
    """The emotion chooser of a method (None = emotion-free), given the best fixed emotion per domain."""
    base = chooser(method)
    if base == "vanilla":
        return None
    if base == "random":
        return ng.random_emotion_policy()
    if base.startswith("fixed:"):
        return ng.fixed_emotion_policy(base[6:])
    if base == "best-fixed":
        return lambda eps: [best[ep.dom.key] for ep in eps]
    import iql
    path = os.path.join(out, "iql.pt")
    if not os.path.exists(path):
        raise StageError(f"method {method} needs {path}; run `emodistill.py iql` first")
    model, _, _, _, spec = iql.load(path)
    missing = [d for d in doms if d not in spec["domains"]]
    if missing:
        raise StageError(f"{path} was trained without domains {missing}")
    return iql.Selector(model, spec, greedy=not sample)


def uses_selector(method):
    return method.endswith("iql") or ADAPTER_METHODS.get(method, ("",))[0] == "iql"


def adapter_folder(out, method):
    """The adapter folder a method needs (None for the base student); a clear error if missing."""
    if method not in ADAPTER_METHODS:
        return None
    name = ADAPTER_METHODS[method][1]
    folder = os.path.join(out, name)
    if not os.path.exists(os.path.join(folder, "adapter_model.safetensors")):
        stage = "sft" if name.startswith("sft") else "jpo"
        flag = " --emotion-free" if name.endswith("emotion-free") else ""
        raise StageError(f"method {method} needs the adapter {folder}; run `emodistill.py {stage}{flag}` first")
    return folder


def adapter_sha(out, method):
    folder = adapter_folder(out, method)
    return sha(os.path.join(folder, "adapter_model.safetensors")) if folder else None


# the student's decoding: greedy. Chosen by `emodistill.py probe` on training scenarios 72-79 with an
# adapter trained on 0-71 (docs/notebook.md, entry 31): greedy stated the planned move in 83% of
# replies and the requested emotion in 70%, sampling at temperature 0.7 in 62% and 66%.
STUDENT_TEMPERATURE = 0.0
# a trained student's reply that does not do the planned move, or that the world does not perceive as
# the requested emotion, is written this many times more, sampled (LMAgent.redrafts); rows of the base
# model (vanilla, iql) are played as they are. Chosen on validation scenarios 72-79 (docs/notebook.md,
# entries 38, 40 and 41): with an adapter of 2 SFT epochs, 64 episodes, offer fidelity 0.78 at the first
# draft and 0.97 played; emotion match 0.78 played when only the move was redrafted, 0.90 with both;
# with 5 rewrites instead of 3, fidelity 0.985 and emotion match 0.93.
STUDENT_REDRAFTS = 5
# the cap on a student reply, in tokens: the adapters write 25-27 (median) and end on their own; the base
# model (vanilla, iql) runs to the cap in ~80% of its replies (docs/notebook.md, entry 40). A larger model
# or another prompt may need more; a smaller cap only makes tiny-model smoke runs faster.
STUDENT_MAX_NEW_TOKENS = 48


def side_agent(method, cfg, out, doms, student, lm_batch, sample, seed, cache, best=None, offers="planned",
               temperature=STUDENT_TEMPERATURE, redrafts=STUDENT_REDRAFTS, max_new_tokens=STUDENT_MAX_NEW_TOKENS):
    """The focal-role expresser of `method` and its emotion policy (None = emotion-free): the
    SimTeacher for teacher-*, else the student LM with the method's adapter from run folder
    `out`, whose iql.pt the policy uses. `redrafts` apply to the adapter rows only;
    `max_new_tokens` caps each reply."""
    policy = policy_for(method, out, doms, sample, best or {})
    if method.startswith("teacher-"):
        return ng.SimTeacher(cfg), policy
    return make_agent(student, "focal", cfg, seed, lm_batch, emotion_free=policy is None,
                      model_cache=cache, adapter=adapter_folder(out, method), offers=offers,
                      temperature=temperature, redrafts=redrafts if method in ADAPTER_METHODS else 0,
                      max_new_tokens=max_new_tokens), policy


def play(cfg, doms, ids, seeds, focal, cp, policy, run_seed, persona=None, scenario_seed=0):
    """Episode records of focal vs cp on scenarios `ids` x `seeds` of each domain, 256 at a time."""
    perceiver = ng.Perceiver(cfg.emotions)
    eps = [ng.new_episode(cfg.domains[d], sc, k, run_seed)
           for d in doms for sc in make_scenarios(cfg.domains[d], scenario_seed, persona) if sc.id in ids
           for k in range(seeds)]
    lm = any(isinstance(getattr(a, "agent", a), ng.LMAgent) for a in (focal, cp))
    bar = progress_bar(len(eps), "play", unit="episode") if lm else None
    for s in range(0, len(eps), 256):
        done = [0]

        def tick(n, base=done):                             # run_episodes reports episodes finished
            bar.update(n - base[0])
            base[0] = n
        ng.run_episodes(cfg, eps[s:s + 256], focal, cp, policy, perceiver, progress=tick if bar else None)
    if bar:
        bar.close()
    return [ng.to_record(ep) for ep in eps]


def best_fixed_emotions(cfg, out, doms, select_seeds, seed, scenario_seed, domains_file_sha, csv_shas=None):
    """Per domain, the single emotion with the highest mean utility on the *training*
    scenarios (SimTeacher as expresser, sim counterparty). Cached in eval/best_fixed.json."""
    path = os.path.join(out, "eval", "best_fixed.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    key = {"seeds": select_seeds, "seed": seed, "scenario_seed": scenario_seed, "domains_file_sha": domains_file_sha}
    if csv_shas:   # best fixed emotion on the imported training scenarios
        key["scenarios_csv"] = csv_shas
    if os.path.exists(path):
        cached = read_json(path)
        if all(d in cached["best"] for d in doms) and cached.get("key") == key:
            return {d: cached["best"][d] for d in doms}
    table, best = {}, {}
    teacher, cp = ng.SimTeacher(cfg), ng.SimCounterparty(cfg)
    for d in doms:
        util = {}
        for e in EMOTIONS:
            recs = play(cfg, [d], TRAIN_IDS, select_seeds, teacher, cp, ng.fixed_emotion_policy(e), seed,
                        scenario_seed=scenario_seed)
            util[e] = sum(r["outcome"]["utility"] for r in recs) / len(recs)
        table[d] = util
        best[d] = max(util, key=util.get)
    write_json_atomic(path, {"best": best, "key": key, "mean_utility_on_train": table})
    return best
