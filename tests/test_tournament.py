"""The role swap (--side counterparty), the mirrored counterparty agent and the
trained-vs-trained tournament."""
import json
import os

import pytest

import domains
import runs
import emodistill
import negotiate as ng
from conftest import DOMAINS_FILE


@pytest.fixture(scope="module")
def cp_cfg():
    return domains.load_config(DOMAINS_FILE, side="counterparty")


def test_swapped_domains_trade_roles_direction_ranges_and_texts(cfg, cp_cfg):
    for k, d in cfg.domains.items():
        s = cp_cfg.domains[k]
        assert (s.focal_role, s.counterparty_role) == (d.counterparty_role, d.focal_role)
        assert {s.focal_prefers, d.focal_prefers} == {"lower", "higher"}
        assert (s.s0, s.b0) == (d.b0, d.s0)
        assert s.prompt["focal_goal"] == d.prompt["counterparty_goal"]
        assert s.teacher["offers"] == d.replies["offer"] and s.replies["offer"] == d.teacher["offers"]
        assert s.teacher["accept"] == d.replies["accept"] and s.replies["accept"] == d.teacher["accept"]
        assert s.replies["walk_away"] != d.replies["walk_away"]          # from the swap: section
        assert s.personas == d.personas and s.effects == d.effects      # dynamics kept (see swap_domain)
        for sc in domains.make_scenarios(s)[:10]:                              # its own direction holds
            assert (sc.s0 < sc.b0) == (s.focal_prefers == "lower")
            assert min(sc.s0, sc.b0) <= sc.reservation <= max(sc.s0, sc.b0)


def test_swap_section_errors_are_named(tmp_path):
    text = open(DOMAINS_FILE).read()
    bad = tmp_path / "bad.yaml"
    # a walk-away list removed from crad's swap section: named, on either side, since it is validated always
    i = text.index("    swap:")
    j = text.index("        walk_away:", i)
    k = text.index("        displayed:", j)
    bad.write_text(text[:j] + text[k:])
    for side in domains.SIDES:
        with pytest.raises(ng.DomainConfigError, match=r"domain 'crad'.*walk_away.*role-swapped"):
            domains.load_config(str(bad), side=side)
    # no swap section at all: fine for the focal side, a clear error for the counterparty side
    none = tmp_path / "none.yaml"
    none.write_text(runs.without_sections(text, ("swap",)))
    assert set(domains.load_config(str(none)).domains) == {"crad", "disaster", "hospital", "student"}
    with pytest.raises(ng.DomainConfigError, match="domain 'crad': no 'swap' section"):
        domains.load_config(str(none), side="counterparty")
    with pytest.raises(ng.DomainConfigError, match="side must be"):
        domains.load_config(DOMAINS_FILE, side="buyer")


class Recorder:
    """A focal-side agent that says a fixed offer and records what it was shown."""

    def __init__(self, offer_of):
        self.seen, self.offer_of = [], offer_of

    def act(self, eps, emotions):
        out = []
        for ep, emo in zip(eps, emotions):
            self.seen.append((ep.dom, ep.sc, [t["speaker"] for t in ep.turns], dict(ep.offers), emo))
            out.append(ng.Reply(f"I propose {ng.format_offer(self.offer_of(ep), ep.dom.unit)}."))
        return out


def test_mirrored_agent_sees_the_swapped_episode(cfg, cp_cfg):
    dom = cfg.domains["crad"]
    sc = domains.make_scenarios(dom)[80]
    ep = ng.new_episode(dom, sc, 0)
    rec = Recorder(lambda m: m.sc.s0)                 # always its own target
    cp = ng.MirroredAgent(rec, cp_cfg, ng.fixed_emotion_policy("sadness"))
    ng.run_episodes(cfg, [ep], ng.SimTeacher(cfg), cp, ng.fixed_emotion_policy("anger"))
    assert ep.done and "mirror" not in ep.private    # freed with the episode
    sdom, msc, speakers, offers, emo = rec.seen[1]
    assert sdom is cp_cfg.domains["crad"] and sdom.focal_prefers == "higher"
    assert (msc.s0, msc.b0, msc.id) == (sc.b0, sc.s0, sc.id)
    assert speakers == ["counterparty", "focal", "counterparty"]          # the focal's turns, flipped
    assert offers == {"focal": ep.turns[1]["offer"], "counterparty": ep.turns[2]["offer"]}
    assert emo == "sadness"
    cp_turns = [t for t in ep.turns if t["speaker"] == "counterparty"]
    assert all(t["emotion"] == "sadness" and t["offer"] == sc.b0 for t in cp_turns)
    assert all(t["emotion"] == "anger" for t in ep.turns if t["speaker"] == "focal")


