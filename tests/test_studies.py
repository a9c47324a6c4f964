"""The studies (study-emotions, study-transfer): their tables and their sections in results.md.
study-counterparties is tested with an api: counterparty in test_api.py."""
import json
import os

import pytest

import report
import emodistill
import negotiate as ng


def test_study_emotions_table_and_results_section(tmp_path, capsys):
    """The per-emotion study ranks all 28 emotions per domain and keeps one copy of its
    section in results.md, which a later eval keeps."""
    out = str(tmp_path / "run")
    argv = ["study-emotions", "--out", out, "--domains", "student", "--seeds", "2", "--scenarios", "0-9"]
    assert emodistill.main(argv) == 0
    md = open(os.path.join(out, "studies", "emotions.md")).read()
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and ln[2].isdigit()]
    assert len(rows) == 28 and {r.split(" | ")[1] for r in rows} == set(ng.EMOTIONS)
    util = [float(r.split(" | ")[2].split()[0]) for r in rows]
    assert util == sorted(util, reverse=True)
    assert "selector share" not in md and "No iql.pt" in md
    with open(os.path.join(out, "studies", "emotions.json")) as f:
        data = json.load(f)
    assert data["utility"]["student"]["anger"][0] == pytest.approx(util[[r.split(" | ")[1] for r in rows].index("anger")],
                                                                    abs=1e-3)
    assert emodistill.main(argv) == 0                         # re-run: the section is replaced, not repeated
    results = open(os.path.join(out, "results.md")).read()
    assert results.count("<!-- study:emotions -->") == 1 and results.count("| 28 |") == 1
    assert emodistill.main(["eval", "--out", out, "--domains", "student", "--methods", "teacher-random",
                            "--seeds", "1"]) == 0
    results = open(os.path.join(out, "results.md")).read()
    assert "| teacher-random |" in results and results.count("<!-- study:emotions -->") == 1


def test_study_transfer_table(tmp_path):
    """One selector per domain, each tested on every domain: a 2x2 table plus the floor row,
    with the diagonal marked; a re-run reuses the trained selectors."""
    out = str(tmp_path / "run")
    assert emodistill.main(["collect", "--out", out, "--domains", "crad,student", "--scenarios", "0-9",
                            "--seeds-per-scenario", "2"]) == 0
    assert emodistill.main(["judge", "--out", out]) == 0
    argv = ["study-transfer", "--out", out, "--domains", "crad,student", "--steps", "30", "--seeds", "1"]
    assert emodistill.main(argv) == 0
    md = open(os.path.join(out, "studies", "transfer.md")).read()
    rows = {ln.split(" | ")[0][2:]: ln for ln in md.splitlines() if ln.startswith("| ") and "[" in ln}
    assert set(rows) == {"crad only", "student only", "random emotion (floor)"}
    assert "--steps 30 --seeds 1`. Rows: the corpus the selector was trained on (30 IQL steps" in md
    assert rows["crad only"].split(" | ")[1].startswith("**") and rows["student only"].split(" | ")[2].startswith("**")
    mtime = os.path.getmtime(os.path.join(out, "transfer", "iql-crad.pt"))
    assert emodistill.main(argv) == 0
    assert os.path.getmtime(os.path.join(out, "transfer", "iql-crad.pt")) == mtime
    with open(os.path.join(out, "transfer", "transfer.json")) as f:
        util = json.load(f)["utility"]
    assert all(0 <= util[r][d][0] <= 1 for r in util for d in ("crad", "student"))


