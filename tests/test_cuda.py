"""The GPU path (skipped without CUDA; run by .ci/gpu on a lent GPU machine): the automatic
device and dtype choice, and the hand-written pieces on CUDA in bf16 checked against the same
model in float32 on the CPU: response log-probabilities, the cached decoder, an SFT run and a
JPO step; and the cached decoder's static step replayed from CUDA graphs (EMODISTILL_STATIC_DECODE=1)
against its eager step (static=False): the same greedy tokens and caches in float32, sampling
from the same seed, bf16, an unmerged LoRA adapter, and merging it after the graphs exist."""
import copy
import dataclasses
import os

import pytest
from conftest import record_logits
import torch

import decode
import domains
import jpo
import lora
import models
import negotiate as ng
from test_sft import _examples

# EMODISTILL_TEST_DEVICE=cpu runs the same checks on the CPU in bf16 (a dry run of this file)
DEV = os.environ.get("EMODISTILL_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def pair(tiny_lm):
    """The tiny model on the CPU in float32 and a copy on the GPU in bf16, with a LoRA adapter
    whose B is not zero, so the adapter path is in every comparison."""
    cpu = copy.deepcopy(tiny_lm[0])
    with torch.no_grad():   # larger embeddings: logits that differ between tokens
        cpu.get_input_embeddings().weight.mul_(25)
    torch.manual_seed(0)
    lora.inject(cpu, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for m in lora.lora_modules(cpu).values():
            m.lora_B.weight.normal_(0, 0.05)
    gpu = copy.deepcopy(cpu).to(DEV, torch.bfloat16)
    for m in lora.lora_modules(gpu).values():   # what LoRALinear makes on a bf16 base
        m.lora_A.float()
        m.lora_B.float()
    return cpu.eval(), gpu.eval(), tiny_lm[1]


def _rel(a, b):
    return ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm()).item()


@pytest.mark.skipif(DEV != "cuda", reason="the automatic choice needs a GPU")
def test_cuda_is_picked_with_bf16(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.delenv("EMODISTILL_DEVICE", raising=False)
    monkeypatch.delenv("EMODISTILL_DTYPE", raising=False)
    assert models.pick_device_dtype() == ("cuda", torch.bfloat16)
    tiny_lm[0].save_pretrained(tmp_path)
    tiny_lm[1].save_pretrained(tmp_path)
    model, _ = models.load_lm(str(tmp_path))
    p = next(model.parameters())
    assert p.device.type == "cuda" and p.dtype == torch.bfloat16
    lora.inject(model)
    assert all(q.dtype == torch.float32 and q.device.type == "cuda" for q in lora.trainable_parameters(model))


def test_cuda_bf16_logprobs_match_cpu_float32(pair):
    cpu, gpu, tok = pair
    batch = lora.collate(_examples(tok, 6), tok.pad_token_id)
    with torch.no_grad():
        ref, mask = lora.token_logprobs(cpu, batch)
        with lora.autocast_for(gpu):
            got, gmask = lora.token_logprobs(gpu, {k: v.to(DEV) for k, v in batch.items()})
    assert torch.equal(gmask.cpu(), mask)
    err = _rel(got[gmask], ref[mask])
    assert err < 2e-2, err          # bf16 operands: 1e-3 to 1e-2 expected


def test_cuda_decoder_matches_hf_forward_and_generate(pair):
    cpu, gpu, tok = pair
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in (5, 17, 11)]
    lora.merge(gpu)
    dec = decode.KVDecoder(gpu, [tok.eos_token_id], max_new_tokens=1, temperature=0)
    B, S = len(prompts), max(map(len, prompts))
    ids = torch.zeros(B, S, dtype=torch.long, device=DEV)
    pos = torch.zeros_like(ids)
    valid = torch.zeros(B, S, dtype=torch.bool, device=DEV)
    for b, p in enumerate(prompts):
        ids[b, S - len(p):] = torch.tensor(p)
        pos[b, S - len(p):] = torch.arange(len(p))
        valid[b, S - len(p):] = True
    K = [torch.zeros(B, dec.n_kv, S, dec.head_dim, device=DEV, dtype=torch.bfloat16) for _ in range(dec.n_layers)]
    V = [torch.zeros_like(K[0]) for _ in range(dec.n_layers)]
    with torch.inference_mode():
        ours = dec._forward(ids, pos, K, V, valid, 0)                                 # B,V
        for b, p in enumerate(prompts):
            assert _rel(ours[b], gpu(torch.tensor([p], device=DEV)).logits[0, -1]) < 2e-2
            assert _rel(ours[b], cpu(torch.tensor([p])).logits[0, -1]) < 3e-2
    # float32 on the GPU: the greedy tokens are exactly those of model.generate
    f32 = copy.deepcopy(cpu).to(DEV)
    lora.merge(f32)
    dec = decode.KVDecoder(f32, [tok.eos_token_id], max_new_tokens=10, temperature=0)
    got, _ = dec.generate(prompts)
    for p, toks in zip(prompts, got):
        ref = f32.generate(torch.tensor([p], device=DEV), do_sample=False, max_new_tokens=10,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, len(p):].tolist()
        if tok.eos_token_id in ref:
            ref = ref[:ref.index(tok.eos_token_id) + 1]
        assert toks == ref


def test_cuda_lm_agent_plays_episodes(cfg, pair, monkeypatch):
    _, gpu, tok = pair
    lora.merge(gpu)
    monkeypatch.delenv("EMODISTILL_STATIC_DECODE", raising=False)
    short = dataclasses.replace(cfg, max_turns=6)
    dom = cfg.domains["crad"]
    eps = [ng.new_episode(dom, sc, 0) for sc in domains.make_scenarios(dom)[:4]]
    agent = ng.LMAgent(gpu, tok, short, max_new_tokens=8, batch_size=4)
    ng.run_episodes(short, eps, agent, ng.SimCounterparty(cfg), ng.random_emotion_policy())
    assert all(ep.done for ep in eps) and agent.generated_tokens > 0
    assert agent.kv_cache and agent.reused_tokens > 0
    # the default decoder is the eager one; EMODISTILL_STATIC_DECODE=1 replays CUDA graphs there
    assert not agent.decoder.static and not agent.decoder.graphs
    monkeypatch.setenv("EMODISTILL_STATIC_DECODE", "1")
    eps = [ng.new_episode(dom, sc, 0) for sc in domains.make_scenarios(dom)[:4]]
    agent = ng.LMAgent(gpu, tok, short, max_new_tokens=8, batch_size=4)
    ng.run_episodes(short, eps, agent, ng.SimCounterparty(cfg), ng.random_emotion_policy())
    assert all(ep.done for ep in eps) and agent.decoder.static and agent.decoder.graphs == (DEV == "cuda")
    if DEV == "cuda":
        assert agent.decoder.graph_captures > 0 and agent.decoder.decode_steps > 0


# -- the static decoding step in CUDA graphs (decode.py) against the eager step -------------


def _decoders(model, ends, **kw):
    """The eager decoder and the static one, with graphs where CUDA is (EMODISTILL_TEST_DEVICE=cpu:
    without), each recording the logits it samples from."""
    eager = decode.KVDecoder(model, ends, static=False, **kw)
    static = decode.KVDecoder(model, ends, static=True, graphs=DEV == "cuda", **kw)
    return eager, static, record_logits(eager), record_logits(static)


def test_cuda_graph_decoder_matches_the_eager_step_float32(pair):
    """float32 on the GPU, LoRA unmerged: the CUDA-graph decoder gives the eager decoder's
    greedy tokens and caches, and its logits within float32 rounding, over two turns (the second
    reusing the caches) with rows that end early; a repeated call replays the graphs it has."""
    cpu, _, tok = pair
    f32 = copy.deepcopy(cpu).to(DEV)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in (4, 9, 15, 6, 11, 3, 20, 7, 5)]
    alone = decode.KVDecoder(f32, [tok.eos_token_id], max_new_tokens=10, temperature=0, static=False)
    full, _ = alone.generate(prompts)
    ends = sorted({full[0][1], full[1][2], full[2][0], full[3][4], full[4][1]})       # most rows stop early
    eager, static, seen_e, seen_s = _decoders(f32, ends, max_new_tokens=10, temperature=0)
    te, ce = eager.generate(prompts)
    ts, cs = static.generate(prompts)
    assert ts == te and sum(len(t) < 10 for t in ts) >= 5
    second = [p + t + [5, 6, 7] for p, t in zip(prompts, ts)]
    te2, ce2 = eager.generate(second, ce)
    ts2, cs2 = static.generate(second, cs)
    assert ts2 == te2
    for a, b in zip(cs + cs2, ce + ce2):
        assert a.ids == b.ids
        torch.testing.assert_close(a.kv, b.kv, atol=1e-4, rtol=1e-4)
    assert len(seen_s) == len(seen_e)
    for a, b in zip(seen_s, seen_e):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    if DEV == "cuda":
        captured = static.graph_captures
        assert captured > 0
        assert static.generate(second, cs)[0] == ts2 and static.graph_captures == captured   # replayed, not recaptured


