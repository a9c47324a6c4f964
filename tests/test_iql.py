"""IQL: losses against hand-computed values, in-sample targets, masking, a synthetic task where
the best emotion depends on the state, checkpoints, and a CLI smoke run."""
import os
import re

import numpy as np
import pytest
import torch

import emodistill
import iql


def test_expectile_loss_by_hand():
    diff = torch.tensor([2.0, -1.0, 0.5, -3.0])
    # tau = 0.7: positive diffs weigh 0.7, negative 0.3
    want = (0.7 * 4 + 0.3 * 1 + 0.7 * 0.25 + 0.3 * 9) / 4
    assert iql.expectile_loss(diff, 0.7).item() == pytest.approx(want)
    assert iql.expectile_loss(diff, 0.5).item() == pytest.approx(0.5 * (4 + 1 + 0.25 + 9) / 4)


def test_awr_weights_by_hand():
    adv = torch.tensor([0.0, 1.0, -1.0, 2.0])
    w, clipped = iql.awr_weights(adv, beta=3.0, clip=100.0)
    assert torch.allclose(w, torch.tensor([1.0, np.exp(3.0), np.exp(-3.0), 100.0], dtype=torch.float32), rtol=1e-5)
    assert clipped.tolist() == [False, False, False, True]   # exp(6) = 403 > 100


