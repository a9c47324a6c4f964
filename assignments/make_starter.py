"""Write the students' starter copy of the repository: every assignment region of the solution
code replaced by `raise NotImplementedError(...)`.

The solutions live in the real modules (iql.py, lora.py, jpo.py, assignments/a5_schedule.py),
between marker comments (shown here behind "| ", which the marker pattern does not match):

    |    # BEGIN A1 q_target
    |    # hint: r + gamma * (1 - done) * V(s'), elementwise
    |    return r + gamma * (1.0 - done) * v_next
    |    # END A1

In the starter, the BEGIN line, the comment lines right after it (the hint) and the END line
stay; the code between them becomes one line at the BEGIN line's indentation:

    |    raise NotImplementedError("A1 q_target: r + gamma * (1 - done) * V(s'), elementwise")

Everything outside the regions is copied as it is (the files git tracks, plus untracked files
that git does not ignore), except the instructor's tools in INSTRUCTOR_ONLY, which hold the
solutions' lines. There is no second copy of the solutions anywhere.

    python assignments/make_starter.py OUT_DIR            # all assignments stubbed
    python assignments/make_starter.py OUT_DIR --only A2  # only A2's regions stubbed
    python assignments/make_starter.py --check            # regions well formed, and a starter made
                                                          # in a temporary folder differs from the
                                                          # repository only inside them; then every
                                                          # assignment's tests are run in that starter:
                                                          # each must fail with its NotImplementedError
    python assignments/make_starter.py --check --no-tests # the comparison only (what the test suite runs)
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTRUCTOR_ONLY = ("assignments/mistakes.py",)     # its substitutions quote the solutions
BEGIN = re.compile(r"^(?P<indent>[ \t]*)# BEGIN (?P<aid>A\d+) (?P<name>\w+)[ \t]*$")
END = re.compile(r"^[ \t]*# END (?P<aid>A\d+)[ \t]*$")
HINT = re.compile(r"^[ \t]*# ?(?P<text>.*)$")


@dataclass
class Region:
    aid: str          # "A1"
    name: str         # "q_target"
    begin: int        # line index of the BEGIN line
    end: int          # line index of the END line
    n_hint: int       # comment lines right after BEGIN (kept in the starter)
    indent: str
    hint: str         # those comment lines joined, without "hint:"


class RegionError(ValueError):
    pass


def regions(text, where="<text>"):
    """The assignment regions of one file's text, in order. Raises RegionError on an unclosed,
    nested or mismatched region, or one with no code in it."""
    lines = text.splitlines()
    out, open_ = [], None
    for k, line in enumerate(lines):
        b, e = BEGIN.match(line), END.match(line)
        if b:
            if open_ is not None:
                raise RegionError(f"{where}:{k + 1}: BEGIN inside the region opened at line {open_.begin + 1}")
            open_ = Region(b["aid"], b["name"], k, -1, 0, b["indent"], "")
        elif e:
            if open_ is None:
                raise RegionError(f"{where}:{k + 1}: END {e['aid']} without a BEGIN")
            if e["aid"] != open_.aid:
                raise RegionError(f"{where}:{k + 1}: END {e['aid']} closes BEGIN {open_.aid} (line {open_.begin + 1})")
            open_.end = k
            body = lines[open_.begin + 1:k]
            hints = []
            for x in body:
                if not x.strip().startswith("#"):
                    break
                hints.append(HINT.match(x)["text"].strip())
            if len(hints) == len(body):
                raise RegionError(f"{where}:{open_.begin + 1}: region {open_.aid} {open_.name} holds no code")
            open_.n_hint = len(hints)
            open_.hint = re.sub(r"^hint:\s*", "", " ".join(hints))
            out.append(open_)
            open_ = None
    if open_ is not None:
        raise RegionError(f"{where}:{open_.begin + 1}: BEGIN {open_.aid} {open_.name} is never closed")
    return out


def stub_line(r: Region):
    msg = f"{r.aid} {r.name}: {r.hint}" if r.hint else f"{r.aid} {r.name}"
    return f"{r.indent}raise NotImplementedError({msg!r})"


def starter_text(text, only=None, where="<text>"):
    """The text with the code of every region (of the assignments in `only`, default all)
    replaced by one `raise NotImplementedError(...)` line."""
    lines = text.splitlines(keepends=True)
    nl = "\n"
    for r in reversed(regions(text, where)):
        if only and r.aid not in only:
            continue
        lines[r.begin + 1 + r.n_hint:r.end] = [stub_line(r) + nl]
    return "".join(lines)


def skeleton(text, where="<text>"):
    """The lines of a file with each region's inside (hint and code) folded to one placeholder:
    a starter and its source must have equal skeletons."""
    lines = text.splitlines()
    out, k = [], 0
    for r in regions(text, where):
        out += lines[k:r.begin + 1] + [f"<inside {r.aid} {r.name}>"]
        k = r.end
    return out + lines[k:]


def source_files(root=ROOT):
    """Files git tracks, plus untracked ones it does not ignore (relative paths, sorted). Outside
    a git checkout (a starter copy): every file but hidden ones, caches and runs/."""
    res = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True)
    if res.returncode == 0 and os.path.exists(os.path.join(root, ".git")):
        files = {f for f in res.stdout.decode().split("\0") if f}
    else:
        files = set()
        for d, dirs, names in os.walk(root):
            dirs[:] = [x for x in dirs if not x.startswith(".") and x not in ("__pycache__", "runs")]
            files |= {os.path.relpath(os.path.join(d, n), root) for n in names if not n.startswith(".")}
    return sorted(f for f in files if os.path.isfile(os.path.join(root, f)))


def all_regions(root=ROOT):
    """{relative path: [Region]} of every Python file with regions."""
    out = {}
    for f in source_files(root):
        if f.endswith(".py") and f not in INSTRUCTOR_ONLY:
            with open(os.path.join(root, f), encoding="utf-8") as fh:
                rs = regions(fh.read(), f)
            if rs:
                out[f] = rs
    return out


def make_starter(out_dir, only=None, root=ROOT):
    """Write the starter copy into out_dir (which must not exist or be empty). Returns
    {relative path: number of regions stubbed}."""
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise SystemExit(f"{out_dir} exists and is not empty")
    only = {a.upper() for a in only} if only else None
    stubbed = {}
    for f in source_files(root):
        if f in INSTRUCTOR_ONLY:
            continue
        src, dst = os.path.join(root, f), os.path.join(out_dir, f)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if f.endswith(".py"):
            with open(src, encoding="utf-8") as fh:
                text = fh.read()
            rs = [r for r in regions(text, f) if not only or r.aid in only]
            if rs:
                with open(dst, "w", encoding="utf-8") as fh:
                    fh.write(starter_text(text, only, f))
                shutil.copymode(src, dst)
                stubbed[f] = len(rs)
                continue
        shutil.copy2(src, dst)
    return stubbed


def run_starter_tests(out, aid, log=print):
    """Run `pytest -m <aid>` in a starter folder. Returns (number of tests, problems): every test
    must fail (or error) with a NotImplementedError of this assignment's regions."""
    import time
    import xml.etree.ElementTree as ET
    xml = os.path.join(out, f".starter-{aid}.xml")
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", aid.lower(),
                    f"--junitxml={xml}", "tests"], cwd=out, capture_output=True,
                   env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    cases = list(ET.parse(xml).getroot().iter("testcase"))
    problems = []
    for c in cases:
        bad = [x for x in c if x.tag in ("failure", "error")]
        text = " ".join((x.get("message") or "") + (x.text or "") for x in bad)
        if not bad or f"NotImplementedError: {aid} " not in text:
            problems.append(f"starter {aid}: {c.get('name')} did not fail with NotImplementedError('{aid} ...')")
    log(f"starter {aid}: {len(cases)} tests, {len(cases) - len(problems)} fail with NotImplementedError "
        f"({time.time() - t0:.0f}s)")
    if not cases:
        problems.append(f"starter {aid}: no tests collected")
    return len(cases), problems