def test_cuda_graph_decoder_samples_like_the_eager_step(pair):
    """Sampling from the same CUDA generator seed: the same tokens, float32."""
    cpu, _, tok = pair
    f32 = copy.deepcopy(cpu).to(DEV)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in (6, 13, 2, 9, 30)]
    eager, static, _, _ = _decoders(f32, [tok.eos_token_id], max_new_tokens=16, temperature=0.9, top_p=0.9)
    te, _ = eager.generate(prompts, generator=torch.Generator(device=DEV).manual_seed(7))
    ts, _ = static.generate(prompts, generator=torch.Generator(device=DEV).manual_seed(7))
    assert ts == te


def test_cuda_graph_decoder_bf16_and_lora_merge(pair):
    """bf16 with an unmerged LoRA adapter: the graphs replay exactly what the static step
    computes without them (same tokens), the first decoding step's logits are the eager
    step's within bf16 rounding, and merging the adapter afterwards drops the captured graphs
    (captured with the adapter's own path) instead of replaying them."""
    _, gpu, tok = pair
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in (5, 17, 11, 8)]
    eager, static, seen_e, seen_s = _decoders(gpu, [tok.eos_token_id], max_new_tokens=12, temperature=0)
    plain = decode.KVDecoder(gpu, [tok.eos_token_id], max_new_tokens=12, temperature=0, static=True, graphs=False)
    ts, _ = static.generate(prompts)
    assert ts == plain.generate(prompts)[0]
    eager.generate(prompts)
    assert _rel(seen_s[1], seen_e[1]) < 2e-2
    lora.merge(gpu)
    captured = static.graph_captures
    merged = decode.KVDecoder(gpu, [tok.eos_token_id], max_new_tokens=12, temperature=0, static=True, graphs=False)
    assert static.generate(prompts)[0] == merged.generate(prompts)[0]
    if DEV == "cuda":
        assert static.graph_captures > captured


