"""The offer planner (which number), shared by the SimTeacher and the LM agent; the compact
state prompt that states its move; and offer fidelity, the share of turns that did the move."""
import dataclasses

import pytest

import domains
import emodistill
import negotiate as ng
import report
from offers import format_offer, parse_offer


class Replay:
    """A focal agent that says what a recorded teacher said, turn by turn, drawing nothing from
    the episode's random streams (an LM agent does not draw from the teacher's wording stream)."""

    def __init__(self, texts):
        self.texts = texts

    def act(self, eps, emotions):
        return [ng.Reply(*self.texts[ep.key][ep.t // 2]) for ep in eps]


def _episodes(cfg, n=6, domain="crad"):
    dom = cfg.domains[domain]
    return [ng.new_episode(dom, sc, 3) for sc in domains.make_scenarios(dom)[:n]]


def test_teacher_and_another_agent_get_the_same_moves_for_the_same_states(cfg):
    teacher_eps = ng.run_episodes(cfg, _episodes(cfg, 40), ng.SimTeacher(cfg), ng.SimCounterparty(cfg),
                                  ng.random_emotion_policy())
    texts = {ep.key: [(t["text"], t["accept"]) for t in ep.turns if t["speaker"] == "focal"] for ep in teacher_eps}
    replay_eps = ng.run_episodes(cfg, _episodes(cfg, 40), Replay(texts), ng.SimCounterparty(cfg),
                                 ng.random_emotion_policy())
    for a, b in zip(teacher_eps, replay_eps):
        plans_a = [t["plan"] for t in a.turns if t["speaker"] == "focal"]
        plans_b = [t["plan"] for t in b.turns if t["speaker"] == "focal"]
        assert plans_a == plans_b and len(plans_a) >= 2
        assert a.agreement == b.agreement
    # the teacher does exactly what the plan says, and the plans concede and accept
    turns = [t for ep in teacher_eps for t in ep.turns if t["speaker"] == "focal"]
    assert all(ng.move_followed(t) for t in turns)
    assert any(t["plan"]["move"] == "accept" for t in turns)
    for ep in teacher_eps:
        offered = [ng.position(t["plan"]["offer"], ep.sc.s0, ep.sc.b0) for t in ep.turns
                   if t["speaker"] == "focal" and t["plan"]["move"] == "offer"]
        assert all(x >= y - 0.02 for x, y in zip(offered, offered[1:]))   # never backward (grain rounding)


def test_the_lm_agent_prompt_states_the_teachers_planned_move(cfg, tiny_lm):
    model, tok = tiny_lm
    short = dataclasses.replace(cfg, max_turns=4)
    lm_eps = _episodes(cfg, 3)
    agent = ng.LMAgent(model, tok, short, max_new_tokens=5)
    seen = {}
    render = agent.prompts

    def recording(eps, emotions):
        texts = render(eps, emotions)
        for ep, t in zip(eps, texts):
            seen.setdefault(ep.key, []).append(t)
        return texts
    agent.prompts = recording
    ng.run_episodes(short, lm_eps, agent, ng.SimCounterparty(cfg), ng.fixed_emotion_policy("anger"))
    teacher_eps = ng.run_episodes(short, _episodes(cfg, 3), ng.SimTeacher(cfg), ng.SimCounterparty(cfg),
                                  ng.fixed_emotion_policy("anger"))
    for lm, te in zip(lm_eps, teacher_eps):
        first_lm, first_te = lm.turns[0]["plan"], te.turns[0]["plan"]
        assert first_lm == first_te and first_lm["move"] == "offer"   # same episode state: same move
        assert f"Your move: offer {format_offer(first_lm['offer'], lm.dom.unit)}." in seen[lm.key][0]
        # each prompt names the move recorded on the turn it produced
        for prompt, turn in zip(seen[lm.key], [t for t in lm.turns if t["speaker"] == "focal"]):
            assert ng.move_line(lm.dom, turn["plan"]) in prompt


@pytest.mark.parametrize("offers", ["planned", "free"])
def test_compact_prompt_is_short_and_identical_at_training_and_inference(cfg, tiny_lm, offers):
    model, tok = tiny_lm
    short = dataclasses.replace(cfg, max_turns=6)
    eps = _episodes(cfg, 2, "hospital")
    agent = ng.LMAgent(model, tok, short, max_new_tokens=6, offers=offers)
    seen = []
    render = agent.prompts

    def recording(eps_, emotions):
        texts = render(eps_, emotions)
        seen.extend((ep, ep.t, t) for ep, t in zip(eps_, texts))
        return texts
    agent.prompts = recording
    ng.run_episodes(short, eps, agent, ng.SimCounterparty(cfg), ng.random_emotion_policy())
    assert len(seen) >= 4
    for ep, t, text in seen:
        rec = ng.to_record(ep)
        assert emodistill.sft_prompt(short, tok, rec, t, offers=offers) == text
        assert ("Your move: offer" in text or "Your move: accept" in text) == (offers == "planned")
        assert "Emotional approach" in text
        assert len(tok(text).input_ids) < 250
        # the compact prompt shows the last counterparty message, never the older transcript
        cp = [x["text"] for x in ep.turns[:t] if x["speaker"] == "counterparty"]
        for old in cp[:-1]:
            if old != cp[-1]:
                assert old not in text


def test_planned_prompt_needs_a_corpus_with_plans(cfg, tiny_lm):
    _, tok = tiny_lm
    ep = ng.run_episodes(cfg, _episodes(cfg, 1), ng.SimTeacher(cfg), ng.SimCounterparty(cfg),
                         ng.random_emotion_policy())[0]
    rec = ng.to_record(ep)
    for t in rec["turns"]:
        t.pop("plan", None)
    with pytest.raises(emodistill.StageError, match="no planned moves"):
        emodistill.sft_prompt(cfg, tok, rec, 0)
    assert "Your move: state your offer" in emodistill.sft_prompt(cfg, tok, rec, 0, offers="free")


def _turn(plan, offer=None, accept=False):
    return {"speaker": "focal", "text": "", "emotion": "anger", "perceived": "anger", "offer": offer,
            "accept": accept, "plan": plan}


def test_offer_fidelity_on_hand_made_transcripts():
    offer34, accept41 = {"move": "offer", "offer": 34.0}, {"move": "accept", "offer": 41.0}
    assert ng.move_followed(_turn(offer34, 34.0)) is True
    assert ng.move_followed(_turn(offer34, 35.0)) is False       # another number
    assert ng.move_followed(_turn(offer34, None)) is False       # no number at all
    assert ng.move_followed(_turn(offer34, 34.0, accept=True)) is False   # accepted instead of offering
    assert ng.move_followed(_turn(accept41, None, accept=True)) is True
    assert ng.move_followed(_turn(accept41, 34.0)) is False      # offered instead of accepting
    assert ng.move_followed({"speaker": "focal", "text": "x"}) is None   # no plan (free text corpus)
    cp = {"speaker": "counterparty", "text": "", "offer": 50.0, "accept": False}
    rec = {"s0": 20, "b0": 60, "turns": [_turn(offer34, 34.0), cp, _turn(offer34, 36.0), cp,
                                         _turn(accept41, None, accept=True)],
           "outcome": {"success": True, "utility": 0.5, "rounds": 3, "end": "accept"}}
    assert report.expression_rates(rec)[2] == pytest.approx(2 / 3)
    rec2 = dict(rec, turns=[_turn(offer34, 34.0)])
    s = report.summarize([rec, rec2])
    assert s["offer_fidelity"][0] == pytest.approx((2 / 3 + 1) / 2)


def test_move_outcomes_count_each_planned_turn_once():
    offer34, accept41 = {"move": "offer", "offer": 34.0}, {"move": "accept", "offer": 41.0}
    missed_both = {"move": False, "emotion": False}
    turns = [_turn(offer34, 34.0), dict(_turn(accept41, None, accept=True), drafts=2, first_draft=missed_both),
             _turn(offer34, 34.0, accept=True), dict(_turn(offer34, None), echo=True), _turn(offer34, None),
             dict(_turn(offer34, 36.0), drafts=3, perceived="joy"),      # redrafted, the first draft played
             dict(_turn(accept41, None), echo=True), _turn(accept41, 30.0),
             {"speaker": "focal", "text": "no plan", "offer": 20.0, "accept": False}]
    assert [report.move_outcome(t) for t in turns] == list(report.MOVE_OUTCOMES) + [None]
    rec = {"domain": "crad", "turns": turns}
    lines = report.move_outcome_lines({"emodistill": {"records": [rec, rec]},
                                       "teacher-iql": {"records": [{"domain": "crad", "turns": turns[-1:]}]}},
                                      ["emodistill", "teacher-iql"])
    # 16 turns; the first draft did the move in 2 (the rewritten accept's first draft did not);
    # it carried the emotion in 12 of 16 (the rewritten accept's first draft and the joyful one
    # did not); 4 redrafted; then the outcomes of the replies played
    assert lines[4] == "| emodistill | 16 | 2 | 12 of 16 | 4 | 2 | 2 | 2 | 2 | 2 | 2 | 2 | 2 |"
    assert len(lines) == 6                                       # no row for a method without planned turns
    # a rewrite played for its emotion: the first draft did the move, and that still counts
    turns[0] = dict(turns[0], drafts=2, first_draft={"move": True, "emotion": False})
    assert report.move_outcome_lines({"emodistill": {"records": [rec]}}, ["emodistill"])[4].startswith(
        "| emodistill | 8 | 1 | 5 of 8 | 3 |")


def test_restating_their_number_when_told_to_accept_is_counted_as_an_echo(cfg):
    """Through the loop's own parser: told to accept 41 days, "41 days is what we need" repeats
    the counterparty's standing offer; it is neither an offer nor an accept."""
    dom = cfg.domains["crad"]
    sc = domains.make_scenarios(dom)[0]
    ep = ng.new_episode(dom, sc, 0)
    ep.offers = {"focal": 30.0, "counterparty": 41.0}
    ep.private["move"] = {"move": "accept", "offer": 41.0}
    text = "Full settlement within 41 days is what we need."
    ng._apply(ep, "focal", ng.Reply(text, accept=ng.detect_accept(text), free_text=True), cfg,
              ng.Perceiver(cfg.emotions), "anger")
    assert ep.turns[-1]["offer"] is None and ep.turns[-1]["accept"] is False
    assert report.move_outcome(ep.turns[-1]) == "accept: restated theirs"
    assert not ep.done


def test_the_judge_pays_for_stating_the_planned_move(cfg):
    """A reply that states another in-range number than the plan scores lower on `offer` than
    the planned number (the number is the planner's; the words are judged on stating it)."""
    ep = ng.run_episodes(cfg, _episodes(cfg, 1), ng.SimTeacher(cfg), ng.SimCounterparty(cfg),
                         ng.fixed_emotion_policy("anger"))[0]
    rec = ng.to_record(ep)
    i = next(i for i, t in enumerate(rec["turns"]) if t["speaker"] == "focal" and t["plan"]["move"] == "offer" and i > 0)
    planned = rec["turns"][i]["plan"]["offer"]
    other = planned + (1 if rec["focal_prefers"] == "higher" else -1) * 3   # firmer, still in range
    unit = rec["unit"]
    said = f"I am furious about this. I need it within {format_offer(planned, unit)}."
    firmer = f"I am furious about this. I need it within {format_offer(other, unit)}."
    judged = {}
    for name, text in (("planned", said), ("other", firmer)):
        r = dict(rec, turns=[dict(t) for t in rec["turns"][:i]] + [dict(rec["turns"][i], text=text)])
        r["turns"][i]["offer"] = parse_offer(text, unit)
        judged[name] = next(j for j in ng.judge_record(r, cfg) if j["turn"] == i)["components"]["offer"]
    assert judged == {"planned": 1.0, "other": 0.5}


class ScriptedLM(ng.LMAgent):
    """An LMAgent without a model: each episode's drafts come from a script, in order; records
    (rows, temperature) of every batched write."""

    def __init__(self, cfg, script, redrafts, role="focal", offers="planned"):
        self.cfg, self.role, self.offers, self.emotion_free = cfg, role, offers, False
        self.redrafts, self.redraft_temperature = redrafts, 0.7
        self.script, self.rounds = script, []

    def prompts(self, eps, emotions):
        return [str(i) for i in range(len(eps))]          # the episode's index into the script

    def write(self, eps, prompts, temperature=None):
        self.rounds.append((len(eps), temperature))
        texts = [self.script[int(p)].pop(0) for p in prompts]
        return [ng.Reply(t, accept=ng.detect_accept(t), free_text=True) for t in texts]


def _redraft_episodes(cfg):
    eps = _episodes(cfg, 3)
    for ep, move in zip(eps, [{"move": "offer", "offer": 34.0}, {"move": "offer", "offer": 34.0},
                              {"move": "accept", "offer": 41.0}]):
        ep.offers = {"focal": 30.0, "counterparty": 41.0}
        ep.private["move"] = move
    return eps


def test_a_reply_that_misses_the_planned_move_is_redrafted_and_counted(cfg):
    script = [["I am furious. I can do 34 days."],                        # done at once: never redrafted
              ["I am furious: 41 days is a lot.", "Maybe 35 days.", "Fine, I can do 34 days."],   # an echo; done
              ["Livid. 41 days is what we need.", "Still 41 days.", "No."]]     # told to accept; never does
    agent = ScriptedLM(cfg, [list(s) for s in script], redrafts=2)
    eps = _redraft_episodes(cfg)
    replies = agent.act(eps, ["anger"] * 3)
    assert agent.rounds == [(3, None), (4, 0.7)]       # greedy first, then the misses x 2, sampled, in one call
    assert [r.text for r in replies] == [script[0][0], "Fine, I can do 34 days.", script[2][0]]
    assert [r.drafts for r in replies] == [1, 3, 3]
    # the rewrite played (the move, not the emotion) records what the first draft did
    assert [r.first for r in replies] == [None, {"move": False, "emotion": True}, None]
    for ep, r in zip(eps, replies):
        ng._apply(ep, "focal", r, cfg, ng.Perceiver(cfg.emotions), "anger")
    assert [ng.move_followed(ep.turns[-1]) for ep in eps] == [True, True, False]
    assert [ep.turns[-1].get("drafts", 1) for ep in eps] == [1, 3, 3]
    assert eps[1].turns[-1]["first_draft"] == {"move": False, "emotion": True} and "first_draft" not in eps[2].turns[-1]
    # no redrafts: the first drafts are played as written, the echo included
    agent = ScriptedLM(cfg, [list(s) for s in script], redrafts=0)
    assert [r.text for r in agent.act(_redraft_episodes(cfg), ["anger"] * 3)] == [s[0] for s in script]
    assert agent.rounds == [(3, None)]
    # nothing to follow: another role, or offers the model picks itself
    for kw in (dict(role="counterparty"), dict(offers="free")):
        agent = ScriptedLM(cfg, [list(s) for s in script], redrafts=2, **kw)
        agent.act(_redraft_episodes(cfg), ["anger"] * 3)
        assert agent.rounds == [(3, None)]


def test_a_reply_without_the_requested_emotion_is_redrafted_the_move_first(cfg):
    """The world perceives no anger in a first draft that does the move: it is written again, and
    a rewrite that does both is played; a rewrite with the emotion but not the move never is; with
    no rewrite doing both, the first draft stays. An emotion-free agent checks the move only."""
    script = [["I can do 34 days.", "Sure, 40 days.", "I am furious. I can do 34 days."],  # the third does both
              ["I can do 34 days.", "I am livid, 50 days!", "Angry? 35 days."],          # none does both
              ["I am furious, but I agree to 41 days."]]                                  # both at once
    agent = ScriptedLM(cfg, [list(s) for s in script], redrafts=2)
    replies = agent.act(_redraft_episodes(cfg), ["anger"] * 3)
    assert agent.rounds == [(3, None), (4, 0.7)]
    assert [r.text for r in replies] == [script[0][2], script[1][0], script[2][0]]
    assert [r.drafts for r in replies] == [3, 3, 1]
    assert [r.first for r in replies] == [{"move": True, "emotion": False}, None, None]
    agent = ScriptedLM(cfg, [list(s) for s in script], redrafts=2)
    agent.emotion_free = True
    replies = agent.act(_redraft_episodes(cfg), ["anger"] * 3)
    assert agent.rounds == [(3, None)] and [r.text for r in replies] == [s[0] for s in script]


def test_redrafts_sample_through_the_key_value_decoder(cfg, tiny_lm):
    """A random tiny model never states the planned number: every focal turn is written
    1 + redrafts times, the rewrites sampled in one call, the first drafts (played, since no
    draft did the move) greedy; all of it reproducible."""
    model, tok = tiny_lm
    seen = []
    for _ in range(2):
        agent = ng.LMAgent(model, tok, cfg, temperature=0, max_new_tokens=4, redrafts=2)
        assert agent.kv_cache
        written, write = [], agent.write

        def recording(eps, prompts, temperature=None, write=write, written=written):
            out = write(eps, prompts, temperature)
            written.append((temperature, [r.text for r in out]))
            return out
        agent.write = recording
        eps = _redraft_episodes(cfg)
        replies = agent.act(eps, ["anger"] * 3)
        assert [r.drafts for r in replies] == [3, 3, 3] and agent.calls == 2
        (t1, greedy), (t2, sampled) = written
        assert t1 is None and t2 == 0.7 and len(sampled) == 6
        assert [r.text for r in replies] == greedy                    # no draft did the move: the first is played
        assert sampled != [g for g in greedy for _ in range(2)]       # the redrafts were sampled, not greedy again
        agent.write(eps, agent.prompts(eps, ["anger"] * 3))
        assert agent.decoder.temperature == 0                          # a first draft is greedy again
        seen.append(written)
    assert seen[0] == seen[1]