def check(root=ROOT, log=print, run_tests=False):
    """Make a starter in a temporary folder and compare it with the repository: the same files
    (less INSTRUCTOR_ONLY), identical outside the regions, each region's inside exactly its hint
    and one raise line, and every Python file compiles; with run_tests, every assignment's tests
    run in the starter must fail with that assignment's NotImplementedError. Returns a list of
    problems (empty: ok)."""
    problems = []
    try:
        found = all_regions(root)
    except RegionError as e:
        return [str(e)]
    n = sum(len(v) for v in found.values())
    per = {}
    for rs in found.values():
        for r in rs:
            per.setdefault(r.aid, []).append(r.name)
    for aid in sorted(per):
        log(f"{aid}: {len(per[aid])} region{'s' * (len(per[aid]) > 1)}: {', '.join(per[aid])}")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "starter")
        make_starter(out, root=root)
        want = [f for f in source_files(root) if f not in INSTRUCTOR_ONLY]
        got = sorted(os.path.relpath(os.path.join(d, n), out) for d, _, ns in os.walk(out) for n in ns)
        if got != want:
            problems.append(f"file lists differ: only in starter {sorted(set(got) - set(want))[:5]}, "
                            f"only in repository {sorted(set(want) - set(got))[:5]}")
        for f in want:
            with open(os.path.join(root, f), "rb") as a, open(os.path.join(out, f), "rb") as b:
                src, dst = a.read(), b.read()
            if f not in found:
                if src != dst:
                    problems.append(f"{f}: has no regions but differs")
                continue
            src, dst = src.decode(), dst.decode()
            if skeleton(src, f) != skeleton(dst, f):
                problems.append(f"{f}: differs outside its regions")
            for r_src, r_dst in zip(regions(src, f), regions(dst, f)):
                inside = dst.splitlines()[r_dst.begin + 1:r_dst.end]
                hint = src.splitlines()[r_src.begin + 1:r_src.begin + 1 + r_src.n_hint]
                if inside != hint + [stub_line(r_src)]:
                    problems.append(f"{f}: region {r_src.aid} {r_src.name} is not its hint and one raise line")
            try:
                compile(dst, f, "exec")
            except SyntaxError as e:
                problems.append(f"{f}: the starter does not compile: {e}")
        log(f"{n} regions in {len(found)} files; " + ("the starter differs from the repository only inside them"
                                                       if not problems else f"{len(problems)} problems"))
        if run_tests and not problems:
            for aid in sorted({r.aid for rs in found.values() for r in rs}, key=lambda a: int(a[1:])):
                problems += run_starter_tests(out, aid, log)[1]
    return problems


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", help="folder to write the starter into (must not exist or be empty)")
    ap.add_argument("--only", help="comma-separated assignments to stub (default all), e.g. A1,A3")
    ap.add_argument("--check", action="store_true", help="check the regions and the starter instead")
    ap.add_argument("--no-tests", action="store_true", help="with --check: do not run the starter's tests")
    args = ap.parse_args(argv)
    if args.check:
        problems = check(run_tests=not args.no_tests)
        for p in problems:
            print("PROBLEM:", p)
        return 1 if problems else 0
    if not args.out:
        ap.error("give an output folder, or --check")
    stubbed = make_starter(args.out, args.only.split(",") if args.only else None)
    for f, n in stubbed.items():
        print(f"{f}: {n} regions stubbed")
    print(f"starter written to {args.out}; grade an assignment there with: python -m pytest -m a1 (... a5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
