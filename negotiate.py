"""The negotiation world: domains, scenarios, the offer parser, agents, the lock-step
episode runner, the rubric judge and the outcome metrics.

Paper parts implemented here (arXiv 2605.26785, SPEC.md §2-§5):
  * the negotiation MDP seen from the focal agent: state = transcript so far, action = one
    of the 28 GoEmotions labels, utterance = how the emotion is expressed;
  * the four domains (crad, disaster, hospital, student), all read from domains.yaml;
  * the per-turn judge (here the deterministic `rubric` judge; LLM judges come later);
  * the outcome metrics (success, utility, rounds) with bootstrap confidence intervals.

Where this departs from the paper's reference code, and why (SPEC §10):
  * offers are read by one deterministic regex parser per message (cached), never by a
    stochastic LLM call, and the same parser is used in collection, training and eval;
  * utility is direction-aware, `clip((b0 - x) / (b0 - s0), 0, 1)`, so domains where the
    focal agent wants a *larger* number (disaster, hospital) are scored correctly;
  * the agreement tolerance is relative to the initial gap (2% of |b0 - s0|, at least one
    unit), not an absolute number in mixed units;
  * scenario ids 0-79 are training ids and 80-99 test ids, and nothing mixes them.

Additions the paper does not have (so everything runs offline): `SimTeacher`, a phrase-bank
teacher, and `SimCounterparty`, an emotion-sensitive concession model that perceives the
focal agent's emotion from the *text* through a cue lexicon (it never sees the label).
An optional turn reminder (`defaults.turn_reminder`, off by default) closes every focal LLM
prompt, with or without an emotion block; the README's runs/v6 measures what it does.

For the trained-vs-trained tournament every domain can be turned around (`swap_domain`,
`load_config(side="counterparty")`): the old counterparty becomes the focal side that the
same pipeline trains, and `MirroredAgent` lets such an agent play the counterparty of the
original domain by showing it each episode mirrored.

This module imports no learner. Agents that use a learned part receive it as a plain
callable or model from emodistill.py.
"""
from __future__ import annotations

import functools
import http.client
import json
import math
import os
import re
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import yaml

EMOTIONS = [
    "admiration", "amusement", "anger", "annoyance", "approval", "caring", "confusion",
    "curiosity", "desire", "disappointment", "disapproval", "disgust", "embarrassment",
    "excitement", "fear", "gratitude", "grief", "joy", "love", "nervousness", "optimism",
    "pride", "realization", "relief", "remorse", "sadness", "surprise", "neutral",
]
UNITS = ("days", "minutes", "clock")
TRAIN_IDS = range(0, 80)
TEST_IDS = range(80, 100)
N_SCENARIOS = 100
PHASES = ("early", "mid", "late")


# ----------------------------------------------------------------------------------------
# domains.yaml: loading and validation
# ----------------------------------------------------------------------------------------

class DomainConfigError(ValueError):
    """domains.yaml is malformed; the message names the domain (or emotion) and the field."""


@dataclass
class Persona:
    name: str
    curve: float            # Faratin exponent: <1 Boulware (late concessions), >1 Conceder
    sensitivity: float      # scales every emotion effect
    walk: float             # scales every walk-away hazard
    heldout: bool = False   # kept out of training corpora (unseen-counterparty study)
    effects: dict = field(default_factory=dict)   # emotion -> [early, mid, late] extra deltas


@dataclass
class Domain:
    key: str
    description: str
    focal_role: str
    counterparty_role: str
    quantity: str
    unit: str
    focal_prefers: str       # "lower" or "higher"
    s0: list                 # focal target range [lo, hi]
    b0: list                 # counterparty opening range [lo, hi]
    reservation: list        # counterparty reservation, as a fraction of the way b0 -> s0
    patience: list           # counterparty turns before it grows impatient
    choices: dict
    ranges: dict
    prompt: dict
    teacher: dict
    replies: dict
    personas: dict
    effects: dict            # emotion -> [early, mid, late] concession-step multiplier delta
    hazard: dict             # emotion -> [early, mid, late] walk-away probability per turn
    base_hazard: float
    habituation: float       # an emotion repeated n times in the last 3 focal turns keeps h**n
    base_share: float        # share of the way to r the counterparty concedes with no emotional push
    emomas: dict = None      # optional: how a row of the EmoMAS scenario CSV maps onto this domain
    imported: list = None    # scenarios read from such a CSV (import_scenarios_csv), else generated

    @property
    def train_personas(self):
        return [p for p in self.personas.values() if not p.heldout]


@dataclass
class Config:
    emotions: dict           # name -> {"instructions": [...], "cues": [...], "phrases": [...]}
    domains: dict            # key -> Domain
    max_turns: int = 30
    tolerance: float = 0.02
    turn_reminder: str = ""  # appended to every focal LLM turn (see turn_note); "" = none
    path: str = ""


def _need(d, key, typ, where, what=None):
    if not isinstance(d, dict) or key not in d:
        raise DomainConfigError(f"{where}: missing field '{key}'")
    v = d[key]
    if typ is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if not isinstance(v, typ) or (typ in (int, float) and isinstance(v, bool)):
        tn = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise DomainConfigError(f"{where}: field '{key}' should be {what or tn}, got {type(v).__name__}")
    return v


def _range(d, key, where, lo_min=None):
    v = _need(d, key, list, where, "a [lo, hi] list")
    if len(v) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise DomainConfigError(f"{where}: field '{key}' should be [lo, hi] numbers, got {v}")
    if not v[0] < v[1]:
        raise DomainConfigError(f"{where}: field '{key}' is an empty range {v}")
    if lo_min is not None and v[0] < lo_min:
        raise DomainConfigError(f"{where}: field '{key}' starts below {lo_min}: {v}")
    return [v[0], v[1]]


def _strings(d, key, where, min_len=1):
    v = _need(d, key, list, where, "a list of strings")
    if len(v) < min_len or not all(isinstance(s, str) and s.strip() for s in v):
        raise DomainConfigError(f"{where}: field '{key}' needs at least {min_len} non-empty strings")
    return v


def _emotion_table(d, where):
    """{"anger, annoyance": [e, m, l], ...} -> {"anger": [...], "annoyance": [...]}."""
    out = {}
    if d is None:
        return out
    if not isinstance(d, dict):
        raise DomainConfigError(f"{where}: should be a mapping emotion -> [early, mid, late]")
    for names, vals in d.items():
        if (not isinstance(vals, list) or len(vals) != 3
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals)):
            raise DomainConfigError(f"{where}.{names}: should be three numbers [early, mid, late]")
        for name in str(names).split(","):
            name = name.strip()
            if name not in EMOTIONS:
                raise DomainConfigError(f"{where}: unknown emotion '{name}'")
            out[name] = [float(x) for x in vals]
    return out


def _check_templates(texts, allowed, where):
    for s in texts:
        for f in re.findall(r"\{(\w+)\}", s):
            if f not in allowed:
                raise DomainConfigError(f"{where}: template uses unknown field '{{{f}}}': {s!r}")


