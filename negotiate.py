"""The negotiation world of EmoDistill (arXiv 2605.26785), in the order to read it next to the
paper: the episode, the lock-step negotiation loop and the outcome; the agents; the judge.

The episode is the paper's negotiation MDP seen from the focal agent: state = transcript so
far, action = one of the 28 GoEmotions labels, utterance = how the emotion is expressed.
The focal language model (`LMAgent`, `ApiAgent`) gets the chosen emotion through an
affective-prompting block (`emotion_note`), and the judge scores every focal turn (the
`rubric` judge, or the same rubric as a prompt for an LLM judge). What a reader of the paper
does not need lives in back-room modules: domains.py (domains.yaml and the scenarios),
offers.py (the offer parser), emomas.py (the EmoMAS scenario CSVs) and report.py (statistics
over episode records).

Where this departs from the paper's reference code, and why:
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
prompt, with or without an emotion block; runs/v6 in docs/notebook.md measures what it does.

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from domains import EMOTIONS, Config, Domain, DomainConfigError, Scenario, _grain, _rng, check_emotions
from offers import detect_accept, detect_walk_away, format_offer, parse_offer


# ----------------------------------------------------------------------------------------
# The episode
# ----------------------------------------------------------------------------------------

@dataclass
class Reply:
    text: str
    accept: bool = False
    walk_away: bool = False
    emotion: str | None = None     # the emotion a counterparty-side agent was asked to express (tournament)
    free_text: bool = False        # written by a model (LM, API): its offer is read from the words, see _apply
    drafts: int = 1                # replies the LM wrote for this turn (LMAgent.redrafts), the played one among them
    first: dict | None = None      # when a redraft was played: what the first draft did, {"move", "emotion"} (bools)


@dataclass
class Episode:
    dom: Domain
    sc: Scenario
    seed: int
    rng_policy: np.random.Generator
    rng_focal: np.random.Generator
    rng_cp: np.random.Generator
    rng_plan: np.random.Generator               # the offer planner's own stream (plan_move)
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


def new_episode(dom, sc, seed, run_seed=0):
    base = ("episode", run_seed, dom.key, sc.id, seed)
    return Episode(dom, sc, seed, _rng(*base, "policy"), _rng(*base, "focal"), _rng(*base, "cp"), _rng(*base, "plan"))


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


# ----------------------------------------------------------------------------------------
# The lock-step negotiation loop: all live episodes take their next turn together
# ----------------------------------------------------------------------------------------

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
            for ep in focal_turn:                # which number: the same planner for every focal agent
                ep.private["move"] = plan_move(ep)
            emos = choose_emotion(focal_turn) if choose_emotion else [None] * len(focal_turn)
            for ep, emo, rep in zip(focal_turn, emos, focal.act(focal_turn, emos)):
                _apply(ep, "focal", rep, cfg, perceiver, emo)
        if cp_turn:
            for ep, rep in zip(cp_turn, counterparty.act(cp_turn)):
                _apply(ep, "counterparty", rep, cfg, perceiver)
        if progress is not None:
            progress(sum(ep.done for ep in eps))


def read_offer(ep, speaker, reply):
    """The offer `speaker`'s reply makes, as the world reads it: (offer or None, echo). The
    parser's number, if inside `offer_bounds`; echo = True when a model's message states only
    the other side's standing offer without accepting it ("22 days is a long way"): that
    restates their offer and is not read as this side's, which would converge on the spot.
    Simulated agents' offers are known from their templates, so echo applies to model-written
    text only."""
    other = "counterparty" if speaker == "focal" else "focal"
    parsed = parse_offer(reply.text, ep.dom.unit)
    lo, hi = offer_bounds(ep.sc)
    offer = parsed if parsed is not None and lo <= parsed <= hi else None
    if reply.free_text and not reply.accept and offer is not None and offer == ep.offers[other]:
        return None, True
    return offer, False


def realizes(ep, reply, move):
    """Does a focal reply do the planned move, as the world will read it (`move_followed`)?"""
    offer, _ = read_offer(ep, "focal", reply)
    return bool(move_followed({"plan": move, "offer": offer, "accept": reply.accept}))


def _apply(ep, speaker, reply, cfg, perceiver, emotion=None):
    other = "counterparty" if speaker == "focal" else "focal"
    offer, echo = read_offer(ep, speaker, reply)
    turn = {"speaker": speaker, "text": reply.text}
    if echo:
        turn["echo"] = True
    if reply.drafts > 1:
        turn["drafts"] = reply.drafts
    if reply.first is not None:
        turn["first_draft"] = dict(reply.first)
    if speaker == "focal":
        turn["emotion"] = emotion
        turn["perceived"] = perceiver(reply.text)
        if "move" in ep.private:
            turn["plan"] = ep.private["move"]
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


def offer_bounds(sc):
    """Parsed offers outside the bargaining range widened by half the gap on each side are
    treated as misreads and ignored (the model's words are checked, not trusted)."""
    lo, hi = min(sc.s0, sc.b0), max(sc.s0, sc.b0)
    pad = 0.5 * (hi - lo)
    return lo - pad, hi + pad


# ----------------------------------------------------------------------------------------
# The offer planner: which number the focal side states this turn (shared by every focal agent)
# ----------------------------------------------------------------------------------------

def plan_move(ep):
    """The focal side's move for its next turn: {"move": "offer", "offer": x} or
    {"move": "accept", "offer": x} (x = the counterparty's standing offer, to accept).

    A noisy concession schedule from the focal target s0 toward a private floor (a position
    between the counterparty's opening, 0, and s0, 1), at a speed and over a horizon drawn per
    episode from the planner's own random stream `ep.rng_plan`: the corpus gets fast and slow,
    good and bad negotiators. It never concedes backward, and it accepts a standing
    counterparty offer at least as good as its own planned position. Called once per focal
    turn by `run_episodes`, so the SimTeacher and an LM agent playing the same episode seed
    are planned alike (they differ only in their words and what those words cause). This is
    the strategy half of the strategy/generation split of He et al. (2018); the LM states the
    move in its own words and its offer is still read from its text."""
    m = ep.private.get("plan")
    r, sc = ep.rng_plan, ep.sc
    if m is None:
        m = ep.private["plan"] = {
            "floor": float(r.uniform(0.0, 0.7)),         # lowest position it will offer
            "speed": float(np.exp(r.uniform(np.log(0.4), np.log(2.5)))),
            "horizon": int(r.integers(4, 12)),            # focal turns to reach the floor
            "pos": 1.0, "j": 0}
    m["j"] += 1
    frac = min(1.0, (m["j"] - 1) / m["horizon"]) ** (1.0 / m["speed"])
    planned = 1.0 - (1.0 - m["floor"]) * frac + r.normal(0, 0.03) * (m["j"] > 1)
    m["pos"] = min(m["pos"], max(m["floor"], min(1.0, planned)))   # never backward
    cp_offer = ep.offers["counterparty"]
    if cp_offer is not None and position(cp_offer, sc.s0, sc.b0) >= m["pos"] - 1e-9:
        return {"move": "accept", "offer": cp_offer}
    g = _grain(ep.dom.unit)
    return {"move": "offer", "offer": float(round((sc.b0 + m["pos"] * (sc.s0 - sc.b0)) / g) * g)}


def move_followed(turn):
    """Did a focal turn do what its plan said: accept when told to accept, otherwise state the
    planned number (read from its text by the parser) without accepting? None without a plan."""
    plan = turn.get("plan")
    if plan is None:
        return None
    if plan["move"] == "accept":
        return bool(turn.get("accept"))
    return not turn.get("accept") and turn.get("offer") is not None and abs(turn["offer"] - plan["offer"]) < 1e-6


def random_emotion_policy(subset=None):
    """The behaviour policy of `collect`: a uniformly random emotion each focal turn."""
    names = check_emotions(subset) if subset else EMOTIONS

    def choose(eps):
        return [names[int(ep.rng_policy.integers(len(names)))] for ep in eps]
    return choose


def fixed_emotion_policy(emotion):
    check_emotions([emotion])
    return lambda eps: [emotion] * len(eps)


# ----------------------------------------------------------------------------------------
# The outcome: success, utility and rounds
# ----------------------------------------------------------------------------------------

def outcome(ep):
    success = ep.end in ("accept", "converged")
    u = utility_of(ep.agreement, ep.sc.s0, ep.sc.b0) if success else 0.0
    return {"end": ep.end, "success": success, "agreement": ep.agreement, "utility": round(u, 6),
            "rounds": math.ceil(ep.t / 2)}


def to_record(ep):
    """One trajectory as a JSON-ready dict (the corpus schema)."""
    sc = ep.sc
    return {"key": ep.key, "domain": ep.dom.key, "scenario_id": sc.id, "split": sc.split, "seed": ep.seed,
            "persona": sc.persona, "unit": ep.dom.unit, "focal_prefers": ep.dom.focal_prefers,
            "s0": sc.s0, "b0": sc.b0, "reservation": sc.reservation, "patience": sc.patience,
            "context": sc.context, "turns": ep.turns, "outcome": outcome(ep)}


def position(x, s0, b0):
    """Where offer x lies between the counterparty opening (0) and the focal target (1)."""
    return (b0 - x) / (b0 - s0)


def utility_of(x, s0, b0):
    return float(min(1.0, max(0.0, position(x, s0, b0))))


def tolerance_of(s0, b0, unit, rel=0.02):
    return max(rel * abs(b0 - s0), 1.0)


# ----------------------------------------------------------------------------------------
# The agents. Perception: which emotion does a text express? (a transparent cue lexicon)
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
# The simulated teacher and counterparty (offline additions, see the module docstring)
# ----------------------------------------------------------------------------------------

def _fill(template, sc, **extra):
    vals = dict(sc.context)
    vals.update(extra)
    return template.format(**vals)


class SimTeacher:
    """Offline teacher: an emotion phrase + the planned offer (`plan_move`) in one of the
    domain's offer sentences + (sometimes) a justification; or, when the plan says accept, an
    acceptance of the counterparty's offer. Its wording draws from `ep.rng_focal`, the plan
    from the planner's own stream."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def act(self, eps, emotions):
        out = []
        for ep, emo in zip(eps, emotions):
            move = ep.private.get("move") or plan_move(ep)
            r, dom, sc = ep.rng_focal, ep.dom, ep.sc
            variant = int(r.integers(3))
            phrase = None
            if emo is not None:
                phrases = self.cfg.emotions[emo]["phrases"]
                phrase = phrases[int(r.integers(len(phrases)))]
            if move["move"] == "accept":
                body = _pick(r, dom.teacher["accept"]).format(offer=format_offer(move["offer"], dom.unit, variant))
                out.append(Reply(" ".join(s for s in (phrase, body) if s), accept=True))
                continue
            parts = [_pick(r, dom.teacher["offers"]).format(offer=format_offer(move["offer"], dom.unit, variant))]
            if r.random() < 0.5:
                parts.append(_fill(_pick(r, dom.teacher["justifications"]), sc))
            if phrase:
                parts.insert(0 if r.random() < 0.7 else len(parts), phrase)
            out.append(Reply(" ".join(parts)))
        return out


def _pick(r, xs):
    return xs[int(r.integers(len(xs)))]


class SimCounterparty:
    """Emotion-sensitive, state-dependent concession model (the offline counterparty).

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
# Language-model agents and their prompts (the exact prompt is shared with SFT later)
# ----------------------------------------------------------------------------------------

def emotion_note(cfg: Config, emotion, turn_index):
    """The paper's affective-prompting block for one focal turn. The wording rotates
    through the emotion's instructions by turn index, so the model sees several phrasings.
    The domains file's turn reminder (if any) closes the block."""
    ins = cfg.emotions[emotion]["instructions"]
    tail = f" {cfg.turn_reminder}" if cfg.turn_reminder else ""
    return f"[Emotional approach ({emotion}): {ins[turn_index % len(ins)]}{tail}]"


def turn_note(cfg: Config, emotion, turn_index, emotion_free=False):
    """What is appended to the focal side's last message for the turn being generated: the
    emotion block, or without an emotion just the turn reminder, so that every LLM method
    (vanilla and emotion-free ones too) gets the same task instruction and the rows differ
    only in the emotion. None when there is nothing to add."""
    if emotion and not emotion_free:
        return emotion_note(cfg, emotion, turn_index)
    return f"[{cfg.turn_reminder}]" if cfg.turn_reminder else None


OFFER_MODES = ("planned", "free")


def last_offers(turns):
    """The standing offer of each side after `turns` (the last one each side stated)."""
    out = {"focal": None, "counterparty": None}
    for t in turns:
        if t.get("offer") is not None:
            out[t["speaker"]] = t["offer"]
    return out


def move_line(dom, move, offers="planned"):
    """The planned move as the prompt states it; in the free mode the model picks the number."""
    if offers == "free":
        return "Your move: state your offer as one number, or accept theirs."
    if offers != "planned":
        raise ValueError(f"offers must be one of {OFFER_MODES}, got '{offers}'")
    if move is None:
        raise ValueError("the planned-offer prompt needs the turn's planned move (plan_move); "
                         "a corpus made before the planner has none: re-run collect")
    if move["move"] == "accept":
        return f"Your move: accept their offer of {format_offer(move['offer'], dom.unit)}."
    return f"Your move: offer {format_offer(move['offer'], dom.unit)}."


def build_messages(cfg: Config, ep: Episode, role: str, emotion=None, emotion_free=False, offers="planned",
                   move=None):
    """Chat messages for `role` ("focal" or "counterparty") at the current turn.

    Focal role: the compact state prompt, identical at SFT, JPO and inference. System: who
    you are, the situation and the goal. One user message: turn k of N, both sides' standing
    offers, the counterparty's last message, the planned `move` (see plan_move; in the
    `offers="free"` mode the model is asked to choose) and the emotion block (unless
    emotion-free); the answer length is the goal's. The whole transcript is not shown: a 135M model
    cannot use it, and the state above is what a move depends on.
    Counterparty role (an LM playing the other side): the full history, own turns as
    assistant, the other side's as user."""
    dom, sc = ep.dom, ep.sc
    situation = _fill(dom.prompt["situation"], sc)
    if role == "focal":
        me, other = dom.focal_role, dom.counterparty_role
        goal = _fill(dom.prompt["focal_goal"], sc, target=format_offer(sc.s0, dom.unit))
        if move is None and offers == "planned":   # (an agent called outside run_episodes plans here)
            move = ep.private["move"] = ep.private.get("move") or plan_move(ep)
    else:
        me, other = dom.counterparty_role, dom.focal_role
        goal = _fill(dom.prompt["counterparty_goal"], sc, target=format_offer(sc.b0, dom.unit))
    msgs = [{"role": "system", "content": f"You are the {me}, negotiating with the {other}. {situation} {goal}"}]
    if role != "focal":
        for turn in ep.turns:
            msgs.append({"role": "assistant" if turn["speaker"] == role else "user", "content": turn["text"]})
        return msgs
    standing = last_offers(ep.turns)
    said = [t["text"] for t in ep.turns if t["speaker"] == "counterparty"]

    def shown(x):
        return format_offer(x, dom.unit) if x is not None else "none yet"
    lines = [f"Turn {ep.t + 1} of {cfg.max_turns}. Your last offer: {shown(standing['focal'])}. "
             f"Their last offer: {shown(standing['counterparty'])}.",
             f'They said: "{said[-1]}"' if said else "The negotiation starts now.",
             move_line(dom, move, offers)]
    note = turn_note(cfg, emotion, ep.t, emotion_free)
    if note:
        lines.append(note)
    msgs.append({"role": "user", "content": "\n".join(lines)})
    return msgs


def _clean_reply(text):
    text = text.strip().split("\n\n")[0].strip()
    text = re.sub(r"^(?:assistant|user|system)\s*:\s*", "", text, flags=re.I)
    return text[:600]


# what a redraft is for (LMAgent.redrafts), part of the eval settings so that results of another rule re-run
REDRAFT_RULE = "move, then emotion"


class LMAgent:
    """A Hugging Face causal LM speaking for `role`, all live episodes in one batched
    `generate` call (left padding). Accept / walk-away are read from the text.

    redrafts: with planned offers, a focal reply that misses the planned move as the world reads
    it (`realizes`: the same parser and echo rule), or whose words the world does not perceive as
    the requested emotion (the same `Perceiver`), is written again this many times, sampled at
    `redraft_temperature`, all in one batched call. The draft played is the first that does both,
    else the first that does the move, else the first draft (the greedy one when the agent decodes
    greedily): the move counts before the emotion. Every reply played is the model's own text; the
    turn records how many were written (`drafts`: 1, or 1 + redrafts) and, when a redraft was
    played, what the first draft did (`first`), so first-draft fidelity and emotion match stay
    countable."""

    def __init__(self, model, tokenizer, cfg: Config, role="focal", temperature=0.7, top_p=0.9,
                 max_new_tokens=48, batch_size=32, emotion_free=False, seed=0, kv_cache=None, offers="planned",
                 redrafts=0, redraft_temperature=0.7):
        self.model, self.tok, self.cfg, self.role, self.offers = model, tokenizer, cfg, role, offers
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.redrafts, self.redraft_temperature = redrafts, redraft_temperature
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
        return [self.tok.apply_chat_template(build_messages(self.cfg, ep, self.role, emo, self.emotion_free, self.offers,
                                                            ep.private.get("move")),
                                             add_generation_prompt=True, tokenize=False)
                for ep, emo in zip(eps, emotions)]

    def generate(self, texts, temperature=None):
        import torch
        self.calls += 1
        torch.manual_seed(self.seed * 100003 + self.calls)
        temperature = self.temperature if temperature is None else temperature
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths together
        out = [None] * len(texts)
        dev = next(self.model.parameters()).device
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            enc = self.tok([texts[i] for i in idx], return_tensors="pt", padding=True,
                           add_special_tokens=False).to(dev)
            t0 = time.time()
            sampling = (dict(do_sample=True, temperature=temperature, top_p=self.top_p)
                        if temperature > 0 else dict(do_sample=False))
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

    def generate_cached(self, eps, texts, temperature=None):
        """Like generate(), through decode.KVDecoder, with each episode's key/value cache
        kept in ep.private between turns so only new prompt tokens are run."""
        import torch
        self.calls += 1
        self.decoder.temperature = self.temperature if temperature is None else temperature
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

    def write(self, eps, prompts, temperature=None):
        raw = self.generate_cached(eps, prompts, temperature) if self.kv_cache else self.generate(prompts, temperature)
        texts = [_clean_reply(t) for t in raw]
        return [Reply(t, accept=detect_accept(t), walk_away=detect_walk_away(t), free_text=True) for t in texts]

    def act(self, eps, emotions=None):
        emotions = emotions or [None] * len(eps)
        prompts = self.prompts(eps, emotions)
        replies = self.write(eps, prompts)
        if self.redrafts < 1 or self.role != "focal" or self.offers != "planned":
            return replies
        wanted = [None if self.emotion_free else e for e in emotions]
        graded = [self.grade(ep, r, e) for ep, r, e in zip(eps, replies, wanted)]
        missed = [i for i, g in enumerate(graded) if g is not None and (not g["move"] or g["emotion"] is False)]
        if not missed:
            return replies
        rows = [i for i in missed for _ in range(self.redrafts)]     # each miss, redrafts times
        again = self.write([eps[i] for i in rows], [prompts[i] for i in rows], self.redraft_temperature)
        for k, i in enumerate(missed):
            tries = again[k * self.redrafts:(k + 1) * self.redrafts]
            first, best, rank = replies[i], replies[i], self._rank(graded[i])
            for r in tries:                  # the first draft keeps its place unless a rewrite ranks higher
                g = self.grade(eps[i], r, wanted[i])
                if self._rank(g) > rank:
                    best, rank = r, self._rank(g)
            replies[i] = best
            best.drafts = 1 + self.redrafts
            if best is not first:
                best.first = graded[i]
        return replies

    def grade(self, ep, reply, emotion):
        """What a planned focal draft does as the world reads it: {"move": did the planned move,
        "emotion": perceived as `emotion` (None when no emotion was requested)}; None without a plan."""
        move = ep.private.get("move")
        if move is None:
            return None
        if not hasattr(self, "_perceive"):
            self._perceive = Perceiver(self.cfg.emotions)
        return {"move": realizes(ep, reply, move),
                "emotion": None if emotion is None else self._perceive(reply.text) == emotion}

    @staticmethod
    def _rank(g):                            # the move first, then the emotion
        return 2 * g["move"] + bool(g["emotion"])


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
        for m in ms:                     # the mirrored focal side is planned like any focal side
            m.private["move"] = plan_move(m)
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
                 top_p=0.9, max_tokens=96, timeout=30.0, retries=4, backoff=1.0, workers=8, emotion_free=False,
                 offers="planned"):
        self.model, self.cfg, self.role = model, cfg, role
        self.base_url = (base_url or os.environ.get("EMODISTILL_API_BASE") or os.environ.get("OPENAI_BASE_URL")
                         or "https://api.openai.com/v1").rstrip("/")
        self.api_key = api_key or os.environ.get("EMODISTILL_API_KEY") or os.environ.get("OPENAI_API_KEY", "")
        self.temperature, self.top_p, self.max_tokens = temperature, top_p, max_tokens
        self.timeout, self.retries, self.backoff, self.workers = timeout, retries, backoff, workers
        self.emotion_free, self.offers = emotion_free, offers

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
        msgs = [build_messages(self.cfg, ep, self.role, emo, self.emotion_free, self.offers, ep.private.get("move"))
                for ep, emo in zip(eps, emotions)]
        texts = [_clean_reply(t) for t in self.chat_many(msgs)]
        return [Reply(t, accept=detect_accept(t), walk_away=detect_walk_away(t), free_text=True) for t in texts]


