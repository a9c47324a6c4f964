"""The paper's SFT on the top-K% advantage turns: the response-only mask on the real chat
template, the training prompt equals the inference prompt, the loss pieces, turn selection by
advantage, and exact resumption after a kill."""
import copy
import dataclasses
import math

import pytest
import torch

import domains
import emodistill
import lora
import negotiate as ng
from conftest import Killed


def _played(cfg, model, tok, emotion_free, n=2, max_turns=6):
    """Episodes played by an LMAgent, with every prompt it rendered recorded per episode."""
    dom = cfg.domains["hospital"]
    eps = [ng.new_episode(dom, sc, 0) for sc in domains.make_scenarios(dom)[:n]]
    short = dataclasses.replace(cfg, max_turns=max_turns)
    agent = ng.LMAgent(model, tok, short, max_new_tokens=6, emotion_free=emotion_free)
    seen = {ep.key: [] for ep in eps}
    render = agent.prompts

    def recording(eps_, emotions):
        texts = render(eps_, emotions)
        for ep, t in zip(eps_, texts):
            seen[ep.key].append((ep.t, t))
        return texts

    agent.prompts = recording
    ng.run_episodes(short, eps, agent, ng.SimCounterparty(cfg), None if emotion_free else ng.random_emotion_policy())
    return eps, seen, short


@pytest.mark.parametrize("emotion_free", [False, True])
def test_training_prompt_is_the_inference_prompt(cfg, tiny_lm, emotion_free):
    model, tok = tiny_lm
    eps, seen, short = _played(cfg, model, tok, emotion_free)
    for ep in eps:
        rec = ng.to_record(ep)
        assert len(seen[ep.key]) >= 2
        for t, text in seen[ep.key]:
            assert rec["turns"][t]["speaker"] == "focal"
            assert ("Emotional approach" in text) != emotion_free
            assert emodistill.sft_prompt(short, tok, rec, t, emotion_free) == text


def test_response_mask_covers_exactly_the_response_on_the_real_template(cfg, smollm2):
    _, tok = smollm2
    dom = cfg.domains["student"]
    ep = ng.new_episode(dom, domains.make_scenarios(dom)[3], 0)
    ng.run_episodes(dataclasses.replace(cfg, max_turns=5), [ep], ng.SimTeacher(cfg),
                    ng.SimCounterparty(cfg), ng.random_emotion_policy())
    rec = ng.to_record(ep)
    t = 4
    response = rec["turns"][t]["text"]
    prompt = emodistill.sft_prompt(cfg, tok, rec, t)
    ex = lora.encode_example(tok, prompt, response)
    # the ids are the tokenised full conversation as the chat template writes it
    msgs = ng.build_messages(cfg, ng.episode_from_record(cfg, rec, t), "focal", rec["turns"][t]["emotion"],
                             move=rec["turns"][t]["plan"])
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": response}], tokenize=False)
    assert full.startswith(tok.decode(ex["input_ids"]))
    assert full[len(tok.decode(ex["input_ids"])):].strip() == ""
    # and the labelled tokens are exactly the response and the end-of-turn token
    labelled = [x for x in ex["labels"] if x != -100]
    assert tok.decode(labelled) == response + "<|im_end|>"
    k = ex["labels"].index(labelled[0])
    assert all(x == -100 for x in ex["labels"][:k]) and ex["labels"][k:] == ex["input_ids"][k:]
    assert tok.decode(ex["input_ids"][:k]).endswith("<|im_start|>assistant\n")


