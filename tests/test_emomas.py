"""The EmoMAS scenario-CSV importer: row repair, mapping onto a domain, the CLI option, and
the domains-file hash that leaves the importer's mapping out."""
import json
import os
from dataclasses import replace

import pytest

import domains
import runs
import emodistill
import emomas
import negotiate as ng

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "emomas")
HEADER = ("Case_ID,Student_Age,Student_Background,Situation_Faced,Student_Feeling_Thought,"
          "Robots_Requested_Bedtime,Student_Wanted_Bedtime,Primary_Annoyance_Reason")
ROWS = [
    '1,16,High_Achiever,Physics Final Tomorrow,"Panic: formulas are a blur.",10:30 PM,2:00 AM,Fear of failure.',
    # unquoted commas in the last text column: one way to re-join them
    '2,14,Writer,History Paper Due,Overwhelmed,9:45 PM,1:30 AM,Perfectionism, cannot start, at all.',
    # unquoted comma inside the mapped Situation_Faced column, which precedes a free-text column
    '3,15,Gamer,Finals tonight, team waiting, guilt,10:15 PM,1:00 AM,Duty.',
    '4,17,Insomniac,History of poor sleep,Anxious.,10:30 PM, N/A (wants to sleep),Fear.',   # no bedtime
    '5,13,Early_Bird,Nothing special,Calm.,11:30 PM,10:00 PM,None.',        # wants an *earlier* bedtime
    '6,12,Kid,Sleepover, party,Excited,9:00 PM',                            # too few cells
]


def write(tmp_path, rows, name="education_sleep_scenarios.csv"):
    path = tmp_path / name
    path.write_text("\n".join([HEADER] + rows) + "\n", encoding="utf-8")
    return str(path)


def test_split_rejoins_leading_space_cells_only():
    cols, types = ["id", "text", "n"], {"id": "int", "n": "int"}
    assert emomas.split_csv_row(["1", "a", " b", "3"], cols, types) == [{"id": "1", "text": "a, b", "n": "3"}]
    # a cell without a leading space never continues the previous one
    assert emomas.split_csv_row(["1", "a", "b", "3"], cols, types) == []
    # two adjacent text columns and one leading-space cell: two readings
    assert emomas.split_csv_row(["x", " y", "z"], ["t1", "t2"], {}) == [{"t1": "x, y", "t2": "z"}]
    amb = emomas.split_csv_row(["x", " y", " z"], ["t1", "t2"], {})
    assert sorted(a["t1"] for a in amb) == ["x", "x, y"]
    assert emomas.split_csv_row(["1", "maybe"], ["id", "yn"], {"id": "int", "yn": ["Yes", "No"]}) == []
    assert emomas.split_csv_row(["1", "no"], ["id", "yn"], {"id": "int", "yn": ["Yes", "No"]})[0]["yn"] == "no"
    assert emomas.split_csv_row(["x", "10:30 PM"], ["t", "c"], {"c": "clock"})[0]["c"] == "10:30 PM"


def test_import_fixture_counts_and_reasons(tmp_path, cfg):
    dom = cfg.domains["student"]
    scs, rep = emomas.import_scenarios_csv(dom, write(tmp_path, ROWS))
    assert rep["rows"] == 6 and rep["read"] == 2 and rep["repaired"] == 1
    why = dict(rep["skipped"])
    assert set(why) == {4, 5, 6, 7}                      # file lines of rows 3-6
    assert "ambiguous" in why[4] and "occasion" in why[4]
    assert "Student_Wanted_Bedtime" in why[5] and "not clock" in why[5]
    assert "contradict focal_prefers=lower" in why[6]
    assert "cannot fill the 8 columns" in why[7]
    first, second = scs
    assert (first.id, first.s0, first.b0) == (0, 90.0, 300.0)   # 10:30 PM, 2:00 AM in minutes after 9 PM
    assert first.context["occasion"] == "physics Final Tomorrow" and first.context["age"] == "16"
    assert (second.id, second.s0, second.b0) == (1, 45.0, 270.0)
    # what the CSV does not give comes from the generated scenario with the same id
    gen = domains.make_scenarios(dom)[0]
    assert first.patience == gen.patience and first.persona == gen.persona
    assert first.context["habit"] == gen.context["habit"]
    frac = (gen.reservation - gen.b0) / (gen.s0 - gen.b0)
    assert first.reservation == pytest.approx(first.b0 + frac * (first.s0 - first.b0), abs=1e-3)
    # the scenarios render into a prompt with every field filled
    ep = ng.new_episode(dom, first, 0)
    text = ng.build_messages(cfg, ep, "focal", "joy")[0]["content"]
    assert "physics Final Tomorrow" in text and "{" not in text


