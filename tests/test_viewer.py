"""eval's transcript page (viewer.py): one self-contained file whose data, figures and views are
checked as written and, where Debian's chromium is installed (.ci/install), as a headless
browser renders them."""
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from conftest import make_selector_run

import chat
import emodistill
import negotiate as ng
import viewer

CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="no headless chromium (Debian: apt-get install -y "
                                   "chromium; .ci/install does it where it can)")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run with one chat game, whose eval (two teacher methods, two domains) wrote the page."""
    out = make_selector_run(str(tmp_path_factory.mktemp("viewer") / "run"))
    lines = iter(["I need 150 days.", "/offer 140", "/quit"])
    chat.chat(out, "teacher-iql", domain="crad", scenario=80, read=lambda prompt: next(lines), write=lambda s: None)
    assert emodistill.main(["eval", "--out", out, "--methods", "teacher-random,teacher-iql", "--domains",
                            "crad,student", "--seeds", "1", "--select-seeds", "1"]) == 0
    return out


def _records(out, method):
    with open(os.path.join(out, "eval", f"{method}.json")) as f:
        return json.load(f)["records"]


def _blob(page):
    m = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S)
    return json.loads(m.group(1))


def test_eval_writes_a_self_contained_page(run, cfg):
    """eval wrote eval/transcripts.html: no external script, style, image or font; every episode
    of every method in one JSON blob with each focal turn's rubric judge score; the figures as
    inline SVG with one bar per method and domain (plus pooled) at the mean utility."""
    path = os.path.join(run, "eval", "transcripts.html")
    page = open(path).read()
    assert "<script src" not in page and "<link" not in page and "@import" not in page and "url(" not in page
    assert not re.search(r'(?:src|href)="(?!#)', page)            # nothing loaded from anywhere
    data = _blob(page)
    assert data["methods"] == ["teacher-random", "teacher-iql", "chat: teacher-iql vs you"]
    for mi, m in enumerate(data["methods"][:2]):
        recs = {r["key"]: r for r in _records(run, m)}
        eps = [e for e in data["episodes"] if e["m"] == mi]
        assert sorted(e["k"] for e in eps) == sorted(recs) and len(eps) == 40
        for e in eps[:10]:
            rec = recs[e["k"]]
            assert [t[1] for t in e["t"]] == [t["text"] for t in rec["turns"]]
            assert e["u"] == round(rec["outcome"]["utility"], 3) and e["end"] == rec["outcome"]["end"]
            scores = [j["score"] for j in ng.judge_record(rec, cfg)]
            assert [t[7] for t in e["t"] if t[0] == 0] == [round(s, 2) for s in scores]
            chosen = [t["emotion"] for t in rec["turns"] if t["speaker"] == "focal"]
            assert [t[2] for t in e["t"] if t[0] == 0] == chosen
    game = [e for e in data["episodes"] if e["m"] == 2]
    assert len(game) == 1 and game[0]["end"] == "walk_away" and game[0]["t"][1][1] == "I need 150 days."
    svg = page[page.index("<svg"):page.rindex("</svg>")]
    bars = re.findall(r'<rect class="bar" data-method="([^"]+)" data-domain="([^"]+)"[^>]*><title>[^<]*: ([0-9.]+) ',
                      svg)
    assert {(m, d) for m, d, _ in bars} == {(m, d) for m in ("teacher-random", "teacher-iql")
                                             for d in ("crad", "student", "pooled")}
    for m, d, mean in bars:
        u = [r["outcome"]["utility"] for r in _records(run, m) if d == "pooled" or r["domain"] == d]
        assert float(mean) == pytest.approx(sum(u) / len(u), abs=6e-4)
    assert "Emotion chosen by focal turn" in page and ">teacher-iql</text>" in page      # the selector's heatmap
    assert os.path.getsize(path) < 400_000


def test_show_rebuilds_the_page_and_adds_the_emotions_study(run, capsys, tmp_path):
    study = os.path.join(run, "studies", "emotions.json")
    os.makedirs(os.path.dirname(study), exist_ok=True)
    with open(study, "w") as f:                      # the study's saved shape: domain -> emotion -> (mean, lo, hi)
        json.dump({"utility": {d: {e: [0.1 + i / 100, 0.0, 0.5] for i, e in enumerate(viewer.EMOTIONS)}
                               for d in ("crad", "student")}}, f)
    try:
        assert emodistill.main(["show", run]) == 0
        printed = capsys.readouterr().out
        path = os.path.join(run, "eval", "transcripts.html")
        assert os.path.abspath(path) in printed
        page = open(path).read()
        assert "the emotions study" in page and "neutral, student: 0.370" in page
    finally:
        os.remove(study)
        viewer.write_page(run)
    assert emodistill.main(["show", str(tmp_path / "nothing")]) == 2


class _Dom(HTMLParser):
    """The rendered elements' attributes, for counting rows, transcripts and turns."""

    def __init__(self, text):
        super().__init__()
        self.tags = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def having(self, cls, tag=None):
        return [a for t, a in self.tags if (tag is None or t == tag) and cls in (a.get("class") or "").split()]


def _dump(path, fragment):
    p = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                        f"file://{os.path.abspath(path)}#{fragment}"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    return _Dom(p.stdout)


@needs_browser
def test_the_page_renders_filters_and_side_by_side_in_a_headless_browser(run, tmp_path):
    """chromium --headless renders the views the address names: a method and domain filter, an
    outcome filter, one open transcript with its judge scores, and two methods side by side on the
    same scenario and seed; a screenshot is a PNG."""
    path = os.path.join(run, "eval", "transcripts.html")
    recs = {m: {r["key"]: r for r in _records(run, m)} for m in ("teacher-random", "teacher-iql")}

    dom = _dump(path, "method=teacher-iql&domain=crad&episode=teacher-iql|crad-80-0")
    rows = dom.having("ep", "tr")
    assert len(rows) == 20 and {r["data-method"] for r in rows} == {"teacher-iql"}
    assert sorted(r["data-key"] for r in rows) == sorted(k for k in recs["teacher-iql"] if k.startswith("crad-"))
    open_ = dom.having("transcript")
    assert len(open_) == 1 and (open_[0]["data-method"], open_[0]["data-key"]) == ("teacher-iql", "crad-80-0")
    assert len(dom.having("turn")) == len(recs["teacher-iql"]["crad-80-0"]["turns"])

    dom = _dump(path, "domain=student&outcome=deal")             # every method, deals only
    rows = dom.having("ep", "tr")
    assert sorted((r["data-method"], r["data-key"]) for r in rows) == sorted(
        (m, k) for m in recs for k, r in recs[m].items() if r["domain"] == "student" and r["outcome"]["success"])
    assert {r["data-end"] for r in rows} <= {"accept", "converged"} and rows

    dom = _dump(path, "compare=teacher-random,teacher-iql&key=student-83-0")
    boxes = dom.having("transcript")
    assert [(b["data-method"], b["data-key"]) for b in boxes] == [("teacher-random", "student-83-0"),
                                                                 ("teacher-iql", "student-83-0")]
    assert len(dom.having("turn")) == sum(len(recs[m]["student-83-0"]["turns"]) for m in recs)
    assert len(dom.having("ep", "tr")) == 0                                   # the list is replaced

    png = tmp_path / "page.png"
    p = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--window-size=1000,900", f"--screenshot={png}", f"file://{os.path.abspath(path)}"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
