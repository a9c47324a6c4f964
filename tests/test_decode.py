"""decode.KVDecoder, the hand-written Llama forward with a key/value cache kept across turns,
checked against Hugging Face: same logits, same greedy tokens as `generate`, and reusing the
cache of a previous turn gives exactly what recomputing the whole prompt gives."""
import dataclasses

import pytest
from conftest import record_logits
import torch

import decode
import domains
import negotiate as ng


@pytest.fixture(scope="module")
def model(tiny_lm):
    return tiny_lm[0]


def _prompts(tok, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in lengths]


def test_prefill_logits_match_hf_forward(model, tiny_lm):
    tok = tiny_lm[1]
    prompts = _prompts(tok, [5, 17, 11])
    dec = decode.KVDecoder(model, [tok.eos_token_id], max_new_tokens=1, temperature=0)
    B, S = len(prompts), max(map(len, prompts))
    ids = torch.zeros(B, S, dtype=torch.long)
    pos = torch.zeros(B, S, dtype=torch.long)
    valid = torch.zeros(B, S, dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, S - len(p):] = torch.tensor(p)
        pos[b, S - len(p):] = torch.arange(len(p))
        valid[b, S - len(p):] = True
    K = [torch.zeros(B, dec.n_kv, S, dec.head_dim) for _ in range(dec.n_layers)]
    V = [torch.zeros_like(K[0]) for _ in range(dec.n_layers)]
    with torch.inference_mode():
        ours = dec._forward(ids, pos, K, V, valid, 0)
        for b, p in enumerate(prompts):
            ref = model(torch.tensor([p])).logits[0, -1]
            torch.testing.assert_close(ours[b], ref, atol=1e-4, rtol=1e-4)


def test_greedy_tokens_match_hf_generate(model, tiny_lm):
    tok = tiny_lm[1]
    prompts = _prompts(tok, [4, 9, 15, 6], seed=1)
    dec = decode.KVDecoder(model, [tok.eos_token_id], max_new_tokens=12, temperature=0)
    ours, caches = dec.generate(prompts)
    for p, got in zip(prompts, ours):
        ref = model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=12,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, len(p):].tolist()
        if tok.eos_token_id in ref:
            ref = ref[:ref.index(tok.eos_token_id) + 1]
        assert got == ref
    for p, got, c in zip(prompts, ours, caches):
        assert c.ids == (p + got)[:c.kv.shape[3]] and c.kv.shape[:3] == (dec.n_layers, 2, dec.n_kv)


def test_reusing_the_cache_equals_recomputing(model, tiny_lm):
    tok = tiny_lm[1]
    first = _prompts(tok, [7, 20, 3], seed=2)
    dec = decode.KVDecoder(model, [tok.eos_token_id], max_new_tokens=6, temperature=0)
    gen1, caches = dec.generate(first)
    extra = _prompts(tok, [5, 2, 9], seed=3)
    second = [p + g + e for p, g, e in zip(first, gen1, extra)]      # the next turn's prompts
    fresh = decode.KVDecoder(model, [tok.eos_token_id], max_new_tokens=6, temperature=0)
    want, _ = fresh.generate(second)
    dec.prefilled_tokens = dec.reused_tokens = 0
    got, _ = dec.generate(second, caches)
    assert got == want
    assert dec.reused_tokens >= sum(len(p) + len(g) - 1 for p, g in zip(first, gen1))
    assert dec.prefilled_tokens < sum(map(len, second)) / 2
    # a cache whose tokens diverge from the new prompt is only used up to the common prefix
    changed = [[p[0] + 1 if p[0] + 1 < len(tok) else 3] + p[1:] for p in second]
    got2, _ = dec.generate(changed, caches)
    want2, _ = fresh.generate(changed)
    assert got2 == want2


def test_sampling_is_reproducible_and_respects_top_p(model, tiny_lm):
    tok = tiny_lm[1]
    prompts = _prompts(tok, [6, 6], seed=4)
    dec = decode.KVDecoder(model, [tok.eos_token_id], max_new_tokens=10, temperature=0.7, top_p=0.9)
    a, _ = dec.generate(prompts, generator=torch.Generator().manual_seed(5))
    b, _ = dec.generate(prompts, generator=torch.Generator().manual_seed(5))
    assert a == b
    # top_p -> 0 keeps only the most likely token: sampling becomes greedy
    dec.top_p = 1e-6
    greedy = decode.KVDecoder(model, [tok.eos_token_id], max_new_tokens=10, temperature=0)
    assert dec.generate(prompts, generator=torch.Generator().manual_seed(9))[0] == greedy.generate(prompts)[0]