# ----------------------------------------------------------------------------------------
# The judge: the paper's per-turn judge as a deterministic rubric
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
                a planned turn that did not do its planned move gets at most 0.5 (the number is
                the planner's: the words are judged on stating it);
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
        if move_followed(t) is False:    # a planned turn that did not do its move (see plan_move)
            c["offer"] = min(c["offer"], 0.5)
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


def judge_reply(cfg: Config, rec, turn_index, text, perceiver=None, sample=0):
    """The rubric judge's score of `text` said as focal turn `turn_index` of corpus record
    `rec` instead of the recorded turn, after one simulated counterparty reply (JPO's re-sample
    mode; not a live negotiation). The episode before the turn is rebuilt from the record
    (`episode_from_record`, standing offers by `last_offers`) and the SimCounterparty's private
    state (concession fraction f, k = its turns so far, heard = the emotions it perceived in the
    focal turns so far) is restored by replaying it on every earlier counterparty turn: its
    words are the record's, its state is exactly what it had (f does not depend on its random
    draws; inferring f from its last offer, `_frac`, would be off by the offer's rounding of up
    to one grain). The reply is applied with the turn's emotion (and plan), the counterparty
    acts once, and the turn is judged by `judge_record` on a record whose outcome is the end
    if one happened (accept, walk-away, convergence) and an ongoing talk otherwise.
    Deterministic per (record key, turn, `sample`): the counterparty's random stream."""
    perceiver = perceiver or Perceiver(cfg.emotions)
    ep = episode_from_record(cfg, rec, turn_index)
    cp, turns = SimCounterparty(cfg, perceiver), ep.turns
    for j, t in enumerate(turns):        # replay: ep.private["cp"] as before turn `turn_index`
        if t["speaker"] == "counterparty":
            ep.turns, ep.offers = turns[:j], last_offers(turns[:j])
            cp.act([ep])
    ep.turns, ep.offers = turns, last_offers(turns)
    ep.rng_cp = _rng("judge_reply", rec.get("key"), turn_index, sample)
    turn = rec["turns"][turn_index]
    if turn.get("plan") is not None:
        ep.private["move"] = turn["plan"]
    _apply(ep, "focal", Reply(text, accept=detect_accept(text), walk_away=detect_walk_away(text), free_text=True),
           cfg, perceiver, turn.get("emotion"))
    if not ep.done:
        _apply(ep, "counterparty", cp.act([ep])[0], cfg, perceiver)
    return next(j["score"] for j in judge_record(to_record(ep), cfg) if j["turn"] == turn_index)
