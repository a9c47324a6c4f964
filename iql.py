"""The emotion selector pi(e | s): discrete Implicit Q-Learning on the offline corpus.

Paper part: the "which emotion" half of EmoDistill (the paper's emotion selector), trained only
on the judged corpus, with no live negotiation. The method is Discrete IQL (Kostrikov et al.
2021): IQL for a discrete action space of the 28 GoEmotions labels (`domains.EMOTIONS`):
  V(s)     <- expectile regression (tau = `expectile`) on min(Q_target1, Q_target2)(s, a_data)
  Q_i(s,a) <- r + gamma (1 - done) V(s')            (in-sample: no max over actions, ever)
  pi(a|s)  <- advantage-weighted regression, weights exp(beta (Q_target - V)) clipped at 100
Emotions never seen in the corpus are masked out of the policy.

Reward: the outcome pays, length does not. Every focal turn earns its *centred* judge part,
the last focal turn of a trajectory additionally earns the episode outcome,
`outcome_weight * utility` for an agreement or `-fail_penalty` for no deal.
  judge part  the turn's judge score mapped from [1, 10] to [-1, 1] by (score - 5.5) / 4.5, where a
              rubric turn's score is first recomputed without its `closing` component (the
              weighted mean of the other components, rubric weights): closing scores the deal,
              which the terminal reward already pays, so the outcome is counted once. An LLM
              judge's score (its components are the rubric's, not the LLM's) is used as it is.
  centring    minus the mean judge part over the scored focal turns of the records given (or a
              fixed `judge_centre`). Uncentred, the judge part is positive on average (the mean
              score is ~7 of 10), so every extra turn paid, and a long failed negotiation
              returned more than a short deal (on a 6,400-trajectory sim corpus the discounted
              return correlated 0.76 with episode length and 0.36 with utility). Centred, a turn
              earns only for being better than the corpus's typical turn, and the return follows
              the outcome (same corpus: -0.24 with length, 0.89 with utility; every domain alike;
              `return_correlations` measures both, `report.summary` prints them).
A missing judge score (an LLM answer without a parseable SCORE) adds 0.

Departures from the reference code: the previous emotion enters the state as a one-hot (never
as an ordinal index), every feature varies with the state (no constants), and offers are
direction-normalised so that all four domains look alike. Features also hold the counts of
each emotion over the last three focal turns: the counterparty habituates to repeats, and a
selector that cannot see its own recent choices cannot learn to vary them.

This module does not import negotiate.py: `features` reads plain turn dicts (the corpus
records and the live episodes share that layout).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from domains import EMOTIONS


@dataclass
class IQLConfig:
    expectile: float = 0.7        # tau of the V regression; higher -> V closer to the best in-data action
    beta: float = 3.0             # AWR temperature; higher -> policy follows advantages more greedily
    clip_weight: float = 100.0    # cap on exp(beta * A); lower -> steadier but more behaviour-cloning-like
    gamma: float = 0.99           # discount per focal turn; lower -> shorter-sighted values
    tau: float = 0.005            # Polyak rate of the target Q; higher -> faster but noisier targets
    lr: float = 3e-4              # Adam learning rate for Q, V and policy
    batch_size: int = 256         # transitions per gradient step
    steps: int = 10000            # gradient steps; the validation curve (iql_curve.py) plateaus by 10000
    hidden: int = 64              # width of the two hidden layers of every network; wider memorises the
    #                               corpus's noise: at 256 the validation utility of teacher-iql fell with
    #                               steps (held-out TD error and policy loss rising; iql_curve.py), at 64
    #                               it rises to a plateau by ~10000 steps and stays there
    outcome_weight: float = 2.0   # terminal reward per unit of utility; higher -> outcome over judge
    fail_penalty: float = 0.5     # terminal reward lost when there is no deal
    judge_centre: float | None = None  # subtracted from every judge part ([-1, 1] scale); None -> the mean
    #                                    judge part of the records given, so length alone earns nothing;
    #                                    0.0 -> the old uncentred reward (long episodes earn more)
    seed: int = 0                 # initialisation and minibatch order
    log_every: int = 1000         # steps between diagnostic lines


# ----------------------------------------------------------------------------------------
# State features: one function for the training set and for inference
# ----------------------------------------------------------------------------------------

def feature_names(domains):
    names = ["turn_frac", "focal_pos", "cp_pos", "gap", "has_focal_offer", "has_cp_offer",
             "cp_last_concession", "cp_mean3_concession", "stalemate", "own_last_concession"]
    names += [f"prev_{e}" for e in EMOTIONS] + ["prev_none"]
    names += [f"recent3_{e}" for e in EMOTIONS]
    names += [f"domain_{d}" for d in domains]
    return names


def _pos(x, s0, b0):
    return (b0 - x) / (b0 - s0)


def features(turns, s0, b0, domain, domains, max_turns=30):
    """Feature vector of the state before the next focal turn, from the turns so far."""
    focal = [t for t in turns if t["speaker"] == "focal"]
    cp_offers = [_pos(t["offer"], s0, b0) for t in turns if t["speaker"] == "counterparty" and t.get("offer") is not None]
    f_offers = [_pos(t["offer"], s0, b0) for t in focal if t.get("offer") is not None]
    fp = min(1.5, max(-0.5, f_offers[-1])) if f_offers else 1.0
    cpp = min(1.5, max(-0.5, cp_offers[-1])) if cp_offers else 0.0
    conc = [b - a for a, b in zip(cp_offers, cp_offers[1:])]
    stale = 0
    for c in reversed(conc):
        if c > 0.01:
            break
        stale += 1
    own = (f_offers[-2] - f_offers[-1]) if len(f_offers) >= 2 else 0.0
    v = [len(turns) / max_turns, fp, cpp, fp - cpp, float(bool(f_offers)), float(bool(cp_offers)),
         conc[-1] if conc else 0.0, float(np.mean(conc[-3:])) if conc else 0.0, min(stale, 5) / 5, own]
    prev = [0.0] * (len(EMOTIONS) + 1)
    prev[EMOTIONS.index(focal[-1]["emotion"]) if focal and focal[-1].get("emotion") in EMOTIONS else -1] = 1.0
    recent = [0.0] * len(EMOTIONS)
    for t in focal[-3:]:
        if t.get("emotion") in EMOTIONS:
            recent[EMOTIONS.index(t["emotion"])] += 1 / 3
    dom = [float(domain == d) for d in domains]
    return np.asarray(v + prev + recent + dom, dtype=np.float32)


# ----------------------------------------------------------------------------------------
# Reward: the centred judge part per focal turn, plus the outcome once at the end
# ----------------------------------------------------------------------------------------

# The rubric judge's component weights, a copy of negotiate.JUDGE_WEIGHTS (this module does not
# import the world; tests/test_iql.py checks that the two agree). A turn whose components do not
# reproduce its score with these weights (an LLM judge's score) is taken as it is.
RUBRIC_WEIGHTS = {"offer": 0.20, "firmness": 0.15, "effect": 0.25, "closing": 0.20, "fidelity": 0.10,
                  "fluency": 0.10}


def _weighted_score(components, drop=()):
    """1 + 9 * the weighted mean of the rubric components, leaving out `drop` (None if none left)."""
    c = {k: v for k, v in components.items() if k not in drop}
    wsum = sum(RUBRIC_WEIGHTS[k] for k in c)
    return 1 + 9 * sum(RUBRIC_WEIGHTS[k] * v for k, v in c.items()) / wsum if wsum > 0 else None


def judge_part(turn):
    """A focal turn's judge reward before centring, in [-1, 1]: (score - 5.5) / 4.5, with a rubric
    score recomputed without `closing` (the outcome is paid by the terminal reward). None when
    the turn has no score (an unparseable LLM answer)."""
    score = turn.get("score")
    if score is None:
        return None
    comps = turn.get("components") or {}
    if comps and set(comps) <= set(RUBRIC_WEIGHTS) and "closing" in comps:
        full = _weighted_score(comps)
        if full is not None and abs(full - score) < 0.01:   # the components are this score's: a rubric turn
            rest = _weighted_score(comps, drop=("closing",))
            score = rest if rest is not None else 5.5
    return (score - 5.5) / 4.5


def _focal_rows(rec):
    """Indices of the turns that become transitions: focal turns with a known emotion."""
    return [i for i, t in enumerate(rec["turns"]) if t["speaker"] == "focal" and t.get("emotion") in EMOTIONS]


def judge_centre(records, cfg: IQLConfig):
    """The centre subtracted from every judge part: cfg.judge_centre, or the mean judge part over
    the scored focal turns (rows) of `records` (0 when none is scored)."""
    if cfg.judge_centre is not None:
        return float(cfg.judge_centre)
    parts = [judge_part(rec["turns"][i]) for rec in records for i in _focal_rows(rec)]
    parts = [p for p in parts if p is not None]
    return float(np.mean(parts)) if parts else 0.0


def turn_rewards(rec, cfg: IQLConfig, centre):
    """The reward of each row of one trajectory (its focal turns with an emotion, in order): the
    centred judge part (0 for a missing score), plus the outcome on the last one."""
    idx = _focal_rows(rec)
    out, rewards = rec["outcome"], []
    for j, i in enumerate(idx):
        t = rec["turns"][i]
        if "score" not in t:
            raise ValueError(f"trajectory {rec.get('key')}: turn {i} has no judge score (run judge first)")
        part = judge_part(t)
        # BEGIN A1 turn_rewards
        # hint: r = part - centre (0.0 when part is None); the last row (j == len(idx) - 1) adds
        # cfg.outcome_weight * out["utility"] on success, else -cfg.fail_penalty
        r = part - centre if part is not None else 0.0
        if j == len(idx) - 1:
            r += cfg.outcome_weight * out["utility"] if out["success"] else -cfg.fail_penalty
        # END A1
        rewards.append(r)
    return rewards


def discounted_return(rewards, gamma):
    """sum_j gamma^j r_j: the return of a trajectory from its first focal turn."""
    return float(sum(gamma ** j * r for j, r in enumerate(rewards)))


def pearson(x, y):
    """Pearson correlation of two sequences; NaN with fewer than 2 points or a constant one."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def return_correlations(records, cfg: IQLConfig, centre=None):
    """Per domain (and "all"), across trajectories: the Pearson correlation of the discounted
    return (the rewards above, cfg.gamma) with the episode length (number of turns) and with the
    utility. A reward that pays for outcomes correlates more with utility than with length.
    Returns {domain: {"n", "length", "utility", "mean_return"}}; trajectories without a row are left out."""
    recs = [r for r in records if _focal_rows(r)]
    centre = judge_centre(recs, cfg) if centre is None else centre
    rows = [(r["domain"], discounted_return(turn_rewards(r, cfg, centre), cfg.gamma), len(r["turns"]),
             r["outcome"]["utility"]) for r in recs]
    table = {}
    for d in sorted({d for d, *_ in rows}) + ["all"]:
        sel = [row for row in rows if d == "all" or row[0] == d]
        _, g, n, u = zip(*sel)
        table[d] = {"n": len(sel), "length": pearson(g, n), "utility": pearson(g, u), "mean_return": float(np.mean(g))}
    return table