def _parse_domain(key, d):
    w = f"domain '{key}'"
    if not isinstance(d, dict):
        raise DomainConfigError(f"{w}: should be a mapping of fields")
    unit = _need(d, "unit", str, w)
    if unit not in UNITS:
        raise DomainConfigError(f"{w}: field 'unit' must be one of {UNITS}, got '{unit}'")
    prefers = _need(d, "focal_prefers", str, w)
    if prefers not in ("lower", "higher"):
        raise DomainConfigError(f"{w}: field 'focal_prefers' must be 'lower' or 'higher', got '{prefers}'")
    ctx = _need(d, "context", dict, w)
    choices = ctx.get("choices") or {}
    ranges = ctx.get("ranges") or {}
    for f, opts in choices.items():
        _strings(choices, f, f"{w} context.choices")
    for f in ranges:
        _range(ranges, f, f"{w} context.ranges")
    sc = _need(d, "scenario", dict, w)
    s0, b0 = _range(sc, "s0", f"{w} scenario"), _range(sc, "b0", f"{w} scenario")
    grain = _grain(unit)
    if ((prefers == "lower" and not s0[1] + 2 * grain <= b0[0])
            or (prefers == "higher" and not b0[1] + 2 * grain <= s0[0])):
        raise DomainConfigError(f"{w}: scenario ranges s0={s0} and b0={b0} overlap, lie closer than two "
                                f"{unit} steps ({2 * grain}), or contradict focal_prefers={prefers}")
    res = _range(sc, "reservation", f"{w} scenario", lo_min=0)
    if res[1] > 1:
        raise DomainConfigError(f"{w}: field 'scenario.reservation' must lie in [0, 1], got {res}")
    patience = _range(sc, "patience", f"{w} scenario", lo_min=1)
    prompt = _need(d, "prompt", dict, w)
    fields = set(choices) | set(ranges)
    for k in ("situation", "focal_goal", "counterparty_goal"):
        _need(prompt, k, str, f"{w} prompt")
    _check_templates([prompt["situation"]], fields, f"{w} prompt.situation")
    _check_templates([prompt["focal_goal"], prompt["counterparty_goal"]], fields | {"target"}, f"{w} prompt")
    teacher = _need(d, "teacher", dict, w)
    for k in ("offers", "justifications", "accept"):
        _strings(teacher, k, f"{w} teacher")
    for k in ("offers", "accept"):
        for s in teacher[k]:
            if s.count("{offer}") != 1:
                raise DomainConfigError(f"{w} teacher.{k}: each sentence needs {{offer}} exactly once: {s!r}")
    _check_templates(teacher["justifications"], fields, f"{w} teacher.justifications")
    cp = _need(d, "counterparty", dict, w)
    replies = _need(cp, "replies", dict, f"{w} counterparty")
    for k in ("offer", "accept", "walk_away"):
        _strings(replies, k, f"{w} counterparty.replies")
    displayed = _need(replies, "displayed", dict, f"{w} counterparty.replies")
    for emo in displayed:
        if emo not in EMOTIONS:
            raise DomainConfigError(f"{w} counterparty.replies.displayed: unknown emotion '{emo}'")
        _strings(displayed, emo, f"{w} counterparty.replies.displayed")
    if "neutral" not in displayed:
        raise DomainConfigError(f"{w} counterparty.replies.displayed: missing field 'neutral'")
    pers = _need(cp, "personas", dict, f"{w} counterparty")
    personas = {}
    for name, p in pers.items():
        pw = f"{w} counterparty.personas.{name}"
        personas[name] = Persona(
            name=name, curve=_need(p, "curve", float, pw), sensitivity=_need(p, "sensitivity", float, pw),
            walk=_need(p, "walk", float, pw), heldout=bool(p.get("heldout", False)),
            effects=_emotion_table(p.get("effects"), f"{pw}.effects"))
        if personas[name].curve <= 0:
            raise DomainConfigError(f"{pw}: field 'curve' must be > 0")
    if not any(not p.heldout for p in personas.values()):
        raise DomainConfigError(f"{w} counterparty.personas: needs at least one training (not heldout) persona")
    return Domain(
        key=key, description=_need(d, "description", str, w), focal_role=_need(d, "focal_role", str, w),
        counterparty_role=_need(d, "counterparty_role", str, w), quantity=_need(d, "quantity", str, w),
        unit=unit, focal_prefers=prefers, s0=s0, b0=b0, reservation=res, patience=patience,
        choices=choices, ranges=ranges, prompt=prompt, teacher=teacher, replies=replies,
        personas=personas, effects=_emotion_table(cp.get("effects"), f"{w} counterparty.effects"),
        hazard=_emotion_table(cp.get("hazard"), f"{w} counterparty.hazard"),
        base_hazard=float(cp.get("base_hazard", 0.0)), habituation=float(cp.get("habituation", 0.5)),
        base_share=float(cp.get("base_share", 1.0)),
        emomas=_parse_emomas(d.get("emomas"), fields, w))


def _parse_emomas(m, fields, w):
    """Check the optional `emomas` section: file, column types, s0/b0 and context templates."""
    if m is None:
        return None
    w = f"{w} emomas"
    if not isinstance(m, dict):
        raise DomainConfigError(f"{w}: should be a mapping with file, s0, b0, context")
    _need(m, "file", str, w)
    types = m.get("columns") or {}
    if not isinstance(types, dict):
        raise DomainConfigError(f"{w}: field 'columns' should map column names to types")
    for col, t in types.items():
        if not (t in CSV_TYPES or (isinstance(t, list) and t and all(isinstance(x, str) for x in t))):
            raise DomainConfigError(f"{w}.columns.{col}: type must be one of {CSV_TYPES} or a list of words, got {t!r}")
    for k in ("s0", "b0"):
        if k in m and not isinstance(m[k], str):
            raise DomainConfigError(f"{w}: field '{k}' should be a template string like '{{Column}}'")
    ctx = m.get("context") or {}
    if not isinstance(ctx, dict):
        raise DomainConfigError(f"{w}: field 'context' should map context fields to templates")
    for f, t in ctx.items():
        if f not in fields:
            raise DomainConfigError(f"{w}.context: unknown context field '{f}' (known: {', '.join(sorted(fields))})")
        if not isinstance(t, str):
            raise DomainConfigError(f"{w}.context.{f}: should be a template string")
    for t in [m.get("s0", ""), m.get("b0", "")] + list(ctx.values()):
        for col, filt in _CELL_REF.findall(t):
            if filt and filt not in CSV_FILTERS:
                raise DomainConfigError(f"{w}: unknown filter '|{filt}' in {t!r} (known: {', '.join(CSV_FILTERS)})")
    return m


SIDES = ("focal", "counterparty")
_FLIP = {"lower": "higher", "higher": "lower"}


def swap_domain(key, d):
    """The raw definition of domain `d` (a domains.yaml mapping) with the roles swapped, for
    the trained-vs-trained tournament: the old counterparty becomes the focal agent that is
    collected, trained and evaluated, and the old focal side becomes the simulated
    counterparty. Roles, direction, goals, the s0/b0 ranges and the offer/accept sentences
    trade places. The texts the old side never needed come from the domain's `swap:`
    section: the new focal side's justifications, and the new counterparty's walk-away and
    displayed-emotion lines. The concession dynamics (personas, emotion effects, hazards,
    patience, reservation fraction) are kept as they are: nothing tells us how the other side
    reacts to emotions, so the simulated collector concedes the way the debtor does."""
    sw = d.get("swap")
    if not isinstance(sw, dict):
        raise DomainConfigError(f"domain '{key}': no 'swap' section, so its roles cannot be swapped "
                                f"(--side counterparty and the tournament need one; see crad in domains.yaml)")
    teacher, cp = d.get("teacher") or {}, d.get("counterparty") or {}
    replies = cp.get("replies") or {}
    sw_teacher, sw_replies = sw.get("teacher") or {}, sw.get("replies") or {}
    scenario, prompt = dict(d.get("scenario") or {}), dict(d.get("prompt") or {})
    scenario["s0"], scenario["b0"] = scenario.get("b0"), scenario.get("s0")
    prompt["focal_goal"], prompt["counterparty_goal"] = prompt.get("counterparty_goal"), prompt.get("focal_goal")
    out = {k: v for k, v in d.items() if k != "swap"}
    out.update(focal_role=d.get("counterparty_role"), counterparty_role=d.get("focal_role"),
               focal_prefers=_FLIP.get(d.get("focal_prefers"), d.get("focal_prefers")), scenario=scenario,
               prompt=prompt,
               teacher={"offers": replies.get("offer"), "accept": replies.get("accept"),
                        "justifications": sw_teacher.get("justifications")},
               counterparty=dict(cp, replies={"offer": teacher.get("offers"), "accept": teacher.get("accept"),
                                              "walk_away": sw_replies.get("walk_away"),
                                              "displayed": sw_replies.get("displayed")}))
    if isinstance(d.get("emomas"), dict):
        m = {k: v for k, v in d["emomas"].items() if k not in ("s0", "b0")}
        m.update({new: d["emomas"][old] for new, old in (("s0", "b0"), ("b0", "s0")) if old in d["emomas"]})
        out["emomas"] = m
    return out


def _parse_swapped(key, d):
    try:
        return _parse_domain(key, swap_domain(key, d))
    except DomainConfigError as e:
        raise DomainConfigError(f"{e} (in the role-swapped domain built with its 'swap' section)") from None


