"""LMAgent on a tiny random Llama (batched, left-padded generation) and model loading; a
short integration test on the real SmolLM2-135M-Instruct."""
import dataclasses
import os

import pytest
import torch

import domains
import models
import runs
import emodistill
import negotiate as ng
from offers import format_offer


def _episodes(cfg, n, turns):
    dom = cfg.domains["student"]
    eps = [ng.new_episode(dom, sc, 0) for sc in domains.make_scenarios(dom)[:n]]
    for i, ep in enumerate(eps):  # histories of different lengths -> different prompt lengths
        short = dataclasses.replace(cfg, max_turns=turns[i % len(turns)])
        ng.run_episodes(short, [ep], ng.SimTeacher(cfg), ng.SimCounterparty(cfg), ng.random_emotion_policy())
        ep.end = None
    return eps


def test_batched_left_padded_generation_equals_one_by_one(cfg, tiny_lm):
    model, tok = tiny_lm
    eps = _episodes(cfg, 5, [0, 1, 3, 5])
    emos = ["anger", "joy", None, "fear", "caring"]
    batched = ng.LMAgent(model, tok, cfg, temperature=0, max_new_tokens=8, batch_size=3)
    single = ng.LMAgent(model, tok, cfg, temperature=0, max_new_tokens=8, batch_size=1)
    prompts = batched.prompts(eps, emos)
    lens = {len(tok(p).input_ids) for p in prompts}
    assert len(lens) > 1  # padding is really exercised
    a, b = batched.generate(prompts), single.generate(prompts)
    assert a == b and all(isinstance(x, str) for x in a)
    assert batched.generated_tokens > 0 and batched.prompt_tokens == sum(len(tok(p).input_ids) for p in prompts)


def test_sampling_is_seeded(cfg, tiny_lm):
    model, tok = tiny_lm
    eps = _episodes(cfg, 4, [0, 2])
    runs = [ng.LMAgent(model, tok, cfg, max_new_tokens=8, seed=7).act(eps, ["joy"] * 4) for _ in range(2)]
    assert runs[0] == runs[1]


def test_compact_prompt_has_state_move_and_emotion_block(cfg, tiny_lm):
    _, tok = tiny_lm
    ep = _episodes(cfg, 1, [4])[0]
    assert ep.t == 4
    ep.private["move"] = move = {"move": "offer", "offer": 34.0}
    msgs = ng.build_messages(cfg, ep, "focal", "pride")
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert "Emotional approach" not in msgs[0]["content"]
    lines = msgs[1]["content"].split("\n")
    standing = ng.last_offers(ep.turns)
    assert lines[0] == (f"Turn 5 of {cfg.max_turns}. Your last offer: {format_offer(standing['focal'], ep.dom.unit)}. "
                        f"Their last offer: {format_offer(standing['counterparty'], ep.dom.unit)}.")
    assert lines[1] == f'They said: "{ep.turns[-1]["text"]}"'     # the last counterparty message only
    assert ep.turns[1]["text"] not in msgs[1]["content"]
    assert lines[2] == f"Your move: offer {format_offer(34.0, ep.dom.unit)}." == ng.move_line(ep.dom, move)
    assert lines[3].startswith("[Emotional approach (pride): ") and lines[3].endswith(".]") and len(lines) == 4
    free = ng.build_messages(cfg, ep, "focal", "pride", emotion_free=True)
    assert free[1]["content"] == "\n".join(lines[:3])
    free_offers = ng.build_messages(cfg, ep, "focal", "pride", offers="free")
    assert free_offers[1]["content"].split("\n")[2] == "Your move: state your offer as one number, or accept theirs."
    accept = ng.build_messages(cfg, ep, "focal", "pride", move={"move": "accept", "offer": 41.0})
    assert f"Your move: accept their offer of {format_offer(41.0, ep.dom.unit)}." in accept[1]["content"]
    # every focal turn ends with the same task reminder: inside the emotion block, or alone
    # (emotion-free and vanilla), so the rows differ only in the emotion
    assert cfg.turn_reminder == ""                      # off by default: the paper's plain block
    rem = "State your offer as a number."
    cfg_r = dataclasses.replace(cfg, turn_reminder=rem)
    with_r = ng.build_messages(cfg_r, ep, "focal", "pride")
    assert with_r[1]["content"] == msgs[1]["content"][:-1] + f" {rem}]"
    free_r = ng.build_messages(cfg_r, ep, "focal", "pride", emotion_free=True)
    assert free_r[1]["content"] == free[1]["content"] + f"\n[{rem}]"
    assert ng.build_messages(cfg_r, ep, "focal")[1]["content"] == free_r[1]["content"]
    assert free_r[0] == with_r[0] == msgs[0]
    # an LM on the counterparty side sees the whole history
    cp = ng.build_messages(cfg, ep, "counterparty")
    assert [m["role"] for m in cp[1:]] == ["user", "assistant", "user", "assistant"]