def transitions(records, domains, cfg: IQLConfig, max_turns=30):
    """Offline dataset (s, a, r, s', done) from judged trajectory records, one row per focal turn,
    with the reward of `turn_rewards` (judge parts centred over these records, see `judge_centre`).
    Diagnostics: "centre" (the judge centre used) and "returns" (the discounted return of each
    trajectory with a row, by record index)."""
    S, A, R, S2, D, W = [], [], [], [], [], []
    centre = judge_centre(records, cfg)
    returns = {}
    for ri, rec in enumerate(records):
        turns = rec["turns"]
        idx = _focal_rows(rec)
        if not idx:
            continue
        rewards = turn_rewards(rec, cfg, centre)
        returns[ri] = discounted_return(rewards, cfg.gamma)
        for j, (i, r) in enumerate(zip(idx, rewards)):
            # BEGIN A1 transitions
            # hint: `last` (row j is the trajectory's last row: its done flag) and `nxt` (the turns
            # before the next row's focal turn idx[j + 1]; all the turns for the last row)
            last = j == len(idx) - 1
            nxt = turns[:idx[j + 1]] if not last else turns
            # END A1
            S.append(features(turns[:i], rec["s0"], rec["b0"], rec["domain"], domains, max_turns))
            A.append(EMOTIONS.index(turns[i]["emotion"]))
            R.append(r)
            S2.append(features(nxt, rec["s0"], rec["b0"], rec["domain"], domains, max_turns))
            D.append(float(last))
            W.append((ri, i))
    if not S:
        raise ValueError("no focal turns with an emotion in the corpus")
    return {"s": torch.tensor(np.stack(S)), "a": torch.tensor(A), "r": torch.tensor(R, dtype=torch.float32),
            "s2": torch.tensor(np.stack(S2)), "d": torch.tensor(D),
            "where": W,            # (record index, turn index) of each row
            "centre": centre, "returns": returns}


