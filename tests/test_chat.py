"""`emodistill.py chat`: a person negotiates in the terminal through the negotiation loop itself
(piped input, a pseudo-terminal for Ctrl-C), against the teacher and a tiny language model."""
import io
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest

import chat
import emodistill
import negotiate as ng
from conftest import ROOT, make_selector_run
from domains import make_scenarios

RECORD_KEYS = {"key", "domain", "scenario_id", "split", "seed", "persona", "unit", "focal_prefers", "s0", "b0",
               "reservation", "patience", "context", "turns", "outcome"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small run folder with an IQL selector (teacher-iql, iql need it)."""
    return make_selector_run(str(tmp_path_factory.mktemp("chat") / "run"))


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", EMODISTILL_NO_PROGRESS="1")


# bad lines and the words of the hint each must get
BAD = [("", "empty line"), ("hello there", "no number read"), ("$500 is all I have", "no offer in days"),
       ("45 minutes", "not in days"), ("900 days", "outside this negotiation"), ("/frobnicate", "unknown command")]


def test_chat_against_the_teacher_with_piped_input(run, tmp_path, cfg):
    """Piped input against teacher-iql: each bad line gets a one-line hint and no traceback; the
    game ends as an episode ends; the saved record has eval's schema plus the judge's scores,
    and it is exactly the episode run_episodes plays with a scripted counterparty saying the same."""
    save = str(tmp_path / "game.json")
    good = ["I need 200 days.", "/offer 180", "170 days is my limit.", "160 days", "/offer 150"] + ["/accept"] * 12
    lines = [b for b, _ in BAD] + good
    p = subprocess.run([sys.executable, "emodistill.py", "chat", "--out", run, "--method", "teacher-iql", "--domain",
                        "crad", "--scenario", "80", "--seed", "0", "--reveal", "--save", save], cwd=ROOT, env=_env(),
                       input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=120)
    text = p.stdout + p.stderr
    assert p.returncode == 0, text
    assert "Traceback" not in text
    hints = [ln for ln in p.stdout.splitlines() if "hint:" in ln]
    assert len(hints) == len(BAD)
    for (_, words), hint in zip(BAD, hints):
        assert words in hint
    assert "[emotion chosen: " in p.stdout and "planned: offer" in p.stdout        # --reveal
    rec = json.load(open(save))
    assert RECORD_KEYS <= set(rec) and rec["chat"]["human"] == "counterparty" and rec["chat"]["agent"] == "teacher-iql"
    turns = rec["turns"]
    assert [t["speaker"] for t in turns] == ["focal", "counterparty"] * (len(turns) // 2) + ["focal"] * (len(turns) % 2)
    assert all(t["emotion"] in cfg.emotions and "plan" in t and "score" in t for t in turns if t["speaker"] == "focal")
    said = [t["text"] for t in turns if t["speaker"] == "counterparty"]
    assert said[:2] == ["I need 200 days.", "My offer is 180 days."]
    assert [t["offer"] for t in turns if t["speaker"] == "counterparty"][:4] == [200.0, 180.0, 170.0, 160.0]
    o = rec["outcome"]
    assert o["end"] in ("accept", "converged") and o["success"]
    assert o["utility"] == pytest.approx(ng.utility_of(o["agreement"], rec["s0"], rec["b0"]), abs=1e-6)
    assert "[chat] deal: " in p.stdout and f"{o['utility']:.3f}" in p.stdout
    assert [j["score"] for j in ng.judge_record(rec, cfg)] == [t["score"] for t in turns if t["speaker"] == "focal"]

    class Scripted:                      # the same counterparty messages, without a person
        def act(self, eps, emotions=None):
            return [ng.Reply(said[eps[0].t // 2], accept=ng.detect_accept(said[eps[0].t // 2]), free_text=True)]
    import methods
    focal, policy = methods.side_agent("teacher-iql", cfg, run, ["crad"], "smollm2", 1, False, 0, {})
    sc = next(s for s in make_scenarios(cfg.domains["crad"], 0) if s.id == 80)
    ep = ng.new_episode(cfg.domains["crad"], sc, 0, 0)
    ng.run_episodes(cfg, [ep], focal, Scripted(), policy)
    again = ng.add_judge_scores(ng.to_record(ep), cfg)
    assert again["turns"] == turns and again["outcome"] == o


def test_chat_on_a_tiny_model_and_as_the_focal_side(run, tmp_path, tiny_lm, cfg, monkeypatch, capsys):
    """The student (a tiny random Llama) with the run's selector as the focal agent, in process
    with piped stdin; /quit walks away. Then the person as the focal side against the simulated
    counterparty: each message shows the emotion it perceived, and the person's turns carry no plan."""
    model, tok = tiny_lm
    student = str(tmp_path / "tiny")
    model.save_pretrained(student)
    tok.save_pretrained(student)
    save = str(tmp_path / "tiny.json")
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n10:30 PM\n2 days\n/offer 11\nmidnight\n/quit\n"))
    assert emodistill.main(["chat", "--out", run, "--method", "iql", "--student", student, "--domain", "student",
                            "--scenario", "81", "--reveal", "--save", save]) == 0
    out = capsys.readouterr().out
    rec = json.load(open(save))
    assert RECORD_KEYS <= set(rec) and rec["chat"]["student"] == student
    assert rec["outcome"]["end"] == "walk_away" and not rec["outcome"]["success"]
    mine = [t for t in rec["turns"] if t["speaker"] == "counterparty"]
    assert [t["offer"] for t in mine] == [90.0, 120.0, 180.0, None] and mine[-1]["walk_away"]
    focal = [t for t in rec["turns"] if t["speaker"] == "focal"]
    assert len(focal) == 4 and all(t["emotion"] in cfg.emotions and "plan" in t for t in focal)
    hints = [ln for ln in out.splitlines() if "hint:" in ln]
    assert len(hints) == 2 and "empty line" in hints[0] and "'2 days' is not in a time of day" in hints[1]
    assert out.count("[emotion chosen: ") == 4

    save2 = str(tmp_path / "focal.json")
    monkeypatch.setattr(sys, "stdin", io.StringIO("I am furious: 10 days!\nThank you, I appreciate it. 12 days.\n"))
    assert emodistill.main(["chat", "--out", run, "--side", "focal", "--domain", "crad", "--scenario", "80",
                            "--save", save2]) == 0
    out = capsys.readouterr().out
    rec = json.load(open(save2))
    mine = [t for t in rec["turns"] if t["speaker"] == "focal"]
    assert [t["offer"] for t in mine] == [10.0, 12.0]
    assert all(t["emotion"] is None and "plan" not in t and t["perceived"] in cfg.emotions for t in mine)
    for t in mine:
        assert f"the counterparty perceived: {t['perceived']}" in out
    assert rec["outcome"]["end"] in ("interrupted", "walk_away", "accept")   # two lines, then the input ends
    if rec["outcome"]["end"] == "interrupted":
        assert "the input ended: saving" in out
    assert rec["chat"] == dict(rec["chat"], human="focal", agent="counterparty-sim")


def _read_until(fd, marker, timeout=60):
    buf, end = b"", time.time() + timeout
    while marker not in buf and time.time() < end:
        r, _, _ = select.select([fd], [], [], 0.5)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return buf


def test_ctrl_c_in_a_terminal_saves_the_game(run, tmp_path):
    """In a pseudo-terminal: one message, then Ctrl-C at the prompt. The game so far is saved
    as an 'interrupted' record, the exit is clean (status 0, no traceback)."""
    save = str(tmp_path / "ctrl-c.json")
    argv = [sys.executable, "emodistill.py", "chat", "--out", run, "--method", "teacher-iql", "--domain", "crad",
            "--scenario", "82", "--save", save]
    pid, fd = pty.fork()
    if pid == 0:                                   # the child: the chat on the terminal's slave side
        os.chdir(ROOT)
        # a test run started in the background of a script inherits SIGINT ignored, and Python keeps
        # an ignored SIGINT ignored: restore the default so that Ctrl-C reaches the chat as it would
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.execve(sys.executable, argv, _env())
    try:
        seen = _read_until(fd, b"you> ")
        assert b"you> " in seen, seen.decode(errors="replace")
        os.write(fd, b"190 days\n")
        seen += _read_until(fd, b"you> ")
        os.write(fd, b"\x03")                      # Ctrl-C: the terminal sends SIGINT
        seen += _read_until(fd, b"transcript page")
        seen += _read_until(fd, b"\0", timeout=5)
    finally:
        end = time.time() + 60                     # never hang the suite on a chat that did not stop
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.time() < end:
            time.sleep(0.2)
        if done[0] == 0:
            os.kill(pid, signal.SIGKILL)
            done = os.waitpid(pid, 0)
        status = done[1]
        os.close(fd)
    text = seen.decode(errors="replace")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, text
    assert "Traceback" not in text and "interrupted (Ctrl-C): saving the 3 turn(s) played" in text
    rec = json.load(open(save))
    assert rec["outcome"]["end"] == "interrupted" and not rec["outcome"]["success"] and rec["outcome"]["utility"] == 0
    assert [t["speaker"] for t in rec["turns"]] == ["focal", "counterparty", "focal"]
    assert rec["turns"][1]["text"] == "190 days" and rec["turns"][1]["offer"] == 190.0


@pytest.mark.parametrize("line, hint", [("", "empty line"), ("we have a deal", "nothing to accept"),
                                        ("50% now", "no offer in days"), ("10 pm", "not in days"),
                                        ("/offer", "no number read"), ("/help", "/offer N")])
def test_bad_lines_get_a_hint_and_good_ones_a_reply(cfg, line, hint):
    sc = next(s for s in make_scenarios(cfg.domains["crad"], 0) if s.id == 80)
    ep = ng.new_episode(cfg.domains["crad"], sc, 0)
    reply, got = chat.reply_for(ep, "counterparty", line)
    assert reply is None and hint in got and "\n" not in got
    reply, got = chat.reply_for(ep, "counterparty", "I can do 120 days.")
    assert got is None and reply.text == "I can do 120 days." and not reply.accept
    ep.offers["focal"] = 30.0
    assert chat.reply_for(ep, "counterparty", "30 days")[1].startswith("30 days is their standing offer")
    assert chat.reply_for(ep, "counterparty", "/accept")[0].accept
    assert chat.reply_for(ep, "counterparty", "/quit")[0].walk_away