def test_lm_agent_with_cache_plays_like_without(cfg, tiny_lm):
    """Whole episodes, greedy: the cached decoder and `model.generate` say the same things."""
    model, tok = tiny_lm
    short = dataclasses.replace(cfg, max_turns=10)
    runs = []
    for kv in (True, False):
        dom = cfg.domains["disaster"]
        eps = [ng.new_episode(dom, sc, 0) for sc in domains.make_scenarios(dom)[:3]]
        agent = ng.LMAgent(model, tok, short, temperature=0, max_new_tokens=8, kv_cache=kv, batch_size=2)
        ng.run_episodes(short, eps, agent, ng.SimCounterparty(cfg), ng.random_emotion_policy())
        runs.append([[t["text"] for t in ep.turns] for ep in eps])
        if kv:
            # later turns reuse the cached system prompt (the compact state prompt changes below it)
            assert agent.reused_tokens > 0.5 * agent.prompt_tokens
            assert all(not any(k.startswith("kv:") for k in ep.private) for ep in eps)  # freed
    assert runs[0] == runs[1]


def test_rows_that_end_early_are_dropped_and_keep_exact_caches(model, tiny_lm):
    """End tokens chosen so that most rows stop early: the finished rows leave the batch, and
    every row's tokens and cache are still what it would get decoding alone."""
    tok = tiny_lm[1]
    prompts = _prompts(tok, [4, 9, 15, 6, 11], seed=6)
    free = decode.KVDecoder(model, [tok.eos_token_id], max_new_tokens=10, temperature=0)
    full, _ = free.generate(prompts)
    ends = sorted({full[0][1], full[1][2], full[2][0]})                # rows 0-2 stop within 3 tokens
    dec = decode.KVDecoder(model, ends, max_new_tokens=10, temperature=0)
    got, caches = dec.generate(prompts)
    assert sum(len(g) < 10 for g in got) >= 3
    assert dec.decoded_tokens == sum(map(len, got))
    for p, g, c in zip(prompts, got, caches):
        alone, (c1,) = decode.KVDecoder(model, ends, max_new_tokens=10, temperature=0).generate([p])
        assert g == alone[0]
        assert c.ids == c1.ids == (p + g)[:len(p) + len(g) - 1]
        torch.testing.assert_close(c.kv, c1.kv, atol=1e-5, rtol=1e-4)
    # the next turn reuses those caches and matches recomputing from scratch
    second = [p + g + [5, 6] for p, g in zip(prompts, got)]
    want, _ = decode.KVDecoder(model, ends, max_new_tokens=10, temperature=0).generate(second)
    assert dec.generate(second, caches)[0] == want


def test_prefill_chunks_are_the_cheapest_split():
    import itertools
    for lengths in ([1], [5, 5, 5], [3, 4, 60, 61, 200], [10, 11, 12, 90, 95, 400, 401]):
        chunks = decode.prefill_chunks(lengths, overhead=20)
        assert chunks[0][0] == 0 and chunks[-1][1] == len(lengths)
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
        cost = sum((b - a) * lengths[b - 1] + 20 for a, b in chunks)
        for k in range(len(lengths)):                               # every split with k cuts
            for cuts in itertools.combinations(range(1, len(lengths)), k):
                edges = [0, *cuts, len(lengths)]
                assert cost <= sum((b - a) * lengths[b - 1] + 20 for a, b in zip(edges, edges[1:]))
    assert decode.prefill_chunks([3, 4, 60, 61, 200], overhead=20) == [(0, 2), (2, 4), (4, 5)]


def test_prefill_in_chunks_equals_one_pass(model, tiny_lm):
    """Rows with very different new-token counts, some with a cache: prefilled in one padded
    pass or one chunk per row, the greedy tokens and the caches are the same."""
    tok = tiny_lm[1]
    first = _prompts(tok, [7, 30, 3, 12], seed=4)
    base = decode.KVDecoder(model, [tok.eos_token_id], max_new_tokens=5, temperature=0)
    _, caches = base.generate(first)
    later = [p + x for p, x in zip(first, _prompts(tok, [2, 40, 9, 1], seed=5))]
    later = [later[0], later[1], later[2], later[3], _prompts(tok, [25], seed=6)[0]]
    caches = caches + [None]
    results = []
    for overhead in (10 ** 9, 0):
        dec = decode.KVDecoder(model, [tok.eos_token_id], max_new_tokens=5, temperature=0)
        dec.prefill_overhead = overhead
        results.append(dec.generate(later, caches))
    (t1, c1), (t2, c2) = results
    assert t1 == t2
    for a, b in zip(c1, c2):
        assert a.ids == b.ids
        torch.testing.assert_close(a.kv, b.kv, atol=1e-5, rtol=1e-5)
    alone = decode.KVDecoder(model, [tok.eos_token_id], max_new_tokens=5, temperature=0)
    for p, got in zip(later, t2):                        # and each is what decoding alone gives
        assert alone.generate([p])[0][0] == got


