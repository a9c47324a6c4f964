"""Not needed to follow the paper: the domains (read and validated from domains.yaml) and
their scenarios.

  * EMOTIONS, the 28 GoEmotions labels (the one list of them in the project), the units, and
    the split of scenario ids: 0-79 are training ids and 80-99 test ids, and nothing mixes them;
  * `load_config` reads domains.yaml and checks every field; each error names the domain (or
    emotion) and the field. `swap_domain` (and `load_config(side="counterparty")`) turns a
    domain around for the trained-vs-trained tournament;
  * `make_scenarios` draws a domain's 100 scenarios as a pure function of (domain, seed).

The vocabulary of a domain's optional `emomas:` section (CSV_TYPES, CSV_FILTERS, the cell
references) is checked here with the rest of the file; emomas.py applies it to the CSVs.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field

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


# The vocabulary of a domain's `emomas:` section: column types, template filters, and the
# `{Column}` / `{Column|filter}` cell references of its templates (applied in emomas.py).
CSV_TYPES = ("int", "number", "clock", "text")
CSV_FILTERS = ("lower", "words", "money")
_CELL_REF = re.compile(r"\{([^{}|]+)(?:\|(\w+))?\}")


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
