"""decode.KVDecoder, the hand-written Llama forward with a key/value cache kept across turns,
checked against Hugging Face: same logits, same greedy tokens as `generate`, and reusing the
cache of a previous turn gives exactly what recomputing the whole prompt gives."""
import dataclasses

import pytest
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
