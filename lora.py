"""LoRA layers by hand: how the small model learns to *say* the chosen emotion.

Paper part: the parameter-efficient adapters that SFT and JPO train on the student. A
`LoRALinear` wraps a frozen `nn.Linear` W and adds a low-rank path:

    y = W x + (alpha / r) * B A dropout(x),    A: r x in (Kaiming-uniform),  B: out x r (zeros)

so a fresh adapter changes nothing. `merge()` folds B A into W for inference and `unmerge()`
takes it out again; both are explicit and never a side effect of `eval()`. A and B are float32
even on a bf16 base (the GPU default): the optimiser's small steps would round away in bf16.

Adapters are saved as `adapter_model.safetensors` + `adapter_config.json` with PEFT's key
names (`base_model.model.<module>.lora_A.weight`), so `peft.PeftModel.from_pretrained` can
load them; the wrapped layer is called `base_layer`, as in PEFT.

The paper's SFT on the top-K% advantage turns, the second half of this file: imitation of the
corpus's best focal turns. `emodistill.py sft` picks the turns (top K% by the IQL advantage)
and renders each one's prompt exactly as `LMAgent` renders it at inference (chat template,
scenario, history, emotion block); this file turns (prompt, response) pairs into token ids
with the loss on the response tokens only (and the end-of-turn token, so the model learns to
stop), and trains the adapter: AdamW, linear warm-up then cosine decay, gradient accumulation,
gradient-norm clipping, bf16 autocast on a GPU, early stopping on a held-out loss, and a
checkpoint that resumes a killed run exactly. Departure from the reference code: it put loss
on the prompt tokens too, which teaches the model to write the counterparty's lines.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r=16, alpha=32, dropout=0.05):
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        # BEGIN A2 scaling
        # hint: store r, alpha and the scale of the low-rank path, self.scaling (the paper's alpha over r)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        # END A2
        # the adapter is float32 whatever the base's dtype: on a bf16 base (the GPU default) an
        # AdamW step of lr 2e-4 is below bf16's resolution for most of A's entries and is lost
        dev = base.weight.device
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=dev, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=dev, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def in_features(self):
        return self.base_layer.in_features

    @property
    def out_features(self):
        return self.base_layer.out_features

    @property
    def weight(self):  # code that reads `.weight` (e.g. a dtype probe) sees the base weight
        return self.base_layer.weight

    def delta(self):
        """The low-rank update (alpha / r) B A, shaped like the base weight."""
        # BEGIN A2 delta
        # hint: (alpha / r) * B A as an (out, in) matrix: lora_B.weight is (out, r), lora_A.weight (r, in)
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling          # out, in
        # END A2

    def forward(self, x):
        # BEGIN A2 forward
        # hint: y = W x (+ bias) from base_layer; when not merged add scaling * B(A(dropout(x))), the
        # adapter path in the adapter's float32, the sum in the base output's dtype
        y = self.base_layer(x)
        if self.merged:
            return y
        z = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))   # ..., out (fp32)
        return y + (z * self.scaling).to(y.dtype)
        # END A2

    @torch.no_grad()
    def merge(self):
        # BEGIN A2 merge
        # hint: once only (check self.merged): add delta() into the base weight, in its dtype; set merged
        if not self.merged:
            self.base_layer.weight += self.delta().to(self.base_layer.weight.dtype)
            self.merged = True
        # END A2

    @torch.no_grad()
    def unmerge(self):
        # BEGIN A2 unmerge
        # hint: only when merged: take delta() back out of the base weight; clear merged
        if self.merged:
            self.base_layer.weight -= self.delta().to(self.base_layer.weight.dtype)
            self.merged = False
        # END A2


def _matches(name, targets):
    """PEFT-style matching: a target matches a module whose name is it or ends in '.target'."""
    # BEGIN A2 matches
    # hint: True when the name equals a target or ends in "." + target ("attn.q_proj" yes, "attn.xq_proj" no)
    return any(name == t or name.endswith("." + t) for t in targets)
    # END A2


def inject(model, targets=DEFAULT_TARGETS, r=16, alpha=32, dropout=0.05):
    """Freeze the model and wrap every nn.Linear whose name matches `targets` in a LoRALinear.
    Returns the names of the wrapped modules. Raises if nothing matched."""
    # BEGIN A2 inject
    # hint: freeze every parameter; find the nn.Linear modules whose names _matches a target (ValueError
    # "no nn.Linear module matches ..." when none); replace each on its parent by a LoRALinear in the
    # model's train/eval mode; return the names in named_modules order
    model.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, targets)]
    if not names:
        raise ValueError(f"no nn.Linear module matches targets {list(targets)}")
    for n in names:
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        # the new layer follows the model's mode: on a model in eval mode its dropout is off
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout).train(model.training))
    return names
    # END A2


def lora_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def trainable_parameters(model):
    """The LoRA parameters (the only ones that should receive gradients)."""
    return [p for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def merge(model):
    for m in lora_modules(model).values():
        m.merge()


def unmerge(model):
    for m in lora_modules(model).values():
        m.unmerge()


def save_adapter(model, folder, base_model_name=""):
    """adapter_model.safetensors + adapter_config.json in PEFT's layout, written atomically."""
    from safetensors.torch import save_file
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA layers to save")
    first = next(iter(mods.values()))
    tensors = {}
    for n, m in mods.items():
        tensors[f"base_model.model.{n}.lora_A.weight"] = m.lora_A.weight.detach().float().cpu().contiguous()
        tensors[f"base_model.model.{n}.lora_B.weight"] = m.lora_B.weight.detach().float().cpu().contiguous()
    targets = sorted({n.rpartition(".")[2] for n in mods})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": first.r, "lora_alpha": first.alpha,
              "lora_dropout": getattr(first.lora_dropout, "p", 0.0), "target_modules": targets, "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": base_model_name,
              "modules_to_save": None, "init_lora_weights": True}
    tmp = folder.rstrip("/") + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"))
    with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if os.path.exists(folder):
        import shutil
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def load_adapter(model, folder):
    """Inject LoRA layers as the adapter's config says and load its weights."""
    from safetensors.torch import load_file
    with open(os.path.join(folder, "adapter_config.json")) as f:
        config = json.load(f)
    if not lora_modules(model):
        inject(model, config["target_modules"], config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0))
    mods = lora_modules(model)
    tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
    seen = set()
    for key, t in tensors.items():
        name, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
        if name not in mods:
            raise ValueError(f"{folder}: adapter has weights for '{name}', which this model does not have")
        layer = getattr(mods[name], "lora_" + part.split(".")[0])
        if layer.weight.shape != t.shape:
            raise ValueError(f"{folder}: {key} has shape {tuple(t.shape)}, the model expects "
                             f"{tuple(layer.weight.shape)} (another base model?)")
        with torch.no_grad():
            layer.weight.copy_(t)
        seen.add(name)
    missing = set(mods) - seen
    if missing:
        raise ValueError(f"{folder}: no adapter weights for {sorted(missing)[:3]} ...")
    return config