def test_cuda_sft_lowers_the_loss_and_keeps_the_base(tiny_lm):
    model, tok = copy.deepcopy(tiny_lm[0]), tiny_lm[1]
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(25)
    model = model.to(DEV, torch.bfloat16)
    lora.inject(model, r=4, alpha=8, dropout=0.0)
    base = {n: p.clone() for n, p in model.named_parameters() if "lora_" not in n}
    exs = _examples(tok)
    cfg = lora.SFTConfig(r=4, alpha=8, lr=1e-2, epochs=8, batch_size=4, heldout_frac=0.0, eval_every=100)
    before = lora.heldout_loss(model, exs, tok.pad_token_id, cfg)
    lora.train_sft(model, exs, tok.pad_token_id, cfg, log=lambda *_: None)
    after = lora.heldout_loss(model, exs, tok.pad_token_id, cfg)
    assert after < before - 3.0, (before, after)     # the CPU float32 test: 17.7 -> 10.7 nats
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n]), n


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_cuda_jpo_step_moves_likelihood_with_the_advantage(pair, sign):
    _, gpu, tok = pair
    batch = {k: v.to(DEV) for k, v in lora.collate(_examples(tok, 1), tok.pad_token_id).items()}
    with torch.no_grad(), lora.autocast_for(gpu):
        ref, mask = lora.token_logprobs(gpu, batch)
        ref = ref.float()
    before = (ref * mask).sum().item()
    params = lora.trainable_parameters(gpu)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-3)
    row = jpo.jpo_step(gpu, opt, [batch], [ref], [torch.tensor([sign], device=DEV)], jpo.JPOConfig())
    assert row["ratio"] == pytest.approx(1.0, abs=1e-3)
    with torch.no_grad(), lora.autocast_for(gpu):
        after = (lora.token_logprobs(gpu, batch)[0] * mask).sum().item()
    assert (after - before) * sign > 0, (before, after)
