"""JPO (the paper's Judge Policy Optimization): refine the SFT adapter toward what the judge rewards.

Paper part: the last stage of EmoDistill. PPO-style clipped policy optimisation on *offline*
focal turns of the corpus, anchored to the SFT initialisation:

    reference   pi_ref = the SFT adapter, frozen (its log-probabilities are computed once,
                before the first update, on exactly the batches training will use)
    advantage   A = judge score normalised within its group (same scenario), clipped to +-adv_clip
    ratio       rho = exp(mean_t(log pi_theta(y_t) - log pi_ref(y_t)))   over response tokens
    loss        -min(rho A, clip(rho, 1 - clip_eps, 1 + clip_eps) A) + kl_coef * k3(pi_theta || pi_ref)

The loss pieces are the small pure functions below (`group_advantages`, `sequence_ratio`,
`clipped_surrogate`, `k3_kl`); `jpo_step` is one optimiser step; `train_jpo` the loop.
The model runs in eval mode (LoRA dropout off) so that the ratio is exactly 1 at step 0.

Departures. From the reference code: the reward is the judge score stored on each focal turn
of the judged corpus (the reference reads a reward field its data does not have). From the
paper: nothing in the objective; the optional re-sampling (GRPO-style) mode is not built.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

import lora


@dataclass
class JPOConfig:
    clip_eps: float = 0.2        # PPO clip of the ratio; higher -> larger moves per step
    kl_coef: float = 0.04        # weight of the k3 KL anchor to the SFT policy; higher -> stays closer to SFT
    adv_clip: float = 2.0        # normalised advantages are clipped to +-adv_clip; lower -> steadier
    lr: float = 2e-4             # AdamW peak learning rate of the LoRA weights
    epochs: float = 2.0          # passes over the offline turns
    batch_size: int = 8          # sequences per micro-batch
    grad_accum: int = 1          # micro-batches per optimiser step
    warmup_frac: float = 0.1     # share of the steps with linear warm-up; then cosine to 0
    max_grad_norm: float = 1.0   # gradient-norm clip
    max_len: int = 2048          # longer examples lose prompt tokens from the left
    seed: int = 0                # batch order


def select_jpo_turns(records, scenarios_per_domain, group_size, seed):
    """Offline groups for JPO (the paper's groups: one scenario a group): per domain,
    `scenarios_per_domain` training scenarios drawn at random, and in each `group_size` judged focal turns drawn at random from all of that
    scenario's trajectories. Returns (record index, turn index, group key) triples."""
    rng = np.random.default_rng(seed)
    pool = {}
    for ri, rec in enumerate(records):
        for ti, t in enumerate(rec["turns"]):
            if t["speaker"] == "focal" and t.get("score") is not None and t.get("emotion"):
                pool.setdefault((rec["domain"], rec["scenario_id"]), []).append((ri, ti))
    picked = []
    for d in sorted({k[0] for k in pool}):
        keys = sorted(k for k in pool if k[0] == d)
        for k in [keys[i] for i in sorted(rng.choice(len(keys), min(scenarios_per_domain, len(keys)), replace=False))]:
            turns = pool[k]
            pick = rng.choice(len(turns), min(group_size, len(turns)), replace=False)
            picked += [(turns[i][0], turns[i][1], f"{k[0]}-{k[1]}") for i in sorted(pick)]
    return picked


# ----------------------------------------------------------------------------------------
# Loss pieces: small pure functions
# ----------------------------------------------------------------------------------------

def group_advantages(rewards, groups, clip):
    """(r - group mean) / group std, clipped to [-clip, clip]. A group of one, or one whose
    rewards are all equal, carries no preference and gets advantage 0 (never NaN)."""
    r = torch.as_tensor(rewards, dtype=torch.float32)
    out = torch.zeros_like(r)
    keys = list(groups)
    for g in set(keys):
        idx = torch.tensor([i for i, k in enumerate(keys) if k == g])
        x = r[idx]
        if len(x) < 2:
            continue
        sd = x.std()
        if sd > 1e-8:
            out[idx] = ((x - x.mean()) / sd).clamp(-clip, clip)
    return out


def sequence_ratio(logp, logp_ref, mask):
    """rho = exp(mean over response tokens of (log pi - log pi_ref)), one per sequence. (B,)"""
    n = mask.sum(1).clamp(min=1)
    return torch.exp(((logp - logp_ref) * mask).sum(1) / n)


def clipped_surrogate(ratio, adv, clip_eps):
    """PPO's clipped objective as a loss, per sequence: -min(rho A, clip(rho) A). (B,)"""
    return -torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)


def k3_kl(logp, logp_ref, mask):
    """Per-sequence mean of the k3 estimator of KL(pi || pi_ref) on the sampled tokens:
    exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1, which is >= 0 and 0 when equal. (B,)"""
    d = (logp_ref - logp) * mask
    k3 = (torch.exp(d) - d - 1) * mask
    return k3.sum(1) / mask.sum(1).clamp(min=1)