# ----------------------------------------------------------------------------------------
# SFT: response-only imitation of the top-advantage focal turns
# ----------------------------------------------------------------------------------------

@dataclass
class SFTConfig:
    r: int = 16                  # LoRA rank; higher -> more capacity, more memory and time
    alpha: int = 32              # LoRA scale numerator (scale = alpha / r); higher -> bigger updates
    dropout: float = 0.05        # dropout on the LoRA input; higher -> more regularisation
    lr: float = 2e-3             # AdamW peak learning rate; higher -> faster, and more phrase copying
    weight_decay: float = 0.0    # AdamW decay on the LoRA weights
    epochs: float = 3.0          # passes over the training examples (fractions allowed)
    batch_size: int = 8          # sequences per micro-batch
    grad_accum: int = 1          # micro-batches per optimiser step; higher -> larger effective batch
    warmup_frac: float = 0.1     # share of the steps with linear warm-up; then cosine to 0
    max_grad_norm: float = 1.0   # gradient-norm clip
    heldout_frac: float = 0.1    # share of examples kept out for the early-stopping loss (rounded up, stratified)
    min_per_emotion: int = 4     # SFT data: turns per emotion and domain kept even below the top-K cut
    min_move_share: float = 0.2  # SFT data: least share of a domain's examples for each planned move (offer, accept)
    prompt_grad: bool = True     # False: no gradient through the prompt tokens (response_logprobs); ~40%
                                 # faster on a compact prompt, a departure from plain SFT
    eval_every: int = 0          # optimiser steps between held-out evaluations (0: once an epoch; each costs
                                 # a forward pass over the held-out examples, ~20 s in the quick profile)
    patience: int = 2            # evaluations without improvement before stopping early
    max_len: int = 2048          # longer examples lose prompt tokens from the left (never the response)
    seed: int = 0                # held-out split, batch order and dropout