def test_response_only_logprobs_equal_full_logits(tiny_lm):
    model, tok = tiny_lm
    exs = [lora.encode_example(tok, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "In 30 days."),
           lora.encode_example(tok, "<|im_start|>user\nA longer prompt here<|im_end|>\n<|im_start|>assistant\n", "No.")]
    b = lora.collate(exs, tok.pad_token_id)
    assert b["input_ids"].shape[0] == 2 and (b["labels"] != -100).sum() == sum(
        sum(x != -100 for x in e["labels"]) for e in exs)
    with torch.no_grad():
        lp, mask = lora.token_logprobs(model, b)
        full = torch.log_softmax(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, -1)
    tgt = b["labels"][:, 1:]
    ref = torch.gather(full[:, :-1], 2, tgt.clamp(min=0)[..., None]).squeeze(-1) * (tgt != -100)
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(mask, tgt != -100)


def test_left_padded_batch_keeps_its_mask(tiny_lm):
    """token_logprobs drops the attention mask only for right padding (pads after the text);
    with pads on the left the mask must stay, or the real tokens would attend to pads."""
    model, tok = tiny_lm
    exs = [lora.encode_example(tok, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "In 30 days."),
           lora.encode_example(tok, "<|im_start|>user\nA longer prompt here<|im_end|>\n<|im_start|>assistant\n", "No.")]
    right = lora.collate(exs, tok.pad_token_id)
    assert right["attention_mask"].min() == 0                     # the batch really is padded
    left = {k: torch.stack([torch.cat([r[m == 0], r[m == 1]]) for r, m in zip(v, right["attention_mask"])])
            for k, v in right.items() if k != "attention_mask"}
    left["attention_mask"] = torch.stack([torch.cat([m[m == 0], m[m == 1]]) for m in right["attention_mask"]])
    with torch.no_grad():
        lp_r, mask_r = lora.token_logprobs(model, right)
        lp_l, mask_l = lora.token_logprobs(model, left)
        unmasked = dict(left, attention_mask=torch.ones_like(left["attention_mask"]))
        lp_u, _ = lora.token_logprobs(model, unmasked)
    # the same tokens get the same log-probs however the row is padded (the short row's
    # log-probs move with its padding; compare them as per-row sums) ...
    torch.testing.assert_close((lp_r * mask_r).sum(1), (lp_l * mask_l).sum(1), atol=1e-5, rtol=1e-5)
    # ... and that is not true without the mask: the left pads would be attended to
    assert not torch.allclose((lp_u * mask_l).sum(1), (lp_l * mask_l).sum(1), atol=1e-4)


def test_lr_schedule_warms_up_then_decays_to_zero():
    lrs = [lora.lr_at(s, 10, 2, 1.0) for s in range(10)]
    assert lrs[:2] == [0.5, 1.0]
    assert lrs[2] == pytest.approx(1.0) and all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert lora.lr_at(10, 10, 2, 1.0) == pytest.approx(0.0)
    assert lora.lr_at(6, 10, 2, 1.0) == pytest.approx(0.5)       # half-way through the cosine


def test_select_sft_turns_is_top_k_per_domain():
    recs = [{"domain": d, "turns": [{"emotion": None}] * 4} for d in ("a", "a", "b")]
    where = [(0, 1), (0, 3), (1, 1), (1, 3), (2, 1), (2, 3)]
    adv = [0.1, 0.9, 0.5, -1.0, 2.0, 3.0]
    picked = lora.select_sft_turns(recs, adv, where, top_k=50, max_examples=0, seed=0)
    assert sorted((ri, ti) for ri, ti, _ in picked) == [(0, 3), (1, 1), (2, 3)]
    assert {(ri, ti): a for ri, ti, a in picked} == {(0, 3): 0.9, (1, 1): 0.5, (2, 3): 3.0}
    capped = lora.select_sft_turns(recs, adv, where, top_k=100, max_examples=2, seed=0)
    assert sorted(recs[ri]["domain"] for ri, _, _ in capped) == ["a", "b"]