def load_config(path="domains.yaml", side="focal") -> Config:
    """Read and validate domains.yaml. Every error names the domain/emotion and the field.
    side="counterparty": every domain with its roles swapped (swap_domain); a domain's `swap`
    section is validated either way, so a mistake in it shows up before a tournament needs it."""
    if side not in SIDES:
        raise DomainConfigError(f"side must be one of {SIDES}, got '{side}'")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise DomainConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as e:
        raise DomainConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise DomainConfigError(f"{path}: top level should be a mapping with 'emotions' and 'domains'")
    emos = _need(raw, "emotions", dict, path)
    for name in emos:
        if name not in EMOTIONS:
            raise DomainConfigError(f"emotions: unknown emotion '{name}' (not one of the 28 GoEmotions labels)")
    for name in EMOTIONS:
        if name not in emos:
            raise DomainConfigError(f"emotions: missing emotion '{name}'")
        e = emos[name]
        _strings(e, "instructions", f"emotion '{name}'")
        _strings(e, "phrases", f"emotion '{name}'")
        cues = _need(e, "cues", list, f"emotion '{name}'")
        if not all(isinstance(c, str) and c.strip() for c in cues):
            raise DomainConfigError(f"emotion '{name}': field 'cues' must be non-empty strings")
    doms = _need(raw, "domains", dict, path)
    if not doms:
        raise DomainConfigError(f"{path}: 'domains' is empty")
    defaults = raw.get("defaults") or {}
    parsed = {k: _parse_domain(k, v) for k, v in doms.items()}
    swapped = {k: _parse_swapped(k, v) for k, v in doms.items()
               if side == "counterparty" or (isinstance(v, dict) and "swap" in v)}
    return Config(emotions={n: emos[n] for n in EMOTIONS},
                  domains=swapped if side == "counterparty" else parsed,
                  max_turns=int(defaults.get("max_turns", 30)),
                  tolerance=float(defaults.get("tolerance", 0.02)),
                  turn_reminder=_reminder(defaults, path), path=str(path))


def _reminder(defaults, path):
    """defaults.turn_reminder with its whitespace collapsed; "" when absent or left empty."""
    if defaults.get("turn_reminder") is None:
        return ""
    return " ".join(_need(defaults, "turn_reminder", str, f"{path}: defaults", "a string").split())


def pick_domains(cfg: Config, spec: str):
    keys = [k.strip() for k in spec.split(",") if k.strip()] if spec and spec != "all" else list(cfg.domains)
    for k in keys:
        if k not in cfg.domains:
            raise DomainConfigError(f"unknown domain '{k}' (known: {', '.join(cfg.domains)})")
    return keys


def check_emotions(names):
    for n in names:
        if n not in EMOTIONS:
            raise ValueError(f"unknown emotion '{n}' (must be one of the 28 GoEmotions labels)")
    return list(names)


# ----------------------------------------------------------------------------------------
# Units: rendering and parsing offers
# ----------------------------------------------------------------------------------------

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

    Rules (deterministic, documented in the README):
      * days:    "45 days", "3 weeks" (21), "2 months" (60), "48 hours" (2), number words too;
      * minutes: "90 minutes", "2 hours" (120), "1.5 hours", "an hour and a half", "half an hour";
      * clock:   "10:30 PM" -> 90 (minutes after 9 PM), "11pm", "22:30", "midnight" -> 180,
                 "by 11" -> 120; 12:xx and 1-5 without AM/PM count as after midnight;
      * a range ("60 to 90 days", "60-90 days") counts as its midpoint: the parser is role-blind,
        so it takes neither side's favourable end;
      * numbers that describe the situation, not an offer, are skipped: money ("$5,000"),
        percentages, and durations followed by "overdue", "ago", "already", "waiting", ...;
      * when a message states several offers, the last one counts ("You said 90 days; I offer 45");
      * with no unit at all, a bare number is taken (the last one) for days and minutes.
    Never raises: any string gives a float or None.
    """
    if not isinstance(text, str) or not text:
        return None
    try:
        return _parse_offer(text.lower(), unit)
    except (ValueError, OverflowError, IndexError):  # defensive: junk never crashes a run
        return None


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
            if v is not None:
                found.append((m.start(), v))
        if not found:
            for m in _BY_HOUR.finditer(t):
                v = _clock_to_minutes(int(m.group(1)), 0, "")
                if v is not None:
                    found.append((m.start(), v))
        return max(found)[1] if found else None
    scale = _IN_DAYS if unit == "days" else _IN_MINUTES
    for m in _DUR.finditer(t):
        u = _UNIT_WORDS[m.group(5)]
        if u not in scale or _NOT_AN_OFFER.match(t, m.end()):
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
            if not _NOT_AN_OFFER.match(t, m.end()) and not re.match(r"\s*(?:%|percent|dollars|usd|k\b|years?)",
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


# ----------------------------------------------------------------------------------------
# Perception: which emotion does a text express? (transparent cue lexicon)
# ----------------------------------------------------------------------------------------

class Perceiver:
    """Maps text to one of the 28 emotions by counting cue-stem hits (`\\bcue`, case-insensitive).
    Most hits wins; ties go to the earliest hit; no hit at all is `neutral`."""

    def __init__(self, emotions):
        self.patterns = {n: re.compile("|".join(r"\b" + re.escape(c.lower()) for c in e["cues"]))
                         for n, e in emotions.items() if e["cues"]}

    @functools.lru_cache(maxsize=65536)
    def __call__(self, text):
        t = text.lower()
        best, best_n, best_pos = "neutral", 0, 1 << 30
        for name, pat in self.patterns.items():
            hits = [m.start() for m in pat.finditer(t)]
            if hits and (len(hits) > best_n or (len(hits) == best_n and hits[0] < best_pos)):
                best, best_n, best_pos = name, len(hits), hits[0]
        return best


# ----------------------------------------------------------------------------------------
# Scenarios
# ----------------------------------------------------------------------------------------

def _rng(*keys):
    """A numpy Generator seeded from strings/ints (stable across runs and Python versions)."""
    return np.random.default_rng([zlib.crc32(str(k).encode()) for k in keys])


@dataclass
class Scenario:
    domain: str
    id: int
    s0: float                # focal target
    b0: float                # counterparty opening
    reservation: float       # counterparty's private limit (between b0 and s0)
    patience: int            # counterparty turns before impatience
    persona: str
    context: dict

    @property
    def split(self):
        return "train" if self.id in TRAIN_IDS else "test"


def _grain(unit):
    return {"days": 1, "minutes": 5, "clock": 5}[unit]


def make_scenarios(dom: Domain, seed=0, persona=None):
    """The domain's 100 scenarios, a pure function of (domain key, seed). Ids 0-79 train,
    80-99 test. Training personas are assigned round-robin; `persona` (a name, or "heldout"
    for the domain's held-out persona) overrides that without changing any other field."""
    out, g = [], _grain(dom.unit)
    names = [p.name for p in dom.train_personas]
    if persona == "heldout":
        held = [p.name for p in dom.personas.values() if p.heldout]
        if not held:
            raise DomainConfigError(f"domain '{dom.key}': no held-out persona defined")
        persona = held[0]
    elif persona is not None and persona not in dom.personas:
        raise DomainConfigError(f"domain '{dom.key}': unknown persona '{persona}' "
                                f"(known: {', '.join(dom.personas)}, or 'heldout')")
    if dom.imported is not None:       # scenarios read from an EmoMAS CSV (import_scenarios_csv)
        return [sc if persona is None else Scenario(**{**sc.__dict__, "persona": persona}) for sc in dom.imported]
    for i in range(N_SCENARIOS):
        r = _rng("scenario", seed, dom.key, i)
        s0 = round(r.uniform(*dom.s0) / g) * g
        b0 = round(r.uniform(*dom.b0) / g) * g
        frac = r.uniform(*dom.reservation)
        res = b0 + frac * (s0 - b0)
        patience = int(r.integers(dom.patience[0], dom.patience[1] + 1))
        ctx = {f: str(opts[int(r.integers(len(opts)))]) for f, opts in sorted(dom.choices.items())}
        ctx.update({f: int(r.integers(int(lo), int(hi) + 1)) for f, (lo, hi) in sorted(dom.ranges.items())})
        if "balance" in ctx:
            ctx["balance"] = f"{ctx['balance']:,}"
        out.append(Scenario(dom.key, i, float(s0), float(b0), round(res, 3), patience,
                            persona or names[i % len(names)], ctx))
    return out


# ----------------------------------------------------------------------------------------
# The EmoMAS scenario CSVs (optional importer, SPEC §3)
# ----------------------------------------------------------------------------------------
# The published CSVs have rows whose free-text cells contain unquoted commas, which shifts
# every later column. A row is repaired by re-joining its cells: a cell that begins with a
# space may continue the previous one (a comma inside a text), any other cell starts a new
# column, and typed columns (numbers, clock times, word lists from domains.yaml) must parse.
# Every split that satisfies this is enumerated; the row is kept when all of them agree on
# the values the domain uses, and skipped with its reason otherwise.

CSV_TYPES = ("int", "number", "clock", "text")
CSV_FILTERS = ("lower", "words", "money")
_CELL_REF = re.compile(r"\{([^{}|]+)(?:\|(\w+))?\}")


class ScenarioCsvError(ValueError):
    """A scenario CSV cannot be used at all (missing file, header without the mapped columns)."""


def _cell_ok(text, kind, unit):
    t = text.strip()
    if kind in (None, "text"):
        return True
    if isinstance(kind, list):
        return t.lower() in {k.lower() for k in kind}
    if kind == "clock":
        return parse_offer(t, "clock") is not None
    try:
        v = float(t)
    except ValueError:
        return False
    return kind == "number" or v == int(v)


def split_csv_row(cells, columns, types, unit="days", limit=256):
    """Every way to place a row's csv cells into `columns` (see the comment above).
    Returns a list of {column: text} dicts (at most `limit`)."""
    out, n, k = [], len(cells), len(columns)

    def walk(i, c, acc):
        if len(out) >= limit:
            return
        if c == k:
            if i == n:
                out.append(dict(zip(columns, acc)))
            return
        for j in range(i + 1, n - (k - c - 1) + 1):     # this column takes cells i..j-1
            if j - 1 > i and not cells[j - 1].startswith(" "):
                break                                    # a cell without a leading space starts a column
            text = ",".join(cells[i:j])
            if _cell_ok(text, types.get(columns[c]), unit):
                walk(j, c + 1, acc + [text.strip()])
    if n >= k:
        walk(0, 0, [])
    return out


def _why_no_split(cells, columns, types, unit):
    if len(cells) == len(columns):        # the plain split has the right width: name the bad cells
        return "column " + "; ".join(_bad_cells(cells, columns, types, unit))
    joined = []
    for c in cells:                       # the most likely reading: every leading-space cell continues
        if joined and c.startswith(" "):
            joined[-1] += "," + c
        else:
            joined.append(c)
    if len(joined) == len(columns):
        return "column " + "; ".join(_bad_cells(joined, columns, types, unit))
    return f"{len(cells)} cells ({len(joined)} after re-joining texts) cannot fill the {len(columns)} columns"


def _bad_cells(cells, columns, types, unit):
    return [f"'{col}' = {v.strip()!r} is not {types[col] if isinstance(types[col], str) else 'one of ' + str(types[col])}"
            for col, v in zip(columns, cells) if not _cell_ok(v, types.get(col), unit)]


def _render_cell(template, row):
    def sub(m):
        v = row[m.group(1)]
        f = m.group(2)
        if f == "lower":
            v = v[:1].lower() + v[1:]
        elif f == "words":
            v = v.replace("_", " ").lower()
        elif f == "money":
            v = f"{round(float(v)):,}"
        return v
    return _CELL_REF.sub(sub, template)


def import_scenarios_csv(dom: Domain, path, seed=0):
    """Scenarios for `dom` from an EmoMAS CSV, mapped by the domain's `emomas` section.

    The data row at position i (0-based) becomes scenario id i, so the first 80 rows are
    training scenarios and rows 80-99 test scenarios. s0, b0 and context fields the CSV
    does not give, and the counterparty's private reservation, patience and persona, come
    from the generated scenario with the same id. Returns (scenarios, report) where report
    = {"read", "repaired", "skipped": [(line, reason)], ...}."""
    import csv
    m = dom.emomas
    if not m:
        raise ScenarioCsvError(f"domain '{dom.key}' has no 'emomas' section in domains.yaml")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise ScenarioCsvError(f"{path}: file not found") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise ScenarioCsvError(f"{path}: not a readable CSV: {e}") from None
    if not rows:
        raise ScenarioCsvError(f"{path}: empty file")
    columns = [c.strip() for c in rows[0]]
    types = m.get("columns") or {}
    templates = {"s0": m.get("s0"), "b0": m.get("b0"), **(m.get("context") or {})}
    used = sorted({col for t in templates.values() if t for col, _ in _CELL_REF.findall(t)} | set(types))
    missing = [c for c in used if c not in columns]
    if missing:
        raise ScenarioCsvError(f"{path}: domain '{dom.key}' maps column(s) {missing} that the header lacks "
                               f"(header: {columns})")
    generated = make_scenarios(replace(dom, imported=None), seed)
    out, report = [], {"file": str(path), "rows": 0, "read": 0, "repaired": 0, "skipped": []}
    for line, cells in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in cells):
            continue
        i = report["rows"]
        report["rows"] += 1
        if i >= N_SCENARIOS:
            report["skipped"].append((line, f"beyond the first {N_SCENARIOS} rows"))
            continue
        cands = split_csv_row(cells, columns, types, dom.unit)
        if not cands:
            report["skipped"].append((line, _why_no_split(cells, columns, types, dom.unit)))
            continue
        try:
            vals = [{k: _render_cell(t, c) for k, t in templates.items() if t} for c in cands]
        except (ValueError, KeyError) as e:
            report["skipped"].append((line, f"cannot render a mapped value: {e}"))
            continue
        differ = sorted({k for v in vals[1:] for k in v if v[k] != vals[0][k]})
        if differ:
            report["skipped"].append((line, f"ambiguous: {len(cands)} ways to split its commas give different {differ}"))
            continue
        v, g = vals[0], generated[i]
        try:
            s0 = _mapped_number(v, "s0", g.s0, dom.unit)
            b0 = _mapped_number(v, "b0", g.b0, dom.unit)
        except ValueError as e:
            report["skipped"].append((line, str(e)))
            continue
        if (dom.focal_prefers == "lower" and not s0 < b0) or (dom.focal_prefers == "higher" and not s0 > b0):
            src = lambda k: "" if k in v else " (generated: no CSV column)"        # noqa: E731
            report["skipped"].append((line, f"target {s0:g}{src('s0')} and opening {b0:g}{src('b0')} contradict "
                                            f"focal_prefers={dom.focal_prefers}"))
            continue
        frac = (g.reservation - g.b0) / (g.s0 - g.b0)   # keep the generated reservation's relative place
        ctx = dict(g.context)
        ctx.update({k: val for k, val in v.items() if k not in ("s0", "b0")})
        out.append(Scenario(dom.key, i, s0, b0, round(b0 + frac * (s0 - b0), 3), g.patience, g.persona, ctx))
        report["read"] += 1
        report["repaired"] += len(cells) != len(columns)
    return out, report


