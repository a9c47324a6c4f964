"""Smoke and fault tests of the collect -> judge -> summary stages and of input validation."""
import json
import os
import shutil

import pytest

import domains
import runs
import emodistill
import negotiate as ng
from conftest import DOMAINS_FILE

SMALL = ["--scenarios", "0-4", "--seeds-per-scenario", "2", "--batch-size", "8"]


def run(*argv):
    return emodistill.main(list(argv))


def test_collect_judge_summary_smoke(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert run("collect", "--out", out, *SMALL) == 0
    recs, bad = runs.read_jsonl(os.path.join(out, "corpus.jsonl"))
    assert len(recs) == 4 * 5 * 2 and not bad
    assert len({r["key"] for r in recs}) == len(recs)
    r = recs[0]
    for k in ("domain", "scenario_id", "seed", "persona", "turns", "outcome"):
        assert k in r
    focal = [t for t in r["turns"] if t["speaker"] == "focal"]
    assert all(t["emotion"] in ng.EMOTIONS and t["perceived"] in ng.EMOTIONS for t in focal)
    assert all("offer" in t and "text" in t for t in r["turns"])
    assert run("judge", "--out", out) == 0
    judged, _ = runs.read_jsonl(os.path.join(out, "judged.jsonl"))
    assert [j["key"] for j in judged] == [r["key"] for r in recs]
    for j in judged:
        for t in j["turns"]:
            assert ("score" in t) == (t["speaker"] == "focal")
    assert run("summary", "--out", out) == 0
    assert "| all | 40 |" in capsys.readouterr().out
    # re-running skips finished stages
    assert run("collect", "--out", out, *SMALL) == 0
    assert "skipping" in capsys.readouterr().out


def test_same_seed_gives_byte_identical_corpus_and_resume_matches(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    assert run("collect", "--out", a, *SMALL) == 0
    assert run("collect", "--out", b, *SMALL) == 0
    ca = open(os.path.join(a, "corpus.jsonl"), "rb").read()
    assert ca == open(os.path.join(b, "corpus.jsonl"), "rb").read()
    # an interrupted run: the partial file holds some whole lines and half a line
    os.makedirs(c)
    lines = ca.split(b"\n")
    with open(os.path.join(c, "corpus.jsonl.partial"), "wb") as f:
        f.write(b"\n".join(lines[:13]) + b"\n" + lines[13][:50])
    shutil.copy(os.path.join(a, "collect.json"), os.path.join(c, "collect.json"))
    assert run("collect", "--out", c, *SMALL) == 0
    assert open(os.path.join(c, "corpus.jsonl"), "rb").read() == ca
    # another seed gives another corpus
    d = str(tmp_path / "d")
    assert run("collect", "--out", d, *SMALL, "--seed", "1") == 0
    assert open(os.path.join(d, "corpus.jsonl"), "rb").read() != ca


def test_resume_refuses_other_settings(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert run("collect", "--out", out, *SMALL) == 0
    os.replace(os.path.join(out, "corpus.jsonl"), os.path.join(out, "corpus.jsonl.partial"))
    assert run("collect", "--out", out, *SMALL, "--seed", "3") == 2
    assert "other settings" in capsys.readouterr().err
    assert os.path.exists(os.path.join(out, "corpus.jsonl.partial"))   # nothing lost
    assert run("collect", "--out", out, *SMALL, "--seed", "3", "--force") == 0


def test_corrupt_corpus_line_is_named_or_skipped(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert run("collect", "--out", out, *SMALL) == 0
    path = os.path.join(out, "corpus.jsonl")
    lines = open(path).read().splitlines()
    lines[6] = lines[6][: len(lines[6]) // 2]           # truncated record
    lines[9] = json.dumps({"key": "x"})                 # record missing fields
    open(path, "w").write("\n".join(lines) + "\n")
    assert run("judge", "--out", out) == 2
    err = capsys.readouterr().err
    assert "line 7" in err and "corrupt" in err
    assert not os.path.exists(os.path.join(out, "judged.jsonl"))
    assert run("judge", "--out", out, "--on-bad-line", "skip") == 0
    assert "skipped 2 corrupt line(s)" in capsys.readouterr().out
    judged, _ = runs.read_jsonl(os.path.join(out, "judged.jsonl"))
    assert len(judged) == len(lines) - 2


def test_bad_arguments_are_named(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert run("collect", "--out", out, "--domains", "crad,mars") == 2
    assert "unknown domain 'mars'" in capsys.readouterr().err
    assert run("collect", "--out", out, "--emotions", "anger,smugness") == 2
    assert "unknown emotion 'smugness'" in capsys.readouterr().err
    assert run("judge", "--out", str(tmp_path / "nothing")) == 2
    assert "not found" in capsys.readouterr().err


def _broken_yaml(tmp_path, edit):
    import yaml
    raw = yaml.safe_load(open(DOMAINS_FILE))
    edit(raw)
    p = tmp_path / "domains.yaml"
    p.write_text(yaml.safe_dump(raw))
    return str(p)


@pytest.mark.parametrize("edit,words", [
    (lambda r: r["domains"]["crad"]["teacher"].pop("offers"), ["domain 'crad'", "offers"]),
    (lambda r: r["domains"]["hospital"].__setitem__("unit", 5), ["domain 'hospital'", "unit"]),
    (lambda r: r["domains"]["student"].__setitem__("unit", "parsecs"), ["domain 'student'", "unit"]),
    (lambda r: r["domains"]["disaster"]["scenario"].__setitem__("s0", [60, 60]), ["domain 'disaster'", "s0", "empty range"]),
    (lambda r: r["domains"]["crad"]["counterparty"]["effects"].__setitem__("smugness", [1, 0, 0]),
     ["domain 'crad'", "effects", "unknown emotion 'smugness'"]),
    (lambda r: r["domains"]["crad"]["counterparty"]["personas"]["stubborn"].pop("curve"),
     ["domain 'crad'", "personas.stubborn", "curve"]),
    (lambda r: r["emotions"]["joy"].pop("cues"), ["emotion 'joy'", "cues"]),
    (lambda r: r["emotions"].__setitem__("smugness", r["emotions"]["joy"]), ["unknown emotion 'smugness'"]),
    (lambda r: r["domains"]["crad"]["teacher"]["justifications"].append("Because {weather}."),
     ["domain 'crad'", "justifications", "weather"]),
    (lambda r: r["defaults"].__setitem__("turn_reminder", ["state", "a number"]), ["turn_reminder", "string"]),
])
def test_domains_yaml_errors_name_domain_and_field(tmp_path, capsys, edit, words):
    path = _broken_yaml(tmp_path, edit)
    with pytest.raises(ng.DomainConfigError) as e:
        domains.load_config(path)
    for w in words:
        assert w in str(e.value)
    assert run("collect", "--out", str(tmp_path / "r"), "--domains-file", path) == 2
    assert words[-1] in capsys.readouterr().err


def test_turn_reminder_from_the_domains_file(tmp_path):
    path = _broken_yaml(tmp_path, lambda r: r["defaults"].__setitem__("turn_reminder", "  State your\n offer. "))
    cfg = domains.load_config(path)
    assert cfg.turn_reminder == "State your offer."
    assert ng.turn_note(cfg, None, 3) == "[State your offer.]"
    assert ng.turn_note(cfg, "joy", 3).endswith(" State your offer.]")
    assert ng.turn_note(domains.load_config(DOMAINS_FILE), None, 3) is None


def test_malformed_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("emotions: [unclosed\n  domains: {")
    with pytest.raises(ng.DomainConfigError, match="not valid YAML"):
        domains.load_config(str(p))


def test_a_fifth_domain_needs_only_a_yaml_entry(tmp_path):
    def add(raw):
        d = json.loads(json.dumps(raw["domains"]["crad"]))
        d["description"] = "Rent arrears: a landlord's agent and a tenant."
        raw["domains"]["rent"] = d
    path = _broken_yaml(tmp_path, add)
    out = str(tmp_path / "run")
    assert run("collect", "--out", out, "--domains-file", path, "--domains", "rent", *SMALL) == 0
    assert run("judge", "--out", out, "--domains-file", path) == 0
    recs, _ = runs.read_jsonl(os.path.join(out, "judged.jsonl"))
    assert {r["domain"] for r in recs} == {"rent"} and len(recs) == 10


def test_finished_stages_are_not_reused_with_other_inputs(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert run("collect", "--out", out, *SMALL) == 0
    assert run("judge", "--out", out) == 0
    capsys.readouterr()
    assert run("collect", "--out", out, *SMALL, "--seed", "7") == 2          # not silently skipped
    assert "other settings" in capsys.readouterr().err
    assert run("collect", "--out", out, *SMALL, "--seed", "7", "--force") == 0
    assert run("judge", "--out", out) == 2                                    # the corpus changed
    assert "corpus_sha" in capsys.readouterr().err
    assert run("judge", "--out", out, "--force") == 0


def test_heldout_persona_in_every_domain(tmp_path, cfg, capsys):
    out = str(tmp_path / "run")
    assert run("collect", "--out", out, *SMALL, "--persona", "heldout") == 0
    recs, _ = runs.read_jsonl(os.path.join(out, "corpus.jsonl"))
    held = {d: next(p.name for p in dom.personas.values() if p.heldout) for d, dom in cfg.domains.items()}
    assert all(r["persona"] == held[r["domain"]] for r in recs)
    assert run("collect", "--out", str(tmp_path / "r2"), *SMALL, "--persona", "nobody") == 2
    assert "unknown persona 'nobody'" in capsys.readouterr().err


def test_eval_cache_follows_settings(tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["--methods", "teacher-random", "--domains", "crad"]
    assert run("eval", "--out", out, *args, "--seeds", "1") == 0
    assert run("eval", "--out", out, *args, "--seeds", "1") == 0
    assert "cached" in capsys.readouterr().out
    assert run("eval", "--out", out, *args, "--seeds", "2") == 0
    text = capsys.readouterr().out
    assert "other settings" in text and "| teacher-random | 40 |" in text


def test_convergence_never_settles_past_the_counterpartys_offer(cfg):
    dom = cfg.domains["crad"]
    sc = domains.make_scenarios(dom)[0]
    ep = ng.new_episode(dom, sc, 0)
    r = sc.reservation
    x_f = float(int(r) - 1)            # the focal asks slightly past the reservation (crad: fewer days)
    ng._apply(ep, "focal", ng.Reply(f"I need it in {int(x_f)} days."), cfg, ng.Perceiver(cfg.emotions), "neutral")
    ng._apply(ep, "counterparty", ng.Reply(f"I can do {int(x_f) + 2} days."), cfg, ng.Perceiver(cfg.emotions))
    assert ep.end == "converged" and ep.agreement == x_f + 2


def test_summary_ignores_missing_llm_scores(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert run("collect", "--out", out, *SMALL) == 0
    assert run("judge", "--out", out) == 0
    path = os.path.join(out, "judged.jsonl")
    recs, _ = runs.read_jsonl(path)
    recs[0]["turns"][0]["score"] = None
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in recs))
    assert run("summary", "--out", out) == 0
    row = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| all |")][0]
    assert row.rstrip().split("|")[-2].strip() != "-"


def test_full_disk_and_unwritable_run_folder(tmp_path, monkeypatch, capsys):
    """A write that fails (full disk) stops collect with a clear message and keeps the lines
    already written; re-running resumes to the same corpus. A run folder that cannot be
    created is a clear error, not a traceback."""
    import errno
    out = str(tmp_path / "run")
    real = runs.PartialJsonl.append
    calls = {"n": 0}

    def flaky(self, records):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", self.partial)
        return real(self, records)
    monkeypatch.setattr(runs.PartialJsonl, "append", flaky)
    with pytest.raises(OSError):     # the stage itself does not swallow it ...
        emodistill.collect(out, scenarios="0-4", seeds_per_scenario=2, batch_size=8)
    calls["n"] = 0
    assert run("collect", "--out", out, *SMALL) == 2   # ... the CLI reports it
    err = capsys.readouterr().err
    assert "No space left on device" in err and "corpus.jsonl.partial" in err
    kept, _ = runs.read_jsonl(os.path.join(out, "corpus.jsonl.partial"))
    assert len(kept) == 4 * 8           # two whole batches survived each failed attempt (the 2nd resumed)
    monkeypatch.setattr(runs.PartialJsonl, "append", real)
    assert run("collect", "--out", out, *SMALL) == 0
    ref = str(tmp_path / "ref")
    assert run("collect", "--out", ref, *SMALL) == 0
    assert open(os.path.join(out, "corpus.jsonl")).read() == open(os.path.join(ref, "corpus.jsonl")).read()
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert run("collect", "--out", str(blocker / "run"), *SMALL) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "a_file" in err and "Traceback" not in err


def test_eval_checks_every_method_before_the_first_row_runs(tmp_path, capsys):
    """A typo (or a missing adapter) at the end of the method list fails at once, before the
    rows before it have run."""
    out = str(tmp_path / "run")
    assert run("eval", "--out", out, "--methods", "teacher-random,teacher-randon", "--seeds", "1") == 2
    assert "unknown method 'teacher-randon'" in capsys.readouterr().err
    assert run("eval", "--out", out, "--methods", "teacher-random,fixed:angr", "--seeds", "1") == 2
    assert "angr" in capsys.readouterr().err
    assert run("eval", "--out", out, "--methods", "teacher-random,emodistill", "--seeds", "1") == 2
    assert "needs the adapter" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, "eval", "teacher-random.json"))


def test_collect_resumes_past_a_corrupt_partial_line_with_skip(tmp_path, capsys):
    """A corrupt line in corpus.jsonl.partial stops collect with its line number; with
    --on-bad-line skip it is dropped, its trajectory made again, and the corpus ends with the
    same trajectories as an uninterrupted run."""
    out, ref = str(tmp_path / "run"), str(tmp_path / "ref")
    assert run("collect", "--out", ref, *SMALL) == 0
    lines = open(os.path.join(ref, "corpus.jsonl")).read().splitlines(keepends=True)
    os.makedirs(out)
    assert run("collect", "--out", out, *SMALL) == 0            # same settings file, then a partial by hand
    os.remove(os.path.join(out, "corpus.jsonl"))
    with open(os.path.join(out, "corpus.jsonl.partial"), "w") as f:
        f.write("".join(lines[:5]) + '{"key": "crad-0-0", "turns": [trunc\n' + "".join(lines[6:12]))
    capsys.readouterr()
    assert run("collect", "--out", out, *SMALL) == 2
    assert "line 6" in capsys.readouterr().err
    assert run("collect", "--out", out, *SMALL, "--on-bad-line", "skip") == 0
    assert "dropped 1 corrupt line(s)" in capsys.readouterr().out
    got = open(os.path.join(out, "corpus.jsonl")).read().splitlines(keepends=True)
    assert len(got) == len(lines) and sorted(got) == sorted(lines)


def test_a_failed_forced_rerun_leaves_the_stage_stale(tmp_path, capsys):
    """judge --force over a corpus that gained a corrupt line fails; the next plain judge must
    not take the old judged.jsonl as complete for the new corpus (it fails again, naming the
    line), and once the line is fixed it judges the new corpus."""
    out = str(tmp_path / "run")
    assert run("collect", "--out", out, *SMALL) == 0
    assert run("judge", "--out", out) == 0
    corpus = os.path.join(out, "corpus.jsonl")
    good = open(corpus).read()
    with open(corpus, "a") as f:
        f.write("{not json\n")
    assert run("judge", "--out", out, "--force") == 2
    capsys.readouterr()
    assert run("judge", "--out", out) == 2                      # stale, not "complete; skipping"
    captured = capsys.readouterr()
    assert "skipping" not in captured.out and "line 41" in captured.err
    assert json.load(open(os.path.join(out, "judge.json")))["complete"] is False
    with open(corpus, "w") as f:
        f.write(good)
    assert run("judge", "--out", out) == 2                      # the corpus changed again: other settings
    assert run("judge", "--out", out, "--force") == 0
    assert json.load(open(os.path.join(out, "judge.json")))["complete"] is True
    assert run("judge", "--out", out) == 0
    assert "is complete; skipping" in capsys.readouterr().out


def test_results_say_which_machine_computed_each_row(tmp_path):
    """Each eval row saves the machine facts (CPU, its vector unit, torch, threads) and
    results.md prints them; a row cached from before (no facts) is named as such."""
    import torch
    out = str(tmp_path / "run")
    args = ["--out", out, "--seeds", "1", "--domains", "crad"]
    assert run("eval", *args, "--methods", "teacher-random") == 0
    row = json.load(open(os.path.join(out, "eval", "teacher-random.json")))
    assert row["machine"]["torch"] == torch.__version__
    assert row["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    text = open(os.path.join(out, "results.md")).read()
    assert f"Computed on {row['machine']['cpu']} ({row['machine']['cpu_capability']}), torch {torch.__version__}" in text
    del row["machine"]
    with open(os.path.join(out, "eval", "teacher-random.json"), "w") as f:
        json.dump(row, f)
    assert run("eval", *args, "--methods", "teacher-random,teacher-fixed:anger") == 0
    text = open(os.path.join(out, "results.md")).read()
    assert "Computed on several machines: " in text and "not recorded (a row from before" in text


def test_each_subcommand_help_shows_its_own_defaults():
    """argparse shares a parent parser's flags between subcommands: the default each help line
    shows must be that subcommand's own, once (sft trains at lr 2e-3, jpo at 2e-4)."""
    p = emodistill.build_parser()
    sub = next(a for a in p._actions if a.dest == "cmd").choices
    helps = {name: {a.dest: a.help for a in sp._actions} for name, sp in sub.items()}
    assert helps["sft"]["lr"] == "(default 0.002)"
    assert helps["jpo"]["lr"] == "(default 0.0002)"
    assert helps["collect"]["out"] == "run folder (default runs/default)"
    assert helps["sft"]["min_move_share"].endswith("(default 0.2)")             # lora.SFTConfig's value
    assert emodistill.build_parser().parse_args(["sft", "--min-move-share", "0.35"]).min_move_share == 0.35
