"""Not needed to follow the paper: the deterministic offer parser (`parse_offer`), the offer
renderer (`format_offer`) and the accept / walk-away detectors.

Where the paper's reference code reads offers with an LLM call, here one deterministic regex
parser reads each message (cached), and the same parser is used in collection, training and
evaluation. Its rules are listed in `parse_offer`.
"""
from __future__ import annotations

import functools
import math
import re


def format_offer(value, unit, variant=0):
    """Render a number of the domain's unit as text. `variant` picks an equivalent wording
    (3 weeks for 21 days, 2 hours for 120 minutes) so the corpus exercises the parser."""
    v = int(round(value))
    if unit == "days":
        if variant % 3 == 1 and v % 7 == 0 and v >= 14:
            return f"{v // 7} weeks"
        if variant % 3 == 2 and v % 30 == 0 and v >= 60:
            return f"{v // 30} months"
        return f"{v} day" if v == 1 else f"{v} days"
    if unit == "minutes":
        if variant % 2 == 1 and v % 30 == 0 and v >= 60:
            h = v / 60
            return f"{h:g} hour" if h == 1 else f"{h:g} hours"
        return f"{v} minutes"
    if unit == "clock":  # minutes after 9 PM -> wall clock
        m = (21 * 60 + v) % 1440
        h24, mm = divmod(m, 60)
        h12 = h24 % 12 or 12
        return f"{h12}:{mm:02d} {'AM' if h24 < 12 else 'PM'}"
    raise ValueError(f"unknown unit {unit}")


_NUM_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen".split())}
_NUM_WORDS.update({"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60,
                   "seventy": 70, "eighty": 80, "ninety": 90, "a": 1, "an": 1, "a couple of": 2})
_TENS = "twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety"
_ONES = "one|two|three|four|five|six|seven|eight|nine"
_WORDNUM = (rf"(?:(?:{_TENS})(?:[- ](?:{_ONES}))?|zero|{_ONES}|ten|eleven|twelve|thirteen|fourteen|"
            r"fifteen|sixteen|seventeen|eighteen|nineteen|a couple of|an|a)")
_NUM = rf"(?:\d+(?:\.\d+)?|{_WORDNUM})"
_UNIT_WORDS = {"day": "day", "days": "day", "week": "week", "weeks": "week", "month": "month",
               "months": "month", "minute": "minute", "minutes": "minute", "min": "minute",
               "mins": "minute", "hour": "hour", "hours": "hour", "hr": "hour", "hrs": "hour"}
_IN_DAYS = {"day": 1.0, "week": 7.0, "month": 30.0, "hour": 1 / 24}
_IN_MINUTES = {"minute": 1.0, "hour": 60.0}
_DUR = re.compile(
    rf"(?<![\w$.])(?:(half an?)|({_NUM})(?:\s*(?:-|–|to|or|and)\s*({_NUM}))?(\s+and a half)?)"
    r"\s*-?\s*(days?|weeks?|months?|minutes?|mins?|hours?|hrs?)\b(\s+and a half)?")
_CLOCK = re.compile(r"(?<![\d$])(\d{1,2})(?::([0-5]\d))?\s*(a\.?m\.?|p\.?m\.?)(?![a-z])"
                    r"|(?<![\d$:])(\d{1,2}):([0-5]\d)(?![\d])|\b(midnight)\b")
_BY_HOUR = re.compile(r"\b(?:by|at|until|till|til|before|around|about)\s+(\d{1,2})\b(?![:.\d%])")
_NOT_AN_OFFER = re.compile(r"\s*(?:overdue|past due|late\b|ago\b|old\b|already|so far|behind|of delay|"
                           r"on the wait|waiting)")
_REJECTED = re.compile(r"(?:\bnot|\bnever|\brather than|\binstead of)\s+$")   # "..., not 30 days": refused
_BARE = re.compile(r"(?<![\w$.,:])(\d+(?:\.\d+)?)(?![\w%:]|\.\d|,\d)")


def _num(tok):
    tok = tok.strip().lower()
    try:
        return float(tok)
    except ValueError:
        pass
    if tok in _NUM_WORDS:
        return float(_NUM_WORDS[tok])
    parts = re.split(r"[- ]", tok)
    return float(sum(_NUM_WORDS.get(p, 0) for p in parts))


def _clock_to_minutes(h, m, ampm):
    """Wall-clock time -> minutes after 9 PM (times before 9 PM are negative)."""
    if h > 23 or m > 59:
        return None
    if ampm:
        if h == 0 or h > 12:
            return None
        h24 = (h % 12) + (12 if ampm.startswith("p") else 0)
    elif h >= 13 or h == 0:
        h24 = h
    elif h == 12:
        h24 = 0              # a bedtime "12:30" means half past midnight
    elif h <= 5:
        h24 = h              # 1-5 without AM/PM: after midnight
    else:
        h24 = h + 12         # 6-11 without AM/PM: evening
    after9 = (h24 * 60 + m - 21 * 60) % 1440
    return float(after9 - 1440 if after9 > 18 * 60 else after9)