def _mapped_number(v, key, default, unit):
    if key not in v:
        return float(default)
    x = parse_offer(v[key], unit) if unit == "clock" else None
    if x is None:
        try:
            x = float(v[key])
        except ValueError:
            raise ValueError(f"{key}: '{v[key]}' is not a {unit} value") from None
    return float(x)


def position(x, s0, b0):
    """Where offer x lies between the counterparty opening (0) and the focal target (1)."""
    return (b0 - x) / (b0 - s0)


def utility_of(x, s0, b0):
    return float(min(1.0, max(0.0, position(x, s0, b0))))


def tolerance_of(s0, b0, unit, rel=0.02):
    return max(rel * abs(b0 - s0), 1.0)


# ----------------------------------------------------------------------------------------
# Episodes and agents
# ----------------------------------------------------------------------------------------

@dataclass
class Reply:
    text: str
    accept: bool = False
    walk_away: bool = False
    emotion: str | None = None     # the emotion a counterparty-side agent was asked to express (tournament)
    free_text: bool = False        # written by a model (LM, API): its offer is read from the words, see _apply


@dataclass
class Episode:
    dom: Domain
    sc: Scenario
    seed: int
    rng_policy: np.random.Generator
    rng_focal: np.random.Generator
    rng_cp: np.random.Generator
    turns: list = field(default_factory=list)   # dicts: speaker, text, emotion, perceived, offer, ...
    offers: dict = field(default_factory=lambda: {"focal": None, "counterparty": None})
    private: dict = field(default_factory=dict)  # per-agent private memory
    end: str | None = None                      # accept | converged | walk_away | max_turns
    agreement: float | None = None

    @property
    def done(self):
        return self.end is not None

    @property
    def key(self):
        return f"{self.dom.key}-{self.sc.id}-{self.seed}"

    @property
    def t(self):
        return len(self.turns)


def episode_from_record(cfg: Config, rec, upto=None):
    """Rebuild the Episode of a corpus record with its first `upto` turns (all by default),
    so that `build_messages` renders exactly the prompt the agent saw before turn `upto`."""
    if rec["domain"] not in cfg.domains:
        raise DomainConfigError(f"record {rec.get('key')}: unknown domain '{rec['domain']}'")
    dom = cfg.domains[rec["domain"]]
    sc = Scenario(rec["domain"], rec["scenario_id"], rec["s0"], rec["b0"], rec["reservation"], rec["patience"],
                  rec["persona"], rec["context"])
    ep = new_episode(dom, sc, rec["seed"])
    ep.turns = [dict(t) for t in rec["turns"][:upto]]
    return ep