def test_q_target_is_in_sample():
    """r + gamma (1 - d) V(s'): no max over actions can enter, and terminal steps drop V."""
    r, v, d = torch.tensor([1.0, 0.5]), torch.tensor([10.0, 10.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(iql.q_target(r, v, d, 0.9), torch.tensor([10.0, 0.5]))
    import inspect
    src = inspect.getsource(iql.train)
    assert ".max(" not in src and "amax" not in src  # the Q update never maximises over actions


def test_masked_actions_get_zero_probability():
    seen = torch.zeros(28, dtype=torch.bool)
    seen[[2, 5]] = True
    p = torch.softmax(iql.masked_logits(torch.randn(4, 28), seen), -1)
    assert torch.all(p[:, ~seen] == 0) and torch.allclose(p.sum(-1), torch.ones(4))


def _synthetic(n=4000, seed=0):
    """One feature: the phase (0 early, 1 late). Emotion 'caring' pays early, 'pride' late;
    the other actions in the data ('anger', 'joy') pay nothing. Behaviour is uniform."""
    g = np.random.default_rng(seed)
    acts = [iql.EMOTIONS.index(e) for e in ("caring", "pride", "anger", "joy")]
    phase = g.integers(0, 2, n).astype(np.float32)
    a = g.choice(acts, n)
    good = np.where(phase == 0, iql.EMOTIONS.index("caring"), iql.EMOTIONS.index("pride"))
    r = (a == good).astype(np.float32) + g.normal(0, 0.1, n).astype(np.float32)
    s = np.stack([phase, g.normal(size=n).astype(np.float32)], 1)
    return {"s": torch.tensor(s), "a": torch.tensor(a), "r": torch.tensor(r),
            "s2": torch.tensor(s), "d": torch.ones(n)}


def test_policy_learns_state_dependent_emotion():
    data = _synthetic()
    cfg = iql.IQLConfig(steps=1500, hidden=64, log_every=10**9)
    model, *_ = iql.train(data, cfg, log=None)
    with torch.no_grad():
        p = torch.softmax(model.policy_logits(torch.tensor([[0.0, 0.0], [1.0, 0.0]])), -1)
    assert iql.EMOTIONS[p[0].argmax()] == "caring" and iql.EMOTIONS[p[1].argmax()] == "pride"
    assert p[:, ~model.seen].sum() == 0 and int(model.seen.sum()) == 4


def test_training_resumes_exactly():
    data = _synthetic(500)
    cfg = iql.IQLConfig(steps=40, hidden=16, log_every=10**9)
    full, *_ = iql.train(data, cfg, log=None)
    m, t, o, step = iql.train(data, cfg, log=None, stop_at=20)
    m, *_ = iql.train(data, cfg, m, t, o, start=step, log=None)
    for a, b in zip(full.state_dict().values(), m.state_dict().values()):
        assert torch.equal(a, b)


def test_features_vary_and_use_one_hot_emotions():
    turns = [{"speaker": "focal", "text": "x", "emotion": "anger", "offer": 20.0},
             {"speaker": "counterparty", "text": "y", "offer": 200.0},
             {"speaker": "focal", "text": "x", "emotion": "joy", "offer": 30.0},
             {"speaker": "counterparty", "text": "y", "offer": 180.0}]
    doms = ["crad", "student"]
    names = iql.feature_names(doms)
    f = dict(zip(names, iql.features(turns, 20.0, 220.0, "crad", doms)))
    assert f["prev_joy"] == 1 and f["prev_anger"] == 0 and f["prev_none"] == 0
    assert f["recent3_anger"] == pytest.approx(1 / 3) and f["domain_crad"] == 1 and f["domain_student"] == 0
    assert f["focal_pos"] == pytest.approx(0.95) and f["cp_pos"] == pytest.approx(0.2)
    assert f["cp_last_concession"] == pytest.approx(0.1) and f["own_last_concession"] == pytest.approx(0.05)
    f0 = dict(zip(names, iql.features([], 20.0, 220.0, "student", doms)))
    assert f0["prev_none"] == 1 and f0["turn_frac"] == 0


def test_iql_cli_smoke_and_checkpoint_guard(tmp_path, capsys):
    out = str(tmp_path / "run")
    small = ["--scenarios", "0-9", "--seeds-per-scenario", "2"]
    assert emodistill.main(["collect", "--out", out, *small]) == 0
    assert emodistill.main(["judge", "--out", out]) == 0
    assert emodistill.main(["iql", "--out", out, "--steps", "300", "--save-every", "100"]) == 0
    model, _, _, step, spec = iql.load(os.path.join(out, "iql.pt"))
    assert step == 300 and spec["domains"] == ["crad", "disaster", "hospital", "student"]
    assert emodistill.main(["iql", "--out", out, "--steps", "300"]) == 0
    assert "complete" in capsys.readouterr().out
    with pytest.raises(iql.CheckpointMismatch, match="domains"):
        iql.load(os.path.join(out, "iql.pt"), ["crad"])
    # (two domains: choosing best-fixed plays every emotion on every training scenario of each)
    assert emodistill.main(["eval", "--out", out, "--seeds", "1", "--select-seeds", "1", "--domains", "crad,student"]) == 0
    text = open(os.path.join(out, "results.md")).read()
    for m in emodistill.TEACHER_METHODS:
        assert f"| {m} | 20 |" in text


def test_eval_with_a_language_model_student(tmp_path, tiny_lm, capsys):
    """The LM methods of eval (emotion-free vanilla, the IQL selector driving the student)
    run end to end on a tiny random Llama saved as a local model folder."""
    model, tok = tiny_lm
    student = tmp_path / "tiny"
    model.save_pretrained(student)
    tok.save_pretrained(student)
    out = str(tmp_path / "run")
    assert emodistill.main(["collect", "--out", out, "--scenarios", "0-4", "--seeds-per-scenario", "2"]) == 0
    assert emodistill.main(["judge", "--out", out]) == 0
    assert emodistill.main(["iql", "--out", out, "--steps", "50"]) == 0
    assert emodistill.main(["eval", "--out", out, "--methods", "vanilla,iql", "--student", f"hf:{student}",
                            "--domains", "crad", "--seeds", "1", "--max-new-tokens", "8"]) == 0   # (it never ends a reply)
    import json
    van = json.load(open(os.path.join(out, "eval", "vanilla.json")))
    sel = json.load(open(os.path.join(out, "eval", "iql.json")))
    assert len(van["records"]) == len(sel["records"]) == 20
    assert all(t.get("emotion") is None for r in van["records"] for t in r["turns"] if t["speaker"] == "focal")
    assert all(t["emotion"] in iql.EMOTIONS for r in sel["records"] for t in r["turns"] if t["speaker"] == "focal")
    # the cap reached the decoder: the random model never ends a reply, so each row generated
    # exactly 8 tokens a focal turn (48 without the cap)
    generated = [int(g) for g in re.findall(r"generated (\d+)", capsys.readouterr().out)]
    turns = [sum(t["speaker"] == "focal" for r in res["records"] for t in r["turns"]) for res in (van, sel)]
    assert generated == [8 * n for n in turns], (generated, turns)
    assert van["settings"]["max_new_tokens"] == sel["settings"]["max_new_tokens"] == 8


# ----------------------------------------------------------------------------------------
# The reward: the outcome pays once, length does not
# ----------------------------------------------------------------------------------------

def _rubric_turn(emotion="joy", **comp):
    """A focal turn scored like the rubric judge: score = 1 + 9 * weighted mean of components."""
    import negotiate as ng
    c = {"offer": 1.0, "firmness": 0.8, "effect": 0.3, "closing": 0.5, "fidelity": 1.0, "fluency": 1.0, **comp}
    score = 1 + 9 * sum(ng.JUDGE_WEIGHTS[k] * v for k, v in c.items()) / sum(ng.JUDGE_WEIGHTS[k] for k in c)
    return {"speaker": "focal", "text": "x", "emotion": emotion, "offer": 20.0, "score": round(score, 4),
            "components": c}


def _record(n_focal, success, utility, domain="crad", key="k"):
    """A hand-made judged trajectory of n_focal focal turns (each answered by the counterparty);
    the last focal turn's closing component is the outcome, as the rubric scores it."""
    turns = []
    for j in range(n_focal):
        last = j == n_focal - 1
        turns.append(_rubric_turn(closing=(utility if success else 0.0) if last else 0.5))
        turns.append({"speaker": "counterparty", "text": "y", "offer": 200.0})
    return {"key": key, "domain": domain, "s0": 20.0, "b0": 220.0, "turns": turns,
            "outcome": {"success": success, "utility": utility, "agreement": None, "end": "x", "rounds": len(turns)}}


def test_rubric_weights_are_the_judges():
    import negotiate as ng
    assert iql.RUBRIC_WEIGHTS == ng.JUDGE_WEIGHTS


def test_long_failed_episode_returns_less_than_a_short_deal():
    """Old reward: every turn paid ~+0.4, so 14 turns of talk ending in a walk-away returned more
    than a 3-turn deal at utility 0.6. Centred, the deal returns more."""
    recs = [_record(14, False, 0.0, key="long-fail"), _record(3, True, 0.6, key="short-deal")]
    cfg = iql.IQLConfig()
    data = iql.transitions(recs, ["crad"], cfg)
    assert data["returns"][1] > data["returns"][0] + 1.0
    assert data["returns"][0] < 0 < data["returns"][1]
    # uncentred (the old reward's centre), length pays: the long failure returns more
    old = iql.transitions(recs, ["crad"], iql.IQLConfig(judge_centre=0.0))
    assert old["returns"][0] > old["returns"][1]


def test_closing_component_is_not_in_the_per_turn_part():
    w = iql.RUBRIC_WEIGHTS
    hi, lo = _rubric_turn(closing=1.0), _rubric_turn(closing=0.0)
    assert hi["score"] > lo["score"]
    assert iql.judge_part(hi) == pytest.approx(iql.judge_part(lo), abs=1e-3)
    rest = {k: v for k, v in hi["components"].items() if k != "closing"}
    want = 1 + 9 * sum(w[k] * v for k, v in rest.items()) / sum(w[k] for k in rest)
    assert iql.judge_part(hi) == pytest.approx((want - 5.5) / 4.5, abs=1e-3)
    # an LLM judge's score (the components are the rubric's, not its own): taken as it is
    llm = dict(hi, score=3.0)
    assert iql.judge_part(llm) == pytest.approx((3.0 - 5.5) / 4.5)
    assert iql.judge_part({"speaker": "focal", "score": 10.0}) == pytest.approx(1.0)
    # a missing score adds 0, even after centring; the terminal outcome still comes once
    rec = _record(2, True, 0.5)
    rec["turns"][0]["score"] = None
    r = iql.turn_rewards(rec, iql.IQLConfig(outcome_weight=2.0), centre=0.3)
    assert r[0] == 0.0
    assert r[1] == pytest.approx(iql.judge_part(rec["turns"][2]) - 0.3 + 2.0 * 0.5)


def test_judge_part_is_centred_on_a_collected_corpus(cfg):
    """On a real (small) judged sim corpus: the per-turn judge part has mean 0 over the rows,
    where uncentred it is clearly positive, and the return follows utility more than length."""
    import methods
    import negotiate as ng
    doms = list(cfg.domains)
    recs = methods.play(cfg, doms, range(0, 10), 2, ng.SimTeacher(cfg), ng.SimCounterparty(cfg),
                        ng.random_emotion_policy(), 0)
    for rec in recs:
        ng.add_judge_scores(rec, cfg)
    hp = iql.IQLConfig()
    data = iql.transitions(recs, doms, hp)
    terminal = torch.tensor([(hp.outcome_weight * recs[ri]["outcome"]["utility"] if recs[ri]["outcome"]["success"]
                              else -hp.fail_penalty) if d else 0.0 for (ri, _), d in zip(data["where"], data["d"])])
    assert (data["r"] - terminal).mean().item() == pytest.approx(0.0, abs=1e-4)
    assert data["centre"] > 0.2                     # the uncentred judge part is positive on average
    corr = iql.return_correlations(recs, hp)
    assert corr["all"]["n"] == len(recs)
    assert corr["all"]["utility"] > 0.5 > corr["all"]["length"]
    old = iql.return_correlations(recs, iql.IQLConfig(judge_centre=0.0))
    assert old["all"]["length"] > old["all"]["utility"]


def test_return_correlations_by_hand():
    """Three crad trajectories, the shorter the better the deal: the correlations are numpy's
    over the discounted returns; one student trajectory alone has no correlation (NaN)."""
    recs = [_record(2, True, 0.9, key="a"), _record(4, True, 0.5, key="b"), _record(8, False, 0.0, key="c"),
            _record(3, True, 0.7, domain="student", key="d")]
    hp = iql.IQLConfig()
    corr = iql.return_correlations(recs, hp)
    centre = iql.judge_centre(recs, hp)
    crad = recs[:3]
    g = [iql.discounted_return(iql.turn_rewards(r, hp, centre), hp.gamma) for r in crad]
    assert corr["crad"]["n"] == 3 and corr["all"]["n"] == 4
    assert corr["crad"]["utility"] == pytest.approx(np.corrcoef(g, [0.9, 0.5, 0.0])[0, 1])
    assert corr["crad"]["length"] == pytest.approx(np.corrcoef(g, [4, 8, 16])[0, 1])
    assert corr["crad"]["utility"] > 0.9 and corr["crad"]["length"] < -0.9
    assert np.isnan(corr["student"]["utility"]) and np.isnan(corr["student"]["length"])
    assert iql.pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(np.corrcoef([1, 2, 3], [2, 4, 7])[0, 1])
    assert np.isnan(iql.pearson([1, 1], [1, 2])) and np.isnan(iql.pearson([1], [2]))



def test_load_ignores_a_config_knob_removed_since(tmp_path):
    """A checkpoint saved with a config key this code no longer has (policy_dropout left
    IQLConfig after runs were made with it) still loads, and its known knobs are kept."""
    cfg = iql.IQLConfig(hidden=8, steps=3)
    doms = ["crad"]
    model = iql.IQL(len(iql.feature_names(doms)), hidden=8)
    targets = torch.nn.ModuleList([iql.mlp(len(iql.feature_names(doms)), len(iql.EMOTIONS), 8) for _ in range(2)])
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    path = str(tmp_path / "iql.pt")
    iql.save(path, model, targets, opt, 3, cfg, doms, 30)
    ck = torch.load(path, weights_only=False)
    ck["config"]["policy_dropout"] = 0.0
    torch.save(ck, path)
    _, _, _, step, spec = iql.load(path, doms)
    assert step == 3 and spec["config"]["hidden"] == 8 and "policy_dropout" not in spec["config"]
