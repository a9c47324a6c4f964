"""Run folders: atomic files, resumable JSONL and the hashes that say whether a stage's output
is stale. Not needed to follow the paper; every stage of emodistill.py uses it the same way.

A stage writes `NAME.partial` and renames it when complete, so a reader never sees half a
file, and a re-run continues where an interrupted one stopped without duplicating a line. Each
stage saves its settings (with content hashes of its inputs) next to its output; a re-run with
other settings or inputs is refused (or, with --force, redone) instead of reusing stale output.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

import domains


class StageError(RuntimeError):
    """A stage cannot run: a missing input, stale output, a file that cannot be written."""


def write_text_atomic(path, text):
    """Write `path` through `<path>.tmp` and a rename, so a reader never sees half a file."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        raise StageError(f"cannot write {path}: {e.strerror or e}") from None


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_json_atomic(path, obj):
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_jsonl(path, on_bad="error", required=("key", "domain", "turns", "outcome")):
    """Records of a JSONL file. A corrupt line (bad JSON or missing fields) raises StageError
    naming its line number, or with on_bad='skip' is skipped and reported in `bad`."""
    records, bad = [], []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
                missing = [k for k in required if k not in rec]
                if missing:
                    raise ValueError(f"missing field(s) {', '.join(missing)}")
            except ValueError as e:
                if on_bad != "skip":
                    raise StageError(f"{path} line {i}: corrupt record ({e}); fix or delete the line, "
                                     f"or re-run with --on-bad-line skip") from None
                bad.append(i)
                continue
            records.append(rec)
    return records, bad


class PartialJsonl:
    """Append-only `<path>.partial`, renamed to `<path>` by finish(). Resuming drops a
    trailing half-written line (an interrupted write) and returns the keys already done."""

    def __init__(self, path):
        self.path, self.partial = path, path + ".partial"

    def resume(self, on_bad="error"):
        """The keys already written. A corrupt line stops with its line number, or with
        on_bad='skip' is dropped from the partial file (its record is made again) and reported."""
        if not os.path.exists(self.partial):
            return []
        with open(self.partial, "rb") as f:
            data = f.read()
        cut = data.rfind(b"\n") + 1
        if cut < len(data):
            with open(self.partial, "r+b") as f:
                f.truncate(cut)
        recs, bad = read_jsonl(self.partial, on_bad=on_bad, required=("key",))
        if bad:
            with open(self.partial) as f:
                keep = [line for i, line in enumerate(f, 1) if i not in set(bad)]
            write_text_atomic(self.partial, "".join(keep))
            print(f"[resume] dropped {len(bad)} corrupt line(s) of {self.partial}: {bad[:20]}; they are made again")
        return [r["key"] for r in recs]

    def append(self, records):
        try:
            with open(self.partial, "a") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise StageError(f"cannot write {self.partial}: {e.strerror or e} "
                             f"(lines already written are kept; re-run to resume)") from None

    def finish(self, settings_name=None):
        """Rename the partial file into place; then mark the stage's settings file (in the same
        folder) complete, when named."""
        if not os.path.exists(self.partial):
            open(self.partial, "a").close()
        os.replace(self.partial, self.path)
        if settings_name:
            mark_complete(os.path.dirname(self.path), settings_name)


def machine_facts():
    """What a result depends on beyond its settings: float results (IQL training, so the
    selector's greedy choices) can differ between CPUs with other vector units, torch versions
    or thread counts. Saved with each eval row and adapter, printed in results.md."""
    import platform

    import torch
    cpu = platform.machine()                    # where /proc/cpuinfo does not name the CPU
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def progress_bar(total, desc, initial=0, unit="traj"):
    """A tqdm bar (off when EMODISTILL_NO_PROGRESS=1, as in CI and the tests)."""
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                disable=os.environ.get("EMODISTILL_NO_PROGRESS") == "1")


def step_bar(desc):
    """A progress bar for a training loop that reports progress(step, total)."""
    bar = progress_bar(None, desc, unit="step")

    def tick(step, total):
        bar.total = total
        bar.update(step - bar.n)
    return bar, tick


def prepare_out(out, meta_name, settings, force):
    """Create the run folder and refuse to resume a stage started with other settings. Returns
    True when the stage's output is complete for these settings (skip it); otherwise the
    settings are saved marked incomplete, and mark_complete() marks them once the output is
    whole, so a run that fails (a forced redo too) leaves the stage stale, never fresh."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise StageError(f"cannot create run folder {out}: {e.strerror or e}") from None
    if not os.access(out, os.W_OK):
        raise StageError(f"run folder {out} is not writable")
    meta = os.path.join(out, meta_name)
    diff = None if force else settings_diff(meta, settings)
    if diff:
        raise StageError(f"{meta} was written with other settings {diff}; use another --out or --force")
    if not force and os.path.exists(meta) and read_json(meta).get("complete", True):  # (older runs: no mark)
        return True
    write_json_atomic(meta, {**settings, "complete": False})
    return False


def mark_complete(out, meta_name):
    """The stage's output is whole: its settings file says so (see prepare_out)."""
    meta = os.path.join(out, meta_name)
    write_json_atomic(meta, {**read_json(meta), "complete": True})


def settings_diff(meta, settings):
    """{key: (old, new)} where the settings file `meta` differs from `settings` ({} if absent)."""
    if not os.path.exists(meta):
        return {}
    with open(meta) as f:
        old = json.load(f)
    return {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}


def need(path, hint):
    """`path`, or a StageError saying it is missing and what makes it."""
    if not os.path.exists(path):
        raise StageError(f"{path} not found; {hint}")
    return path


def sha(path):
    """Short content hash of a file, for the settings that decide whether a stage's output is stale."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def domains_sha(path, side="focal"):
    """Like sha, for a domains file, but without its optional `emomas:` sections (they only
    matter with --scenarios-csv, whose settings hash them with the CSV) and, for the focal
    side, without its `swap:` sections (they only define the role-swapped domains), so runs
    made before either existed stay valid. The counterparty side hashes the swap sections too."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if side == "counterparty":
        text = "side: counterparty\n" + without_sections(text, ("emomas",))
    else:
        text = without_sections(text, ("emomas", "swap"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def text_sha(text):
    """Short hash of a string (the EmoMAS mapping in the CSV settings)."""
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def without_sections(text, names):
    """`text` (YAML) without the blocks that start with one of `names` followed by a colon."""
    out, skip, ind = [], False, 0
    start = re.compile(r"^\s*(?:%s):" % "|".join(map(re.escape, names)))
    for ln in text.split("\n"):
        indent = len(ln) - len(ln.lstrip())
        if start.match(ln):
            skip, ind = True, indent
            continue
        if skip and ln.strip() and indent > ind:
            continue
        skip = False
        out.append(ln)
    return "\n".join(out)


def parse_ids(spec):
    """'train' (0-79), 'test' (80-99), or '0-9,15' style ranges."""
    if spec == "train":
        return list(domains.TRAIN_IDS)
    if spec == "test":
        return list(domains.TEST_IDS)
    ids = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        ids.extend(range(int(a), int(b or a) + 1))
    if not ids or not all(0 <= i < domains.N_SCENARIOS for i in ids):
        raise ValueError(f"scenario ids must be a non-empty selection in 0-{domains.N_SCENARIOS - 1}: {spec}")
    return sorted(set(ids))


