"""train.sh end to end on a tiny random student: both lanes side by side (JOBS=2), the report
from every method, the stage times, a re-run that skips everything, and a lane that fails."""
import json
import os
import re
import subprocess


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = "teacher-random,vanilla,iql,iql+sft,emodistill,jpo-emotion-free"


def _train(run, student, **env):
    e = dict(os.environ, RUN=str(run), STUDENT=str(student), JOBS="2", SEEDS="1", STEPS="20", SFT_MAX="4",
             SFT_EPOCHS="1", JPO_SCEN="1", JPO_GROUP="2", METHODS=METHODS, EMODISTILL_NO_PROGRESS="1",
             REDRAFTS="1",      # a random tiny model misses every move: one rewrite keeps the redraft path cheap
             MAX_NEW_TOKENS="8")    # nor does it ever end a reply: 8 tokens instead of 48 a reply
    e.update(env)
    return subprocess.run(["bash", os.path.join(ROOT, "train.sh")], env=e, capture_output=True, text=True,
                          timeout=900)


def test_two_lanes_make_every_method_and_a_rerun_skips(tmp_path, tiny_student):
    run = tmp_path / "run"
    p = _train(run, tiny_student)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "two lanes side by side" in p.stdout
    for lane in ("a", "b"):
        assert (run / "logs" / f"lane-{lane}.log").stat().st_size > 0
    report = (run / "results.md").read_text()
    for m in METHODS.split(","):
        assert f"| {m} | 80 |" in report, m
        assert (run / "eval" / f"{m}.json").exists()
    settings = {m: json.loads((run / "eval" / f"{m}.json").read_text())["settings"] for m in ("emodistill", "iql")}
    assert settings["emodistill"]["redrafts"] == 1 and "redrafts" not in settings["iql"]      # REDRAFTS reached eval
    assert settings["emodistill"]["max_new_tokens"] == settings["iql"]["max_new_tokens"] == 8   # so did MAX_NEW_TOKENS,
    assert json.loads((run / "jpo.json").read_text())["config"]["max_new_tokens"] == 8     # and JPO's sampling
    # the report checks the paper's four orderings, each over the four domains
    section = report[report.index("## The paper's orderings"):]
    for pair in ("emodistill ≥ iql+sft", "iql+sft ≥ iql", "iql ≥ vanilla", "emodistill > jpo-emotion-free"):
        assert re.search(rf"\| {re.escape(pair)} \|.* \| [0-4] of 4( \([1-4] ties?\))? \|", section), pair
    for stage in ("collect", "judge", "iql", "sft", "jpo", "sft-emotion-free", "jpo-emotion-free",
                  "eval vanilla", "eval iql,iql+sft", "eval emodistill,jpo-emotion-free", "eval others", "report"):
        assert f"[train.sh] {stage} done in " in p.stdout, stage
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("[train.sh] stage wall times: collect ") and last.endswith("(JOBS=2)")
    # lane b's emotion-free SFT ran only after lane a's IQL, its emodistill row after lane a's JPO
    order = [line.split(" done in")[0] for line in p.stdout.splitlines() if " done in " in line]
    assert order.index("[train.sh] iql") < order.index("[train.sh] sft-emotion-free")
    assert order.index("[train.sh] jpo") < order.index("[train.sh] eval emodistill,jpo-emotion-free")

    again = _train(run, tiny_student)
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + (run / "logs" / "lane-a.log").read_text() + (run / "logs" / "lane-b.log").read_text()
    for m in ("iql+sft", "emodistill", "jpo-emotion-free", "iql", "vanilla"):
        assert f"[eval] {m}: cached in" in log, m
    assert "is complete; skipping" in log                 # the adapters are not retrained
    assert "[train.sh] sft-emotion-free done in " in again.stdout

    # without an emotion-free row in METHODS its adapters are not made (nor checked); in the same
    # call, the transfer study with the student's adapters (2 scenarios a cell), on the finished run
    study = _train(run, tiny_student, METHODS="teacher-random,emodistill", STUDIES="transfer", TRANSFER_LM="1",
                   TRANSFER_SCEN="2")
    assert study.returncode == 0, study.stdout[-3000:] + study.stderr[-3000:]
    assert "[train.sh] sft done in " in study.stdout and "[train.sh] jpo done in " in study.stdout
    assert "emotion-free" not in study.stdout
    report = (run / "results.md").read_text()
    assert "<!-- study:transfer -->" in report and "--adapters --student" in report
    assert "| all domains (iql.pt + sft/) |" in report[report.index("Student ("):]
    assert "[train.sh] study-transfer done in " in study.stdout
    assert "on 2 held-out scenarios" in study.stdout             # TRANSFER_SCEN reached the study


def test_a_failing_lane_stops_the_run_with_its_log(tmp_path, tiny_student):
    # lane a fails in its first stage; lane b (nothing to evaluate first) must not wait forever
    p = _train(tmp_path / "run", tiny_student, SEEDS="not-a-number", METHODS="teacher-random")
    assert p.returncode != 0
    assert "lane a failed" in p.stderr and "lane-a.log" in p.stderr
    assert "lane a stopped before its iql stage finished" in (tmp_path / "run" / "logs" / "lane-b.log").read_text()