# ----------------------------------------------------------------------------------------
# One step and the loop
# ----------------------------------------------------------------------------------------

def jpo_step(model, opt, batches, refs, advs, cfg: JPOConfig, lr=None):
    """One optimiser step over micro-batches (collated, on the model's device) with their
    reference log-probs (B, S-1) and advantages (B,). Returns the step's diagnostics."""
    params = lora.trainable_parameters(model)
    if lr is not None:
        for group in opt.param_groups:
            group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    n_seq = sum(len(a) for a in advs)
    rows = []
    for b, ref, adv in zip(batches, refs, advs):
        with lora.autocast_for(model):
            logp, mask = lora.token_logprobs(model, b)
        ratio = sequence_ratio(logp, ref, mask)                                   # B
        surr = clipped_surrogate(ratio, adv, cfg.clip_eps)                        # B
        kl = k3_kl(logp, ref, mask)                                               # B
        loss = (surr + cfg.kl_coef * kl).sum() / n_seq
        loss.backward()
        with torch.no_grad():
            clipped = ((ratio - 1).abs() > cfg.clip_eps) & (adv != 0)
            rows.append(torch.stack([ratio, kl, clipped.float(), adv, mask.sum(1).float(),
                                     surr + cfg.kl_coef * kl], 1).detach())
    gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    opt.step()
    m = torch.cat(rows).mean(0).tolist()
    return {"ratio": m[0], "approx_kl": m[1], "clip_frac": m[2], "adv": m[3], "resp_len": m[4], "loss": m[5],
            "grad_norm": float(gnorm)}


@torch.no_grad()
def reference_logprobs(model, examples, micro, pad_id, cfg: JPOConfig):
    """log pi_ref of every example's response tokens, batch by batch as training will run them."""
    dev = next(model.parameters()).device
    out = {}
    for idx in {tuple(b) for b in micro}:
        batch = {k: v.to(dev) for k, v in lora.collate([examples[i] for i in idx], pad_id, cfg.max_len).items()}
        with lora.autocast_for(model):
            lp, _ = lora.token_logprobs(model, batch)
        out[idx] = lp.float()
    return out


def train_jpo(model, examples, rewards, groups, pad_id, cfg: JPOConfig, ckpt=None, log=print, progress=None):
    """JPO on encoded examples (lora.encode_example) with judge rewards and group keys.
    The model's current LoRA weights are the reference. Resumes from `ckpt` when present.
    Returns a dict with the per-step diagnostics."""
    params = lora.trainable_parameters(model)
    if not params:
        raise ValueError("the model has no LoRA layers: load the SFT adapter first")
    for p in params:
        p.requires_grad_(True)
    model.eval()                                        # no dropout: rho == 1 exactly at step 0
    dev = next(model.parameters()).device
    adv_all = group_advantages(rewards, groups, cfg.adv_clip)
    lengths = [len(e["input_ids"]) for e in examples]
    micro = [b for ep in range(math.ceil(cfg.epochs))
             for b in lora.length_batches(lengths, cfg.batch_size, cfg.seed, ep)]
    total = lora.total_steps(len(examples), cfg.batch_size, cfg.epochs, cfg.grad_accum)
    micro = micro[:total * cfg.grad_accum]
    warmup = max(1, int(total * cfg.warmup_frac))
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    state = {"step": 0, "history": []}
    ck = lora.load_checkpoint(ckpt, model, opt, cfg, len(examples), "JPO")
    if ck is not None:
        refs, state = ck["refs"], ck["state"]
        log(f"[jpo] resuming from step {state['step']}")
    else:
        refs = reference_logprobs(model, examples, micro, pad_id, cfg)
    t0 = time.time()
    while state["step"] < total:
        step = state["step"]
        chunk = micro[step * cfg.grad_accum:(step + 1) * cfg.grad_accum]
        batches = [{k: v.to(dev) for k, v in lora.collate([examples[i] for i in idx], pad_id, cfg.max_len).items()}
                   for idx in chunk]
        row = jpo_step(model, opt, batches, [refs[tuple(idx)].to(dev) for idx in chunk],
                       [adv_all[idx].to(dev) for idx in chunk], cfg, lora.lr_at(step, total, warmup, cfg.lr))
        state["step"] = step + 1
        row = {"step": state["step"], **{k: round(v, 5) for k, v in row.items()}}
        state["history"].append(row)
        log("[jpo] " + " ".join(f"{k} {v}" for k, v in row.items()))
        if progress:
            progress(state["step"], total)
        if ckpt:
            lora.save_checkpoint(ckpt, model, opt, state, cfg, len(examples), refs=refs)
    return {**state, "total_steps": total, "n_examples": len(examples), "seconds": round(time.time() - t0, 1),
            "adv_nonzero": float((adv_all != 0).float().mean())}
