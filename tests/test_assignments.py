"""The course assignments' machinery (assignments/README.md): the starter differs from the
repository only inside the marked regions, the region markers are well formed, and the A5
baselines are current. The autograders themselves are tests/test_a1_iql.py ... test_a5_schedule.py
(`pytest -m a1` ... `-m a5`); `python assignments/make_starter.py --check` also runs them on a
starter, where each must fail with its NotImplementedError."""
import json
import os
import sys

import pytest

import domains as dm
import negotiate as ng

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "assignments"))
import a5_schedule as a5  # noqa: E402
import make_starter as ms  # noqa: E402

REGIONS = {
    "A1": ["turn_rewards", "transitions", "expectile_loss", "q_target", "awr_weights", "iql_step"],
    "A2": ["scaling", "delta", "forward", "merge", "unmerge", "matches", "inject"],
    "A3": ["encode_example", "collate", "logprob_targets", "logprob_gather", "sft_loss"],
    "A4": ["group_advantages", "sequence_ratio", "clipped_surrogate", "k3_kl"],
    "A5": ["schedule"],
}


def test_every_assignment_has_its_regions():
    found = {}
    for f, rs in ms.all_regions().items():
        for r in rs:
            found.setdefault(r.aid, []).append(r.name)
            assert r.hint, (f, r.aid, r.name)                          # every region tells the student what to write
    assert found == REGIONS


def test_starter_differs_from_the_repository_only_inside_the_regions():
    assert ms.check(log=lambda *_: None) == []


def test_starter_text_by_hand():
    src = "\n".join(["def f(x):",
                     "    y = 1",
                     "    # BEGIN A9 f",
                     "    # hint: return x + y",
                     "    #   (twice is fine)",
                     "    z = x + y",
                     "    return z",
                     "    # END A9",
                     "", "g = 2", ""])
    out = ms.starter_text(src)
    assert out.splitlines() == ["def f(x):", "    y = 1", "    # BEGIN A9 f", "    # hint: return x + y",
                                "    #   (twice is fine)",
                                "    raise NotImplementedError('A9 f: return x + y (twice is fine)')",
                                "    # END A9", "", "g = 2"]
    assert ms.skeleton(out) == ms.skeleton(src)
    assert ms.starter_text(src, only={"A1"}) == src                   # another assignment's starter leaves it
    ns = {}
    exec(compile(out, "<starter>", "exec"), ns)
    with pytest.raises(NotImplementedError, match="A9 f: return x"):
        ns["f"](1)


@pytest.mark.parametrize("lines,match", [
    (["# BEGIN A1 f", "x = 1"], "never closed"),
    (["# BEGIN A1 f", "x = 1", "# END A2"], "closes BEGIN A1"),
    (["x = 1", "# END A1"], "without a BEGIN"),
    (["# BEGIN A1 f", "# BEGIN A1 g", "x = 1", "# END A1", "# END A1"], "inside the region"),
    (["# BEGIN A1 f", "# hint: only a hint", "# END A1"], "holds no code"),
])
def test_malformed_regions_are_refused(lines, match):
    with pytest.raises(ms.RegionError, match=match):
        ms.regions("\n".join(lines))


def test_the_stored_best_fixed_emotions_are_current(cfg):
    """a5_best_fixed.json was made by `python assignments/a5_schedule.py --best-fixed` (every
    emotion x training scenarios 0-79 x 3 seeds). Replaying crad's best one must give the stored
    mean; if the simulator changed, recompute the file."""
    with open(a5.BEST_FIXED_FILE) as f:
        table = json.load(f)
    best = a5.best_fixed()
    assert set(best) == set(cfg.domains) and table["seeds"] == a5.BEST_FIXED_SEEDS
    for d, e in best.items():
        assert table["mean_utility_on_train"][d][e] == max(table["mean_utility_on_train"][d].values())
    res = a5.play(cfg, ng.fixed_emotion_policy(best["crad"]), dm.TRAIN_IDS, a5.BEST_FIXED_SEEDS, ["crad"])["crad"]
    mean = sum(o["utility"] for o in res) / len(res)
    assert mean == pytest.approx(table["mean_utility_on_train"]["crad"][best["crad"]], abs=2e-6), \
        "the simulator changed: run python assignments/a5_schedule.py --best-fixed"


def test_a5_refuses_a_schedule_with_a_wrong_answer(cfg):
    bad = a5.as_policy(lambda views: ["happy"] * len(views), cfg)
    with pytest.raises(ValueError, match="not one of the 28 emotions"):
        a5.play(cfg, bad, range(80, 81), 1, ["crad"])
    short = a5.as_policy(lambda views: ["joy"], cfg)
    with pytest.raises(ValueError, match="returned 1 emotions for 2 episodes"):
        a5.play(cfg, short, range(80, 81), 2, ["crad"])


def test_a5_views_hold_public_facts_only(cfg):
    """A View is what the focal side saw: its own emotions and offers, the counterparty's
    offers and last message; never the counterparty's patience, reservation or persona."""
    dom = cfg.domains["crad"]
    ep = ng.new_episode(dom, next(sc for sc in dm.make_scenarios(dom) if sc.id == 80), 0)
    seen = []

    def spy(views):
        seen.extend(views)
        return ["caring"] * len(views)
    ng.run_episodes(cfg, [ep], ng.SimTeacher(cfg), ng.SimCounterparty(cfg), a5.as_policy(spy, cfg))
    focal = [i for i, t in enumerate(ep.turns) if t["speaker"] == "focal"]
    assert len(focal) >= 3 and [v.focal_turn for v in seen] == list(range(len(focal)))
    last, before = seen[-1], ep.turns[:focal[-1]]                     # the view before the last focal turn
    assert last.my_emotions == ("caring",) * (len(focal) - 1)
    assert last.my_offers == tuple(t["offer"] for t in before if t["speaker"] == "focal")
    assert last.their_offers == tuple(t["offer"] for t in before if t["speaker"] == "counterparty")
    assert last.their_last_text == before[-1]["text"] and before[-1]["speaker"] == "counterparty"
    assert set(a5.View.__dataclass_fields__) == {"domain", "focal_turn", "my_emotions", "my_offers", "their_offers",
                                                 "their_last_text", "their_last_shown", "planned_move"}


def test_a3_token_logprobs_on_a_tiny_llama_equal_the_full_logits():
    """A3's functions on the real transformers path (a tiny random-init Llama from a config, no
    weights), with the autograder's word tokenizer: the same log-probs as the full logits."""
    import torch
    from test_a3_sft import PROMPT, WordTok
    from transformers import LlamaConfig, LlamaForCausalLM

    import lora
    tok = WordTok()
    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                       pad_token_id=0, tie_word_embeddings=True)
    model = LlamaForCausalLM(conf).eval()
    exs = [lora.encode_example(tok, PROMPT, "in 30 days"), lora.encode_example(tok, "<|im_start|>assistant\n", "no")]
    b = lora.collate(exs, tok.pad_token_id)
    with torch.no_grad():
        lp, mask = lora.token_logprobs(model, b)
        full = torch.log_softmax(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, -1)
    tgt = b["labels"][:, 1:]
    for i in range(2):
        for t in range(tgt.shape[1]):
            want = full[i, t, tgt[i, t]].item() if tgt[i, t] != -100 else 0.0
            assert lp[i, t].item() == pytest.approx(want, abs=1e-5), (i, t)
    assert mask.sum().item() == 4 + 2                                 # "in 30 days <|im_end|>" and "no <|im_end|>"
