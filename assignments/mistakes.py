"""Do the autograders catch wrong math? Each entry below is a plausible mistake a student could
make inside an assignment region, written as literal source substitutions (old -> new). For
each one this script makes the substitution in a temporary copy of the repository (never in
the working tree), runs that assignment's autograder there, and prints a table:
mistake -> caught? -> by which tests. A mistake no test catches is a defect of the tests.

    python assignments/mistakes.py               # every mistake, each until its first failing test
    python assignments/mistakes.py --all         # ... and list every test that fails
    python assignments/mistakes.py --only A4     # one assignment's
    python assignments/mistakes.py --list        # the list, without running

Instructor-only: the `old` strings quote the solutions, so make_starter.py leaves this file out
of the starter. The copy is made once; each run forks from a parent that has already imported
torch and transformers, and restores the file after it.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TESTS = {"A1": "tests/test_a1_iql.py", "A2": "tests/test_a2_lora.py", "A3": "tests/test_a3_sft.py",
         "A4": "tests/test_a4_jpo.py", "A5": "tests/test_a5_schedule.py"}
FILES = {"A1": "iql.py", "A2": "lora.py", "A3": "lora.py", "A4": "jpo.py", "A5": "assignments/a5_schedule.py"}

# (assignment, function, mistake, [(old, new), ...]); `old` must occur exactly once in the
# assignment's file, inside one of that assignment's regions
MISTAKES = [
    # ---- A1: IQL ------------------------------------------------------------------------
    ("A1", "expectile_loss", "tau <-> 1 - tau",
     [("torch.where(diff < 0, 1.0 - expectile, expectile)", "torch.where(diff < 0, expectile, 1.0 - expectile)")]),
    ("A1", "expectile_loss", "weight tau - 1(diff < 0) without the absolute value",
     [("torch.where(diff < 0, 1.0 - expectile, expectile)", "(expectile - (diff < 0).float())")]),
    ("A1", "expectile_loss", "abs(diff) instead of diff^2", [("(w * diff.pow(2)).mean()", "(w * diff.abs()).mean()")]),
    ("A1", "expectile_loss", "sum instead of mean", [("(w * diff.pow(2)).mean()", "(w * diff.pow(2)).sum()")]),
    ("A1", "q_target", "missing (1 - d)", [("r + gamma * (1.0 - done) * v_next", "r + gamma * v_next")]),
    ("A1", "q_target", "d instead of (1 - d)", [("r + gamma * (1.0 - done) * v_next", "r + gamma * done * v_next")]),
    ("A1", "q_target", "no discount", [("r + gamma * (1.0 - done) * v_next", "r + (1.0 - done) * v_next")]),
    ("A1", "q_target", "(1 - d) multiplies the reward too",
     [("return r + gamma * (1.0 - done) * v_next", "return (r + gamma * v_next) * (1.0 - done)")]),
    ("A1", "awr_weights", "adv / beta instead of beta * adv", [("w = torch.exp(beta * adv)", "w = torch.exp(adv / beta)")]),
    ("A1", "awr_weights", "exp(-beta * adv)", [("w = torch.exp(beta * adv)", "w = torch.exp(-beta * adv)")]),
    ("A1", "awr_weights", "no clip", [("return w.clamp(max=clip), w > clip", "return w, w > clip")]),
    ("A1", "awr_weights", "clipped from below", [("return w.clamp(max=clip), w > clip", "return w.clamp(min=clip), w > clip")]),
    ("A1", "awr_weights", "clipped mask taken after clipping (never true)",
     [("return w.clamp(max=clip), w > clip", "w = w.clamp(max=clip); return w, w > clip")]),
    ("A1", "turn_rewards", "judge part not centred",
     [("r = part - centre if part is not None else 0.0", "r = part if part is not None else 0.0")]),
    ("A1", "turn_rewards", "a missing score is centred too (not 0)",
     [("r = part - centre if part is not None else 0.0", "r = (part if part is not None else 0.0) - centre")]),
    ("A1", "turn_rewards", "outcome paid on every row", [("        if j == len(idx) - 1:\n            r +=", "        if True:\n            r +=")]),
    ("A1", "turn_rewards", "outcome paid on the first row", [("        if j == len(idx) - 1:\n            r +=", "        if j == 0:\n            r +=")]),
    ("A1", "turn_rewards", "fail penalty with the wrong sign", [('if out["success"] else -cfg.fail_penalty', 'if out["success"] else cfg.fail_penalty')]),
    ("A1", "turn_rewards", "no deal costs nothing", [('if out["success"] else -cfg.fail_penalty', 'if out["success"] else 0.0')]),
    ("A1", "transitions", "done = 1 on every row", [("last = j == len(idx) - 1", "last = True")]),
    ("A1", "transitions", "done never set (off by one)", [("last = j == len(idx) - 1", "last = j == len(idx)")]),
    ("A1", "transitions", "s' = s", [("nxt = turns[:idx[j + 1]] if not last else turns", "nxt = turns[:i]")]),
    ("A1", "transitions", "s' right after the own turn, before the reply",
     [("nxt = turns[:idx[j + 1]] if not last else turns", "nxt = turns[:i + 1] if not last else turns")]),
    ("A1", "transitions", "s' includes the next focal turn",
     [("nxt = turns[:idx[j + 1]] if not last else turns", "nxt = turns[:idx[j + 1] + 1] if not last else turns")]),
    ("A1", "transitions", "the next row assumed 2 turns later",
     [("nxt = turns[:idx[j + 1]] if not last else turns", "nxt = turns[:i + 2] if not last else turns")]),
    ("A1", "iql_step", "a max over actions in the Q target (not in-sample)",
     [("v_next = model.v(s2).squeeze(1)", "v_next = torch.min(targets[0](s2), targets[1](s2)).max(1).values")]),
    ("A1", "iql_step", "V(s) instead of V(s')", [("v_next = model.v(s2).squeeze(1)", "v_next = model.v(s).squeeze(1)")]),
    ("A1", "iql_step", "max of the twin target critics",
     [("qt = torch.min(targets[0](s), targets[1](s))", "qt = torch.max(targets[0](s), targets[1](s))")]),
    ("A1", "iql_step", "online critics instead of the target critics",
     [("qt = torch.min(targets[0](s), targets[1](s))", "qt = torch.min(model.q1(s), model.q2(s))")]),
    ("A1", "iql_step", "V regressed on prediction - target (tau <-> 1 - tau)",
     [("expectile_loss(qt - v, cfg.expectile)", "expectile_loss(v - qt, cfg.expectile)")]),
    ("A1", "iql_step", "advantage not detached from V", [("adv = (qt - v.detach())", "adv = (qt - v)")]),
    ("A1", "iql_step", "AWR temperature inverted at the call",
     [("awr_weights(adv, cfg.beta, cfg.clip_weight)", "awr_weights(adv, 1 / cfg.beta, cfg.clip_weight)")]),
    ("A1", "iql_step", "policy loss without the weights (behaviour cloning)",
     [("pi_loss = -(w * logp.gather(1, a[:, None]).squeeze(1)).mean()",
       "pi_loss = -(logp.gather(1, a[:, None]).squeeze(1)).mean()")]),
    ("A1", "iql_step", "unseen emotions not masked",
     [("F.log_softmax(masked_logits(model.pi(s), model.seen), dim=-1)", "F.log_softmax(model.pi(s), dim=-1)")]),
    # ---- A2: LoRA -----------------------------------------------------------------------
    ("A2", "scaling", "r / alpha instead of alpha / r",
     [("self.r, self.alpha, self.scaling = r, alpha, alpha / r", "self.r, self.alpha, self.scaling = r, alpha, r / alpha")]),
    ("A2", "scaling", "no scale (1)",
     [("self.r, self.alpha, self.scaling = r, alpha, alpha / r", "self.r, self.alpha, self.scaling = r, alpha, 1.0")]),
    ("A2", "scaling", "alpha alone",
     [("self.r, self.alpha, self.scaling = r, alpha, alpha / r", "self.r, self.alpha, self.scaling = r, alpha, alpha")]),
    ("A2", "delta", "delta without the scale",
     [("return (self.lora_B.weight @ self.lora_A.weight) * self.scaling", "return (self.lora_B.weight @ self.lora_A.weight)")]),
    ("A2", "delta", "delta transposed (A^T B^T)",
     [("return (self.lora_B.weight @ self.lora_A.weight) * self.scaling",
       "return (self.lora_A.weight.T @ self.lora_B.weight.T) * self.scaling")]),
    ("A2", "forward", "forward without the scale", [("return y + (z * self.scaling).to(y.dtype)", "return y + z.to(y.dtype)")]),
    ("A2", "forward", "dropout on the adapter's output",
     [("z = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))",
       "z = self.lora_dropout(self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))))")]),
    ("A2", "forward", "dropout on the frozen path too",
     [("        y = self.base_layer(x)\n        if self.merged:", "        y = self.base_layer(self.lora_dropout(x))\n        if self.merged:")]),
    ("A2", "forward", "adapter added again after merging",
     [("        if self.merged:\n            return y\n        z =", "        z =")]),
    ("A2", "merge", "merge not guarded (merging twice doubles it)",
     [("        if not self.merged:\n            self.base_layer.weight +=", "        if True:\n            self.base_layer.weight +=")]),
    ("A2", "merge", "merge does not set the flag", [("            self.merged = True", "            pass")]),
    ("A2", "merge", "merge adds B A without the scale",
     [("self.base_layer.weight += self.delta().to(", "self.base_layer.weight += (self.lora_B.weight @ self.lora_A.weight).to(")]),
    ("A2", "unmerge", "unmerge adds instead of subtracting",
     [("self.base_layer.weight -= self.delta()", "self.base_layer.weight += self.delta()")]),
    ("A2", "unmerge", "unmerge not guarded",
     [("        if self.merged:\n            self.base_layer.weight -=", "        if True:\n            self.base_layer.weight -=")]),
    ("A2", "matches", "plain suffix match (xq_proj matches q_proj)",
     [('name.endswith("." + t)', "name.endswith(t)")]),
    ("A2", "matches", "substring match",
     [('return any(name == t or name.endswith("." + t) for t in targets)', "return any(t in name for t in targets)")]),
    ("A2", "inject", "the model is not frozen", [("    model.requires_grad_(False)\n    names =", "    names =")]),
    ("A2", "inject", "any module with a matching name is wrapped",
     [("isinstance(m, nn.Linear) and _matches(n, targets)", "_matches(n, targets)")]),
    ("A2", "inject", "adapters ignore the model's eval mode",
     [("LoRALinear(getattr(parent, child), r, alpha, dropout).train(model.training)",
       "LoRALinear(getattr(parent, child), r, alpha, dropout)")]),
    ("A2", "inject", "set on the top-level model instead of the parent",
     [("parent = model.get_submodule(parent_name) if parent_name else model", "parent = model")]),
    ("A2", "inject", "no error when nothing matches", [("    if not names:\n        raise ValueError", "    if False:\n        raise ValueError")]),
    # ---- A3: SFT ------------------------------------------------------------------------
    ("A3", "encode_example", "loss on the prompt too", [('"labels": [-100] * len(p) + r}', '"labels": p + r}')]),
    ("A3", "encode_example", "no end-of-turn token",
     [("r = tok(response, add_special_tokens=False).input_ids + [end_of_turn_id(tok)]",
       "r = tok(response, add_special_tokens=False).input_ids")]),
    ("A3", "encode_example", "eos instead of the end-of-turn token", [("+ [end_of_turn_id(tok)]", "+ [tok.eos_token_id]")]),
    ("A3", "encode_example", "first response token masked (off by one)",
     [('"labels": [-100] * len(p) + r}', '"labels": [-100] * (len(p) + 1) + r[1:]}')]),
    ("A3", "encode_example", "special tokens added to the prompt",
     [("p = tok(prompt, add_special_tokens=False).input_ids", "p = tok(prompt).input_ids")]),
    ("A3", "collate", "labels padded with the pad id",
     [("labels = torch.full((len(examples), n), -100, dtype=torch.long)",
       "labels = torch.full((len(examples), n), pad_id, dtype=torch.long)")]),
    ("A3", "collate", "truncation keeps the first tokens (cuts the response)",
     [("{k: v[-max_len:] for k, v in e.items()}", "{k: v[:max_len] for k, v in e.items()}")]),
    ("A3", "collate", "attention mask all ones",
     [("mask = torch.zeros((len(examples), n), dtype=torch.long)", "mask = torch.ones((len(examples), n), dtype=torch.long)")]),
    ("A3", "logprob_targets", "labels not shifted (targets off by one)",
     [('batch["labels"][:, 1:]', 'batch["labels"][:, :-1]')]),
    ("A3", "logprob_targets", "mask off by one token",
     [("    mask = target != -100\n", '    mask = batch["labels"][:, :-1] != -100\n')]),
    ("A3", "logprob_gather", "log-softmax over the batch axis",
     [("F.log_softmax(picked.float(), -1)", "F.log_softmax(picked.float(), 0)")]),
    ("A3", "logprob_gather", "probabilities instead of log-probabilities",
     [("F.log_softmax(picked.float(), -1)", "F.softmax(picked.float(), -1)")]),
    ("A3", "logprob_gather", "raw logits (not normalised)", [("F.log_softmax(picked.float(), -1)", "picked.float()")]),
    ("A3", "sft_loss", "mean over every position (prompt and padding too)",
     [("return -lp.sum() / (mask.sum().clamp(min=1) if n_tokens is None else n_tokens)", "return -lp.mean()")]),
    ("A3", "sft_loss", "n_tokens ignored",
     [("return -lp.sum() / (mask.sum().clamp(min=1) if n_tokens is None else n_tokens)",
       "return -lp.sum() / mask.sum().clamp(min=1)")]),
    ("A3", "sft_loss", "sign flipped (maximises the loss)",
     [("return -lp.sum() / (mask.sum().clamp(min=1) if n_tokens is None else n_tokens)",
       "return lp.sum() / (mask.sum().clamp(min=1) if n_tokens is None else n_tokens)")]),
    ("A3", "sft_loss", "no guard for a batch without response tokens",
     [("(mask.sum().clamp(min=1) if n_tokens is None else n_tokens)", "(mask.sum() if n_tokens is None else n_tokens)")]),
    # ---- A4: JPO ------------------------------------------------------------------------
    ("A4", "group_advantages", "population std instead of the sample std", [("sd = x.std()", "sd = x.std(unbiased=False)")]),
    ("A4", "group_advantages", "batch mean and std instead of the group's (the wrong axis)",
     [("out[idx] = ((x - x.mean()) / sd).clamp(-clip, clip)", "out[idx] = ((x - r.mean()) / r.std()).clamp(-clip, clip)")]),
    ("A4", "group_advantages", "no clipping",
     [("out[idx] = ((x - x.mean()) / sd).clamp(-clip, clip)", "out[idx] = (x - x.mean()) / sd")]),
    ("A4", "group_advantages", "sign flipped",
     [("out[idx] = ((x - x.mean()) / sd).clamp(-clip, clip)", "out[idx] = ((x.mean() - x) / sd).clamp(-clip, clip)")]),
    ("A4", "group_advantages", "centred but not divided by the std",
     [("out[idx] = ((x - x.mean()) / sd).clamp(-clip, clip)", "out[idx] = (x - x.mean()).clamp(-clip, clip)")]),
    ("A4", "group_advantages", "a zero-variance group divides by zero (NaN)", [("if sd > 1e-8:", "if True:")]),
    ("A4", "sequence_ratio", "sum instead of mean over tokens",
     [("torch.exp(((logp - logp_ref) * mask).sum(1) / n)", "torch.exp(((logp - logp_ref) * mask).sum(1))")]),
    ("A4", "sequence_ratio", "mean over every position (padding counted)",
     [("n = mask.sum(1).clamp(min=1)", "n = mask.shape[1]")]),
    ("A4", "sequence_ratio", "ratio inverted (pi_ref / pi)",
     [("torch.exp(((logp - logp_ref) * mask).sum(1) / n)", "torch.exp(((logp_ref - logp) * mask).sum(1) / n)")]),
    ("A4", "sequence_ratio", "padding not masked",
     [("torch.exp(((logp - logp_ref) * mask).sum(1) / n)", "torch.exp((logp - logp_ref).sum(1) / n)")]),
    ("A4", "sequence_ratio", "mean of per-token ratios instead of exp of the mean log-ratio",
     [("torch.exp(((logp - logp_ref) * mask).sum(1) / n)", "(torch.exp(logp - logp_ref) * mask).sum(1) / n")]),
    ("A4", "clipped_surrogate", "max instead of min",
     [("-torch.min(ratio * adv, ratio.clamp(", "-torch.max(ratio * adv, ratio.clamp(")]),
    ("A4", "clipped_surrogate", "objective, not loss (no minus)",
     [("return -torch.min(ratio * adv, ratio.clamp(", "return torch.min(ratio * adv, ratio.clamp(")]),
    ("A4", "clipped_surrogate", "clipped term only",
     [("return -torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)",
       "return -(ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)")]),
    ("A4", "clipped_surrogate", "the advantage clipped instead of the ratio",
     [("ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)", "ratio * adv.clamp(1 - clip_eps, 1 + clip_eps))")]),
    ("A4", "clipped_surrogate", "ratio clipped around 0 instead of 1",
     [("ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)", "ratio.clamp(-clip_eps, clip_eps) * adv)")]),
    ("A4", "k3_kl", "KL in the wrong direction (d = log pi - log pi_ref)",
     [("d = (logp_ref - logp) * mask", "d = (logp - logp_ref) * mask")]),
    ("A4", "k3_kl", "k1 estimator (-d)", [("k3 = (torch.exp(d) - d - 1) * mask", "k3 = (-d) * mask")]),
    ("A4", "k3_kl", "k2 estimator (d^2 / 2)", [("k3 = (torch.exp(d) - d - 1) * mask", "k3 = (0.5 * d ** 2) * mask")]),
    ("A4", "k3_kl", "sign of the linear term", [("k3 = (torch.exp(d) - d - 1) * mask", "k3 = (torch.exp(d) + d - 1) * mask")]),
    ("A4", "k3_kl", "padding not masked",
     [("d = (logp_ref - logp) * mask", "d = logp_ref - logp"),
      ("k3 = (torch.exp(d) - d - 1) * mask", "k3 = torch.exp(d) - d - 1")]),
    ("A4", "k3_kl", "mean over every position (padding counted)",
     [("return k3.sum(1) / mask.sum(1).clamp(min=1)", "return k3.mean(1)")]),
    # ---- A5: the schedule ---------------------------------------------------------------
    ("A5", "schedule", "one fixed emotion (no schedule)",
     [("return [_reference_choice(v) for v in views]", 'return ["caring"] * len(views)')]),
    ("A5", "schedule", "the first view's emotion for the whole batch",
     [("return [_reference_choice(v) for v in views]", "return [_reference_choice(views[0])] * len(views)")]),
    ("A5", "schedule", "an emotion name that is not one of the 28",
     [('("gratitude", "optimism", "relief")', '("grateful", "optimism", "relief")')]),
    ("A5", "schedule", "the phases in reverse order (the late emotions first)",
     [("return REFERENCE[v.domain][phase][v.focal_turn % 3]", "return REFERENCE[v.domain][2 - phase][v.focal_turn % 3]")]),
]


def check_entry(aid, func, what, subs, texts, regions):
    """Every `old` occurs once in the assignment's file and lies inside one of its regions."""
    text = texts[FILES[aid]]
    for old, _ in subs:
        if text.count(old) != 1:
            raise SystemExit(f"{aid} {func} '{what}': {old!r} occurs {text.count(old)} times in {FILES[aid]}")
        a, b = text.index(old), text.index(old) + len(old)
        la, lb = text.count("\n", 0, a), text.count("\n", 0, b - 1)      # lines of its first and last character
        if not any(r.aid == aid and r.begin < la and lb < r.end for r in regions[FILES[aid]]):
            raise SystemExit(f"{aid} {func} '{what}': {old!r} is not inside an {aid} region of {FILES[aid]}")
        text = text.replace(old, "\0" * len(old))       # later substitutions must not overlap this one