@functools.lru_cache(maxsize=65536)
def parse_offer(text, unit):
    """The offer stated in `text`, in the domain's unit, or None.

    Rules (deterministic):
      * days:    "45 days", "3 weeks" (21), "2 months" (60), "48 hours" (2), number words too;
      * minutes: "90 minutes", "2 hours" (120), "1.5 hours", "an hour and a half", "half an hour";
      * clock:   "10:30 PM" -> 90 (minutes after 9 PM), "11pm", "22:30", "midnight" -> 180,
                 "by 11" -> 120; 12:xx and 1-5 without AM/PM count as after midnight;
      * a range ("60 to 90 days", "60-90 days") counts as its midpoint: the parser is role-blind,
        so it takes neither side's favourable end;
      * numbers that describe the situation, not an offer, are skipped: money ("$5,000"),
        percentages, and durations followed by "overdue", "ago", "already", "waiting", ...;
      * when a message states several offers, the last one counts ("You said 90 days; I offer 45");
      * a number the speaker refuses is not its offer: "40 days, not 30 days" is 40;
      * with no unit at all, a bare number is taken (the last one) for days and minutes.
    Never raises: any string gives a float or None.
    """
    if not isinstance(text, str) or not text:
        return None
    try:
        return _parse_offer(text.lower(), unit)
    except (ValueError, OverflowError, IndexError):  # defensive: junk never crashes a run
        return None


def _rejected(t, pos):
    """The number at `pos` is one the speaker refuses ("40 days, not 30 days")."""
    return _REJECTED.search(t, max(0, pos - 16), pos) is not None


def _parse_offer(t, unit):
    found = []  # (position, value)
    if unit == "clock":
        for m in _CLOCK.finditer(t):
            if m.group(6):
                v = 180.0
            elif m.group(1):
                v = _clock_to_minutes(int(m.group(1)), int(m.group(2) or 0), m.group(3).replace(".", ""))
            else:
                v = _clock_to_minutes(int(m.group(4)), int(m.group(5)), "")
            if v is not None and not _rejected(t, m.start()):
                found.append((m.start(), v))
        if not found:
            for m in _BY_HOUR.finditer(t):
                v = _clock_to_minutes(int(m.group(1)), 0, "")
                if v is not None and not _rejected(t, m.start()):
                    found.append((m.start(), v))
        return max(found)[1] if found else None
    scale = _IN_DAYS if unit == "days" else _IN_MINUTES
    for m in _DUR.finditer(t):
        u = _UNIT_WORDS[m.group(5)]
        if u not in scale or _NOT_AN_OFFER.match(t, m.end()) or _rejected(t, m.start()):
            continue
        if m.group(1):
            v = 0.5
        else:
            v = _num(m.group(2))
            if m.group(3):
                v = (v + _num(m.group(3))) / 2
            if m.group(4) or m.group(6):
                v += 0.5
        if not math.isfinite(v):
            continue
        found.append((m.start(), round(v * scale[u], 4)))
    if found:
        return max(found)[1]
    bare = [(m.start(), float(m.group(1))) for m in _BARE.finditer(t)
            if not _NOT_AN_OFFER.match(t, m.end()) and not _rejected(t, m.start()) and not re.match(r"\s*(?:%|percent|dollars|usd|k\b|years?)",
                                                                    t[m.end():])]
    bare = [(p, v) for p, v in bare if math.isfinite(v) and v < 1e6]
    return max(bare)[1] if bare else None


_ACCEPT = re.compile(r"\b(?:i|we)\s+(?:(?:can|will|do)\s+)?(?:accept|agree)\b|\bit'?s a deal\b|\b(?:we|you) have a deal\b|"
                     r"^\s*deal\b|\bagreed\b|(?:days?|weeks?|months?|minutes?|hours?|[ap]\.?m\.?)\s+it is\b|"
                     r"\b(?:that )?works for me\b|\bthat works\b|\bfine with me\b|\block (?:that|it) in\b")
_NEG = re.compile(r"(?:\b(?:not|never|no|cannot)|n't)\s+(?:\w+\s+){0,2}(?:accept|agree|deal|work|fine|good)"
                  r"|\b(?:bad|terrible|awful|lousy|poor) deal\b")
_WALK = re.compile(r"\bwalk(?:ing)? away\b|\bi'?m done\b|\bi am done\b|\bend this\b|\bgoodbye\b|\bno deal\b")


def detect_accept(text):
    """An explicit acceptance ("I accept", "we have a deal") in a clause that is not a
    question and not negated ("I can't accept", "I don't think that works for me")."""
    t = text.lower()
    if _WALK.search(t):
        return False
    for clause in re.findall(r"(?:\d[.:]\d|[^.!?;,])+[.!?;,]?", t):
        if clause.rstrip().endswith("?") or _NEG.search(clause):
            continue
        if _ACCEPT.search(clause.strip()):
            return True
    return False


def detect_walk_away(text):
    return bool(_WALK.search(text.lower()))
