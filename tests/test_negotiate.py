"""Property tests of the simulated world: scenarios, utility direction, the counterparty, the
phrase banks, the judge, and the paper's premise that emotion *scheduling* matters."""
import numpy as np
import pytest

import domains
import negotiate as ng
import offers
import report


def test_config_has_everything(cfg):
    assert list(cfg.emotions) == domains.EMOTIONS and len(domains.EMOTIONS) == 28
    assert set(cfg.domains) == {"crad", "disaster", "hospital", "student"}
    for dom in cfg.domains.values():
        assert len(dom.train_personas) >= 3
        assert any(p.heldout for p in dom.personas.values())
        for e in cfg.emotions.values():
            assert len(e["instructions"]) >= 2


def test_scenarios_are_deterministic_and_split(cfg):
    for dom in cfg.domains.values():
        a, b = domains.make_scenarios(dom, seed=0), domains.make_scenarios(dom, seed=0)
        assert a == b and len(a) == 100
        assert [s.split for s in a].count("train") == 80 and all(s.split == "test" for s in a[80:])
        assert domains.make_scenarios(dom, seed=1) != a
        held = next(p.name for p in dom.personas.values() if p.heldout)
        c = domains.make_scenarios(dom, seed=0, persona=held)
        assert all(x.persona == held for x in c)
        assert [(x.s0, x.b0, x.reservation) for x in c] == [(x.s0, x.b0, x.reservation) for x in a]
        for s in a:  # reservation strictly between the two openings
            assert min(s.s0, s.b0) < s.reservation < max(s.s0, s.b0)
            assert s.persona in dom.personas and not dom.personas[s.persona].heldout


def test_utility_direction_in_every_domain(cfg):
    for dom in cfg.domains.values():
        for s in domains.make_scenarios(dom):
            assert ng.utility_of(s.s0, s.s0, s.b0) == 1.0
            assert ng.utility_of(s.b0, s.s0, s.b0) == 0.0
            assert ng.utility_of((s.s0 + s.b0) / 2, s.s0, s.b0) == pytest.approx(0.5)
            beyond = s.s0 + (s.s0 - s.b0)          # better for focal than its own target
            assert ng.utility_of(beyond, s.s0, s.b0) == 1.0
            # the better side for the focal agent depends on the domain's direction
            better = s.s0 - 1 if dom.focal_prefers == "lower" else s.s0 + 1
            assert ng.position(better, s.s0, s.b0) > 1


class Stubborn:
    """A focal agent that never concedes: its offer is always s0, with an emotion phrase."""

    def __init__(self, cfg):
        self.cfg = cfg

    def act(self, eps, emotions):
        out = []
        for ep, e in zip(eps, emotions):
            phrase = self.cfg.emotions[e]["phrases"][ep.t % 6]
            out.append(ng.Reply(f"{phrase} I want {offers.format_offer(ep.sc.s0, ep.dom.unit)}."))
        return out


def test_counterparty_never_passes_reservation_nor_moves_backward(cfg):
    cp = ng.SimCounterparty(cfg)
    for dom in cfg.domains.values():
        eps = [ng.new_episode(dom, sc, k) for sc in domains.make_scenarios(dom) for k in range(3)]
        ng.run_episodes(cfg, eps, Stubborn(cfg), cp, ng.random_emotion_policy())
        for ep in eps:
            sc = ep.sc
            r_pos = ng.position(sc.reservation, sc.s0, sc.b0)
            cp_pos = [ng.position(t["offer"], sc.s0, sc.b0) for t in ep.turns
                      if t["speaker"] == "counterparty" and t["offer"] is not None]
            assert all(p <= r_pos + 1e-9 for p in cp_pos), (ep.key, cp_pos, r_pos)
            assert all(b >= a - 1e-9 for a, b in zip(cp_pos, cp_pos[1:])), (ep.key, cp_pos)
            if ep.agreement is not None:
                assert ng.position(ep.agreement, sc.s0, sc.b0) <= r_pos + 1e-9
        # against a focal agent that never moves, no deal beats the reservation, so s0 is never
        # reached unless the reservation rounds onto it
        assert all(ep.end in ("walk_away", "max_turns", "accept", "converged") for ep in eps)


