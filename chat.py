"""Play a negotiation in the terminal: `python emodistill.py chat --out RUN --method emodistill`.
Not needed to follow the paper.

A person takes one side of a domain's scenario and types messages:

  --side counterparty (default)  the person is the counterparty; the focal side is an eval method
                                 (teacher-iql, vanilla, iql+sft, emodistill, ...) loaded from the run
                                 folder as eval loads it (methods.side_agent), with the settings of
                                 the run's eval/<method>.json when it exists;
  --side focal                   the person is the focal side against the simulated counterparty
                                 (or --counterparty), and sees the emotion it perceived in each message.

The game is an ordinary episode of `negotiate.run_episodes`: the person is an agent (`HumanAgent`)
whose act() reads a line, so the turns are applied, parsed, planned and ended by the loop's own
functions (`_apply`, `parse_offer`, `plan_move`), and the saved file is one record of eval's
schema (`negotiate.to_record`) with the rubric judge's scores and a `chat` field saying who played.
`python emodistill.py show RUN` puts the saved games on the transcript page next to eval's.
"""
from __future__ import annotations

import datetime
import os
import re
import sys

import negotiate as ng
from domains import SIDES, TEST_IDS, load_config, make_scenarios
from methods import STUDENT_REDRAFTS, STUDENT_TEMPERATURE, best_fixed_emotions, chooser, side_agent
from models import make_agent
from offers import detect_accept, detect_walk_away, format_offer, parse_offer
from runs import StageError, domains_sha, read_json, write_json_atomic

# a number followed by one of these words is in another unit than the domain's ("45 minutes" in a
# negotiation about days: the parser would read 45 days, which the person did not mean)
_FOREIGN = {"days": r"minutes?|mins?|[ap]\.?m\b\.?|o'?clock",
            "minutes": r"days?|weeks?|months?|[ap]\.?m\b\.?|o'?clock",
            "clock": r"days?|weeks?|months?|minutes?|mins?|hours?|hrs?"}
_UNIT_NAME = {"days": "days", "minutes": "minutes", "clock": "a time of day"}
WALK_TEXT = "I am walking away: no deal."
HELP = ("Type a message that states your offer (the parser reads the number), or: /offer N, /accept (their "
        "standing offer), /quit (walk away), /help. Ctrl-C stops and saves the game so far.")


def read_line(prompt):
    """input(), echoing the line when it comes from a pipe so that the terminal shows the whole game."""
    line = input(prompt)
    if not sys.stdin.isatty():
        print(line)
    return line


class HumanAgent:
    """A person at the terminal as an agent of `negotiate.run_episodes`, for either side. act()
    shows what happened since the person last spoke (`Console.show`), reads a line and returns it
    as a Reply: offers, accept and walk-away are read from the words by the same detectors and
    parser as a model's text. A line that would not be a move (empty, no number, a number in
    another unit or out of range, accepting with nothing to accept) gets a one-line hint and the
    line is asked again. Ctrl-C (KeyboardInterrupt) and the end of the input (EOFError) are left to
    the caller, which saves the game so far."""

    def __init__(self, side, console, read=read_line):
        self.side, self.console, self.read = side, console, read

    def act(self, eps, emotions=None):
        ep = eps[0]                       # one game: run_episodes calls it with the one live episode
        self.console.show(ep)
        if self.side == "focal":          # a person's turn has no planned move to follow: drop the plan
            move = ep.private.pop("move", None)
            if self.console.reveal and move:
                self.console.say(f"   (the offer planner would: {ng.move_line(ep.dom, move)[len('Your move: '):]})")
        while True:
            reply, hint = reply_for(ep, self.side, self.read("you> "))
            if reply is not None:
                return [reply]
            self.console.say(f"   hint: {hint}")


def _example(ep):
    sc = ep.sc
    return format_offer(round((sc.s0 + sc.b0) / 2), ep.dom.unit)