def test_select_sft_turns_keeps_accept_turns_to_their_share():
    """Deal-closing accept turns carry the outcome in their advantage; ranked with the offer
    turns they would fill the set, and the student would say "Agreed" when told to offer."""
    turns = [{"speaker": "focal", "emotion": "joy", "plan": {"move": "accept" if i % 10 == 0 else "offer"}}
             for i in range(200)]
    recs = [{"domain": "a", "turns": turns}]
    where = [(0, i) for i in range(200)]
    adv = [5.0 + i / 100 if t["plan"]["move"] == "accept" else i / 1000 for i, t in enumerate(turns)]
    plain = lora.select_sft_turns(recs, adv, where, top_k=20, max_examples=40, seed=0, min_per_emotion=0,
                                  min_move_share=0)
    moves = [turns[ti]["plan"]["move"] for _, ti, _ in plain]
    assert len(plain) == 40 and moves.count("accept") == 4           # 10% of the turns, 10% of the set
    # within a stratum still the best by advantage: the offer turns kept are the top 20% of offers
    offers = sorted(a for _, ti, a in plain if turns[ti]["plan"]["move"] == "offer")
    assert min(offers) >= sorted(a for a, t in zip(adv, turns) if t["plan"]["move"] == "offer")[-36]


def test_select_sft_turns_gives_a_rare_move_its_minimum_share():
    """Accept turns are rare in the corpus (~2%): at their plain share the student saw too few
    to learn to accept. With min_move_share each move gets at least that share of the cap
    (8 of 40 here), the rest in proportion to the turns left ([12, 172] -> 2 and 22), filled
    with its best turns; without a cap, that share of the domain's top K."""
    turns = [{"speaker": "focal", "emotion": "joy", "plan": {"move": "accept" if i % 10 == 0 else "offer"}}
             for i in range(200)]
    recs = [{"domain": "a", "turns": turns}]
    where = [(0, i) for i in range(200)]
    adv = [i / 1000 for i in range(200)]              # accept turns no better than the offers around them
    picked = lora.select_sft_turns(recs, adv, where, top_k=20, max_examples=40, seed=0, min_per_emotion=0,
                                   min_move_share=0.2)
    acc = sorted(ti for _, ti, _ in picked if turns[ti]["plan"]["move"] == "accept")
    assert len(picked) == 40 and len(acc) == 10
    assert acc == list(range(100, 200, 10))            # the 10 best accept turns
    assert lora.move_caps(40, [20, 180], 0.2) == [10, 30]
    assert lora.move_caps(40, [3, 180], 0.2) == [3, 37]   # a move with fewer turns than its share: all of them
    uncapped = lora.select_sft_turns(recs, adv, where, top_k=20, max_examples=0, seed=0, min_per_emotion=0,
                                     min_move_share=0.2)
    n_acc = sum(turns[ti]["plan"]["move"] == "accept" for _, ti, _ in uncapped)
    assert n_acc == 8 and len(uncapped) == 36 + 8     # ceil(0.2 x (4 + 36)) accept turns, 36 offers


def _corpus(spec, turns_per_record=3):
    """records, adv, where for select_sft_turns from {domain: [(emotion, advantage), ...]}:
    every turn its own (record, turn) place, a few turns per record."""
    records, adv, where = [], [], []
    for d, turns in spec.items():
        for s in range(0, len(turns), turns_per_record):
            chunk = turns[s:s + turns_per_record]
            records.append({"domain": d, "turns": [{"speaker": "focal", "emotion": e} for e, _ in chunk]})
            for ti, (_, a) in enumerate(chunk):
                where.append((len(records) - 1, ti))
                adv.append(a)
    return records, adv, where


def _by(records, picked, domain=None):
    """{(domain, emotion): sorted advantages} of the picked turns."""
    out = {}
    for ri, ti, a in picked:
        d = records[ri]["domain"]
        if domain is None or d == domain:
            out.setdefault((d, records[ri]["turns"][ti]["emotion"]), []).append(a)
    return {k: sorted(v, reverse=True) for k, v in out.items()}


