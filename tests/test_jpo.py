"""JPO (the paper's Judge Policy Optimization): the loss pieces against hand-computed values,
group normalisation edge cases, step 0 (ratio 1, KL 0), the direction of one step for either
sign of advantage, and exact resumption after a kill; same-state groups; the re-sample mode
(direction toward the better-scored sample, seeded sampling, exact resume); and the judge of a
re-sampled reply (negotiate.judge_reply)."""
import copy
import functools
import math
from dataclasses import replace

import pytest
import torch

import domains
import jpo
import lora
import negotiate as ng
from conftest import Killed
from offers import detect_accept, detect_walk_away, format_offer


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


# ----------------------------------------------------------------------------------------
# Same-state groups, the re-sample mode, and the judge of a re-sampled reply
# ----------------------------------------------------------------------------------------

def _toy_records():
    """Trajectories of 2 domains x 3 scenarios x 4 seeds; focal turns at 0, 2, 4 (turn 4 only
    in seed 0, so that state has a single judged turn), one unjudged focal turn a domain."""
    recs = []
    for d in ("crad", "student"):
        for sid in range(3):
            for seed in range(4):
                turns = []
                for ti in range(5 if seed == 0 else 4):
                    turns.append({"speaker": "focal", "text": "x", "emotion": "joy", "score": 5.0 + ti}
                                 if ti % 2 == 0 else {"speaker": "counterparty", "text": "y"})
                if sid == 2 and seed == 3:
                    turns[2]["score"] = None
                recs.append({"domain": d, "scenario_id": sid, "seed": seed, "turns": turns})
    return recs


def test_select_jpo_turns_groups_hold_one_state():
    recs = _toy_records()
    picked = jpo.select_jpo_turns(recs, states_per_domain=3, group_size=3, seed=0)
    groups = {}
    for ri, ti, g in picked:
        groups.setdefault(g, []).append((ri, ti))
    assert len(groups) == 6                                 # 3 states in each of 2 domains
    for g, turns in groups.items():
        states = {(recs[ri]["domain"], recs[ri]["scenario_id"], ti) for ri, ti in turns}
        assert len(states) == 1                             # one (domain, scenario, turn index)
        d, sid, ti = states.pop()
        assert g == f"{d}-{sid}-t{ti}" and ti != 4          # turn 4 has one judged turn: never a group
        assert 2 <= len(turns) <= 3 and len({ri for ri, _ in turns}) == len(turns)   # distinct seeds
        assert all(recs[ri]["turns"][t]["score"] is not None for ri, t in turns)
    assert jpo.select_jpo_turns(recs, 3, 3, seed=0) == picked                     # seeded
    everything = jpo.select_jpo_turns(recs, 100, 100, seed=1)
    assert len({g for *_, g in everything}) == 2 * 3 * 2    # every state with >= 2 judged turns
    assert len(everything) == 2 * 3 * 2 * 4 - 2             # ... with all its judged turns
    one = jpo.select_jpo_turns(recs, 100, 1, seed=1, min_group=1)               # the re-sample mode's states
    assert len(one) == 2 * 3 * 3 and len({g for *_, g in one}) == len(one)


def _logp_sum(model, tok, prompt, text):
    batch = lora.collate([lora.encode_example(tok, prompt, text)], tok.pad_token_id)
    with torch.no_grad():
        lp, mask = lora.token_logprobs(model, batch)
    return ((lp * mask).sum() / mask.sum()).item()


def test_resample_mode_moves_the_policy_toward_higher_scored_samples(tiny_lm):
    """A fake sampler offers a good and a bad reply for each state (in a seed-dependent order),
    a fake judge scores them 9 and 2: the good reply's log-likelihood rises relative to the bad."""
    model, tok, _ = _setup(tiny_lm)
    p = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    prompts = [p.format("Your offer?"), p.format("When can you pay?")]
    good, bad = "I can do 30 days.", "Never, go away!"
    calls = []

    def sample(ps, n, seed):
        calls.append((list(ps), n, seed))
        return [[good, bad] if seed % 2 else [bad, good] for _ in ps]

    def score(state, texts):
        return [9.0 if t == good else 2.0 for t in texts]
    gap0 = [_logp_sum(model, tok, q, good) - _logp_sum(model, tok, q, bad) for q in prompts]
    cfg = jpo.JPOConfig(mode="resample", group_size=2, states_per_step=2, epochs=6, lr=3e-3, batch_size=4)
    stats = jpo.train_jpo_resample(model, ["s1", "s2"], prompts, sample, score,
                                   lambda q, t: lora.encode_example(tok, q, t), tok.pad_token_id, cfg,
                                   log=lambda *_: None)
    hist = stats["history"]
    assert len(hist) == stats["total_steps"] == 6 and len(calls) == 6
    assert hist[0]["ratio"] == 1.0 and hist[0]["approx_kl"] == 0.0 and hist[0]["clip_frac"] == 0.0
    assert all(h["score"] == 5.5 and h["adv_nonzero"] == 1.0 for h in hist)     # mean of 9 and 2
    assert all(n == 2 and sorted(ps) == sorted(prompts) for ps, n, _ in calls)
    assert len({s for *_, s in calls}) == 6                                  # a fresh sampling stream each step
    gap1 = [_logp_sum(model, tok, q, good) - _logp_sum(model, tok, q, bad) for q in prompts]
    print("log-likelihood gap good - bad (mean per token) before", gap0, "after", gap1)
    assert all(b - a > 0.1 for a, b in zip(gap0, gap1)), (gap0, gap1)
    assert hist[-1]["approx_kl"] > 0