def _one_turn_episode(cfg, text, label):
    dom = cfg.domains["crad"]
    ep = ng.new_episode(dom, domains.make_scenarios(dom)[3], 0)
    ep.turns.append({"speaker": "focal", "text": text, "emotion": label, "offer": dom.s0[0]})
    ep.offers["focal"] = float(dom.s0[0])
    return ep


def test_counterparty_reacts_to_text_not_label(cfg):
    cp = ng.SimCounterparty(cfg)
    angry = cfg.emotions["annoyance"]["phrases"][0] + " Pay in 14 days."
    warm = cfg.emotions["gratitude"]["phrases"][0] + " Pay in 14 days."
    # same text, different labels -> identical reaction
    a, b = _one_turn_episode(cfg, angry, "annoyance"), _one_turn_episode(cfg, angry, "gratitude")
    ra, rb = cp.act([a])[0], cp.act([b])[0]
    assert ra == rb and a.private["cp"] == b.private["cp"]
    assert a.private["cp"]["heard"] == ["annoyance"]
    # same label, different text -> a different perceived emotion and concession
    c = _one_turn_episode(cfg, warm, "annoyance")
    cp.act([c])
    assert c.private["cp"]["heard"] == ["gratitude"]
    assert c.private["cp"]["f"] != a.private["cp"]["f"]


def test_every_teacher_phrase_is_perceived_as_its_emotion(cfg):
    perceive = ng.Perceiver(cfg.emotions)
    for name, e in cfg.emotions.items():
        for p in e["phrases"]:
            assert perceive(p) == name, (name, p)
    for dom in cfg.domains.values():  # offer sentences carry no emotion of their own
        for s in dom.teacher["offers"]:
            assert perceive(s.format(offer="30 days")) == "neutral", s


def _mean_utility(cfg, dom, policy, seeds=1):
    # (one seed on each of the 80 training scenarios: the schedule wins by 0.13-0.19 in every
    # domain with 1 seed and with 2, against the 0.05 asked below)
    eps = [ng.new_episode(dom, sc, k) for sc in domains.make_scenarios(dom)[:80] for k in range(seeds)]
    ng.run_episodes(cfg, eps, ng.SimTeacher(cfg), ng.SimCounterparty(cfg), policy)
    return float(np.mean([ng.outcome(ep)["utility"] for ep in eps]))