def test_lm_agent_plays_episodes_in_lock_step(cfg, tiny_lm):
    model, tok = tiny_lm
    dom = cfg.domains["crad"]
    eps = [ng.new_episode(dom, sc, 0) for sc in domains.make_scenarios(dom)[:3]]
    short = dataclasses.replace(cfg, max_turns=4)
    agent = ng.LMAgent(model, tok, short, max_new_tokens=6)
    ng.run_episodes(short, eps, agent, ng.SimCounterparty(cfg), ng.random_emotion_policy())
    assert agent.calls == 2  # one batched call per focal turn
    for ep in eps:
        assert ep.done and ep.t <= 4
        rec = ng.to_record(ep)
        assert rec["turns"][0]["speaker"] == "focal" and rec["turns"][0]["emotion"] in ng.EMOTIONS


def test_device_and_dtype_choice(monkeypatch):
    dev, dtype = models.pick_device_dtype()
    assert dev == ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cpu":
        assert dtype == torch.float32
    monkeypatch.setenv("EMODISTILL_DTYPE", "bfloat16")
    assert models.pick_device_dtype()[1] == torch.bfloat16


def test_unknown_model_fails_clearly(tmp_path):
    with pytest.raises(RuntimeError, match="cannot load model"):
        models.load_lm(str(tmp_path / "no-such-model"))


@pytest.mark.smollm2
def test_smollm2_loads_offline_and_negotiates(cfg, smollm2):
    model, tok = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    folder = models.smollm2_folder()
    assert os.path.exists(os.path.join(folder, ".complete"))
    dom = cfg.domains["crad"]
    eps = [ng.new_episode(dom, sc, 0) for sc in domains.make_scenarios(dom)[:2]]
    agent = ng.LMAgent(model, tok, cfg, max_new_tokens=40, seed=1)
    replies = agent.act(eps, ["gratitude", "anger"])
    assert all(len(r.text.split()) >= 3 for r in replies), replies


@pytest.mark.smollm2
def test_half_written_cache_is_rebuilt(tmp_path, monkeypatch, smollm2):
    monkeypatch.setenv("EMODISTILL_CACHE", str(tmp_path))
    half = tmp_path / "SmolLM2-135M-Instruct"
    half.mkdir()
    (half / "config.json").write_text("{ truncated")
    folder = models.smollm2_folder()
    assert os.path.exists(os.path.join(folder, ".complete"))
    model, tok = models.load_lm("smollm2", device="cpu")
    ids = tok("Hello", return_tensors="pt").input_ids
    ref, _ = smollm2
    with torch.inference_mode():
        assert torch.allclose(model(ids).logits, ref(ids).logits)


def test_hf_judge_stage_records_scores_or_missing(tmp_path, tiny_lm):
    model, tok = tiny_lm
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    out = str(tmp_path / "run")
    assert emodistill.main(["collect", "--out", out, "--domains", "student", "--scenarios", "0-1",
                            "--seeds-per-scenario", "1"]) == 0
    assert emodistill.main(["judge", "--out", out, "--judge", f"hf:{folder}"]) == 0
    recs, _ = runs.read_jsonl(os.path.join(out, "judged.jsonl"))
    focal = [t for r in recs for t in r["turns"] if t["speaker"] == "focal"]
    assert focal and all("judge_answer" in t for t in focal)
    for t in focal:  # a random model rarely writes "SCORE: N": then the score is missing, not 5
        assert t["score"] == ng.parse_score(t["judge_answer"])
