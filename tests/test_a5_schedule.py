"""Assignment A5 (a hand-designed emotion schedule, assignments/A5-schedule.md): the autograder.
`python -m pytest -m a5`.

The schedule is played by the simulated teacher against the simulated counterparty on the
held-out scenarios 80-99 (never the training ones it was designed on) and must beat both
baselines of `emodistill.py eval`, teacher-random and teacher-best-fixed, pooled and in every
domain. Simulator only, no language model."""
import os
import sys

import pytest

import domains as dm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assignments"))
import a5_schedule as a5  # noqa: E402

pytestmark = pytest.mark.a5

MARGIN = 0.05     # pooled utility above each baseline (the reference is ~0.2 above best-fixed)


def _views(domain):
    """Views at focal turns 0-11, with and without a displayed emotion of the counterparty."""
    out = []
    for j in range(12):
        for shown in ("neutral", "annoyance", "gratitude"):
            mine = tuple(dm.EMOTIONS[(3 * k + j) % 28] for k in range(j))
            out.append(a5.View(domain, j, mine, tuple(40.0 - k for k in range(j)), tuple(200.0 - 5 * k for k in range(j)),
                               "Here is where I stand. My offer is 120 days." if j else "", shown if j else "neutral",
                               "offer"))
    return out


@pytest.mark.parametrize("domain", ["crad", "disaster", "hospital", "student"])
def test_one_known_emotion_per_view_deterministic_and_independent(domain):
    views = _views(domain)
    got = a5.schedule(views)
    assert len(got) == len(views)
    assert all(e in dm.EMOTIONS for e in got), [e for e in got if e not in dm.EMOTIONS]
    assert a5.schedule(views) == got                                   # the same views, the same emotions
    assert [a5.schedule([v])[0] for v in views] == got                 # an episode's choice ignores the others
    assert a5.schedule(list(reversed(views))) == list(reversed(got))


def test_the_schedule_is_not_one_fixed_emotion():
    """A single emotion all episode long is the best-fixed baseline, not a schedule."""
    for d in ("crad", "disaster", "hospital", "student"):
        assert len(set(a5.schedule(_views(d)))) >= 2, d


@pytest.fixture(scope="module")
def board(cfg):
    rows, table = a5.leaderboard(cfg, {"schedule": a5.as_policy(a5.schedule, cfg)}, "test", a5.GRADE_SEEDS)
    print("\n" + table)
    return rows


def test_beats_random_and_best_fixed_on_heldout_scenarios(board):
    you, fixed, rand = board["schedule"], board["teacher-best-fixed"], board["teacher-random"]
    assert you["pooled"][0] > fixed["pooled"][0] + MARGIN, (you["pooled"], fixed["pooled"])
    assert you["pooled"][0] > rand["pooled"][0] + MARGIN, (you["pooled"], rand["pooled"])
    for d in ("crad", "disaster", "hospital", "student"):
        assert you[d][0] > max(fixed[d][0], rand[d][0]), (d, you[d], fixed[d], rand[d])