# ----------------------------------------------------------------------------------------
# Losses: small pure functions
# ----------------------------------------------------------------------------------------

def expectile_loss(diff, expectile):
    """Asymmetric squared loss |tau - 1(diff < 0)| * diff^2, averaged; diff = target - prediction."""
    # BEGIN A1 expectile_loss
    # hint: weight tau where diff >= 0 and 1 - tau where diff < 0, times diff^2, mean over the batch
    w = torch.where(diff < 0, 1.0 - expectile, expectile)
    return (w * diff.pow(2)).mean()
    # END A1


def q_target(r, v_next, done, gamma):
    """In-sample Bellman target r + gamma (1 - done) V(s'): V, never a max over actions."""
    # BEGIN A1 q_target
    # hint: r + gamma * (1 - done) * V(s'), elementwise
    return r + gamma * (1.0 - done) * v_next
    # END A1


def awr_weights(adv, beta, clip):
    """exp(beta * advantage), clipped from above at `clip`. Returns (weights, clipped mask)."""
    # BEGIN A1 awr_weights
    # hint: w = exp(beta * adv); return (w capped from above at clip, bool mask of the entries above clip)
    w = torch.exp(beta * adv)
    return w.clamp(max=clip), w > clip
    # END A1


def masked_logits(logits, seen):
    """Emotions never seen in the data get -inf, so zero probability."""
    return logits.masked_fill(~seen, float("-inf"))