def test_a_mirrored_sim_teacher_opens_at_the_counterparty_target(cfg, cp_cfg):
    """Seen through the mirror, the counterparty's target is b0, so the SimTeacher on that
    side opens there and concedes toward the focal side, never past its opening."""
    eps = []
    for d, dom in cfg.domains.items():
        eps += [ng.new_episode(dom, sc, k) for sc in domains.make_scenarios(dom)[80:90] for k in range(3)]
    ng.run_episodes(cfg, eps, ng.SimTeacher(cfg), ng.MirroredAgent(ng.SimTeacher(cp_cfg), cp_cfg,
                                                                     ng.random_emotion_policy()))
    for ep in eps:
        cp_offers = [t["offer"] for t in ep.turns if t["speaker"] == "counterparty" and t["offer"] is not None]
        if cp_offers:
            assert cp_offers[0] == pytest.approx(ep.sc.b0, abs=5)
            assert all(ng.position(x, ep.sc.s0, ep.sc.b0) <= 1e-9 + ng.position(y, ep.sc.s0, ep.sc.b0)
                       for x, y in zip(cp_offers, cp_offers[1:]))   # moves toward the focal side only
    assert any(ng.outcome(ep)["success"] for ep in eps)


def test_tournament_needs_a_counterparty_side_run(tmp_path, capsys):
    f, c = str(tmp_path / "f"), str(tmp_path / "c")
    assert emodistill.main(["collect", "--out", c, "--scenarios", "0-3", "--seeds-per-scenario", "2"]) == 0
    capsys.readouterr()
    assert emodistill.main(["tournament", "--out", f, "--cp-run", c, "--methods", "teacher-random",
                            "--cp-methods", "teacher-random"]) == 2
    assert "not a counterparty-side run" in capsys.readouterr().err


def test_tournament_on_a_tiny_model(tmp_path, tiny_lm, capsys):
    """Both sides trained (collect -> judge -> iql; the counterparty side with --side
    counterparty), then a round robin of a teacher method and the LM methods vanilla and iql
    on each side, with a tiny random student: one table, every pairing cached on re-run."""
    model, tok = tiny_lm
    student = str(tmp_path / "tiny")
    model.save_pretrained(student)
    tok.save_pretrained(student)
    f, c = str(tmp_path / "f"), str(tmp_path / "c")
    run = emodistill.main
    for out, side in ((f, "focal"), (c, "counterparty")):
        base = ["--out", out, "--side", side]
        assert run(["collect", *base, "--scenarios", "0-5", "--seeds-per-scenario", "2"]) == 0
        assert run(["judge", *base]) == 0
        assert run(["iql", *base, "--steps", "20"]) == 0
    crad = [json.loads(x) for x in open(os.path.join(c, "corpus.jsonl")) if '"crad"' in x]
    assert crad and all(r["s0"] > r["b0"] and r["focal_prefers"] == "higher" for r in crad)   # the debtor's side
    argv = ["tournament", "--out", f, "--cp-run", c, "--methods", "teacher-iql,vanilla,iql",
            "--cp-methods", "vanilla,iql", "--student", student, "--domains", "crad,student",
            "--scenarios-per-domain", "2", "--max-new-tokens", "8"]   # (a random tiny model never ends a reply)
    assert run(argv) == 0
    md = open(os.path.join(f, "studies", "tournament.md")).read()
    rows = {ln.split(" | ")[0][2:]: ln for ln in md.splitlines() if ln.startswith("| ") and " / " in ln}
    assert set(rows) == {"teacher-iql", "vanilla", "iql"}
    for ln in rows.values():
        for cell in ln.strip(" |").split(" | ")[1:]:
            fu, cu = (float(x) for x in cell.split("<br>")[0].split(" / "))
            assert 0 <= fu <= 1 and 0 <= cu <= 1 and fu + cu <= 1 + 1e-9
    recs = json.load(open(os.path.join(f, "tournament", "iql__vs__iql.json")))["records"]
    assert len(recs) == 4
    assert all(t.get("emotion") in ng.EMOTIONS for r in recs for t in r["turns"])      # both sides chose emotions
    recs = json.load(open(os.path.join(f, "tournament", "vanilla__vs__vanilla.json")))["records"]
    assert not any(t.get("emotion") for r in recs for t in r["turns"])
    assert "<!-- study:tournament -->" in open(os.path.join(f, "results.md")).read()
    capsys.readouterr()
    assert run(argv) == 0
    assert capsys.readouterr().out.count("cached in") == 6
