"""`emodistill.py probe`: the one-turn check used to choose SFT settings on training scenarios."""
import pytest

import emodistill
import probe
from conftest import DOMAINS_FILE


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe")
    emodistill.collect(out=str(out), domains_file=DOMAINS_FILE, seeds_per_scenario=2, scenarios="72-75")
    return out / "corpus.jsonl"


@pytest.fixture
def student(tiny_student):
    return str(tiny_student)


def test_probe_counts_rates_and_filters_by_move(corpus, student, capsys):
    got = probe.probe(corpus=str(corpus), student=student, states=8, max_new_tokens=6, domains_file=DOMAINS_FILE)
    assert set(got) == {"offer_fidelity", "emotion_match", "judge_score", "first_draft_fidelity",
                        "first_draft_emotion_match"}
    assert 0 <= got["offer_fidelity"] <= 1 and 0 <= got["emotion_match"] <= 1 and 1 <= got["judge_score"] <= 10
    assert got["first_draft_fidelity"] == got["offer_fidelity"]      # no redrafts: the first draft is played
    assert got["first_draft_emotion_match"] == got["emotion_match"]
    out = capsys.readouterr().out
    assert "[probe] all       n   8" in out and "first draft" not in out
    probe.probe(corpus=str(corpus), student=student, states=4, max_new_tokens=6, move="accept",
                domains_file=DOMAINS_FILE, show=4)
    shown = [line for line in capsys.readouterr().out.splitlines() if "Your move:" in line]
    assert shown and all("Your move: accept their offer" in line for line in shown)


def test_probe_with_redrafts_prints_the_first_drafts_fidelity(corpus, student, capsys):
    got = probe.probe(corpus=str(corpus), student=student, states=4, max_new_tokens=4, redrafts=1,
                      domains_file=DOMAINS_FILE)
    assert got["first_draft_fidelity"] <= got["offer_fidelity"]
    assert "(first draft " in capsys.readouterr().out


def test_probe_names_a_bad_move(corpus, student):
    with pytest.raises(ValueError, match="move must be offer, accept"):
        probe.probe(corpus=str(corpus), student=student, move="walk")
