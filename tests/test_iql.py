"""IQL: losses against hand-computed values, in-sample targets, masking, a synthetic task where
the best emotion depends on the state, checkpoints, and a CLI smoke run."""
import os

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
    assert emodistill.main(["eval", "--out", out, "--seeds", "1", "--select-seeds", "1"]) == 0
    text = open(os.path.join(out, "results.md")).read()
    for m in emodistill.TEACHER_METHODS:
        assert f"| {m} | 20 |" in text


def test_eval_with_a_language_model_student(tmp_path, tiny_lm):
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
                            "--domains", "crad", "--seeds", "1"]) == 0
    import json
    van = json.load(open(os.path.join(out, "eval", "vanilla.json")))
    sel = json.load(open(os.path.join(out, "eval", "iql.json")))
    assert len(van["records"]) == len(sel["records"]) == 20
    assert all(t.get("emotion") is None for r in van["records"] for t in r["turns"] if t["speaker"] == "focal")
    assert all(t["emotion"] in iql.EMOTIONS for r in sel["records"] for t in r["turns"] if t["speaker"] == "focal")
