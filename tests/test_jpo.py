"""JPO (the paper's Judge Policy Optimization): the loss pieces against hand-computed values,
group normalisation edge cases, step 0 (ratio 1, KL 0), the direction of one step for either
sign of advantage, and exact resumption after a kill."""
import copy
import math

import pytest
import torch

import jpo
import lora
from conftest import Killed


def test_clipped_surrogate_by_hand():
    ratio = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0])
    # min(rho A, clip(rho, 0.8, 1.2) A): 1.2 | -1.5 | 0.5 | -0.8 | 2.2  -> loss is minus that
    expect = torch.tensor([-1.2, 1.5, -0.5, 0.8, -2.2])
    torch.testing.assert_close(jpo.clipped_surrogate(ratio, adv, 0.2), expect)


def test_k3_and_ratio_by_hand():
    logp = torch.tensor([[-1.0, -2.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0]])
    mask = torch.tensor([[True, True, False]])
    d1, d2 = -0.5, 1.0                                # log ref - log pi per response token
    k3 = ((math.exp(d1) - d1 - 1) + (math.exp(d2) - d2 - 1)) / 2
    assert jpo.k3_kl(logp, ref, mask).item() == pytest.approx(k3, rel=1e-6)
    assert jpo.sequence_ratio(logp, ref, mask).item() == pytest.approx(math.exp((0.5 - 1.0) / 2), rel=1e-6)
    assert jpo.k3_kl(ref, ref, mask).item() == 0.0
    assert jpo.sequence_ratio(ref, ref, mask).item() == 1.0


def test_group_advantages_edge_cases():
    adv = jpo.group_advantages([1, 3, 5, 7, 7, 2], ["a", "a", "a", "b", "b", "c"], clip=2.0)
    assert not torch.isnan(adv).any()
    torch.testing.assert_close(adv[:3], torch.tensor([-1.0, 0.0, 1.0]))     # (r - mean) / std, std = 2
    assert adv[3:].tolist() == [0.0, 0.0, 0.0]          # zero variance, and a group of one
    big = jpo.group_advantages([0, 0, 0, 0, 0, 0, 0, 0, 0, 100], ["g"] * 10, clip=2.0)
    assert big.max().item() == 2.0                         # clipped


def _setup(tiny_lm):
    model, tok = copy.deepcopy(tiny_lm[0]), tiny_lm[1]
    torch.manual_seed(0)
    lora.inject(model, r=4, alpha=8, dropout=0.1)
    with torch.no_grad():                                  # a non-trivial "SFT" adapter
        for m in lora.lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.02)
    p = "<|im_start|>user\nYour offer?<|im_end|>\n<|im_start|>assistant\n"
    exs = [lora.encode_example(tok, p, t) for t in ("I can do 30 days.", "Never, go away!",
                                                   "Let us say 45 days.", "No deal at all.")]
    return model, tok, exs


def test_step_zero_ratio_is_one_and_kl_zero(tiny_lm):
    model, tok, exs = _setup(tiny_lm)
    cfg = jpo.JPOConfig(epochs=1, batch_size=2, lr=1e-3)
    stats = jpo.train_jpo(model, exs, [9, 2, 8, 3], ["s", "s", "s", "s"], tok.pad_token_id, cfg, log=lambda *_: None)
    first = stats["history"][0]
    assert first["ratio"] == 1.0 and first["approx_kl"] == 0.0 and first["clip_frac"] == 0.0
    assert stats["total_steps"] == 2 and len(stats["history"]) == 2


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_one_step_moves_likelihood_with_the_advantage(tiny_lm, sign):
    model, tok, exs = _setup(tiny_lm)
    model.eval()
    batch = lora.collate(exs[:1], tok.pad_token_id)
    with torch.no_grad():
        ref, mask = lora.token_logprobs(model, batch)
    before = (ref * mask).sum().item()
    opt = torch.optim.AdamW(lora.trainable_parameters(model), lr=1e-3)
    for p in lora.trainable_parameters(model):
        p.requires_grad_(True)
    row = jpo.jpo_step(model, opt, [batch], [ref], [torch.tensor([sign])], jpo.JPOConfig())
    assert row["ratio"] == 1.0
    with torch.no_grad():
        after = (lora.token_logprobs(model, batch)[0] * mask).sum().item()
    assert (after - before) * sign > 0, (before, after)


def test_jpo_resumes_exactly(tiny_lm, tmp_path, kill_after):
    model, tok, exs = _setup(tiny_lm)
    exs = exs * 3
    rewards, groups = [9, 2, 8, 3] * 3, ["a", "a", "b", "b"] * 3
    cfg = jpo.JPOConfig(epochs=2, batch_size=2, lr=1e-3)
    a = copy.deepcopy(model)
    jpo.train_jpo(a, exs, rewards, groups, tok.pad_token_id, cfg, log=lambda *_: None)
    ck = str(tmp_path / "j.pt")
    b = copy.deepcopy(model)
    kill_after(5)
    with pytest.raises(Killed):
        jpo.train_jpo(b, exs, rewards, groups, tok.pad_token_id, cfg, ckpt=ck, log=lambda *_: None)
    assert torch.load(ck, weights_only=False)["state"]["step"] == 5
    b = copy.deepcopy(model)
    jpo.train_jpo(b, exs, rewards, groups, tok.pad_token_id, cfg, ckpt=ck, log=lambda *_: None)
    for ma, mb in zip(lora.lora_modules(a).values(), lora.lora_modules(b).values()):
        assert torch.equal(ma.lora_B.weight, mb.lora_B.weight)