def test_select_sft_turns_tops_up_every_emotion_to_its_minimum():
    """An emotion that only appears below the top-K cut still gets its best turns, up to the
    minimum or as many as it has; emotion-free turns get no minimum; the top K stays."""
    turns = [("joy", 10.0 - i / 10) for i in range(20)]               # the whole top 10% is joy
    turns += [("anger", -1.0 - i) for i in range(10)]                 # anger: only below the cut
    turns += [("fear", -50.0 - i) for i in range(3)]                  # fear: the very bottom, 3 turns
    turns += [(None, -100.0 - i) for i in range(5)]                   # emotion-free turns
    turns += [("calm", 0.0 - i / 10) for i in range(162)]             # the bulk, 200 turns in all
    recs, adv, where = _corpus({"a": turns, "b": [(e, a + 1.0) for e, a in turns]})
    picked = lora.select_sft_turns(recs, adv, where, top_k=10, max_examples=0, seed=0, min_per_emotion=4)
    for d, shift in (("a", 0.0), ("b", 1.0)):
        got = _by(recs, picked, d)
        assert got[(d, "joy")] == [10.0 - i / 10 + shift for i in range(20)]      # the top 10% (20 of 200)
        assert got[(d, "anger")] == [-1.0 - i + shift for i in range(4)]          # its 4 best
        assert got[(d, "fear")] == [-50.0 - i + shift for i in range(3)]          # all it has
        assert got[(d, "calm")] == [0.0 - i / 10 + shift for i in range(4)]
        assert (d, None) not in got
    assert len(picked) == 2 * (20 + 4 + 3 + 4)
    # without the minimum: the plain top 10%
    plain = lora.select_sft_turns(recs, adv, where, top_k=10, max_examples=0, seed=0, min_per_emotion=0)
    assert set(_by(recs, plain)) == {("a", "joy"), ("b", "joy")} and len(plain) == 40


def _skewed(domains=("a", "b", "c"), n=400, seed=0):
    """Per domain n turns of 8 emotions; two emotions hold the best advantages, one (rare) is
    seen only 3 times and only at the bottom."""
    g = torch.Generator().manual_seed(seed)
    emos = ["joy", "pride", "anger", "fear", "grief", "relief", "caring", "rare"]
    spec = {}
    for k, d in enumerate(domains):
        a = torch.randn(n, generator=g).tolist()
        turns = []
        for i, x in enumerate(a):
            e = emos[i % 7]
            turns.append((e, x + (3.0 if e in ("joy", "pride") else 0.0) + k))
        turns += [("rare", -10.0 - i) for i in range(3)]
        spec[d] = turns
    return _corpus(spec), emos


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_select_sft_turns_cap_keeps_minimums_and_domain_balance(seed):
    (recs, adv, where), emos = _skewed()
    best = {}                                                         # (domain, emotion) -> all advantages
    for (ri, ti), a in zip(where, adv):
        best.setdefault((recs[ri]["domain"], recs[ri]["turns"][ti]["emotion"]), []).append(a)
    best = {k: sorted(v, reverse=True) for k, v in best.items()}
    uncapped = lora.select_sft_turns(recs, adv, where, top_k=10, max_examples=0, seed=seed, min_per_emotion=4)
    assert len(uncapped) > 3 * 40                                     # so the cap below bites
    picked = lora.select_sft_turns(recs, adv, where, top_k=10, max_examples=120, seed=seed, min_per_emotion=4)
    assert len(picked) == 120 and len({(ri, ti) for ri, ti, _ in picked}) == 120
    assert set((ri, ti, a) for ri, ti, a in picked) <= set(uncapped)  # the cap only drops turns
    got = _by(recs, picked)
    for d in ("a", "b", "c"):
        assert sum(len(v) for (dd, _), v in got.items() if dd == d) == 40       # the same number per domain
        for e in emos:
            want = best[(d, e)][:4]                                   # each emotion's best 4 (rare: its 3)
            assert got[(d, e)][:len(want)] == want, (d, e)