def test_resample_mode_refuses_groups_of_one(tiny_lm):
    model, tok, _ = _setup(tiny_lm)
    with pytest.raises(ValueError, match="at least 2 samples"):
        jpo.train_jpo_resample(model, ["s"], ["p"], None, None, None, 0, jpo.JPOConfig(group_size=1))


def test_sample_replies_is_seeded_and_groups_by_prompt(tiny_lm):
    model, tok, _ = _setup(tiny_lm)
    p = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    prompts = [p.format("Your offer?"), p.format("A much longer question: when can you pay the full balance?")]
    cfg = jpo.JPOConfig(max_new_tokens=6, batch_size=4)
    side = tok.padding_side
    a = jpo.sample_replies(model, tok, prompts, 3, 5, cfg)
    assert len(a) == 2 and all(len(x) == 3 and all(isinstance(t, str) for t in x) for x in a)
    assert jpo.sample_replies(model, tok, prompts, 3, 5, cfg) == a
    assert jpo.sample_replies(model, tok, prompts, 3, 6, cfg) != a
    assert tok.padding_side == side                         # generation pads left; the tokenizer is given back as it was


def test_resample_mode_resumes_exactly_with_real_sampling(tiny_lm, tmp_path, kill_after):
    model, tok, _ = _setup(tiny_lm)
    p = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    prompts = [p.format(q) for q in ("Your offer?", "When?", "How many days?")]
    cfg = jpo.JPOConfig(mode="resample", group_size=3, states_per_step=2, epochs=2, lr=1e-3, batch_size=4,
                        max_new_tokens=5)

    def run(m, ckpt=None):
        sample = functools.partial(jpo.sample_replies, m, tok, cfg=cfg)
        return jpo.train_jpo_resample(m, [0, 1, 2], prompts, sample, lambda s, ts: [float(len(t) % 7) for t in ts],
                                      lambda q, t: lora.encode_example(tok, q, t), tok.pad_token_id, cfg, ckpt=ckpt,
                                      log=lambda *_: None)
    a = copy.deepcopy(model)
    full = run(a)
    assert full["total_steps"] == 3 and full["history"][0]["ratio"] == 1.0
    ck = str(tmp_path / "r.pt")
    kill_after(2)
    with pytest.raises(Killed):
        run(copy.deepcopy(model), ck)
    b = copy.deepcopy(model)
    resumed = run(b, ck)
    assert [h["score"] for h in resumed["history"]] == [h["score"] for h in full["history"]]
    for ma, mb in zip(lora.lora_modules(a).values(), lora.lora_modules(b).values()):
        assert torch.equal(ma.lora_B.weight, mb.lora_B.weight)


def _sim_records(cfg, domain, n, seed=0):
    dom = cfg.domains[domain]
    eps = [ng.new_episode(dom, sc, seed) for sc in domains.make_scenarios(dom)[:n]]
    ng.run_episodes(cfg, eps, ng.SimTeacher(cfg), ng.SimCounterparty(cfg), ng.random_emotion_policy())
    return [ng.add_judge_scores(ng.to_record(ep), cfg) for ep in eps]


def test_judge_reply_is_deterministic_and_rewards_a_good_offer(cfg):
    recs = _sim_records(cfg, "crad", 12)
    n = 0
    for rec in recs:
        for ti, t in enumerate(rec["turns"]):
            if t["speaker"] != "focal" or ti == 0 or t["plan"]["move"] != "offer":
                continue
            good = f"We can settle the whole balance in {format_offer(t['plan']['offer'], 'days')}."
            vague = "Let us keep talking about the balance for a while."
            s_good = ng.judge_reply(cfg, rec, ti, good)
            assert ng.judge_reply(cfg, rec, ti, good) == s_good                 # deterministic
            assert 1.0 <= s_good <= 10.0
            assert ng.judge_reply(cfg, rec, ti, vague) < s_good, (rec["key"], ti)
            n += 1
    assert n >= 10


def test_judge_reply_restores_the_counterparty_exactly(cfg):
    """Without walk-aways (the one random decision of the counterparty that changes a score),
    re-judging a corpus turn's own text gives the corpus's judge score: the counterparty's
    private state (concession so far, turn count, emotions heard) is restored exactly."""
    dom = cfg.domains["crad"]
    calm = replace(dom, personas={k: replace(p, walk=0.0) for k, p in dom.personas.items()})
    cfg2 = replace(cfg, domains={**cfg.domains, "crad": calm})
    recs = _sim_records(cfg2, "crad", 20)
    n = 0
    for rec in recs:
        for ti, t in enumerate(rec["turns"]):
            if (t["speaker"] != "focal" or ti // 2 + 1 > rec["patience"]           # no late impatience hazard
                    or detect_accept(t["text"]) != t["accept"] or detect_walk_away(t["text"]) != t["walk_away"]):
                continue
            assert ng.judge_reply(cfg2, rec, ti, t["text"]) == pytest.approx(t["score"], abs=1e-9), (rec["key"], ti)
            n += 1
    assert n >= 40