# ----------------------------------------------------------------------------------------
# Networks and training
# ----------------------------------------------------------------------------------------

def mlp(i, o, h):
    return nn.Sequential(nn.Linear(i, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, o))


class IQL(nn.Module):
    def __init__(self, n_features, n_actions=len(EMOTIONS), hidden=256):
        super().__init__()
        self.q1, self.q2 = mlp(n_features, n_actions, hidden), mlp(n_features, n_actions, hidden)
        self.v = mlp(n_features, 1, hidden)
        self.pi = mlp(n_features, n_actions, hidden)
        self.register_buffer("seen", torch.ones(n_actions, dtype=torch.bool))
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))

    def norm(self, s):
        return (s - self.mean) / self.std

    def policy_logits(self, s):
        return masked_logits(self.pi(self.norm(s)), self.seen)


def train(data, cfg: IQLConfig, model=None, targets=None, opt=None, start=0, log=print, stop_at=None):
    """Gradient steps of IQL on a transition dict. Returns (model, target_q, optimiser, step).
    Pass back model/targets/opt/start to continue training (resumable)."""
    torch.manual_seed(cfg.seed)
    n, nf = data["s"].shape
    if model is None:
        model = IQL(nf, hidden=cfg.hidden)
        counts = torch.bincount(data["a"], minlength=len(EMOTIONS))
        model.seen.copy_(counts > 0)
        model.mean.copy_(data["s"].mean(0))
        model.std.copy_(data["s"].std(0).clamp(min=1e-3))
    if targets is None:
        targets = copy.deepcopy(nn.ModuleList([model.q1, model.q2])).requires_grad_(False)
    if opt is None:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    g = torch.Generator()
    s_all, s2_all = model.norm(data["s"]), model.norm(data["s2"])
    end = stop_at if stop_at is not None else cfg.steps
    stats = []
    for step in range(start, end):
        g.manual_seed(cfg.seed * 1_000_003 + step)  # minibatch depends on the step only: exact resume
        i = torch.randint(0, n, (min(cfg.batch_size, n),), generator=g)
        s, s2, a, r, d = s_all[i], s2_all[i], data["a"][i], data["r"][i], data["d"][i]
        # BEGIN A1 iql_step
        # hint: define qt, v, v_loss, y, q_loss, adv, w, clipped, logp, pi_loss (assignments/A1-iql.md);
        # qt and V(s') carry no gradient, adv uses V detached
        with torch.no_grad():
            qt = torch.min(targets[0](s), targets[1](s)).gather(1, a[:, None]).squeeze(1)   # B
            v_next = model.v(s2).squeeze(1)                                                # B
        v = model.v(s).squeeze(1)
        v_loss = expectile_loss(qt - v, cfg.expectile)
        y = q_target(r, v_next, d, cfg.gamma)
        q1, q2 = model.q1(s).gather(1, a[:, None]).squeeze(1), model.q2(s).gather(1, a[:, None]).squeeze(1)
        q_loss = F.mse_loss(q1, y) + F.mse_loss(q2, y)
        adv = (qt - v.detach())
        w, clipped = awr_weights(adv, cfg.beta, cfg.clip_weight)
        logp = F.log_softmax(masked_logits(model.pi(s), model.seen), dim=-1)
        pi_loss = -(w * logp.gather(1, a[:, None]).squeeze(1)).mean()
        # END A1
        opt.zero_grad(set_to_none=True)
        (v_loss + q_loss + pi_loss).backward()
        opt.step()
        with torch.no_grad():
            for t, src in zip(targets, (model.q1, model.q2)):
                for pt, ps in zip(t.parameters(), src.parameters()):
                    pt.lerp_(ps, cfg.tau)
        if log and ((step + 1) % cfg.log_every == 0 or step + 1 == end):
            p = logp.exp()
            ent = -(p * logp.masked_fill(p == 0, 0)).sum(-1).mean()
            row = {"step": step + 1, "V": v.mean().item(), "Q": qt.mean().item(), "adv": adv.mean().item(),
                   "clipped": clipped.float().mean().item(), "entropy": ent.item(),
                   "v_loss": v_loss.item(), "q_loss": q_loss.item(), "pi_loss": pi_loss.item()}
            stats.append(row)
            log("[iql] " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    return model, targets, opt, end


# ----------------------------------------------------------------------------------------
# Checkpoints and the selector
# ----------------------------------------------------------------------------------------

def save(path, model, targets, opt, step, cfg: IQLConfig, domains, max_turns):
    import os
    spec = {"features": feature_names(domains), "emotions": EMOTIONS, "domains": list(domains), "max_turns": max_turns}
    tmp = path + ".tmp"
    torch.save({"model": model.state_dict(), "targets": targets.state_dict(), "opt": opt.state_dict(), "step": step,
                "config": asdict(cfg), "spec": spec, "n_features": len(spec["features"])}, tmp)
    os.replace(tmp, path)


class CheckpointMismatch(ValueError):
    pass


def load(path, domains=None, cfg: IQLConfig | None = None):
    """Load a checkpoint; refuse it when its feature layout differs from `domains`'s."""
    ck = torch.load(path, map_location="cpu", weights_only=False)
    spec = ck["spec"]
    if domains is not None and spec["features"] != feature_names(domains):
        raise CheckpointMismatch(f"{path}: selector was trained with domains {spec['domains']} "
                                 f"({len(spec['features'])} features); this run uses {list(domains)} "
                                 f"({len(feature_names(domains))} features). Retrain or use the same domains.")
    if spec["emotions"] != EMOTIONS:
        raise CheckpointMismatch(f"{path}: emotion list differs from this code's")
    known = {f.name for f in fields(IQLConfig)}      # (a knob removed since, e.g. policy_dropout, is dropped)
    ck["config"] = {k: v for k, v in ck["config"].items() if k in known}
    model = IQL(ck["n_features"], hidden=ck["config"]["hidden"])
    model.load_state_dict(ck["model"])
    targets = nn.ModuleList([mlp(ck["n_features"], len(EMOTIONS), ck["config"]["hidden"]) for _ in range(2)])
    targets.load_state_dict(ck["targets"])
    targets.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=(cfg or IQLConfig(**ck["config"])).lr)
    opt.load_state_dict(ck["opt"])
    return model, targets, opt, ck["step"], dict(spec, config=ck["config"])