def test_imported_scenarios_replace_generated_ones(tmp_path, cfg):
    dom = replace(cfg.domains["student"])
    dom.imported, _ = emomas.import_scenarios_csv(dom, write(tmp_path, ROWS))
    assert [s.id for s in domains.make_scenarios(dom)] == [0, 1]
    held = next(p.name for p in dom.personas.values() if p.heldout)
    assert {s.persona for s in domains.make_scenarios(dom, persona="heldout")} == {held}
    with pytest.raises(domains.DomainConfigError, match="unknown persona"):
        domains.make_scenarios(dom, persona="nobody")


def test_import_errors_name_the_problem(tmp_path, cfg):
    dom = cfg.domains["student"]
    with pytest.raises(emomas.ScenarioCsvError, match="file not found"):
        emomas.import_scenarios_csv(dom, str(tmp_path / "missing.csv"))
    bad = tmp_path / "bad.csv"
    bad.write_text("Case_ID,Student_Age\n1,16\n")
    with pytest.raises(emomas.ScenarioCsvError, match="Robots_Requested_Bedtime"):
        emomas.import_scenarios_csv(dom, str(bad))
    with pytest.raises(emomas.ScenarioCsvError, match="no 'emomas' section"):
        emomas.import_scenarios_csv(replace(dom, emomas=None), str(bad))


def test_emomas_section_is_validated(tmp_path):
    import yaml
    from conftest import DOMAINS_FILE
    raw = yaml.safe_load(open(DOMAINS_FILE))
    raw["domains"]["student"]["emomas"]["context"]["mood"] = "{Student_Feeling_Thought}"
    p = tmp_path / "d.yaml"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(domains.DomainConfigError, match="domain 'student' emomas.context: unknown context field 'mood'"):
        domains.load_config(str(p))
    raw["domains"]["student"]["emomas"]["context"].pop("mood")
    raw["domains"]["student"]["emomas"]["columns"]["Student_Age"] = "integer"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(domains.DomainConfigError, match="emomas.columns.Student_Age"):
        domains.load_config(str(p))


def test_cli_collect_and_eval_on_imported_scenarios(tmp_path, capsys):
    rows = [f'{i + 1},{12 + i % 6},Kid,Exam number {i},Tired.,10:{i % 6}0 PM,1:{i % 6}0 AM,Reason.'
            for i in range(100)]
    rows[3] = '4,16,Kid,Exam,Tired.,10:00 PM, N/A,Reason.'
    path = write(tmp_path, rows)
    out = str(tmp_path / "run")
    common = ["--out", out, "--domains", "student", "--scenarios-csv", path]
    assert emodistill.main(["collect", *common, "--scenarios", "0-5", "--seeds-per-scenario", "1"]) == 0
    printed = capsys.readouterr().out
    assert "100 rows, 99 read (0 repaired, 20 of them test scenarios), 1 skipped" in printed
    assert "line 5: column 'Student_Wanted_Bedtime'" in printed
    recs, _ = runs.read_jsonl(os.path.join(out, "corpus.jsonl"))
    assert sorted(r["scenario_id"] for r in recs) == [0, 1, 2, 4, 5]      # id 3 was skipped
    assert all(r["context"]["occasion"] == f"exam number {r['scenario_id']}" for r in recs)
    with open(os.path.join(out, "scenarios_import.json")) as f:
        assert json.load(f)["student"]["read"] == 99
    assert emodistill.main(["eval", *common, "--methods", "teacher-random", "--seeds", "1"]) == 0
    with open(os.path.join(out, "eval", "teacher-random.json")) as f:
        res = json.load(f)
    assert sorted({r["scenario_id"] for r in res["records"]}) == list(range(80, 100))
    assert res["records"][0]["context"]["occasion"].startswith("exam number 8")
    # a folder works too, and a folder without the domain's file is a clear error
    assert emodistill.main(["collect", "--out", str(tmp_path / "r2"), "--domains", "student", "--scenarios-csv",
                            str(tmp_path), "--scenarios", "0-1", "--seeds-per-scenario", "1"]) == 0
    assert emodistill.main(["collect", "--out", str(tmp_path / "r3"), "--domains", "crad", "--scenarios-csv",
                            str(tmp_path), "--scenarios", "0-1", "--seeds-per-scenario", "1"]) == 2
    assert "credit_recovery_scenarios.csv: file not found" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="the shared EmoMAS CSVs are not present")