def test_study_transfer_with_adapters_on_a_tiny_student(tmp_path, tiny_lm, capsys):
    """--adapters: an SFT adapter per domain trained only on that domain's turns, then the
    student with each adapter and its domain's selector on every domain; the main run's sft/
    adds a row; a re-run reuses adapters and rows."""
    model, tok = tiny_lm
    student = str(tmp_path / "tiny")
    model.save_pretrained(student)
    tok.save_pretrained(student)
    out = str(tmp_path / "run")
    assert emodistill.main(["collect", "--out", out, "--domains", "crad,student", "--scenarios", "0-9",
                            "--seeds-per-scenario", "2"]) == 0
    assert emodistill.main(["judge", "--out", out]) == 0
    assert emodistill.main(["iql", "--out", out, "--steps", "30"]) == 0
    assert emodistill.main(["sft", "--out", out, "--student", student, "--max-examples", "4", "--epochs", "1",
                            "--batch-size", "2"]) == 0
    argv = ["study-transfer", "--out", out, "--domains", "crad,student", "--steps", "30", "--seeds", "1",
            "--adapters", "--student", student, "--lm-scenarios", "2", "--sft-max-examples", "4", "--sft-epochs", "1",
            "--redrafts", "1", "--max-new-tokens", "8"]     # (a random tiny model never ends a reply)
    assert emodistill.main(argv) == 0
    for src in ("crad", "student"):
        with open(os.path.join(out, "transfer", f"sft-{src}_data.jsonl")) as f:
            assert {json.loads(ln)["domain"] for ln in f} == {src}     # only that domain's turns
    md = open(os.path.join(out, "studies", "transfer.md")).read()
    assert "--seeds 1 --adapters --student " in md and "--lm-scenarios 2 --lm-seeds 1 --sft-max-examples 4" in md
    lm_part = md[md.index("Student ("):]
    rows = {ln.split(" | ")[0][2:]: ln for ln in lm_part.splitlines() if ln.startswith("| ") and "[" in ln}
    assert set(rows) == {"crad only", "student only", "all domains (iql.pt + sft/)"}
    assert rows["crad only"].split(" | ")[1].startswith("**") and rows["student only"].split(" | ")[2].startswith("**")
    with open(os.path.join(out, "transfer", "transfer.json")) as f:
        lm = json.load(f)["lm_utility"]
    assert set(lm) == set(rows) and all(0 <= lm[r][d][0] <= 1 for r in lm for d in ("crad", "student"))
    with open(os.path.join(out, "transfer", "lm-crad.json")) as f:
        assert json.load(f)["settings"]["scenarios"] == [80, 81]
    mtime = os.path.getmtime(os.path.join(out, "transfer", "sft-crad", "adapter_model.safetensors"))
    capsys.readouterr()
    assert emodistill.main(argv) == 0
    assert os.path.getmtime(os.path.join(out, "transfer", "sft-crad", "adapter_model.safetensors")) == mtime
    assert "student + adapter" not in capsys.readouterr().out               # rows cached too
    # other --steps: new selectors, so the study retrains its adapters instead of refusing them
    argv[argv.index("--steps") + 1] = "40"
    assert emodistill.main(argv) == 0
    assert os.path.getmtime(os.path.join(out, "transfer", "sft-crad", "adapter_model.safetensors")) != mtime
    assert "student + adapter" in capsys.readouterr().out
    # the main run's sft stage still refuses other settings without --force
    assert emodistill.main(["sft", "--out", out, "--student", student, "--max-examples", "5", "--epochs", "1",
                            "--batch-size", "2"]) == 2


def test_results_report_checks_the_papers_orderings_per_domain():
    def recs(us):  # {domain: [utility per held-out scenario]}
        return {"records": [{"domain": d, "scenario_id": 80 + i, "seed": 0, "persona": None, "outcome": {"utility": u}}
                            for d, row in us.items() for i, u in enumerate(row)]}
    results = {"vanilla": recs({"crad": [0.1, 0.1], "hospital": [0.2, 0.2]}),
               "iql": recs({"crad": [0.3, 0.1], "hospital": [0.1, 0.1]}),          # better in crad only
               "iql+sft": recs({"crad": [0.3, 0.1], "hospital": [0.1, 0.1]}),      # ties iql everywhere
               "emodistill": recs({"crad": [0.3, 0.1], "hospital": [0.1, 0.1]}),
               "jpo-emotion-free": recs({"crad": [0.3, 0.1], "hospital": [0.0, 0.1]})}
    methods = ["teacher-iql", "vanilla", "iql", "iql+sft", "emodistill", "jpo-emotion-free"]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in report.ordering_lines(results, methods, ["crad", "hospital"])
            if line.startswith("| ") and " of 2" in line}
    assert set(rows) == {"iql ≥ vanilla", "iql+sft ≥ iql", "emodistill ≥ iql+sft", "emodistill > jpo-emotion-free"}
    assert rows["iql ≥ vanilla"].endswith("| 1 of 2 |") and "+0.100 [+0.000, +0.200]" in rows["iql ≥ vanilla"]
    assert "-0.100 [-0.100, -0.100]" in rows["iql ≥ vanilla"]
    assert rows["iql+sft ≥ iql"].endswith("| 0 of 2 (2 ties) |")            # ties are not wins, for >= too
    assert "tie +0.000 [+0.000, +0.000]" in rows["iql+sft ≥ iql"]
    assert rows["emodistill > jpo-emotion-free"].endswith("| 1 of 2 (1 tie) |")
    # a pair with a row that did not run is left out; no pair at all, no section
    assert not any("jpo-emotion-free" in line for line in report.ordering_lines(results, methods[:-1], ["crad"]))
    assert report.ordering_lines(results, ["vanilla", "teacher-iql"], ["crad"]) == []
