"""One-turn probe of a student: `python emodistill.py probe --out RUN --corpus VAL/corpus.jsonl`.
Not needed to follow the paper. It asks the student (base, or with an adapter) for the focal
turns of a corpus whose scenarios it did not train on, in the exact inference prompt, and counts
how often the reply does the planned move (offer fidelity, `negotiate.move_followed`),
carries the requested emotion (the cue-lexicon perceiver), and what the rubric judge scores it
after one simulated counterparty reply (`negotiate.judge_reply`, as JPO's re-sample mode). Cheap (one turn per state, no
episodes), so it is how SFT settings and decoding are chosen on training scenarios: train on
some training ids, probe on others (docs/notebook.md shows the commands).
"""
from __future__ import annotations

import numpy as np

import negotiate as ng
from domains import load_config
from methods import STUDENT_TEMPERATURE
from models import make_agent
from runs import read_jsonl


def probe(out="runs/default", corpus="", adapter="", student="smollm2", states=96, temperature=STUDENT_TEMPERATURE,
          max_new_tokens=48, offers="planned", move="", redrafts=0, domains_file="domains.yaml", seed=0, show=3):
    """Offer fidelity, emotion match and judge score of the student on `states` focal turns of `corpus`
    (a seeded random draw). `adapter`: a folder under `out`, or "" for the
    base model. `move`: only the turns whose planned move is this one ("offer" or "accept"; accept
    turns are ~2% of a corpus, too few in a uniform draw to measure). Prints the rates per domain
    and a few replies; returns the pooled rates. `redrafts`: rewrites of a reply that missed the
    planned move (LMAgent); the first draft's fidelity is printed beside the played one's."""
    if move not in ("", "offer", "accept"):
        raise ValueError(f"move must be offer, accept or empty, got '{move}'")
    cfg = load_config(domains_file)
    records, _ = read_jsonl(corpus)
    rng = np.random.default_rng(seed)
    pool = [(r, i) for r in records for i, t in enumerate(r["turns"]) if t["speaker"] == "focal" and t.get("emotion")
            and (not move or (t.get("plan") or {}).get("move") == move)]
    if not pool:
        raise ValueError(f"no focal turns with an emotion{' and planned move ' + move if move else ''} in {corpus}")
    picks = [pool[i] for i in sorted(rng.choice(len(pool), min(states, len(pool)), replace=False))]
    folder = f"{out}/{adapter}" if adapter else None
    agent = make_agent(student, "focal", cfg, seed, batch_size=64, adapter=folder, offers=offers,
                       temperature=temperature, redrafts=redrafts)
    agent.max_new_tokens = max_new_tokens
    if getattr(agent, "kv_cache", False):
        agent.decoder.max_new_tokens = max_new_tokens
    eps = []
    for rec, i in picks:
        ep = ng.episode_from_record(cfg, rec, i)
        ep.offers = ng.last_offers(ep.turns)
        ep.private["move"] = rec["turns"][i]["plan"]
        eps.append(ep)
    emotions = [rec["turns"][i]["emotion"] for rec, i in picks]
    perceiver = ng.Perceiver(cfg.emotions)
    replies = agent.act(eps, emotions)
    for ep, emo, rep in zip(eps, emotions, replies):
        ng._apply(ep, "focal", rep, cfg, perceiver, emo)
    followed = [ng.move_followed(ep.turns[-1]) for ep in eps]
    rows = [(ep.dom.key, ok, ep.turns[-1]["perceived"] == emo, ng.judge_reply(cfg, rec, i, rep.text, perceiver),
             rep.first["move"] if rep.first else ok,
             rep.first["emotion"] if rep.first else ep.turns[-1]["perceived"] == emo)
            for ep, emo, rep, (rec, i), ok in zip(eps, emotions, replies, picks, followed)]
    for d in sorted({r[0] for r in rows}) + ["all"]:
        sel = [r for r in rows if d in ("all", r[0])]
        first, first_e = ((f" (first draft {np.mean([r[k] for r in sel]):.2f})" if redrafts else "") for k in (4, 5))
        print(f"[probe] {d:9s} n {len(sel):3d}  offer fidelity {np.mean([r[1] for r in sel]):.2f}{first}  "
              f"emotion match {np.mean([r[2] for r in sel]):.2f}{first_e}  judge score {np.mean([r[3] for r in sel]):.2f}")
    for ep, emo in list(zip(eps, emotions))[:show]:
        print(f"[probe] {ng.move_line(ep.dom, ep.turns[-1]['plan'])} ({emo}) -> {ep.turns[-1]['text']!r}")
    return {"offer_fidelity": float(np.mean([r[1] for r in rows])), "emotion_match": float(np.mean([r[2] for r in rows])),
            "judge_score": float(np.mean([r[3] for r in rows])),
            "first_draft_fidelity": float(np.mean([r[4] for r in rows])),
            "first_draft_emotion_match": float(np.mean([r[5] for r in rows]))}


def add_command(command):
    """probe's subcommand, through emodistill.build_parser's `command`."""
    command("probe", probe, "one-turn offer fidelity and emotion match of a student on a corpus", [],
            ("--out", dict(help="run folder holding the adapter")),
            ("--corpus", dict(help="corpus.jsonl whose focal turns are probed (scenarios the student did not train on)")),
            ("--adapter", dict(help="adapter folder under the run ('' = the base model)")),
            ("--student", dict()), ("--states", dict(type=int)), ("--temperature", dict(type=float)),
            ("--max-new-tokens", dict(type=int)), ("--offers", dict(choices=ng.OFFER_MODES)),
            ("--move", dict(choices=["offer", "accept"], help="only turns with this planned move")),
            ("--redrafts", dict(type=int, help="rewrites of a reply that missed the planned move")),
            ("--domains-file", dict()), ("--seed", dict(type=int)), ("--show", dict(type=int)))