# -- the static decoding step (decode.py's module docstring): on CUDA it is captured in graphs;
# on the CPU the same step runs without them, and here it is checked against the default step


def _same_calls(model, ends, calls, atol=1e-5, **kw):
    """Run the same calls (prompts, seed or None) through a static and a default decoder, each
    call reusing its own decoder's caches of the previous call: same tokens, cache ids, counts,
    keys/values and, step by step, logits."""
    static = decode.KVDecoder(model, ends, static=True, **kw)
    eager = decode.KVDecoder(model, ends, static=False, **kw)
    assert static.static and not static.graphs and not eager.static
    seen_s, seen_e = record_logits(static), record_logits(eager)
    cs = ce = None
    for prompts, seed in calls:
        gs = torch.Generator().manual_seed(seed) if seed is not None else None
        ge = torch.Generator().manual_seed(seed) if seed is not None else None
        ts, cs = static.generate(prompts, cs if cs and len(cs) == len(prompts) else None, gs)
        te, ce = eager.generate(prompts, ce if ce and len(ce) == len(prompts) else None, ge)
        assert ts == te
        for a, b in zip(cs, ce):
            assert a.ids == b.ids
            torch.testing.assert_close(a.kv, b.kv, atol=atol, rtol=1e-4)
    assert len(seen_s) == len(seen_e)
    for a, b in zip(seen_s, seen_e):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)
    for k in ("decoded_tokens", "decode_steps", "prefilled_tokens", "reused_tokens"):
        assert getattr(static, k) == getattr(eager, k), k
    return static, ts


def test_static_step_matches_the_default_step(model, tiny_lm):
    """Greedy, with rows that end early (dropped from the batch) and a second turn that reuses
    the caches: the same tokens, caches and logits as the default decoder."""
    tok = tiny_lm[1]
    prompts = _prompts(tok, [4, 9, 15, 6, 11, 3, 20, 7, 5], seed=6)
    full, _ = decode.KVDecoder(model, [tok.eos_token_id], max_new_tokens=10, temperature=0).generate(prompts)
    ends = sorted({full[0][1], full[1][2], full[2][0], full[3][4], full[4][1]})      # most rows stop early
    first = (prompts, None)
    static, got = _same_calls(model, ends, [first], max_new_tokens=10, temperature=0)
    assert sum(len(g) < 10 for g in got) >= 5
    second = ([p + g + e for p, g, e in zip(prompts, got, _prompts(tok, [3, 1, 8, 2, 5, 9, 1, 4, 6], seed=7))], None)
    _same_calls(model, ends, [first, second], max_new_tokens=10, temperature=0)
    # padding rows: 9 prompts run as row_bucket(9) = 12 rows, and 4 rows still going as 4
    assert static._buf.kv.shape[2] == decode.row_bucket(9) == 12