def test_shared_emomas_csvs(cfg):
    """The published files: how many rows each domain recovers (the numbers in docs/notebook.md)."""
    got = {}
    for d, dom in cfg.domains.items():
        scs, rep = emomas.import_scenarios_csv(dom, os.path.join(SHARED, dom.emomas["file"]))
        assert rep["read"] + len(rep["skipped"]) == rep["rows"] == 100
        assert len({s.id for s in scs}) == len(scs)
        for s in scs:
            assert (s.s0 < s.b0) if dom.focal_prefers == "lower" else (s.s0 > s.b0)
        got[d] = (rep["read"], rep["repaired"], len(rep["skipped"]))
    assert got == {"crad": (100, 0, 0), "disaster": (98, 98, 2), "hospital": (90, 84, 10), "student": (97, 24, 3)}


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="the shared EmoMAS CSVs are not present")
def test_a_quote_never_closed_damages_only_its_row(tmp_path, cfg):
    """A shipped CSV with one cell's quote opened and never closed: that row is skipped and
    reported, every other row keeps its scenario id and values, the train/test split is intact."""
    dom = cfg.domains["crad"]
    src = os.path.join(SHARED, dom.emomas["file"])
    lines = open(src, encoding="utf-8-sig").read().splitlines()
    head, _, tail = lines[51].partition(",")                    # line 52: data row 50, scenario 50
    lines[51] = head + ',"' + tail
    broken = tmp_path / "broken.csv"
    broken.write_text("\n".join(lines) + "\n")
    ref, _ = emomas.import_scenarios_csv(dom, src)
    got, rep = emomas.import_scenarios_csv(dom, str(broken))
    assert [why for line, why in rep["skipped"] if line == 52] and "quote" in rep["skipped"][0][1]
    assert len(rep["skipped"]) == 1 and rep["rows"] == 100
    want = {s.id: s for s in ref if s.id != 50}
    assert {s.id: s for s in got} == want                      # ids 0-49, 51-99 unchanged, 50 missing
    assert sum(s.id in domains.TEST_IDS for s in got) == 20


def test_domains_hash_ignores_only_the_emomas_and_swap_sections(tmp_path):
    """Stage settings hash domains.yaml without its `emomas:` sections (they only matter with
    --scenarios-csv, hashed there) and, on the focal side, without its `swap:` sections, so
    adding the importer's mapping or the role swap leaves old runs valid."""
    from conftest import DOMAINS_FILE
    text = open(DOMAINS_FILE).read()
    stripped = runs.without_sections(text, ("emomas", "swap"))
    assert "emomas:" in text and "emomas:" not in stripped and "Creditor Target Days" not in stripped
    assert "swap:" in text and "swap:" not in stripped and "talk to my lawyer" in stripped
    assert "the account goes to formal collection" in text and "the account goes to formal collection" not in stripped
    assert stripped.count("    scenario:") == text.count("    scenario:")
    a, b, c = (tmp_path / n for n in ("a.yaml", "b.yaml", "c.yaml"))
    a.write_text(text)
    b.write_text(stripped)
    c.write_text(stripped.replace("max_turns: 30", "max_turns: 28"))
    assert runs.domains_sha(str(a)) == runs.domains_sha(str(b)) != runs.domains_sha(str(c))
    # the counterparty side is built from the swap sections, so they count there
    assert runs.domains_sha(str(a), "counterparty") != runs.domains_sha(str(a))
    d = tmp_path / "d.yaml"
    d.write_text(text.replace("the account goes to formal collection", "the file goes to formal collection"))
    assert runs.domains_sha(str(d)) == runs.domains_sha(str(a))
    assert runs.domains_sha(str(d), "counterparty") != runs.domains_sha(str(a), "counterparty")