def new_episode(dom, sc, seed, run_seed=0):
    base = ("episode", run_seed, dom.key, sc.id, seed)
    return Episode(dom, sc, seed, _rng(*base, "policy"), _rng(*base, "focal"), _rng(*base, "cp"))


def _fill(template, sc, **extra):
    vals = dict(sc.context)
    vals.update(extra)
    return template.format(**vals)


class SimTeacher:
    """Offline teacher: an emotion phrase + an offer sentence + (sometimes) a justification.

    Its offers follow a noisy concession schedule from the focal target s0 toward a private
    floor, at a speed drawn per episode, so the corpus has both good and bad turns."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def _plan(self, ep):
        m = ep.private.get("teacher")
        if m is None:
            r = ep.rng_focal
            m = ep.private["teacher"] = {
                "floor": float(r.uniform(0.0, 0.7)),         # lowest position it will offer
                "speed": float(np.exp(r.uniform(np.log(0.4), np.log(2.5)))),
                "horizon": int(r.integers(4, 12)),            # focal turns to reach the floor
                "pos": 1.0, "j": 0}
        return m

    def act(self, eps, emotions):
        out = []
        for ep, emo in zip(eps, emotions):
            m, r, dom, sc = self._plan(ep), ep.rng_focal, ep.dom, ep.sc
            m["j"] += 1
            frac = min(1.0, (m["j"] - 1) / m["horizon"]) ** (1.0 / m["speed"])
            planned = 1.0 - (1.0 - m["floor"]) * frac + r.normal(0, 0.03) * (m["j"] > 1)
            m["pos"] = min(m["pos"], max(m["floor"], min(1.0, planned)))   # never backward
            x_plan = sc.b0 + m["pos"] * (sc.s0 - sc.b0)
            g = _grain(dom.unit)
            x = round(x_plan / g) * g
            variant = int(r.integers(3))
            cp_offer = ep.offers["counterparty"]
            phrase = None
            if emo is not None:
                phrases = self.cfg.emotions[emo]["phrases"]
                phrase = phrases[int(r.integers(len(phrases)))]
            if cp_offer is not None and position(cp_offer, sc.s0, sc.b0) >= m["pos"] - 1e-9:
                body = _pick(r, dom.teacher["accept"]).format(offer=format_offer(cp_offer, dom.unit, variant))
                out.append(Reply(" ".join(s for s in (phrase, body) if s), accept=True))
                continue
            parts = [_pick(r, dom.teacher["offers"]).format(offer=format_offer(x, dom.unit, variant))]
            if r.random() < 0.5:
                parts.append(_fill(_pick(r, dom.teacher["justifications"]), sc))
            if phrase:
                parts.insert(0 if r.random() < 0.7 else len(parts), phrase)
            out.append(Reply(" ".join(parts)))
        return out


def _pick(r, xs):
    return xs[int(r.integers(len(xs)))]


class SimCounterparty:
    """Emotion-sensitive, state-dependent concession model (SPEC §4).

    Private per scenario: opening b0, reservation r, patience T, persona. Its concession
    fraction f (0 at b0, 1 at r) follows a Faratin curve F(k) = share * min(1, k/T)^(1/curve)
    (share < 1: without emotional push it never gets all the way to r); each turn the
    base step F(k+1) - F(k) is scaled by (1 + effect), where `effect` depends on the emotion it
    *perceives in the focal text*, on the phase of the talk (early/mid/late by k/T) and on
    habituation (an emotion repeated in the last 3 focal turns keeps habituation**n of its
    effect). A per-turn walk-away hazard depends on the same emotion and phase, and grows once
    patience runs out. It accepts a focal offer at least as good for it as its own planned
    offer, never offers past r and never moves backward."""

    def __init__(self, cfg: Config, perceiver: Perceiver | None = None):
        self.cfg = cfg
        self.perceive = perceiver or Perceiver(cfg.emotions)

    @staticmethod
    def phase(k, patience):
        p = k / patience
        return 0 if p < 1 / 3 else (1 if p < 2 / 3 else 2)

    def effect(self, dom, persona, emo, ph, recent):
        e = dom.effects.get(emo, [0.0] * 3)[ph] + persona.effects.get(emo, [0.0] * 3)[ph]
        e *= persona.sensitivity
        if e > 0:
            e *= dom.habituation ** sum(1 for x in recent[-3:] if x == emo)
        return e

    def act(self, eps, emotions=None):
        return [self._act(ep) for ep in eps]

    def _act(self, ep):
        dom, sc, r = ep.dom, ep.sc, ep.rng_cp
        persona = dom.personas[sc.persona]
        m = ep.private.setdefault("cp", {"f": 0.0, "k": 0, "heard": []})
        focal_text = ep.turns[-1]["text"] if ep.turns else ""
        emo = self.perceive(focal_text)          # the text, never the label
        ph = self.phase(m["k"], sc.patience)
        eff = self.effect(dom, persona, emo, ph, m["heard"])
        m["heard"].append(emo)

        def F(k):
            return dom.base_share * min(1.0, (k / sc.patience) ** (1.0 / persona.curve))

        step = F(m["k"] + 1) - F(m["k"])
        m["f"] = min(1.0, m["f"] + step * max(0.0, 1.0 + eff))
        m["k"] += 1
        x_cp = self._offer_at(ep, m["f"])
        # accept a focal offer at least as good for it as its own planned offer
        x_f = ep.offers["focal"]
        if x_f is not None and self._frac(ep, x_f) <= m["f"] + 1e-9:
            text = _pick(r, dom.replies["accept"]).format(offer=format_offer(x_f, dom.unit))
            return Reply(text, accept=True)
        hazard = dom.base_hazard + dom.hazard.get(emo, [0.0] * 3)[ph]
        hazard = persona.walk * max(0.0, hazard) + 0.04 * max(0, m["k"] - sc.patience)
        if r.random() < hazard:
            return Reply(_pick(r, dom.replies["walk_away"]), walk_away=True)
        shown = self._displayed(emo, eff)
        opener = _pick(r, dom.replies["displayed"].get(shown) or dom.replies["displayed"]["neutral"])
        body = _pick(r, dom.replies["offer"]).format(offer=format_offer(x_cp, dom.unit, int(r.integers(3))))
        return Reply(f"{opener} {body}")

    @staticmethod
    def _displayed(emo, eff):
        if eff >= 0.5:
            return "gratitude" if emo in ("caring", "gratitude", "admiration", "love", "approval") else "optimism"
        if eff <= -0.5:
            return "anger" if emo in ("anger", "disgust") else "annoyance"
        if emo in ("fear", "nervousness"):
            return "nervousness"
        if emo in ("sadness", "grief", "disappointment", "remorse"):
            return "sadness"
        return "neutral"

    def _frac(self, ep, x):
        """Concession fraction the counterparty would need to offer x (0 at b0, 1 at r)."""
        sc = ep.sc
        return (x - sc.b0) / (sc.reservation - sc.b0)

    def _offer_at(self, ep, f):
        sc, g = ep.sc, _grain(ep.dom.unit)
        x = sc.b0 + f * (sc.reservation - sc.b0)
        # round toward b0, so the offer never passes the reservation
        return float(math.ceil(x / g - 1e-9) * g if sc.b0 > sc.reservation else math.floor(x / g + 1e-9) * g)


# ----------------------------------------------------------------------------------------
# Prompts for language-model agents (the exact prompt is shared with SFT later)
# ----------------------------------------------------------------------------------------

def emotion_note(cfg: Config, emotion, turn_index):
    """The affective-prompting block for one focal turn (SPEC §2). The wording rotates
    through the emotion's instructions by turn index, so the model sees several phrasings.
    The domains file's turn reminder (if any) closes the block."""
    ins = cfg.emotions[emotion]["instructions"]
    tail = f" {cfg.turn_reminder}" if cfg.turn_reminder else ""
    return f"[Emotional approach for your reply ({emotion}): {ins[turn_index % len(ins)]}{tail}]"


def turn_note(cfg: Config, emotion, turn_index, emotion_free=False):
    """What is appended to the focal side's last message for the turn being generated: the
    emotion block, or without an emotion just the turn reminder, so that every LLM method
    (vanilla and emotion-free ones too) gets the same task instruction and the rows differ
    only in the emotion. None when there is nothing to add."""
    if emotion and not emotion_free:
        return emotion_note(cfg, emotion, turn_index)
    return f"[{cfg.turn_reminder}]" if cfg.turn_reminder else None