def reply_for(ep, side, line):
    """(Reply, None) for a line the person typed at episode `ep`, or (None, one-line hint)."""
    other = "counterparty" if side == "focal" else "focal"
    theirs, unit, text = ep.offers[other], ep.dom.unit, (line or "").strip()
    if not text:
        return None, f"an empty line is not a message: state an offer, e.g. '{_example(ep)}' (/help)."
    if text.startswith("/"):
        cmd, _, arg = text[1:].partition(" ")
        cmd, arg = cmd.lower(), arg.strip()
        if cmd in ("quit", "walk"):
            return ng.Reply(WALK_TEXT, walk_away=True, free_text=True), None
        if cmd == "accept":
            if theirs is None:
                return None, "they have made no offer yet, so there is nothing to accept: make one with /offer N."
            return ng.Reply(f"I accept your offer of {format_offer(theirs, unit)}.", accept=True, free_text=True), None
        if cmd == "offer":
            x, hint = read_offer(ep, arg, bare=True)
            if hint:
                return None, hint
            return ng.Reply(f"My offer is {format_offer(x, unit)}.", free_text=True), None
        return None, HELP if cmd == "help" else f"unknown command /{cmd}. {HELP}"
    if detect_walk_away(text):
        return ng.Reply(text, walk_away=True, free_text=True), None
    if detect_accept(text):
        if theirs is None:
            return None, "they have made no offer yet, so there is nothing to accept: state your own number."
        return ng.Reply(text, accept=True, free_text=True), None
    x, hint = read_offer(ep, text)
    if hint:
        return None, hint
    if theirs is not None and abs(x - theirs) < 1e-9:
        # the echo rule of _apply would not read it as an offer: say how to take their number
        return None, (f"{format_offer(x, unit)} is their standing offer: type /accept to take it, or state a number "
                      f"of your own.")
    return ng.Reply(text, free_text=True), None


def read_offer(ep, text, bare=False):
    """(offer, None) as the parser reads it from `text`, or (None, hint). `bare`: /offer's
    argument, where a bare hour means that hour of the evening in the clock domain."""
    unit = ep.dom.unit
    foreign = re.search(rf"\d+(?:[.,:]\d+)?\s*(?:{_FOREIGN[unit]})(?![a-z])", text.lower())
    if foreign:
        return None, (f"'{foreign.group(0)}' is not in {_UNIT_NAME[unit]}: this negotiation is about the "
                      f"{ep.dom.quantity}; say e.g. '{_example(ep)}'.")
    x = parse_offer(text, unit)
    if x is None and bare and unit == "clock":
        x = parse_offer(f"by {text}", unit)
    if x is None:
        if re.search(r"\d", text):
            return None, (f"no offer in {_UNIT_NAME[unit]} read from that (money, percentages and past durations "
                          f"are not offers): say e.g. '{_example(ep)}'.")
        return None, f"no number read: state your offer, e.g. '{_example(ep)}', or /accept, /quit (/help)."
    lo, hi = ng.offer_bounds(ep.sc)
    if not lo <= x <= hi:
        return None, (f"{format_offer(x, unit)} is outside this negotiation: an offer between "
                      f"{format_offer(lo, unit)} and {format_offer(hi, unit)} counts.")
    return x, None