def test_select_sft_turns_cap_below_the_minimums_covers_every_emotion():
    """When the minimums alone exceed the cap, the cap wins and is shared in rounds: every
    emotion's best turn first (8 emotions, a cap of 10: each one, two of them twice)."""
    (recs, adv, where), emos = _skewed()
    picked = lora.select_sft_turns(recs, adv, where, top_k=10, max_examples=30, seed=0, min_per_emotion=4)
    got, every = _by(recs, picked), _by(recs, [(ri, ti, a) for (ri, ti), a in zip(where, adv)])
    assert len(picked) == 30
    for d in ("a", "b", "c"):
        assert sorted(len(got[(d, e)]) for e in emos) == [1] * 6 + [2, 2], d
        for e in emos:
            assert got[(d, e)] == every[(d, e)][:len(got[(d, e)])]     # each emotion's best turns
        twice = {e for e in emos if len(got[(d, e)]) == 2}             # the second round: the best emotions
        assert twice == set(sorted(emos, key=lambda e: -every[(d, e)][0])[:2])


def test_select_sft_turns_is_deterministic_under_the_seed():
    (recs, adv, where), _ = _skewed()
    run = [lora.select_sft_turns(recs, adv, where, 10, 120, s, min_per_emotion=4) for s in (0, 0, 1)]
    assert run[0] == run[1]
    assert set(run[0]) != set(run[2])                                 # the sampled rest moves with the seed
    kept = [{(ri, ti) for ri, ti, _ in r} for r in run]
    assert len(kept[0] & kept[2]) >= 3 * 8 * 4 - 3                    # ... the minimums do not
    shuffled = list(zip(where, adv))[::-1]                            # nor does the corpus order matter
    again = lora.select_sft_turns(recs, [a for _, a in shuffled], [w for w, _ in shuffled], 10, 120, 0,
                                  min_per_emotion=4)
    assert again == run[0]


@pytest.mark.parametrize("n", [10, 11, 19, 25, 30, 64, 99, 256, 257, 1000])
def test_heldout_is_at_least_its_share(n):
    cfg = lora.SFTConfig()
    train, held = lora.split_heldout(list(range(n)), cfg)
    assert len(held) == math.ceil(n * cfg.heldout_frac - 1e-9) and len(held) >= 0.1 * n
    assert sorted(train + held) == list(range(n)) and train == sorted(train)
    assert lora.split_heldout(list(range(n)), cfg) == (train, held)
    assert lora.split_heldout(list(range(n)), dataclasses.replace(cfg, heldout_frac=0.25))[1].__len__() == \
        math.ceil(n / 4)
    if n == 25:
        assert len(held) == 3


def test_heldout_split_is_stratified_and_seeded():
    # 4 domains of 25 examples each, in the order select_sft_turns returns them
    exs = [(d, i) for d in "abcd" for i in range(25)]
    helds = [lora.split_heldout(exs, lora.SFTConfig(seed=s))[1] for s in range(6)]
    for held in helds:
        assert sorted(sum(1 for d, _ in held if d == dd) for dd in "abcd") == [2, 2, 3, 3]
    assert len({tuple(h) for h in helds}) > 1                         # the seed moves the pick
    assert lora.split_heldout(exs[:9], lora.SFTConfig())[1] == []     # too few for a held-out loss
    assert lora.split_heldout(exs, lora.SFTConfig(heldout_frac=0.0))[1] == []
    assert len(lora.split_heldout(exs[:10], lora.SFTConfig(heldout_frac=0.99))[0]) == 1   # one left to train


def _examples(tok, n=12):
    out = []
    for i in range(n):
        p = f"<|im_start|>user\nOffer {i}?<|im_end|>\n<|im_start|>assistant\n"
        out.append(lora.encode_example(tok, p, f"I can do {10 + i} days, and that is firm."))
    return out