def build_messages(cfg: Config, ep: Episode, role: str, emotion=None, emotion_free=False):
    """Chat messages for `role` ("focal" or "counterparty") at the current turn.

    System: who you are, the situation and the goal (fixed for the whole episode).
    History: own turns as assistant, the other side's as user. For the focal role the emotion
    block of the turn being generated is appended to the last user message (unless
    emotion-free); earlier turns' blocks are not repeated. That keeps long negotiations ~30%
    shorter in tokens (what SFT and JPO train on, and what prefill costs) at the price of
    re-running one block per turn in the decoder's cache (decode.py reuses the common prefix)."""
    dom, sc = ep.dom, ep.sc
    situation = _fill(dom.prompt["situation"], sc)
    if role == "focal":
        me, other = dom.focal_role, dom.counterparty_role
        goal = _fill(dom.prompt["focal_goal"], sc, target=format_offer(sc.s0, dom.unit))
    else:
        me, other = dom.counterparty_role, dom.focal_role
        goal = _fill(dom.prompt["counterparty_goal"], sc, target=format_offer(sc.b0, dom.unit))
    msgs = [{"role": "system", "content": f"You are the {me}, negotiating with the {other}. {situation} {goal}"}]
    if role == "focal":
        msgs.append({"role": "user", "content": "(The negotiation starts now. Make your opening offer.)"})
    for turn in ep.turns:
        mine = turn["speaker"] == role
        msgs.append({"role": "assistant" if mine else "user", "content": turn["text"]})
    note = turn_note(cfg, emotion, len(msgs), emotion_free) if role == "focal" else None
    if note:
        msgs[-1]["content"] += "\n\n" + note
    return msgs


def _clean_reply(text):
    text = text.strip().split("\n\n")[0].strip()
    text = re.sub(r"^(?:assistant|user|system)\s*:\s*", "", text, flags=re.I)
    return text[:600]


class LMAgent:
    """A Hugging Face causal LM speaking for `role`, all live episodes in one batched
    `generate` call (left padding). Accept / walk-away are read from the text."""

    def __init__(self, model, tokenizer, cfg: Config, role="focal", temperature=0.7, top_p=0.9,
                 max_new_tokens=48, batch_size=32, emotion_free=False, seed=0, kv_cache=None):
        self.model, self.tok, self.cfg, self.role = model, tokenizer, cfg, role
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.batch_size, self.emotion_free, self.seed, self.calls = batch_size, emotion_free, seed, 0
        self.generated_tokens, self.prompt_tokens, self.reused_tokens, self.gen_seconds = 0, 0, 0, 0.0
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        import decode
        # kv_cache: True = hand-written decoder that keeps each episode's cache between turns
        # (decode.py); False = `model.generate`; None = the former where the architecture allows
        self.kv_cache = decode.supports(model) if kv_cache is None else kv_cache
        if self.kv_cache:
            eos = model.generation_config.eos_token_id if model.generation_config else None
            eos = [eos] if isinstance(eos, int) else list(eos or [])
            self.decoder = decode.KVDecoder(model, eos + [self.tok.eos_token_id], max_new_tokens,
                                            temperature, top_p)

    def prompts(self, eps, emotions):
        return [self.tok.apply_chat_template(build_messages(self.cfg, ep, self.role, emo, self.emotion_free),
                                             add_generation_prompt=True, tokenize=False)
                for ep, emo in zip(eps, emotions)]

    def generate(self, texts):
        import torch
        self.calls += 1
        torch.manual_seed(self.seed * 100003 + self.calls)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths together
        out = [None] * len(texts)
        dev = next(self.model.parameters()).device
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            enc = self.tok([texts[i] for i in idx], return_tensors="pt", padding=True,
                           add_special_tokens=False).to(dev)
            t0 = time.time()
            sampling = (dict(do_sample=True, temperature=self.temperature, top_p=self.top_p)
                        if self.temperature > 0 else dict(do_sample=False))
            with torch.inference_mode():
                gen = self.model.generate(**enc, **sampling, max_new_tokens=self.max_new_tokens,
                                          pad_token_id=self.tok.pad_token_id)
            self.gen_seconds += time.time() - t0
            new = gen[:, enc["input_ids"].shape[1]:]
            self.prompt_tokens += int(enc["attention_mask"].sum())
            self.generated_tokens += int((new != self.tok.pad_token_id).sum())
            for i, row in zip(idx, new):
                out[i] = self.tok.decode(row, skip_special_tokens=True)
        return out

    def generate_cached(self, eps, texts):
        """Like generate(), through decode.KVDecoder, with each episode's key/value cache
        kept in ep.private between turns so only new prompt tokens are run."""
        import torch
        self.calls += 1
        gen = torch.Generator(device=next(self.model.parameters()).device)
        gen.manual_seed(self.seed * 100003 + self.calls)
        key = f"kv:{self.role}"
        ids = [self.tok(t, add_special_tokens=False).input_ids for t in texts]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = [None] * len(ids)
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            d = self.decoder
            before = (d.prefilled_tokens, d.reused_tokens)
            t0 = time.time()
            toks, caches = d.generate([ids[i] for i in idx], [eps[i].private.get(key) for i in idx], gen)
            self.gen_seconds += time.time() - t0
            self.prompt_tokens += d.prefilled_tokens - before[0]
            self.reused_tokens += d.reused_tokens - before[1]
            for i, t, c in zip(idx, toks, caches):
                eps[i].private[key] = c
                self.generated_tokens += len(t)
                out[i] = self.tok.decode(t, skip_special_tokens=True)
        return out

    def act(self, eps, emotions=None):
        emotions = emotions or [None] * len(eps)
        prompts = self.prompts(eps, emotions)
        raw = self.generate_cached(eps, prompts) if self.kv_cache else self.generate(prompts)
        texts = [_clean_reply(t) for t in raw]
        return [Reply(t, accept=detect_accept(t), walk_away=detect_walk_away(t), free_text=True) for t in texts]


class MirroredAgent:
    """A focal-side agent (and its emotion policy) playing the counterparty: the
    trained-vs-trained tournament. Every episode is shown to it mirrored: the role-swapped
    domain of `swapped_cfg` (swap_domain), s0 and b0 exchanged, every turn's speaker flipped,
    the two standing offers exchanged. To the agent and to its selector this is a focal turn
    of the swapped domain, which is what it was trained on. The mirror, and with it the
    agent's private memory (an LM's key/value cache, the SimTeacher's plan), lives in
    ep.private["mirror"]; the emotion it chose is returned on the Reply and recorded on the
    counterparty turn."""

    def __init__(self, agent, swapped_cfg: Config, choose_emotion=None):
        self.agent, self.cfg, self.choose = agent, swapped_cfg, choose_emotion

    def mirror(self, ep):
        m = ep.private.get("mirror")
        if m is None:
            if ep.dom.key not in self.cfg.domains:
                raise DomainConfigError(f"domain '{ep.dom.key}' has no role-swapped version in the counterparty's config")
            sc = ep.sc
            m = ep.private["mirror"] = new_episode(self.cfg.domains[ep.dom.key], replace(sc, s0=sc.b0, b0=sc.s0), ep.seed,
                                                   run_seed=f"mirror-{int(ep.rng_cp.integers(2 ** 31))}")
        flip = {"focal": "counterparty", "counterparty": "focal"}
        m.turns = [dict(t, speaker=flip[t["speaker"]]) for t in ep.turns]
        m.offers = {"focal": ep.offers["counterparty"], "counterparty": ep.offers["focal"]}
        return m

    def act(self, eps, emotions=None):
        ms = [self.mirror(ep) for ep in eps]
        emos = self.choose(ms) if self.choose else [None] * len(ms)
        replies = self.agent.act(ms, emos)
        for r, e in zip(replies, emos):
            r.emotion = e
        return replies


class ApiError(RuntimeError):
    pass