class Selector:
    """pi(e | s) as a callable for the episode runner: episodes -> emotions (greedy or sampled)."""

    def __init__(self, model, spec, greedy=True, seed=0, as_domain=None):
        self.model, self.spec, self.greedy = model.eval(), spec, greedy
        self.as_domain = as_domain      # transfer study: every episode is shown as this (training) domain
        self.g = torch.Generator().manual_seed(seed)

    def probs(self, eps):
        x = torch.tensor(np.stack([features(ep.turns, ep.sc.s0, ep.sc.b0, self.as_domain or ep.dom.key,
                                            self.spec["domains"],
                                            self.spec["max_turns"]) for ep in eps]))
        with torch.no_grad():
            return F.softmax(self.model.policy_logits(x), dim=-1)

    def __call__(self, eps):
        if not eps:
            return []
        p = self.probs(eps)
        idx = p.argmax(-1) if self.greedy else torch.multinomial(p, 1, generator=self.g).squeeze(1)
        return [EMOTIONS[i] for i in idx.tolist()]


@torch.no_grad()
def advantages(model, data, gamma):
    """A_t = r_t + gamma V(s_{t+1}) (1 - d_t) - V(s_t) for every row of a transition dict,
    with the learned V: how the paper's SFT ranks the corpus's focal turns (it keeps the top K%)."""
    model.eval()
    v = model.v(model.norm(data["s"])).squeeze(1)                     # N
    v_next = model.v(model.norm(data["s2"])).squeeze(1)               # N
    return q_target(data["r"], v_next, data["d"], gamma) - v