def test_sft_lowers_the_loss_and_trains_only_lora(tiny_lm):
    model, tok = copy.deepcopy(tiny_lm[0]), tiny_lm[1]
    with torch.no_grad():   # the random init's tiny embeddings cap how far any logit can move
        model.get_input_embeddings().weight.mul_(25)
    lora.inject(model, r=4, alpha=8, dropout=0.0)
    base = {n: p.clone() for n, p in model.named_parameters() if "lora_" not in n}
    exs = _examples(tok)
    cfg = lora.SFTConfig(r=4, alpha=8, lr=1e-2, epochs=8, batch_size=4, heldout_frac=0.0, eval_every=100)
    before = lora.heldout_loss(model, exs, tok.pad_token_id, cfg)
    stats = lora.train_sft(model, exs, tok.pad_token_id, cfg, log=lambda *_: None)
    after = lora.heldout_loss(model, exs, tok.pad_token_id, cfg)
    assert after < before - 3.0, (before, after)   # measured: 17.7 -> 10.7 nats
    assert stats["step"] == stats["total_steps"] == 24
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n]), n


def test_sft_without_prompt_gradient_lowers_the_loss(tiny_lm):
    model, tok = copy.deepcopy(tiny_lm[0]), tiny_lm[1]
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(25)
    lora.inject(model, r=4, alpha=8, dropout=0.0)
    exs = _examples(tok)
    cfg = lora.SFTConfig(r=4, alpha=8, lr=1e-2, epochs=8, batch_size=4, heldout_frac=0.0, eval_every=100,
                         prompt_grad=False)
    before = lora.heldout_loss(model, exs, tok.pad_token_id, cfg)
    lora.train_sft(model, exs, tok.pad_token_id, cfg, log=lambda *_: None)
    assert lora.heldout_loss(model, exs, tok.pad_token_id, cfg) < before - 3.0


def _lora_model(tiny_lm, layers, targets):
    from transformers import LlamaForCausalLM
    conf = copy.deepcopy(tiny_lm[0].config)
    conf.num_hidden_layers = layers
    torch.manual_seed(1)
    model = LlamaForCausalLM(conf).eval()
    lora.inject(model, targets=targets, r=4, alpha=8, dropout=0.0)
    for m in lora.lora_modules(model).values():              # a trained-looking adapter: B != 0
        torch.nn.init.normal_(m.lora_B.weight, std=0.5)
    return model


def test_response_logprobs_without_prompt_gradient(tiny_lm):
    """Values equal token_logprobs' (an off-by-one at the prompt/response boundary would drop or
    shift a token). Gradients: in one layer with the adapter on q and o only, the prompt's keys
    and values do not depend on the adapter, so leaving the prompt out of autograd changes no
    gradient; with the adapter on v they do, and the gradient must differ (the prompt really is
    cut off)."""
    tok = tiny_lm[1]
    ex = lora.encode_example(tok, "<|im_start|>user\nOffer 34 days, with anger<|im_end|>\n<|im_start|>assistant\n",
                             "I am furious. 34 days.")

    def grads(model, fn):
        model.zero_grad()
        fn(model).backward()
        return torch.cat([p.grad.flatten() for p in lora.trainable_parameters(model)])

    def full(model):
        lp, mask = lora.token_logprobs(model, lora.collate([ex], tok.pad_token_id))
        return lp.sum()

    model = _lora_model(tiny_lm, 2, lora.DEFAULT_TARGETS)
    with torch.no_grad():
        lp, mask = lora.token_logprobs(model, lora.collate([ex], tok.pad_token_id))
        torch.testing.assert_close(lora.response_logprobs(model, ex), lp[mask], atol=1e-5, rtol=1e-5)
    one_layer_qo = _lora_model(tiny_lm, 1, ("q_proj", "o_proj"))
    torch.testing.assert_close(grads(one_layer_qo, lambda m: lora.response_logprobs(m, ex).sum()),
                               grads(one_layer_qo, full), atol=1e-5, rtol=1e-4)
    one_layer_v = _lora_model(tiny_lm, 1, ("v_proj",))
    g_cut, g_full = grads(one_layer_v, lambda m: lora.response_logprobs(m, ex).sum()), grads(one_layer_v, full)
    assert not torch.allclose(g_cut, g_full, atol=1e-4)