class Console:
    """What the person sees: each turn once, the agent's with (--reveal) the emotion it chose, its
    planned move and the offer the parser read; the person's own with what was read from it and,
    on the focal side, the emotion the counterparty perceived."""

    def __init__(self, human_side, reveal=False, write=print):
        self.human, self.reveal, self.write, self.shown = human_side, reveal, write, 0

    def say(self, text):
        self.write(text)

    def show(self, ep):
        unit = ep.dom.unit
        for t in ep.turns[self.shown:]:
            read = ("walks away" if t.get("walk_away") else "accepts" if t.get("accept")
                    else f"offer {format_offer(t['offer'], unit)}" if t.get("offer") is not None
                    else "their own standing offer repeated, not an offer" if t.get("echo") else "no offer")
            if t["speaker"] == self.human:
                line = f"   (read as: {read}"
                if t["speaker"] == "focal":
                    line += f"; the counterparty perceived: {t.get('perceived')}"
                self.write(line + ")")
                continue
            who = ep.dom.focal_role if t["speaker"] == "focal" else ep.dom.counterparty_role
            self.write(f"{who}: {t['text']}")
            if self.reveal:
                parts = []
                if t["speaker"] == "focal":
                    parts.append(f"emotion chosen: {t.get('emotion') or 'none (emotion-free)'}")
                    if t.get("plan"):
                        parts.append(f"planned: {ng.move_line(ep.dom, t['plan'])[len('Your move: '):].rstrip('.')}")
                parts.append(f"read as: {read}")
                self.write(f"   [{'; '.join(parts)}]")
        self.shown = len(ep.turns)


def outcome_lines(ep, human_side):
    """The end of a game in words: how it ended, the agreement and the focal side's utility."""
    o, dom, sc = ng.outcome(ep), ep.dom, ep.sc
    who = {"focal": dom.focal_role, "counterparty": dom.counterparty_role}
    last = ep.turns[-1]["speaker"] if ep.turns else None
    ends = {"accept": lambda: f"deal: the {who[last]} accepted {format_offer(o['agreement'], dom.unit)}",
            "converged": lambda: f"deal: the two offers met at {format_offer(o['agreement'], dom.unit)}",
            "walk_away": lambda: f"no deal: the {who[last]} walked away",
            "max_turns": lambda: "no deal: the turn limit was reached",
            "interrupted": lambda: "stopped before the end (saved as 'interrupted')"}
    mine = "your" if human_side == "focal" else "the agent's"
    return [f"[chat] {ends.get(o['end'], lambda: str(o['end']))()} after {o['rounds']} round(s).",
            f"[chat] utility of the focal side ({mine}): {o['utility']:.3f} (1 = its target "
            f"{format_offer(sc.s0, dom.unit)} or better, 0 = the counterparty's opening "
            f"{format_offer(sc.b0, dom.unit)})"]


def _eval_settings(out, method):
    path = os.path.join(out, "eval", f"{method.replace(':', '_')}.json")
    return read_json(path).get("settings", {}) if os.path.exists(path) else {}


def _load(method, cfg, out, domain, student, st, run_seed, best):
    """The focal agent and emotion policy of `method`, as eval made them (its settings `st`)."""
    temperature = STUDENT_TEMPERATURE if st.get("temperature") is None else st["temperature"]
    return side_agent(method, cfg, out, [domain], student, 1, st.get("sample", False), run_seed, {}, best,
                      st.get("offers") or "planned", temperature, st.get("redrafts", STUDENT_REDRAFTS))


