"""Not needed to follow the paper: the IQL selector's learning curve on a validation split.

What it measures: how good the emotion selector is after N gradient steps, for several N, without
touching the test scenarios. IQL trains on the judged corpus's trajectories of training
scenarios 0-63 (`train_ids`); after each step count in `steps`, the SimTeacher guided by the
greedy selector (the `teacher-iql` method of eval) plays the validation scenarios 64-79
(`val_ids`) x `seeds` seeds of every domain against the sim counterparty (as eval does:
run seed `seed`, counterparty seed `seed + 1`). The table gives, per step count, the pooled
mean utility, the paired difference to teacher-random on the same episodes (95% bootstrap CI),
the per-domain utility, and the training diagnostics that explain a falling curve:
  Q, V      mean min(Q_target)(s, a_data) and V(s) over the training rows;
  G         the mean discounted Monte-Carlo return-to-go of the same rows (the behaviour's value):
            Q - G far above what the expectile explains is value overestimation;
  clipped   the share of rows whose AWR weight exp(beta (Q - V)) hits `clip_weight`;
  entropy   the policy's mean entropy on the training states (nats; log 28 = 3.33 is uniform);
  td_val, pi_val  Q's TD error and the AWR policy loss on the corpus's own trajectories of the
            validation scenarios (never trained on): rising with steps = the networks memorise;
  q_argmax  a probe, not a method: the utility when the teacher takes the emotion of highest
            min(Q1, Q2) instead of the policy's, to tell a falling policy from a falling Q;
  top       the share of the validation turns given the selector's most frequent emotion
            (in brackets: how many distinct emotions it used).
One training run gives every point: iql.train continues from the previous step count.
Scenarios 80-99 (the test split) are refused.

    python iql_curve.py --out runs/NAME [--steps 1000,2000,4000,6000,10000,20000] [--seeds 5]
                        [--expectile 0.7] [--beta 3] [--clip-weight 100] [--hidden 64]

Measured (sim corpus, 20 and 50 seeds per scenario, 10 validation seeds; teacher-random 0.140):
with hidden 256 the utility peaked early (0.269 at 2000 steps, 0.306 at 6000 on the larger
corpus) and fell to 0.162 / 0.257 at 20000, while Q stayed near the Monte-Carlo return (no
overestimation, nothing clipped) and the held-out TD error and policy loss rose (0.08 -> 0.30,
3.0 -> 6.9): the networks memorised the corpus. Policy dropout 0.2 did not stop it (0.184 at
20000). With hidden 64 (now the default) the held-out losses stay flat and the utility rises to a
plateau: 0.295 / 0.291 (two training seeds) and 0.315 (50 seeds) at 10000, the same at 20000.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from collections import Counter

import numpy as np
import torch

import iql
import negotiate as ng
import report
from domains import TEST_IDS, load_config
from emodistill import load_judged
from methods import play
from models import make_agent


def returns_to_go(data, gamma):
    """Discounted Monte-Carlo return from each row to the end of its trajectory (rows of one
    trajectory are consecutive, in turn order, the last one done)."""
    r, d = data["r"].tolist(), data["d"].tolist()
    g, nxt = [0.0] * len(r), 0.0
    for k in range(len(r) - 1, -1, -1):
        nxt = r[k] + gamma * (1.0 - d[k]) * nxt
        g[k] = nxt
    return torch.tensor(g)


@torch.no_grad()
def diagnostics(model, targets, data, g_mc, cfg: iql.IQLConfig, n=8192):
    """Value and policy statistics on (up to n) training rows; see the module docstring."""
    i = torch.arange(len(data["a"]))[: n] if len(data["a"]) <= n else torch.randperm(
        len(data["a"]), generator=torch.Generator().manual_seed(0))[:n]
    s, a = model.norm(data["s"][i]), data["a"][i]
    qt = torch.min(targets[0](s), targets[1](s)).gather(1, a[:, None]).squeeze(1)
    v = model.v(s).squeeze(1)
    _, clipped = iql.awr_weights(qt - v, cfg.beta, cfg.clip_weight)
    logp = torch.log_softmax(iql.masked_logits(model.pi(s), model.seen), -1)
    p = logp.exp()
    ent = -(p * logp.masked_fill(p == 0, 0)).sum(-1).mean()
    return {"Q": qt.mean().item(), "V": v.mean().item(), "G": g_mc[i].mean().item(),
            "clipped": clipped.float().mean().item(), "entropy": ent.item()}


@torch.no_grad()
def heldout_losses(model, targets, data, cfg: iql.IQLConfig):
    """On transitions the networks never trained on: the TD error of Q (MSE to r + gamma V(s'))
    and the AWR policy loss -mean(w log pi(a|s)). Rising with steps = the networks memorise."""
    s, s2, a = model.norm(data["s"]), model.norm(data["s2"]), data["a"]
    v, v_next = model.v(s).squeeze(1), model.v(s2).squeeze(1)
    y = iql.q_target(data["r"], v_next, data["d"], cfg.gamma)
    q = torch.min(model.q1(s), model.q2(s)).gather(1, a[:, None]).squeeze(1)
    qt = torch.min(targets[0](s), targets[1](s)).gather(1, a[:, None]).squeeze(1)
    w, _ = iql.awr_weights(qt - v, cfg.beta, cfg.clip_weight)
    logp = torch.log_softmax(iql.masked_logits(model.pi(s), model.seen), -1).gather(1, a[:, None]).squeeze(1)
    return {"td_val": torch.mean((q - y) ** 2).item(), "pi_val": -(w * logp).mean().item()}


class QSelector(iql.Selector):
    """A probe, not a method: the emotion with the highest min(Q1, Q2)(s, e) over the emotions
    seen in the corpus (greedy), to tell a falling policy from a falling Q."""

    def probs(self, eps):
        x = torch.tensor(np.stack([iql.features(ep.turns, ep.sc.s0, ep.sc.b0, ep.dom.key, self.spec["domains"],
                                                self.spec["max_turns"]) for ep in eps]))
        with torch.no_grad():
            s = self.model.norm(x)
            q = iql.masked_logits(torch.min(self.model.q1(s), self.model.q2(s)), self.model.seen)
            return torch.nn.functional.one_hot(q.argmax(-1), q.shape[-1]).float()


def utilities(recs, doms):
    """Pooled and per-domain mean utility of episode records."""
    row = {"all": float(np.mean([r["outcome"]["utility"] for r in recs]))}
    row.update({d: float(np.mean([r["outcome"]["utility"] for r in recs if r["domain"] == d])) for d in doms})
    return row


def curve(out, steps=(1000, 2000, 4000, 6000, 10000, 20000), train_ids=range(0, 64), val_ids=range(64, 80),
          seeds=5, hp: iql.IQLConfig | None = None, domains_file="domains.yaml", seed=0, log=print):
    """Train IQL on the judged corpus of run `out` (scenarios `train_ids` only) and evaluate
    teacher-iql on scenarios `val_ids` after each step count. Returns the table's rows, one
    dict per method/step count ("teacher-random" first), and prints the table."""
    val_ids, train_ids = list(val_ids), list(train_ids)
    if set(val_ids) & set(TEST_IDS) or set(train_ids) & set(TEST_IDS):
        raise ValueError("the curve never uses the test scenarios 80-99")
    if set(val_ids) & set(train_ids):
        raise ValueError("validation scenarios must not be training scenarios")
    hp = hp or iql.IQLConfig()
    cfg = load_config(domains_file)
    corpus = load_judged(out)
    records = [r for r in corpus if r["scenario_id"] in train_ids]
    doms = [d for d in cfg.domains if any(r["domain"] == d for r in records)]
    data = iql.transitions(records, doms, hp, cfg.max_turns)
    g_mc = returns_to_go(data, hp.gamma)
    held = iql.transitions([r for r in corpus if r["scenario_id"] in val_ids], doms,    # the corpus's own
                           dataclasses.replace(hp, judge_centre=data["centre"]), cfg.max_turns)  # validation episodes
    log(f"[curve] {len(data['a'])} transitions from {len(records)} trajectories (scenarios "
        f"{train_ids[0]}-{train_ids[-1]}), judge centre {data['centre']:+.3f}; validation scenarios "
        f"{val_ids[0]}-{val_ids[-1]} x {seeds} seeds x {len(doms)} domains; {hp}")
    teacher, cp = ng.SimTeacher(cfg), make_agent("sim", "counterparty", cfg, seed + 1, 64)
    base = play(cfg, doms, val_ids, seeds, teacher, cp, ng.random_emotion_policy(), seed)
    rows = [dict(method="teacher-random", steps=0, **utilities(base, doms))]
    model = targets = opt = None
    step, t0 = 0, time.time()
    spec = {"domains": doms, "max_turns": cfg.max_turns}
    for n in sorted(steps):
        model, targets, opt, step = iql.train(data, hp, model, targets, opt, start=step, stop_at=n, log=None)
        recs = play(cfg, doms, val_ids, seeds, teacher, cp, iql.Selector(model, spec), seed)
        q_recs = play(cfg, doms, val_ids, seeds, teacher, cp, QSelector(model, spec), seed)
        model.train()
        diff = report.paired_diff_ci(recs, base)
        chosen = Counter(t["emotion"] for r in recs for t in r["turns"] if t["speaker"] == "focal")
        rows.append(dict(method="teacher-iql", steps=n, **utilities(recs, doms), diff=diff[:3],
                         top=chosen.most_common(1)[0][1] / sum(chosen.values()), distinct=len(chosen),
                         **diagnostics(model, targets, data, g_mc, hp), **heldout_losses(model, targets, held, hp),
                         q_argmax=utilities(q_recs, doms)["all"], seconds=time.time() - t0))
        log(f"[curve] step {n}: utility {rows[-1]['all']:.3f} ({time.time() - t0:.0f}s)")
    print_table(rows, doms)
    return rows


def print_table(rows, doms):
    keys = ("Q", "V", "G", "clipped", "entropy", "td_val", "pi_val", "q_argmax")
    head = ["method", "steps", "utility", "vs random [95% CI]", *doms, *keys, "top"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        diff = f"{r['diff'][0]:+.3f} [{r['diff'][1]:+.3f}, {r['diff'][2]:+.3f}]" if "diff" in r else ""
        stats = [f"{r[k]:.3f}" if k in r else "" for k in keys]
        top = f"{r['top']:.2f} ({r['distinct']})" if "top" in r else ""
        lines.append("| " + " | ".join([r["method"], str(r["steps"] or ""), f"{r['all']:.3f}", diff,
                                        *(f"{r[d]:.3f}" for d in doms), *stats, top]) + " |")
    print("\n".join(lines))


def _ids(text):
    a, b = text.split("-")
    return range(int(a), int(b) + 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="run folder with judged.jsonl")
    p.add_argument("--steps", default="1000,2000,4000,6000,10000,20000", help="comma-separated step counts")
    p.add_argument("--train-ids", default="0-63", help="training scenarios, A-B")
    p.add_argument("--val-ids", default="64-79", help="validation scenarios, A-B (never 80-99)")
    p.add_argument("--seeds", type=int, default=5, help="episodes per validation scenario and domain")
    p.add_argument("--seed", type=int, default=0, help="IQL initialisation and episode randomness")
    d = iql.IQLConfig()
    for k in ("expectile", "beta", "clip_weight", "lr", "gamma", "outcome_weight", "fail_penalty"):
        p.add_argument("--" + k.replace("_", "-"), type=float, default=getattr(d, k))
    p.add_argument("--hidden", type=int, default=d.hidden)
    a = p.parse_args(argv)
    hp = iql.IQLConfig(expectile=a.expectile, beta=a.beta, clip_weight=a.clip_weight, lr=a.lr, gamma=a.gamma,
                       outcome_weight=a.outcome_weight, fail_penalty=a.fail_penalty, hidden=a.hidden, seed=a.seed,
                       log_every=10 ** 9)
    curve(a.out, [int(s) for s in a.steps.split(",")], _ids(a.train_ids), _ids(a.val_ids), a.seeds, hp,
          seed=a.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