class ApiAgent:
    """Any OpenAI-compatible /chat/completions endpoint, standard-library HTTP only.

    Base URL: EMODISTILL_API_BASE or OPENAI_BASE_URL (default https://api.openai.com/v1);
    key: EMODISTILL_API_KEY or OPENAI_API_KEY. Timeouts, retries with exponential backoff on
    connection errors, HTTP 429/5xx and malformed JSON; then a clear ApiError."""

    def __init__(self, model, cfg: Config, role="focal", base_url=None, api_key=None, temperature=0.7,
                 top_p=0.9, max_tokens=96, timeout=30.0, retries=4, backoff=1.0, workers=8, emotion_free=False):
        self.model, self.cfg, self.role = model, cfg, role
        self.base_url = (base_url or os.environ.get("EMODISTILL_API_BASE") or os.environ.get("OPENAI_BASE_URL")
                         or "https://api.openai.com/v1").rstrip("/")
        self.api_key = api_key or os.environ.get("EMODISTILL_API_KEY") or os.environ.get("OPENAI_API_KEY", "")
        self.temperature, self.top_p, self.max_tokens = temperature, top_p, max_tokens
        self.timeout, self.retries, self.backoff, self.workers = timeout, retries, backoff, workers
        self.emotion_free = emotion_free

    def chat(self, messages):
        url = f"{self.base_url}/chat/completions"
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "top_p": self.top_p, "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last, attempt = None, 0
        for attempt in range(max(0, self.retries) + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                req = urllib.request.Request(url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    data = json.loads(resp.read().decode())
                content = data["choices"][0]["message"]["content"]
                if not isinstance(content, str):
                    raise TypeError(f"message content is {type(content).__name__}, not text")
                return content
            except urllib.error.HTTPError as e:
                try:
                    detail = e.read().decode(errors="replace").strip()[:200]
                except (OSError, http.client.HTTPException):
                    detail = ""
                last = f"HTTP {e.code} {e.reason}" + (f": {detail}" if detail else "")
                if e.code != 429 and e.code < 500:
                    break  # a client error (bad key, bad model) will not improve with retries
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError, http.client.HTTPException) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (json.JSONDecodeError, KeyError, IndexError, TypeError, UnicodeDecodeError) as e:
                last = f"malformed response ({type(e).__name__}: {e})"
        raise ApiError(f"API endpoint {url} (model '{self.model}') failed after {attempt + 1} attempt(s): {last}")

    def chat_many(self, batch):
        """Answers to a list of message lists, `workers` requests at a time, in order."""
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(self.chat, batch))

    def act(self, eps, emotions=None):
        emotions = emotions or [None] * len(eps)
        msgs = [build_messages(self.cfg, ep, self.role, emo, self.emotion_free) for ep, emo in zip(eps, emotions)]
        texts = [_clean_reply(t) for t in self.chat_many(msgs)]
        return [Reply(t, accept=detect_accept(t), walk_away=detect_walk_away(t), free_text=True) for t in texts]


# ----------------------------------------------------------------------------------------
# The batched lock-step runner
# ----------------------------------------------------------------------------------------

def random_emotion_policy(subset=None):
    """The behaviour policy of `collect`: a uniformly random emotion each focal turn."""
    names = check_emotions(subset) if subset else EMOTIONS

    def choose(eps):
        return [names[int(ep.rng_policy.integers(len(names)))] for ep in eps]
    return choose


def fixed_emotion_policy(emotion):
    check_emotions([emotion])
    return lambda eps: [emotion] * len(eps)


def offer_bounds(sc):
    """Parsed offers outside the bargaining range widened by half the gap on each side are
    treated as misreads and ignored (the model's words are checked, not trusted)."""
    lo, hi = min(sc.s0, sc.b0), max(sc.s0, sc.b0)
    pad = 0.5 * (hi - lo)
    return lo - pad, hi + pad


def _apply(ep, speaker, reply, cfg, perceiver, emotion=None):
    other = "counterparty" if speaker == "focal" else "focal"
    parsed = parse_offer(reply.text, ep.dom.unit)
    lo, hi = offer_bounds(ep.sc)
    offer = parsed if parsed is not None and lo <= parsed <= hi else None
    turn = {"speaker": speaker, "text": reply.text}
    if reply.free_text and not reply.accept and offer is not None and offer == ep.offers[other]:
        # a model's message whose only (or last) number is the other side's standing offer,
        # without accepting it ("22 days is a long way"), restates that offer: it is not read as
        # this side's offer, which would converge on the spot. Simulated agents' offers are
        # known from their templates, so this is applied to model-written text only.
        offer, turn["echo"] = None, True
    if speaker == "focal":
        turn["emotion"] = emotion
        turn["perceived"] = perceiver(reply.text)
    elif reply.emotion is not None:      # a trained agent on the counterparty side (MirroredAgent)
        turn["emotion"] = reply.emotion
    turn["offer"] = offer
    turn["accept"] = bool(reply.accept)
    turn["walk_away"] = bool(reply.walk_away)
    ep.turns.append(turn)
    if reply.accept and ep.offers[other] is not None:
        ep.end, ep.agreement = "accept", ep.offers[other]
        return
    if reply.walk_away:
        ep.end = "walk_away"
        return
    if offer is not None:
        ep.offers[speaker] = offer
    f, c = ep.offers["focal"], ep.offers["counterparty"]
    if offer is not None and f is not None and c is not None:
        if abs(f - c) <= tolerance_of(ep.sc.s0, ep.sc.b0, ep.dom.unit, cfg.tolerance):
            # settle at the offer less favourable to the focal side: within the tolerance the
            # counterparty has conceded no further than its own offer (never past its reservation)
            ep.end, ep.agreement = "converged", min((f, c), key=lambda x: position(x, ep.sc.s0, ep.sc.b0))
            return
    if ep.t >= cfg.max_turns:
        ep.end = "max_turns"


def run_episodes(cfg: Config, eps, focal, counterparty, choose_emotion=None, perceiver=None, progress=None):
    """Advance all episodes in lock step: every live episode takes its next utterance together,
    so each LM side makes one batched call per turn. `choose_emotion(eps) -> [emotion|None]`
    picks the focal emotion (None = emotion-free). Returns the episodes, finished."""
    perceiver = perceiver or Perceiver(cfg.emotions)
    while True:
        live = []
        for ep in eps:
            if ep.done:  # free the LM agents' key/value caches (and mirrors) of finished episodes
                for k in [k for k in ep.private if k.startswith("kv:") or k == "mirror"]:
                    del ep.private[k]
            else:
                live.append(ep)
        if not live:
            return eps
        focal_turn = [ep for ep in live if ep.t % 2 == 0]
        cp_turn = [ep for ep in live if ep.t % 2 == 1]
        if focal_turn:
            emos = choose_emotion(focal_turn) if choose_emotion else [None] * len(focal_turn)
            for ep, emo, rep in zip(focal_turn, emos, focal.act(focal_turn, emos)):
                _apply(ep, "focal", rep, cfg, perceiver, emo)
        if cp_turn:
            for ep, rep in zip(cp_turn, counterparty.act(cp_turn)):
                _apply(ep, "counterparty", rep, cfg, perceiver)
        if progress is not None:
            progress(sum(ep.done for ep in eps))


# ----------------------------------------------------------------------------------------
# Outcomes, records and metrics
# ----------------------------------------------------------------------------------------

def outcome(ep):
    success = ep.end in ("accept", "converged")
    u = utility_of(ep.agreement, ep.sc.s0, ep.sc.b0) if success else 0.0
    return {"end": ep.end, "success": success, "agreement": ep.agreement, "utility": round(u, 6),
            "rounds": math.ceil(ep.t / 2)}


def to_record(ep):
    """One trajectory as a JSON-ready dict (the corpus schema; see README)."""
    sc = ep.sc
    return {"key": ep.key, "domain": ep.dom.key, "scenario_id": sc.id, "split": sc.split, "seed": ep.seed,
            "persona": sc.persona, "unit": ep.dom.unit, "focal_prefers": ep.dom.focal_prefers,
            "s0": sc.s0, "b0": sc.b0, "reservation": sc.reservation, "patience": sc.patience,
            "context": sc.context, "turns": ep.turns, "outcome": outcome(ep)}