def chat(out="runs/default", method="emodistill", side="counterparty", domain="crad", scenario=TEST_IDS[0], seed=0,
         reveal=False, student=None, counterparty="sim", save=None, domains_file="domains.yaml", read=read_line,
         write=print):
    """Negotiate in the terminal against `method` of run folder `out` (side counterparty), or as
    the focal side against `counterparty` (side focal), on scenario `scenario` of `domain` with
    episode seed `seed`. The agent is loaded with the settings of the run's eval/<method>.json
    when present (student, offers, temperature, run seed); --student overrides the student.
    Saves the game as one eval record (JSON) under RUN/chat/ (or `save`) and returns its path."""
    if side not in SIDES:
        raise StageError(f"--side must be one of {', '.join(SIDES)}")
    cfg = load_config(domains_file)
    if domain not in cfg.domains:
        raise StageError(f"unknown domain '{domain}' (one of {', '.join(cfg.domains)})")
    dom = cfg.domains[domain]
    agent_name = method if side == "counterparty" else f"counterparty-{counterparty}"
    st = _eval_settings(out, method) if side == "counterparty" else {}
    run_seed, scenario_seed, persona = st.get("seed", 0), st.get("scenario_seed", 0), st.get("persona")
    sc = next((s for s in make_scenarios(dom, scenario_seed, persona) if s.id == scenario), None)
    if sc is None:
        raise StageError(f"no scenario {scenario} in domain {domain} (ids 0-99; 80-99 are held out)")
    ep = ng.new_episode(dom, sc, seed, run_seed)
    console = Console(side, reveal, write)
    human = HumanAgent(side, console, read)
    if side == "counterparty":
        chooser(method)
        student = student or st.get("student") or "smollm2"
        best = st.get("best_fixed") or ({} if "best-fixed" not in method else best_fixed_emotions(
            cfg, out, [domain], 3, run_seed, scenario_seed, domains_sha(domains_file)))
        write(f"[chat] loading {method} from {out} ...")
        try:
            focal, policy = _load(method, cfg, out, domain, student, st, run_seed, best)
        except KeyboardInterrupt:
            write("[chat] stopped before the game started; nothing to save.")
            return None
        cp = human
    else:
        focal, policy = human, None
        cp = make_agent(counterparty, "counterparty", cfg, run_seed + 1, 1)
    me = "counterparty" if side == "counterparty" else "focal"
    write(f"[chat] {domain}, scenario {sc.id}{' (held out)' if sc.id in TEST_IDS else ' (a training scenario)'}, "
          f"seed {seed}, persona {sc.persona}; you are the {me} side, against {agent_name}.")
    write(ng.build_messages(cfg, ep, me, offers="free")[0]["content"])
    write(f"[chat] The {dom.focal_role} speaks first. {HELP}")
    stopped = None
    try:
        ng.run_episodes(cfg, [ep], focal, cp, policy, ng.Perceiver(cfg.emotions))
    except KeyboardInterrupt:
        stopped = "interrupted (Ctrl-C)"
    except EOFError:
        stopped = "the input ended"
    if stopped and not ep.done:
        ep.end = "interrupted"
        write("")
        write(f"[chat] {stopped}: saving the {len(ep.turns)} turn(s) played.")
    console.show(ep)
    for line in outcome_lines(ep, side):
        write(line)
    rec = ng.add_judge_scores(ng.to_record(ep), cfg)
    rec["chat"] = {"human": side, "agent": agent_name, "run": out, "student": student if side == "counterparty"
                   else None, "date": datetime.datetime.now().isoformat(timespec="seconds")}
    if save is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        save = os.path.join(out, "chat", f"{ep.key}-{agent_name.replace(':', '_')}-you-{side}-{stamp}.json")
    os.makedirs(os.path.dirname(save) or ".", exist_ok=True)
    write_json_atomic(save, rec)
    write(f"[chat] saved the game to {save} (one eval record; `python emodistill.py show {out}` adds it to the "
          f"transcript page)")
    return save


def add_command(command):
    """chat's subcommand, through emodistill.build_parser's `command`."""
    command("chat", chat, "negotiate in the terminal against a method of a run (or as the focal side)", [],
            ("--out", dict(help="run folder the agent is loaded from (and where the game is saved)")),
            ("--method", dict(help="the focal agent when you are the counterparty: any eval method")),
            ("--side", dict(choices=SIDES, help="your side: counterparty (against --method) or focal (against "
                            "--counterparty)")),
            ("--domain", dict()), ("--scenario", dict(type=int, help="scenario id; 80-99 are held out")),
            ("--seed", dict(type=int, help="episode seed (eval's seeds are 0, 1, ...)")),
            ("--reveal", dict(action="store_true", help="show the emotion the agent chose, its planned move and the "
                              "offer the parser read")),
            ("--student", dict(help="the LM student; None: the one the run's eval of --method used, else smollm2")),
            ("--counterparty", dict(help="with --side focal: sim | smollm2 | hf:<model> | api:<model>")),
            ("--save", dict(help="file for the game; None: RUN/chat/<episode>-<agent>-you-<side>-<time>.json")),
            ("--domains-file", dict()))