def test_sft_evaluates_the_heldout_loss_once_an_epoch_by_default(tiny_lm):
    """eval_every=0: one held-out evaluation an epoch (and at the last step): 20 examples, 2 held
    out, 18 in micro-batches of 4 = 5 a epoch, 2 per step = 3 steps an epoch, 8 steps in all."""
    tok = tiny_lm[1]
    m = copy.deepcopy(tiny_lm[0])
    lora.inject(m, r=4, alpha=8)
    cfg = lora.SFTConfig(r=4, alpha=8, epochs=2.5, batch_size=4, grad_accum=2)
    stats = lora.train_sft(m, _examples(tok, 20), tok.pad_token_id, cfg, log=lambda *_: None)
    assert [row["step"] for row in stats["history"]] == [3, 6, 7]
    m = copy.deepcopy(tiny_lm[0])
    lora.inject(m, r=4, alpha=8)
    stats = lora.train_sft(m, _examples(tok, 20), tok.pad_token_id, dataclasses.replace(cfg, eval_every=2, patience=100),
                           log=lambda *_: None)
    assert [row["step"] for row in stats["history"]] == [2, 4, 6, 7]


def test_sft_resumes_exactly(tiny_lm, tmp_path, kill_after):
    tok = tiny_lm[1]
    exs = _examples(tok, 20)
    cfg = lora.SFTConfig(r=4, alpha=8, dropout=0.1, lr=3e-3, epochs=2, batch_size=4, eval_every=1, patience=100)

    def fresh():
        m = copy.deepcopy(tiny_lm[0])
        torch.manual_seed(0)
        lora.inject(m, r=4, alpha=8, dropout=0.1)
        return m

    a = fresh()
    lora.train_sft(a, exs, tok.pad_token_id, cfg, ckpt=str(tmp_path / "a.pt"), log=lambda *_: None)
    b = fresh()
    ck = str(tmp_path / "b.pt")
    kill_after(3)
    with pytest.raises(Killed):
        lora.train_sft(b, exs, tok.pad_token_id, cfg, ckpt=ck, log=lambda *_: None)
    assert torch.load(ck, weights_only=False)["state"]["step"] == 3
    b = fresh()                                   # a new process: only the checkpoint survives
    lora.train_sft(b, exs, tok.pad_token_id, cfg, ckpt=ck, log=lambda *_: None)
    for (na, ma), (nb, mb) in zip(lora.lora_modules(a).items(), lora.lora_modules(b).items()):
        assert torch.equal(ma.lora_A.weight, mb.lora_A.weight) and torch.equal(ma.lora_B.weight, mb.lora_B.weight)
    with pytest.raises(ValueError, match="other SFT settings"):
        lora.train_sft(fresh(), exs[:-1], tok.pad_token_id, cfg, ckpt=ck, log=lambda *_: None)


