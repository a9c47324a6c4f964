"""Property and example tests of the offer parser and the accept / walk-away detectors."""
import math
import random

import pytest

import domains
import offers


@pytest.mark.parametrize("unit,lo,hi", [("days", 1, 400), ("minutes", 5, 400), ("clock", -60, 420)])
def test_format_then_parse_round_trips_every_value_and_wording(unit, lo, hi):
    step = 1 if unit == "days" else 5
    for v in range(lo, hi + 1, step):
        for variant in range(3):
            text = offers.format_offer(v, unit, variant)
            assert offers.parse_offer(f"I propose {text}, final answer.", unit) == v, (v, text)


@pytest.mark.parametrize("text,unit,want", [
    ("Pay it all within 3 weeks.", "days", 21),
    ("Two months is the most I can do.", "days", 60),
    ("How about twenty-one days?", "days", 21),
    ("I can do 60 to 90 days.", "days", 75),          # a range counts as its midpoint
    ("60-90 days works for me.", "days", 75),
    ("Your balance of $15,700 is due in 30 days.", "days", 30),   # money is skipped
    ("You are 133 days overdue, so I need it in 45 days.", "days", 45),
    ("You said 90 days; I offer 45 days.", "days", 45),  # the last offer counts
    ("A week and we are done.", "days", 7),
    ("Fine, 48 hours.", "days", 2),
    ("Hold on for 90 minutes.", "minutes", 90),
    ("Can you hold on for 2 hours?", "minutes", 120),
    ("Stay put for 1.5 hours.", "minutes", 90),
    ("Just an hour and a half more.", "minutes", 90),
    ("Half an hour, that's all.", "minutes", 30),
    ("Give me 45 more.", "minutes", 45),                  # bare number, no unit
    ("Lights out by 10:30 PM.", "clock", 90),
    ("I'll sleep at 11pm.", "clock", 120),
    ("22:45 is my bedtime.", "clock", 105),
    ("Not before midnight.", "clock", 180),
    ("Maybe 1:30 AM?", "clock", 270),
    ("In bed by 11, deal?", "clock", 120),
    ("12:30 is fine.", "clock", 210),                   # half past midnight
    ("Let's say 8:30 PM.", "clock", -30),               # before 9 PM is negative
])
def test_parser_examples(text, unit, want):
    assert offers.parse_offer(text, unit) == want


@pytest.mark.parametrize("unit", domains.UNITS)
def test_no_number_means_no_offer(unit):
    assert offers.parse_offer("I really need you to work with me here.", unit) is None
    assert offers.parse_offer("", unit) is None


@pytest.mark.parametrize("unit", domains.UNITS)
def test_parser_never_crashes_on_junk(unit):
    rng = random.Random(0)
    alphabet = "0123456789 :.-,$%apmdayswekhourinute\n\t\u00e9\u2013ABC" + "".join(map(chr, range(32, 127)))
    for _ in range(3000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        v = offers.parse_offer(s, unit)
        assert v is None or (isinstance(v, float) and math.isfinite(v)), (s, v)
    for s in ["9" * 400 + " days", "1e308 days", ":" * 50, "99:99 pm", "0:00 am", "13 pm", None, 5]:
        v = offers.parse_offer(s, unit)
        assert v is None or math.isfinite(v)


def test_accept_and_walk_detection():
    assert offers.detect_accept("I accept 30 days.")
    assert offers.detect_accept("All right, you have a deal at 2 hours.")
    assert offers.detect_accept("Agreed, 10:30 PM it is.")
    assert not offers.detect_accept("I can't accept 30 days.")
    assert not offers.detect_accept("I will not agree to that.")
    assert not offers.detect_accept("That is no deal at all, I'm done.")
    for text in ["I haven't agreed to anything yet.", "I don't think that works for me.", "That is not a good deal.",
                 "That is a terrible deal!", "Is 30 days agreed?", "No, that is not fine with me",
                 "I cannot say that works for me.", "In bed by 11, deal?"]:
        assert not offers.detect_accept(text), text
    assert offers.detect_accept("Fine. I accept 45 days; send the papers.")
    assert offers.detect_walk_away("This is going nowhere; I'm done talking.")
    assert offers.detect_walk_away("I will walk away now.")
    assert not offers.detect_walk_away("Let us keep talking about 30 days.")


def test_sim_replies_are_read_as_their_flags(cfg):
    for dom in cfg.domains.values():
        for s in dom.teacher["accept"] + dom.replies["accept"]:
            assert offers.detect_accept(s.format(offer=offers.format_offer(30, dom.unit))), s
        for s in dom.replies["walk_away"]:
            assert offers.detect_walk_away(s), s
        for s in dom.teacher["offers"] + dom.replies["offer"]:
            t = s.format(offer=offers.format_offer(30, dom.unit))
            assert not offers.detect_accept(t) and not offers.detect_walk_away(t), t


@pytest.mark.parametrize("text,unit,want", [
    ("I can do 40 days, not 30 days.", "days", 40),
    ("45 days, not 30.", "days", 45),
    ("40 days rather than 30 days.", "days", 40),
    ("Not 2 hours, 90 minutes.", "minutes", 90),
    ("10 PM, not 11 PM.", "clock", 60),
    ("In bed by 10, not by 11.", "clock", 60),
    ("Not 30 days.", "days", None),                        # only a refusal: no offer (the last one stands)
    ("Not more than 30 days.", "days", 30),                # a bound is still an offer
])
def test_a_refused_number_is_not_the_offer(text, unit, want):
    assert offers.parse_offer(text, unit) == want