def select_sft_turns(records, adv, where, top_k, max_examples, seed, min_per_emotion=4, min_move_share=0.2):
    """The focal turns to imitate, chosen per stratum, a domain and a planned move (offer or
    accept, the turn's `plan`), so that neither a domain with larger advantages nor the
    deal-closing accept turns (their advantage carries the outcome: without strata they were
    42% of the examples, and the student learned to say "Agreed, 52 days" when told to offer)
    crowd out the rest, by three rules in turn:

    1. top K: the top `top_k` percent of the stratum's focal turns by advantage (at least one),
       raised for a move that would be rare to `min_move_share` of the domain's examples (the
       cap, or without one the domain's top K) where it has the turns. Accept turns are ~2% of
       the corpus, and with their plain share (5 of 256 examples) the student never accepted
       when told to (0 of 129 planned accepts in a quick run, docs/notebook.md);
    2. per-emotion minimum: every emotion that the domain's turns carry and that has fewer than
       `min_per_emotion` turns in the top K gets its highest-advantage turns added, even below
       the cut, until it has `min_per_emotion` or runs out of turns. So every emotion the
       selector may pick has examples of how to say it (the IQL selector only picks emotions
       seen in the corpus). Emotion-free turns (emotion None) have no minimum;
    3. cap: when that is more than the stratum's cap (0: no cap) -- `max_examples // number of
       domains`, shared between the domain's strata, each first given its `min_move_share`
       and the rest in proportion to their number of turns (`move_caps`) -- the cap is
       filled first with each emotion's best turns up to its minimum, taken in rounds (every
       emotion's best turn, then every emotion's second best, ...; within a round, emotions in
       the order of their best turn), and the rest of the cap with a seeded random sample of the
       remaining turns. So the cap never drops an emotion below its minimum, unless the
       minimums alone exceed the cap: then the rounds stop at the cap, which keeps as many
       emotions covered as the cap allows.

    Deterministic for a given `seed`. Returns (record index, turn index, advantage) triples,
    per stratum grouped by emotion (emotion-free first, then by name) and best first within an
    emotion, so that `split_heldout`'s evenly spaced pick spreads over domains and emotions."""
    by_stratum = {}
    for (ri, ti), a in zip(where, adv):
        turn = records[ri]["turns"][ti]
        move = (turn.get("plan") or {}).get("move", "offer")
        by_stratum.setdefault((records[ri]["domain"], move), []).append((float(a), ri, ti, turn.get("emotion")))
    rng = np.random.default_rng(seed)
    n_dom = {}
    for d, _ in by_stratum:
        n_dom[d] = n_dom.get(d, 0) + 1
    dom_cap = max(1, max_examples // len(n_dom)) if max_examples else None
    top = {k: max(1, math.ceil(len(rows) * top_k / 100)) for k, rows in by_stratum.items()}
    caps = {}
    for d in n_dom:
        keys = sorted(k for k in by_stratum if k[0] == d)
        sizes = [len(by_stratum[k]) for k in keys]
        if dom_cap:                      # the domain's cap over its strata (sums to it); a move given
            plain = largest_remainder(dom_cap, sizes)   # more than its plain share fills it, best first
            caps.update(zip(keys, move_caps(dom_cap, sizes, min_move_share)))
            for k, p in zip(keys, plain):
                if caps[k] > p:
                    top[k] = max(top[k], caps[k])
        else:                            # no cap: every move at least its share of the domain's top K
            total = sum(top[k] for k in keys)
            for k, n in zip(keys, sizes):
                top[k] = max(top[k], min(n, math.ceil(min_move_share * total)))
    picked = []
    for d, move in sorted(by_stratum):
        cap = caps.get((d, move))
        if cap == 0:
            continue
        rows = sorted(by_stratum[d, move], key=lambda x: (-x[0], x[1], x[2]))   # rank 0 = best
        ranks = {}                                                           # emotion -> its ranks, best first
        for i, row in enumerate(rows):
            if row[3] is not None:
                ranks.setdefault(row[3], []).append(i)
        floors = [rs[:min_per_emotion] for rs in ranks.values()]             # in the order of each best turn
        keep = set(range(top[d, move])).union(*floors)
        if cap and len(keep) > cap:
            reserved = [f[j] for j in range(max(map(len, floors), default=0)) for f in floors if j < len(f)][:cap]
            rest = sorted(keep.difference(reserved))
            n = min(cap - len(reserved), len(rest))
            keep = set(reserved).union(rest[i] for i in rng.choice(len(rest), n, replace=False))
        keep = sorted(keep, key=lambda i: (rows[i][3] is not None, rows[i][3] or "", i))
        picked += [(rows[i][1], rows[i][2], rows[i][0]) for i in keep]
    return picked


def move_caps(total, sizes, min_share):
    """`total` examples over strata of `sizes` turns: each stratum first gets `min_share` of
    the total (or all its turns, if fewer), the rest goes in proportion to the turns left.
    Whole numbers that sum to `total` (when the strata hold that many)."""
    floors = [min(n, math.ceil(min_share * total)) for n in sizes]
    if sum(floors) >= total:
        return largest_remainder(total, floors)
    rest = largest_remainder(total - sum(floors), [n - f for n, f in zip(sizes, floors)])
    return [f + x for f, x in zip(floors, rest)]


def largest_remainder(total, sizes):
    """`total` split in proportion to `sizes` into whole numbers that sum to `total`."""
    exact = [total * n / sum(sizes) for n in sizes]
    out = [math.floor(x) for x in exact]
    for i in sorted(range(len(sizes)), key=lambda i: out[i] - exact[i])[:total - sum(out)]:
        out[i] += 1
    return out


def encode_example(tok, prompt, response):
    """Token ids and labels for one example: labels are -100 on the prompt and equal to the
    ids on the response followed by the end-of-turn token, so the loss covers exactly what
    the model must generate. The prompt is the chat-templated text that ends with the
    assistant header; tokenised apart from the response so the boundary is exact."""
    # BEGIN A3 encode_example
    # hint: ids of prompt and of response (add_special_tokens=False), then end_of_turn_id(tok) after the
    # response; labels: -100 on every prompt token, the ids themselves on the response and end token
    p = tok(prompt, add_special_tokens=False).input_ids
    r = tok(response, add_special_tokens=False).input_ids + [end_of_turn_id(tok)]
    return {"input_ids": p + r, "labels": [-100] * len(p) + r}
    # END A3


def end_of_turn_id(tok):
    """The token that closes an assistant turn in the chat template (<|im_end|> for SmolLM2)."""
    for t in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tok.unk_token_id and i is not None:
            return i
    return tok.eos_token_id


def collate(examples, pad_id, max_len=None):
    """Right-padded batch: input_ids, attention_mask, labels (-100 on prompt and padding)."""
    # BEGIN A3 collate
    # hint: keep the last max_len tokens of each example; pad on the right to the longest: ids with
    # pad_id, labels with -100, attention_mask 1 on real tokens and 0 on padding (all long tensors)
    if max_len:
        examples = [{k: v[-max_len:] for k, v in e.items()} for e in examples]
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)                # B,S
    labels = torch.full((len(examples), n), -100, dtype=torch.long)               # B,S
    mask = torch.zeros((len(examples), n), dtype=torch.long)                      # B,S
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k] = torch.tensor(e["input_ids"])
        labels[i, :k] = torch.tensor(e["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    # END A3


def token_logprobs(model, batch):
    """log pi(y_t | y_<t, prompt) of every label token: (B, S-1) values and a (B, S-1) mask.
    Shared with JPO, which needs the per-token log-probabilities of the response.

    The vocabulary projection is applied only at the response positions: with ~35 response
    tokens in a ~600-token example that saves most of the (S x 49k) logits and their memory."""
    # BEGIN A3 logprob_targets
    # hint: ids = the input ids (B, S); target = the label each position t < S-1 predicts, the label of
    # token t+1 (B, S-1); mask = where target is a real label (not -100)
    ids, target = batch["input_ids"], batch["labels"][:, 1:]                                      # B,S ; B,S-1
    mask = target != -100
    # END A3
    am = batch.get("attention_mask")
    if am is not None and bool((am[:, 1:] <= am[:, :-1]).all()):
        # right padding only (what `collate` makes): causal attention never looks to the right,
        # so the pads cannot change a real token and need no mask. Without one, attention takes
        # its causal fast path: on a 2-core CPU a batch of 8 x 999 tokens trains ~20% faster
        # and peaks at 12 GB instead of 21 GB (docs/notebook.md, "Training without an attention mask").
        am = None
    head = model.get_output_embeddings()
    if head is None or getattr(model.config, "final_logit_softcapping", None) or \
            getattr(model.config, "logits_scaling", None):       # a model that post-processes its logits
        logits = model(input_ids=ids, attention_mask=am).logits[:, :-1]                        # B,S-1,V
        picked = logits[mask]                                                                   # N,V
    else:
        h = model.base_model(input_ids=ids, attention_mask=am).last_hidden_state               # B,S,D
        picked = head(h[:, :-1][mask])                                                          # N,V
    # BEGIN A3 logprob_gather
    # hint: picked (N, V) are the logits at the N masked positions, in row-major order; log-softmax them
    # over the vocabulary (in float32), take each one's target token, and return (lp, mask) with lp a
    # (B, S-1) float tensor holding those values at the masked positions and 0 elsewhere
    lp_picked = torch.gather(F.log_softmax(picked.float(), -1), 1, target[mask][:, None]).squeeze(1)  # N
    lp = torch.zeros(mask.shape, dtype=lp_picked.dtype, device=ids.device).masked_scatter(mask, lp_picked)
    return lp, mask
    # END A3


def response_logprobs(model, example):
    """log pi(y_t | y_<t, prompt) of one example's label tokens (N,), with no gradient through
    the prompt: the prompt's keys and values are computed without autograd, and only the
    response tokens (and the last prompt token, whose output predicts the first of them) run
    with it. The values are those of `token_logprobs`; the gradient leaves out how the adapter
    changes the prompt's keys and values. A compact prompt is ~85% of an example's tokens, so
    a training step costs ~40% less (`SFTConfig.prompt_grad`). One example at a time: no padding."""
    ids = torch.as_tensor(example["input_ids"])[None]                                          # 1,S
    labels = torch.as_tensor(example["labels"])
    p = int((labels != -100).nonzero()[0])           # the first label token; position p-1 predicts it
    if p < 2:
        raise ValueError("response_logprobs needs a prompt of at least two tokens")
    dev = next(model.parameters()).device
    ids = ids.to(dev)
    body = model.base_model
    with torch.no_grad():
        out = body(input_ids=ids[:, :p - 1], use_cache=True)                                 # the prompt minus one
    # the cache argument is `cache` in newer transformers, `past_key_values` before
    kw = "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"
    cache = out.cache if kw == "cache" else out.past_key_values
    h = body(input_ids=ids[:, p - 1:-1], use_cache=True, **{kw: cache}).last_hidden_state      # 1,S-p,D
    target = labels[p:].to(dev)                                                                # S-p
    keep = target != -100
    logits = model.get_output_embeddings()(h[0][keep])                                        # N,V
    return torch.gather(F.log_softmax(logits.float(), -1), 1, target[keep][:, None]).squeeze(1)


def sft_loss(model, batch, n_tokens=None):
    """Negative log-likelihood of the batch's response tokens, divided by `n_tokens` (default:
    the batch's own response-token count, i.e. the mean). `train_sft` passes the count of the
    whole optimiser step, so that the accumulated gradient is that of the step's mean."""
    # BEGIN A3 sft_loss
    # hint: minus the sum of the response tokens' log-probs (token_logprobs), over n_tokens, or over
    # the batch's own count of response tokens (at least 1) when n_tokens is None
    lp, mask = token_logprobs(model, batch)
    return -lp.sum() / (mask.sum().clamp(min=1) if n_tokens is None else n_tokens)
    # END A3


def lr_at(step, total, warmup, peak):
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def total_steps(n_examples, batch_size, epochs, grad_accum):
    """Optimiser steps of a run: micro-batches per epoch x epochs (fractions allowed) / accumulation."""
    return max(1, math.ceil(math.ceil(n_examples / batch_size) * epochs / grad_accum))


def length_batches(lengths, batch_size, seed, epoch):
    """The micro-batches of one epoch: examples sorted by length and cut into batches (little
    padding), the batch order shuffled. A pure function of seed and epoch: exact resume."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def autocast_for(model):
    dev = next(model.parameters()).device
    on = dev.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=on)


@torch.no_grad()
def heldout_loss(model, examples, pad_id, cfg: SFTConfig):
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    tot = n = 0.0
    for s in range(0, len(examples), cfg.batch_size):
        b = {k: v.to(dev) for k, v in collate(examples[s:s + cfg.batch_size], pad_id, cfg.max_len).items()}
        with autocast_for(model):
            lp, mask = token_logprobs(model, b)
        tot += -lp.sum().item()
        n += mask.sum().item()
    model.train(was)
    return tot / max(n, 1)


def split_heldout(examples, cfg: SFTConfig):
    """(train, heldout): ceil(`heldout_frac` x n) examples are kept for early stopping, so the
    share is never below `heldout_frac` (25 examples at 0.1: 3 held out); none below 10
    examples (a held-out loss of one example is noise) and always at least one to train on.
    The held-out examples are evenly spaced through the list from a seeded offset (positions
    floor((j + u) n / k), j < k, u uniform in [0, 1)), so a list grouped by domain and emotion,
    as `select_sft_turns` returns it, gets a held-out share of every group in proportion to
    its size (a stratified split) rather than a random heap of one domain. Both lists keep
    the input order; the split depends only on n, `heldout_frac` and `seed` (what
    `load_checkpoint` checks), so a resumed run splits the same way."""
    n = len(examples)
    k = min(math.ceil(n * cfg.heldout_frac - 1e-9), n - 1) if n >= 10 else 0
    if k <= 0:
        return list(examples), []
    u = np.random.default_rng(cfg.seed).random()
    held = {int((j + u) * n / k) for j in range(k)}
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def train_sft(model, examples, pad_id, cfg: SFTConfig, ckpt=None, log=print, progress=None):
    """Train the model's LoRA adapter on encoded examples (see `encode_example`).

    ckpt: a file path; the state (adapter, optimiser, step, best held-out loss and the best
    adapter so far) is saved there after every step and training continues from it when
    present. Ends with the best adapter (lowest held-out loss) loaded. Returns a dict of stats.
    progress: called as progress(steps done, total steps) after every step."""
    train_ex, held = split_heldout(examples, cfg)
    if not train_ex:
        raise ValueError("no SFT training examples")
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no LoRA layers; call inject() first")
    dev = next(model.parameters()).device
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = total_steps(len(train_ex), cfg.batch_size, cfg.epochs, cfg.grad_accum)
    warmup = max(1, int(total * cfg.warmup_frac))
    state = {"step": 0, "best": float("inf"), "best_step": 0, "bad_evals": 0, "history": [], "tokens": 0}
    best_weights = None
    ck = load_checkpoint(ckpt, model, opt, cfg, len(examples), "SFT")
    if ck is not None:
        state, best_weights = ck["state"], ck["best_lora"]
        log(f"[sft] resuming from step {state['step']}")
    lengths = [len(e["input_ids"]) for e in train_ex]
    micro = [b for ep in range(math.ceil(cfg.epochs)) for b in length_batches(lengths, cfg.batch_size, cfg.seed, ep)]
    micro = micro[:total * cfg.grad_accum]
    every = cfg.eval_every or math.ceil(math.ceil(len(train_ex) / cfg.batch_size) / cfg.grad_accum)   # 0: an epoch
    model.train()
    if state["step"] == 0 and held and "initial_heldout" not in state:
        state["initial_heldout"] = round(heldout_loss(model, held, pad_id, cfg), 4)
        log(f"[sft] step 0 heldout {state['initial_heldout']}")
    t0, tok0 = time.time(), state["tokens"]
    stopped_early = False
    while state["step"] < total:
        step = state["step"]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, warmup, cfg.lr)
        torch.manual_seed(cfg.seed * 7919 + step)           # dropout masks: exact resume
        opt.zero_grad(set_to_none=True)
        chunk = micro[step * cfg.grad_accum:(step + 1) * cfg.grad_accum]
        n_resp = sum(sum(1 for x in train_ex[i]["labels"] if x != -100) for idx in chunk for i in idx)
        loss_sum = 0.0
        for idx in chunk:
            if not cfg.prompt_grad:                         # one example at a time, prompt without autograd
                for i in idx:
                    ex = {k: v[-cfg.max_len:] for k, v in train_ex[i].items()}
                    with autocast_for(model):
                        loss = -response_logprobs(model, ex).sum() / n_resp
                    loss.backward()
                    loss_sum += loss.item()
                    state["tokens"] += len(ex["input_ids"])
                continue
            b = {k: v.to(dev) for k, v in collate([train_ex[i] for i in idx], pad_id, cfg.max_len).items()}
            with autocast_for(model):
                loss = sft_loss(model, b, n_resp)           # mean over the step's response tokens
            loss.backward()
            loss_sum += loss.item()
            state["tokens"] += int(b["attention_mask"].sum())
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        state["step"] = step + 1
        if progress:
            progress(state["step"], total)
        last = state["step"] == total
        if state["step"] % every == 0 or last:
            hl = heldout_loss(model, held, pad_id, cfg) if held else loss_sum
            dt = time.time() - t0
            row = {"step": state["step"], "loss": round(loss_sum, 4), "heldout": round(hl, 4),
                   "lr": round(opt.param_groups[0]["lr"], 7), "grad_norm": round(float(gnorm), 3),
                   "tokens_per_s": round((state["tokens"] - tok0) / max(dt, 1e-9), 1)}
            state["history"].append(row)
            log("[sft] " + " ".join(f"{k} {v}" for k, v in row.items()))
            if hl < state["best"] - 1e-4:
                state.update(best=hl, best_step=state["step"], bad_evals=0)
                best_weights = get_lora_state(model)
            else:
                state["bad_evals"] += 1
            if state["bad_evals"] >= cfg.patience and not last:
                log(f"[sft] held-out loss has not improved for {cfg.patience} evaluations; stopping early")
                stopped_early = True
                state["step"] = total
        if ckpt:                                            # every step: a few MB against a step's seconds
            save_checkpoint(ckpt, model, opt, state, cfg, len(examples), best_lora=best_weights)
    if best_weights is not None:
        set_lora_state(model, best_weights)
    model.eval()
    return {**state, "stopped_early": stopped_early, "total_steps": total, "n_train": len(train_ex),
            "n_heldout": len(held), "seconds": round(time.time() - t0, 1)}


def get_lora_state(model):
    return {n: (m.lora_A.weight.detach().cpu().clone(), m.lora_B.weight.detach().cpu().clone())
            for n, m in lora_modules(model).items()}


@torch.no_grad()
def set_lora_state(model, weights):
    for n, m in lora_modules(model).items():
        a, b = weights[n]
        m.lora_A.weight.copy_(a)
        m.lora_B.weight.copy_(b)


def atomic_save(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------
# The training checkpoint of SFT and JPO: saved after every step, a killed run resumes exactly
# ----------------------------------------------------------------------------------------

def save_checkpoint(path, model, opt, state, config, n_examples, **extra):
    """Everything a killed run needs to continue exactly where it stopped: the LoRA weights,
    the optimiser, the loop's `state` dict and the stage's `extra` items (SFT: best_lora; JPO:
    refs), with the settings and data size that `load_checkpoint` checks. Written atomically."""
    atomic_save({"lora": get_lora_state(model), "opt": opt.state_dict(), "state": state, **extra,
                 "config": asdict(config), "n_examples": n_examples}, path)


def load_checkpoint(path, model, opt, config, n_examples, what):
    """The checkpoint at `path` as a dict, or None when there is none (or no path). It must have
    been written with the same settings and data (`what` names the stage in the error); the
    model's LoRA weights and the optimiser's state are restored from it."""
    if not (path and os.path.exists(path)):
        return None
    ck = torch.load(path, map_location="cpu", weights_only=False)
    if ck["config"] != asdict(config) or ck["n_examples"] != n_examples:
        raise ValueError(f"{path} was written with other {what} settings or data; delete it or use --force")
    set_lora_state(model, ck["lora"])
    opt.load_state_dict(ck["opt"])
    return ck