def bootstrap_ci(values, n_boot=2000, alpha=0.05, seed=0):
    """Mean and percentile-bootstrap (1 - alpha) CI. Empty input gives NaNs."""
    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    r = np.random.default_rng(seed)
    means = v[r.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(v.mean()), float(lo), float(hi)


def paired_diff_ci(recs_a, recs_b, key="utility", n_boot=2000, seed=0):
    """Mean of (a - b) over the episodes both record lists played (matched on domain,
    scenario id, seed and persona: the same scenario against the same counterparty), with a
    percentile-bootstrap 95% CI over those pairs. Pairing removes the scenario-to-scenario
    spread, which is most of the variance when two methods play the same held-out scenarios.
    Returns (mean, lo, hi, n_pairs); NaNs when nothing matches."""
    def index(recs):
        return {(r["domain"], r["scenario_id"], r["seed"], r.get("persona")): r["outcome"][key] for r in recs}
    a, b = index(recs_a), index(recs_b)
    both = sorted(set(a) & set(b), key=str)
    m, lo, hi = bootstrap_ci([float(a[k]) - float(b[k]) for k in both], n_boot=n_boot, seed=seed)
    return m, lo, hi, len(both)


def expression_rates(rec):
    """How well the focal side *said* things in one trajectory: the share of its turns whose
    offer parses and lies inside the bargaining range [min(s0, b0), max(s0, b0)], and the
    share of its emotion-conditioned turns whose perceived emotion is the requested one
    (None when the trajectory has no such turn)."""
    lo, hi = min(rec["s0"], rec["b0"]), max(rec["s0"], rec["b0"])
    focal = [t for t in rec["turns"] if t["speaker"] == "focal"]
    emo = [t for t in focal if t.get("emotion")]
    in_range = [t.get("offer") is not None and lo <= t["offer"] <= hi for t in focal]
    return (sum(in_range) / len(in_range) if in_range else None,
            sum(t.get("perceived") == t["emotion"] for t in emo) / len(emo) if emo else None)


def summarize(records):
    """Outcome metrics over trajectory records, each (mean, lo, hi). The expression rates are
    per-trajectory shares (see `expression_rates`) averaged over trajectories."""
    outs = [r["outcome"] for r in records]
    succ = [o for o in outs if o["success"]]
    rates = [expression_rates(r) for r in records]
    return {"n": len(outs),
            "success": bootstrap_ci([o["success"] for o in outs]),
            "utility": bootstrap_ci([o["utility"] for o in outs]),
            "utility_on_success": bootstrap_ci([o["utility"] for o in succ]),
            "rounds": bootstrap_ci([o["rounds"] for o in outs]),
            "offer_in_range": bootstrap_ci([a for a, _ in rates if a is not None]),
            "emotion_match": bootstrap_ci([b for _, b in rates if b is not None])}


# ----------------------------------------------------------------------------------------
# The rubric judge (SPEC §5)
# ----------------------------------------------------------------------------------------

JUDGE_WEIGHTS = {"offer": 0.20, "firmness": 0.15, "effect": 0.25, "closing": 0.20, "fidelity": 0.10,
                 "fluency": 0.10}


def add_judge_scores(rec, cfg: Config):
    """Write the rubric judge's score and components into the focal turns of `rec` (in place)."""
    for j in judge_record(rec, cfg):
        rec["turns"][j["turn"]].update(score=j["score"], components=j["components"])
    return rec


def _words(text):
    return re.findall(r"[a-z']+", text.lower())


def judge_record(rec, cfg: Config):
    """Score every focal turn of a trajectory record 1-10, with components in [0, 1]:
      offer     the turn states an offer inside the bargaining range (an explicit accept: 0.5);
      firmness  no needless own concession: 1 - (own concession in gap units) / 0.2;
      effect    the counterparty's concession that followed, in gap units / 0.15 (accept = 1);
      closing   the turn's consequence for the deal: utility if it ends in agreement, 0 if it
                provokes a walk-away, 0.5 while the talk goes on;
      fidelity  the perceived emotion equals the intended one (skipped when emotion-free);
      fluency   4-80 words, not a copy of its own previous turn, not speaking as the other side.
    score = 1 + 9 * weighted mean of the components (JUDGE_WEIGHTS)."""
    s0, b0, turns = rec["s0"], rec["b0"], rec["turns"]
    dom = cfg.domains.get(rec["domain"])
    other_role = dom.counterparty_role.lower() if dom else "counterparty"
    lo, hi = min(s0, b0), max(s0, b0)
    out, own_prev, own_prev_text, cp_last = [], None, None, None
    agreement = rec["outcome"]["agreement"]
    for i, t in enumerate(turns):
        if t["speaker"] != "focal":
            if t.get("offer") is not None:
                cp_last = t["offer"]
            continue
        c = {}
        x = t.get("offer")
        c["offer"] = 1.0 if x is not None and lo <= x <= hi else (0.5 if t.get("accept") else 0.0)
        if x is None:
            c["firmness"] = 0.5 if t.get("accept") else 0.0
        elif own_prev is None:
            c["firmness"] = min(1.0, max(0.0, position(x, s0, b0)))
        else:
            conceded = position(own_prev, s0, b0) - position(x, s0, b0)
            c["firmness"] = 1.0 - min(1.0, max(0.0, conceded / 0.2))
        nxt = turns[i + 1] if i + 1 < len(turns) else None
        if nxt is None:
            c["effect"] = 0.5
        elif nxt.get("accept"):
            c["effect"] = 1.0
        elif nxt.get("walk_away"):
            c["effect"] = 0.0
        elif nxt.get("offer") is not None and cp_last is not None:
            moved = position(nxt["offer"], s0, b0) - position(cp_last, s0, b0)
            c["effect"] = min(1.0, max(0.0, moved / 0.15))
        elif nxt.get("offer") is not None:
            c["effect"] = 0.5
        else:
            c["effect"] = 0.0
        ended_here = i + 1 >= len(turns) - 1  # this turn or the reply to it closed the episode
        end = rec["outcome"]["end"]
        if ended_here and end in ("accept", "converged"):
            c["closing"] = utility_of(agreement, s0, b0)
        elif ended_here and end == "walk_away":
            c["closing"] = 0.0
        else:
            c["closing"] = 0.5
        if t.get("emotion"):
            c["fidelity"] = 1.0 if t.get("perceived") == t["emotion"] else 0.0
        words = _words(t["text"])
        flu = 1.0
        if not 4 <= len(words) <= 80:
            flu -= 0.5
        if own_prev_text is not None:
            a, b = set(words), set(_words(own_prev_text))
            if a and len(a & b) / len(a | b) > 0.9:
                flu -= 0.5
        if re.search(rf"(?:^|\n)\s*(?:{re.escape(other_role)}|counterparty|user)\s*:", t["text"].lower()):
            flu -= 0.5
        c["fluency"] = max(0.0, flu)
        wsum = sum(JUDGE_WEIGHTS[k] for k in c)
        score = 1 + 9 * sum(JUDGE_WEIGHTS[k] * v for k, v in c.items()) / wsum
        out.append({"turn": i, "score": round(score, 4), "components": {k: round(v, 4) for k, v in c.items()}})
        if x is not None:
            own_prev = x
        own_prev_text = t["text"]
    return out


# ----------------------------------------------------------------------------------------
# LLM judges (hf: / api:): the same rubric as a prompt, answer parsed from "SCORE: N"
# ----------------------------------------------------------------------------------------

JUDGE_RUBRIC = (
    "You are judging one turn of a negotiation. Score the marked turn of the {focal} from 1 (bad) "
    "to 10 (excellent) for how well it serves the {focal}, who wants the {quantity} to be as "
    "{direction} as possible (target {target}; the {other} opened at {opening}). Consider: does the "
    "turn state a concrete offer in range; does it avoid needless concessions; did the {other} "
    "concede in the reply; did the turn move toward a good deal or provoke a walk-away; does the "
    "turn convey the intended emotion ({emotion}); is it fluent, short and in role. "
    "Answer with one line: the word SCORE, a colon, and a whole number from 1 to 10.")


def judge_messages(rec, turn_index, cfg: Config):
    """Chat messages asking an LLM judge to score focal turn `turn_index` of a record."""
    dom = cfg.domains[rec["domain"]]
    lines = []
    for i, t in enumerate(rec["turns"][:turn_index + 2]):
        who = dom.focal_role if t["speaker"] == "focal" else dom.counterparty_role
        mark = ">>> " if i == turn_index else ""
        lines.append(f"{mark}{who}: {t['text']}")
    system = JUDGE_RUBRIC.format(
        focal=dom.focal_role, other=dom.counterparty_role, quantity=dom.quantity,
        direction="low" if dom.focal_prefers == "lower" else "high",
        target=format_offer(rec["s0"], dom.unit), opening=format_offer(rec["b0"], dom.unit),
        emotion=rec["turns"][turn_index].get("emotion") or "none requested")
    return [{"role": "system", "content": system},
            {"role": "user", "content": "Transcript (the turn to score is marked >>>):\n" + "\n".join(lines)}]


# a number followed by a unit ("SCORE: 204 days") is an offer copied into the answer, not a score
_SCORE = re.compile(r"score\s*[:=]\s*(-?\d+(?:\.\d+)?)(?!\d|\s*(?:days?|weeks?|months?|minutes?|hours?|[ap]\.?m\b|:\d))",
                    re.I)


def parse_score(text):
    """The N of 'SCORE: N', clamped to [1, 10]; None when there is no such answer (recorded as
    missing, never replaced by a default). "SCORE: 204 days" is not an answer: that is an offer."""
    m = _SCORE.search(text or "")
    if not m:
        return None
    v = float(m.group(1))
    return min(10.0, max(1.0, v)) if math.isfinite(v) else None