def test_sft_jpo_eval_stages_on_a_tiny_model(tmp_path, tiny_lm, capsys, kill_after):
    """collect -> judge -> iql -> sft (both) -> jpo (both) -> eval of every adapter method,
    with a tiny random student saved as a local folder."""
    import json
    import os
    model, tok = tiny_lm
    student = str(tmp_path / "tiny")
    model.save_pretrained(student)
    tok.save_pretrained(student)
    out = str(tmp_path / "run")
    run = emodistill.main
    assert run(["collect", "--out", out, "--scenarios", "0-5", "--seeds-per-scenario", "2"]) == 0
    assert run(["judge", "--out", out]) == 0
    # sft before iql: a clear error
    assert run(["sft", "--out", out, "--student", student]) == 2
    assert "run iql first" in capsys.readouterr().err
    assert run(["iql", "--out", out, "--steps", "20"]) == 0
    small = ["--student", student, "--max-examples", "8", "--epochs", "1", "--batch-size", "4"]
    # killed after one step, then resumed to the end
    kill_after(1)
    with pytest.raises(Killed):
        run(["sft", "--out", out, *small])
    assert not os.path.exists(os.path.join(out, "sft", "adapter_config.json"))
    assert run(["sft", "--out", out, *small]) == 0
    assert "resuming from step" in capsys.readouterr().out
    rows = [json.loads(x) for x in open(os.path.join(out, "sft_data.jsonl"))]
    assert len(rows) == 8 and len({r["domain"] for r in rows}) == 4
    assert len({(r["domain"], r["emotion"]) for r in rows}) == 8     # a cap of 2 per domain: two emotions each
    assert all("Emotional approach" in r["prompt"] for r in rows)
    assert run(["sft", "--out", out, *small, "--emotion-free"]) == 0
    free = [json.loads(x) for x in open(os.path.join(out, "sft-emotion-free_data.jsonl"))]
    assert not any("Emotional approach" in r["prompt"] for r in free)
    jp = ["--student", student, "--states-per-domain", "1", "--group-size", "2", "--epochs", "1",
          "--batch-size", "4", "--max-new-tokens", "8"]
    assert run(["jpo", "--out", out, *jp]) == 0
    assert run(["jpo", "--out", out, *jp, "--emotion-free"]) == 0
    stats = json.load(open(os.path.join(out, "jpo", "train_stats.json")))
    assert stats["history"][0]["ratio"] == 1.0 and stats["history"][0]["approx_kl"] == 0.0
    # a forced redo that dies leaves the stage stale: the next plain run finishes it, not skips it
    kill_after(1)
    with pytest.raises(Killed):
        run(["jpo", "--out", out, *jp, "--force"])
    capsys.readouterr()
    assert run(["jpo", "--out", out, *jp]) == 0
    rerun = capsys.readouterr().out
    assert "is complete; skipping" not in rerun and "resuming from step 1" in rerun
    capsys.readouterr()
    methods = "vanilla,iql,iql+sft,sft-emotion-free,emodistill,jpo-emotion-free"
    assert run(["eval", "--out", out, "--student", student, "--methods", methods, "--domains", "crad",
                "--seeds", "1", "--redrafts", "1", "--max-new-tokens", "8"]) == 0
    # (a random tiny model misses every move and never ends a reply: one rewrite, 8 tokens a reply)
    text = open(os.path.join(out, "results.md")).read()
    for m in methods.split(","):
        assert f"| {m} | 20 |" in text
    assert "offer in range %" in text and "emotion match %" in text
    # a re-run with the same adapters is served from the cache; a changed adapter is re-evaluated
    assert run(["eval", "--out", out, "--student", student, "--methods", "emodistill", "--domains", "crad",
                "--seeds", "1", "--redrafts", "1", "--max-new-tokens", "8"]) == 0
    assert "cached" in capsys.readouterr().out


def test_bench_training_lines_on_a_tiny_model(tmp_path, tiny_lm, capsys):
    """`bench --what sft,jpo` prints the frozen, LoRA, LoRA-without-dropout and JPO step times."""
    model, tok = tiny_lm
    student = str(tmp_path / "tiny")
    model.save_pretrained(student)
    tok.save_pretrained(student)
    assert emodistill.main(["bench", "--model", student, "--what", "sft,jpo", "--train-batch", "2",
                            "--train-len", "40", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    for words in ("no LoRA (frozen)", "our LoRA without its input dropout", "JPO optimiser step (batch 2)",
                  "padded batch (60 of 80 tokens): attention mask passed"):
        assert words in out