def _phase_schedule(dom):
    """A state-dependent schedule that sees only the turn number: in each third of a typical
    patience, cycle through the 3 emotions the domain's table rates best for that phase."""
    mid = sum(dom.patience) / 2
    best = []
    for ph in range(3):
        score = {e: dom.effects.get(e, [0] * 3)[ph] - 5 * dom.hazard.get(e, [0] * 3)[ph] for e in domains.EMOTIONS}
        best.append(sorted(domains.EMOTIONS, key=lambda e: -score[e])[:3])

    def choose(eps):
        return [best[ng.SimCounterparty.phase(ep.t // 2, mid)][(ep.t // 2) % 3] for ep in eps]
    return choose


@pytest.mark.parametrize("domain", ["crad", "disaster", "hospital", "student"])
def test_state_dependent_schedule_beats_best_fixed_emotion(cfg, domain):
    """The paper's premise: no single fixed emotion is optimal throughout an episode (train split)."""
    dom = cfg.domains[domain]
    fixed = {e: _mean_utility(cfg, dom, ng.fixed_emotion_policy(e)) for e in domains.EMOTIONS}
    best = max(fixed, key=fixed.get)
    sched = _mean_utility(cfg, dom, _phase_schedule(dom))
    print(f"{domain}: best fixed {best} {fixed[best]:.3f}, schedule {sched:.3f}")
    assert sched > fixed[best] + 0.05, (domain, best, fixed[best], sched)


def test_judge_components_and_range(cfg):
    dom = cfg.domains["hospital"]
    eps = [ng.new_episode(dom, sc, 0) for sc in domains.make_scenarios(dom)[:40]]
    ng.run_episodes(cfg, eps, ng.SimTeacher(cfg), ng.SimCounterparty(cfg), ng.random_emotion_policy())
    seen_walk = False
    for ep in eps:
        rec = ng.to_record(ep)
        scores = ng.judge_record(rec, cfg)
        assert [s["turn"] for s in scores] == [i for i, t in enumerate(rec["turns"]) if t["speaker"] == "focal"]
        for s in scores:
            assert 1 <= s["score"] <= 10
            assert set(s["components"]) == set(ng.JUDGE_WEIGHTS)
            assert all(0 <= v <= 1 for v in s["components"].values())
        if rec["outcome"]["end"] == "walk_away":
            seen_walk = True
            assert scores[-1]["components"]["closing"] == 0.0
        if rec["outcome"]["success"]:
            assert scores[-1]["components"]["closing"] == pytest.approx(rec["outcome"]["utility"], abs=1e-4)
    assert seen_walk
    # fidelity: the intended emotion is not what the text expresses
    rec = ng.to_record(eps[0])
    rec["turns"][0]["emotion"] = "joy" if rec["turns"][0]["perceived"] != "joy" else "anger"
    assert ng.judge_record(rec, cfg)[0]["components"]["fidelity"] == 0.0


def test_bootstrap_ci():
    assert report.bootstrap_ci([0.5] * 10) == (0.5, 0.5, 0.5)
    m, lo, hi = report.bootstrap_ci(np.arange(100) / 100)
    assert lo < m < hi and m == pytest.approx(0.495)
    assert all(x != x for x in report.bootstrap_ci([]))


def _rec(domain, sid, u, seed=0):
    return {"domain": domain, "scenario_id": sid, "seed": seed, "persona": None, "outcome": {"utility": u}}


def test_paired_diff_ci_matches_episodes_and_ignores_unmatched():
    a = [_rec("crad", 80, 0.5), _rec("crad", 81, 0.2), _rec("crad", 82, 0.0), _rec("crad", 83, 0.9)]
    b = [_rec("crad", 82, 0.3), _rec("crad", 80, 0.1), _rec("crad", 81, 0.2), _rec("crad", 84, 0.0)]
    m, lo, hi, n = report.paired_diff_ci(a, b)
    assert n == 3 and m == pytest.approx((0.4 + 0.0 - 0.3) / 3)    # 83 and 84 have no partner
    assert -0.3 - 1e-9 <= lo <= m <= hi <= 0.4 + 1e-9
    # a constant difference has a zero-width interval; another seed of the same scenario is another pair
    m, lo, hi, n = report.paired_diff_ci([_rec("x", 1, 0.3), _rec("x", 1, 0.5, seed=1)], [_rec("x", 1, 0.1), _rec("x", 1, 0.3, seed=1)])
    assert n == 2 and (m, lo, hi) == pytest.approx((0.2, 0.2, 0.2))
    assert report.paired_diff_ci(a, [_rec("student", 80, 0.1)])[3] == 0


def test_a_model_restating_the_other_offer_is_not_read_as_its_offer(cfg):
    """An LM that repeats the counterparty's number while refusing it ("150 days is far too
    long") must not converge on that number; the same words from a simulated agent (whose
    offers are known from its templates) and an acceptance still count."""
    dom = cfg.domains["crad"]
    sc = domains.make_scenarios(dom)[80]
    per = ng.Perceiver(cfg.emotions)

    def play(focal_reply):
        ep = ng.new_episode(dom, sc, 0)
        ng._apply(ep, "focal", ng.Reply("I need it paid in 20 days."), cfg, per)
        ng._apply(ep, "counterparty", ng.Reply("I can pay in 150 days."), cfg, per)
        ng._apply(ep, "focal", focal_reply, cfg, per)
        return ep

    ep = play(ng.Reply("150 days is far too long for us.", free_text=True))
    assert ep.turns[-1]["offer"] is None and ep.turns[-1]["echo"] and ep.offers["focal"] == 20 and not ep.done
    ep = play(ng.Reply("150 days is far too long; I can do 25 days.", free_text=True))
    assert ep.turns[-1]["offer"] == 25 and "echo" not in ep.turns[-1] and not ep.done
    ep = play(ng.Reply("150 days is far too long for us."))          # a template: taken as said
    assert ep.turns[-1]["offer"] == 150 and ep.end == "converged"
    text = "All right, I accept 150 days."
    ep = play(ng.Reply(text, accept=offers.detect_accept(text), free_text=True))
    assert ep.end == "accept" and ep.agreement == 150