def run_tests(copy, aid, timeout, first=False, tests=None):
    """Fork, run the assignment's test file (or the pytest arguments `tests`) in the copy; return
    (n tests run, failing test names); first: stop at the first failing test (pytest -x)."""
    xml = os.path.join(copy, f".grade-{aid}.xml")
    if os.path.exists(xml):
        os.remove(xml)
    pid = os.fork()
    if pid == 0:                                         # the child: a fresh import of the copy's modules
        try:
            signal.alarm(timeout)
            os.chdir(copy)
            sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") not in (HERE, ROOT)]
            sys.path.insert(0, copy)
            import pytest
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            pytest.main(["-q", "-p", "no:cacheprovider", f"--junitxml={xml}"] + (tests or [TESTS[aid]])
                        + (["-x"] if first else []))
        finally:
            os._exit(0)
    try:
        os.waitpid(pid, 0)
    except BaseException:                                # interrupted: take the child down too
        os.kill(pid, signal.SIGKILL)
        raise
    if not os.path.exists(xml):
        return 0, ["(the run died: timed out or crashed)"]
    cases = list(ET.parse(xml).getroot().iter("testcase"))
    failed = [c.get("name") for c in cases if any(x.tag in ("failure", "error") for x in c)]
    return len(cases), failed


def main(argv=None):
    ap = argparse.ArgumentParser(description="apply each listed mistake to a temporary copy and run its autograder")
    ap.add_argument("--only", help="comma-separated assignments, e.g. A1,A4")
    ap.add_argument("--list", action="store_true", help="print the list and exit")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per autograder run")
    ap.add_argument("--all", action="store_true", help="run every test of the autograder for each mistake and "
                    "list all that fail (default: stop at the first that fails, pytest -x)")
    ap.add_argument("--tests", metavar="ARGS", type=shlex.split,
                    help="pytest arguments to run instead of the autograder, in one string (e.g. the older "
                         "tests: --tests \"tests/test_iql.py -k 'not cli and not language_model'\")")
    args = ap.parse_args(argv)
    only = {a.strip().upper() for a in args.only.split(",")} if args.only else None
    todo = [m for m in MISTAKES if not only or m[0] in only]
    sys.path.insert(0, HERE)
    import make_starter
    texts = {}
    for f in set(FILES.values()):
        with open(os.path.join(ROOT, f), encoding="utf-8") as fh:
            texts[f] = fh.read()
    regions = {f: make_starter.regions(t, f) for f, t in texts.items()}
    for m in todo:
        check_entry(*m, texts, regions)
    if args.list:
        for aid, func, what, _ in todo:
            print(f"{aid} {func}: {what}")
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))   # clean up the copy when killed
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["EMODISTILL_NO_PROGRESS"] = "1"
    import torch  # noqa: F401  (imported once here, shared by every forked run)
    import transformers  # noqa: F401
    import pytest  # noqa: F401
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "repo")
        for f in make_starter.source_files(ROOT):
            os.makedirs(os.path.dirname(os.path.join(copy, f)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), os.path.join(copy, f))
        for aid in sorted({m[0] for m in todo}):
            n, failed = run_tests(copy, aid, args.timeout, tests=args.tests)
            print(f"{aid} as written: {n} tests, {len(failed)} failing" + (f": {failed}" if failed else ""), flush=True)
            if failed or not n:
                print("the solutions must pass their tests before mistakes can be judged")
                return 1
        print()
        print("| # | assignment | function | mistake | caught | by (" + ("failing tests" if args.all else "the first failing test") + ") |")
        print("|---|---|---|---|---|---|")
        missed = 0
        for k, (aid, func, what, subs) in enumerate(todo, 1):
            path = os.path.join(copy, FILES[aid])
            text = texts[FILES[aid]]
            for old, new in subs:
                text = text.replace(old, new)
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)
            try:
                n, failed = run_tests(copy, aid, args.timeout, first=not args.all, tests=args.tests)
            finally:
                with open(path, "w", encoding="utf-8") as fh:
                    fh.write(texts[FILES[aid]])
            missed += not failed
            by = ", ".join(failed[:3]) + (f" (+{len(failed) - 3} more)" if len(failed) > 3 else "")
            cell = what.replace("|", "\\|")
            print(f"| {k} | {aid} | {func} | {cell} | {'yes' if failed else 'NO'} | {by or '-'} |", flush=True)
    print()
    print(f"{len(todo) - missed} of {len(todo)} mistakes caught ({time.time() - t0:.0f}s)")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
