"""LoRA layers by hand (SPEC §7): how the small model learns to *say* the chosen emotion.

Paper part: the parameter-efficient adapters that SFT and JPO train on the student. A
`LoRALinear` wraps a frozen `nn.Linear` W and adds a low-rank path:

    y = W x + (alpha / r) * B A dropout(x),    A: r x in (Kaiming-uniform),  B: out x r (zeros)

so a fresh adapter changes nothing. `merge()` folds B A into W for inference and `unmerge()`
takes it out again; both are explicit and never a side effect of `eval()`.

Adapters are saved as `adapter_model.safetensors` + `adapter_config.json` with PEFT's key
names (`base_model.model.<module>.lora_A.weight`), so `peft.PeftModel.from_pretrained` can
load them; the wrapped layer is called `base_layer`, as in PEFT.

Not yet here: the SFT loop (advantage-filtered imitation) that trains these adapters.
"""
from __future__ import annotations

import json
import math
import os

import torch
import torch.nn as nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r=16, alpha=32, dropout=0.05):
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=dev, dtype=dt)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=dev, dtype=dt)
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
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling          # out, in

    def forward(self, x):
        y = self.base_layer(x)
        if self.merged:
            return y
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base_layer.weight += self.delta().to(self.base_layer.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base_layer.weight -= self.delta().to(self.base_layer.weight.dtype)
            self.merged = False


def _matches(name, targets):
    """PEFT-style matching: a target matches a module whose name is it or ends in '.target'."""
    return any(name == t or name.endswith("." + t) for t in targets)


def inject(model, targets=DEFAULT_TARGETS, r=16, alpha=32, dropout=0.05):
    """Freeze the model and wrap every nn.Linear whose name matches `targets` in a LoRALinear.
    Returns the names of the wrapped modules. Raises if nothing matched."""
    model.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, targets)]
    if not names:
        raise ValueError(f"no nn.Linear module matches targets {list(targets)}")
    for n in names:
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout))
    return names


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