def test_static_step_without_grouped_heads(tiny_lm):
    """A model with as many key/value heads as query heads (no grouped-query attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(1)
    conf = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
    mha = LlamaForCausalLM(conf).eval()
    prompts = _prompts_from_vocab(512, [7, 3, 16], seed=10)
    _same_calls(mha, [2], [(prompts, 2), ([p + [9, 8] for p in prompts], 3)], max_new_tokens=9, temperature=0.8)


def test_static_step_samples_like_the_default_step(model, tiny_lm):
    """Sampling (temperature, top-k, top-p) from the same seed: the same tokens."""
    tok = tiny_lm[1]
    prompts = _prompts(tok, [6, 13, 2, 9], seed=8)
    calls = [(prompts, 11), ([p + [5, 6, 7] for p in prompts], 12)]
    _same_calls(model, [tok.eos_token_id], calls, max_new_tokens=12, temperature=0.9, top_p=0.9)


def test_static_buffers_grow_and_are_reused(model, tiny_lm):
    """Calls of growing batch and length reallocate the buffers (rows bucketed, columns in
    multiples of STATIC_GROW); a smaller call after them reuses them; every call decodes as the
    default decoder does."""
    tok = tiny_lm[1]
    dec = decode.KVDecoder(model, [tok.eos_token_id], max_new_tokens=6, temperature=0, static=True)
    ref = decode.KVDecoder(model, [tok.eos_token_id], max_new_tokens=6, temperature=0, static=False)
    shapes = []
    for lengths in ([5, 8], [30, 4, 9, 12, 7], [600, 3, 40], [6]):
        prompts = _prompts(tok, lengths, seed=len(lengths))
        assert dec.generate(prompts)[0] == ref.generate(prompts)[0]
        shapes.append((tuple(dec._buf.kv.shape[2::2]), dec._buf.kv.data_ptr()))
    assert [s for s, _ in shapes] == [(2, 512), (8, 512), (8, 1024), (8, 1024)]
    assert shapes[3][1] == shapes[2][1]


def test_static_step_with_unmerged_lora(model):
    """LoRA layers left unmerged (their own path in every projection) work in the static step,
    and merging them later is seen by the next call."""
    import copy

    import lora
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.get_input_embeddings().weight.mul_(25)                   # logits that differ between tokens
    torch.manual_seed(0)
    lora.inject(m, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for mod in lora.lora_modules(m).values():
            mod.lora_B.weight.normal_(0, 0.05)
    m.eval()
    tok_ids = _prompts_from_vocab(m.config.vocab_size, [5, 12, 8], seed=9)
    static, _ = _same_calls(m, [2], [(tok_ids, None)], max_new_tokens=8, temperature=0)
    off = copy.deepcopy(m)
    for mod in lora.lora_modules(off).values():
        mod.lora_B.weight.data.zero_()
    off_dec = decode.KVDecoder(off, [2], max_new_tokens=8, temperature=0, static=True)
    with_lora, seen_off = record_logits(static), record_logits(off_dec)
    static.generate(tok_ids)
    off_dec.generate(tok_ids)
    assert (with_lora[1] - seen_off[1]).abs().max() > 1e-2          # the adapter is in the decoding step
    lora.merge(m)
    merged = decode.KVDecoder(m, [2], max_new_tokens=8, temperature=0, static=False)
    seen_m = record_logits(merged)
    with_lora.clear()
    assert static.generate(tok_ids)[0] == merged.generate(tok_ids)[0]
    for a, b in zip(with_lora, seen_m):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def _prompts_from_vocab(vocab, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def test_static_is_off_by_default_on_cpu_and_plays_episodes_alike(cfg, tiny_lm, monkeypatch):
    """The CPU default stays the default step; EMODISTILL_STATIC_DECODE=1 switches LMAgent's
    decoder to the static one, which plays the same episodes (greedy)."""
    model, tok = tiny_lm
    monkeypatch.delenv("EMODISTILL_STATIC_DECODE", raising=False)
    assert not decode.KVDecoder(model, [tok.eos_token_id]).static
    with pytest.raises(ValueError):
        decode.KVDecoder(model, [tok.eos_token_id], static=True, graphs=True)     # graphs need CUDA
    short = dataclasses.replace(cfg, max_turns=8)
    runs = []
    for env in ("0", "1"):
        monkeypatch.setenv("EMODISTILL_STATIC_DECODE", env)
        dom = cfg.domains["crad"]
        eps = [ng.new_episode(dom, sc, 0) for sc in domains.make_scenarios(dom)[:3]]
        agent = ng.LMAgent(model, tok, short, temperature=0, max_new_tokens=8, batch_size=3)
        assert agent.decoder.static == (env == "1")
        ng.run_episodes(short, eps, agent, ng.SimCounterparty(cfg), ng.random_emotion_policy())
        runs.append([[t["text"] for t in ep.turns] for ep in eps])
    assert runs[0] == runs[1]


def test_row_buckets():
    assert [decode.row_bucket(n) for n in (1, 2, 3, 5, 8, 9, 12, 13, 17, 25, 33, 64, 65, 97, 128, 129, 256)] == \
        [1, 2, 4, 8, 8, 12, 12, 16, 24, 32, 48, 64, 96, 128, 128, 192, 256]
    assert all(decode.row_bucket(n) >= n and decode.row_bucket(n) * 2 <= 3 * n + 2 for n in range(1, 600))
