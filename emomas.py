"""Not needed to follow the paper: the importer of the EmoMAS benchmark's scenario CSVs
(`--scenarios-csv`), optional: without it every scenario is generated (domains.make_scenarios).

The published CSVs have rows whose free-text cells contain unquoted commas, which shifts
every later column. A row is repaired by re-joining its cells: a cell that begins with a
space may continue the previous one (a comma inside a text), any other cell starts a new
column, and typed columns (numbers, clock times, word lists from domains.yaml) must parse.
Every split that satisfies this is enumerated; the row is kept when all of them agree on
the values the domain uses, and skipped with its reason otherwise.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace

from domains import _CELL_REF, N_SCENARIOS, TEST_IDS, Domain, Scenario, make_scenarios
from offers import parse_offer


class ScenarioCsvError(ValueError):
    """A scenario CSV cannot be used at all (missing file, header without the mapped columns)."""


def _cell_ok(text, kind, unit):
    t = text.strip()
    if kind in (None, "text"):
        return True
    if isinstance(kind, list):
        return t.lower() in {k.lower() for k in kind}
    if kind == "clock":
        return parse_offer(t, "clock") is not None
    try:
        v = float(t)
    except ValueError:
        return False
    return kind == "number" or v == int(v)


def split_csv_row(cells, columns, types, unit="days", limit=256):
    """Every way to place a row's csv cells into `columns` (see the comment above).
    Returns a list of {column: text} dicts (at most `limit`)."""
    out, n, k = [], len(cells), len(columns)

    def walk(i, c, acc):
        if len(out) >= limit:
            return
        if c == k:
            if i == n:
                out.append(dict(zip(columns, acc)))
            return
        for j in range(i + 1, n - (k - c - 1) + 1):     # this column takes cells i..j-1
            if j - 1 > i and not cells[j - 1].startswith(" "):
                break                                    # a cell without a leading space starts a column
            text = ",".join(cells[i:j])
            if _cell_ok(text, types.get(columns[c]), unit):
                walk(j, c + 1, acc + [text.strip()])
    if n >= k:
        walk(0, 0, [])
    return out


def _why_no_split(cells, columns, types, unit):
    if len(cells) == len(columns):        # the plain split has the right width: name the bad cells
        return "column " + "; ".join(_bad_cells(cells, columns, types, unit))
    joined = []
    for c in cells:                       # the most likely reading: every leading-space cell continues
        if joined and c.startswith(" "):
            joined[-1] += "," + c
        else:
            joined.append(c)
    if len(joined) == len(columns):
        return "column " + "; ".join(_bad_cells(joined, columns, types, unit))
    return f"{len(cells)} cells ({len(joined)} after re-joining texts) cannot fill the {len(columns)} columns"


def _bad_cells(cells, columns, types, unit):
    return [f"'{col}' = {v.strip()!r} is not {types[col] if isinstance(types[col], str) else 'one of ' + str(types[col])}"
            for col, v in zip(columns, cells) if not _cell_ok(v, types.get(col), unit)]


def _render_cell(template, row):
    def sub(m):
        v = row[m.group(1)]
        f = m.group(2)
        if f == "lower":
            v = v[:1].lower() + v[1:]
        elif f == "words":
            v = v.replace("_", " ").lower()
        elif f == "money":
            v = f"{round(float(v)):,}"
        return v
    return _CELL_REF.sub(sub, template)


def import_scenarios_csv(dom: Domain, path, seed=0):
    """Scenarios for `dom` from an EmoMAS CSV, mapped by the domain's `emomas` section.

    The data row at position i (0-based) becomes scenario id i, so the first 80 rows are
    training scenarios and rows 80-99 test scenarios; a skipped row keeps its id unused, so a
    damaged row never moves a later one across the split. Each line is one row (the published
    files have no line breaks inside cells). s0, b0 and context fields the CSV
    does not give, and the counterparty's private reservation, patience and persona, come
    from the generated scenario with the same id. Returns (scenarios, report) where report
    = {"read", "repaired", "skipped": [(line, reason)], ...}."""
    import csv
    m = dom.emomas
    if not m:
        raise ScenarioCsvError(f"domain '{dom.key}' has no 'emomas' section in domains.yaml")
    try:
        # one physical line, one row: a quote opened and never closed in one cell must not
        # swallow the rows after it (and shift every later id across the train/test split)
        with open(path, newline="", encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
        rows = [next(csv.reader([ln]), []) for ln in lines]
    except FileNotFoundError:
        raise ScenarioCsvError(f"{path}: file not found") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise ScenarioCsvError(f"{path}: not a readable CSV: {e}") from None
    if not rows:
        raise ScenarioCsvError(f"{path}: empty file")
    columns = [c.strip() for c in rows[0]]
    types = m.get("columns") or {}
    templates = {"s0": m.get("s0"), "b0": m.get("b0"), **(m.get("context") or {})}
    used = sorted({col for t in templates.values() if t for col, _ in _CELL_REF.findall(t)} | set(types))
    missing = [c for c in used if c not in columns]
    if missing:
        raise ScenarioCsvError(f"{path}: domain '{dom.key}' maps column(s) {missing} that the header lacks "
                               f"(header: {columns})")
    generated = make_scenarios(replace(dom, imported=None), seed)
    out, report = [], {"file": str(path), "rows": 0, "read": 0, "repaired": 0, "skipped": []}
    for line, cells in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in cells):
            continue
        i = report["rows"]
        report["rows"] += 1
        if i >= N_SCENARIOS:
            report["skipped"].append((line, f"beyond the first {N_SCENARIOS} rows"))
            continue
        if lines[line - 1].count('"') % 2:
            report["skipped"].append((line, "a quote is opened and never closed (the row is damaged; "
                                            "the rows after it keep their ids)"))
            continue
        cands = split_csv_row(cells, columns, types, dom.unit)
        if not cands:
            report["skipped"].append((line, _why_no_split(cells, columns, types, dom.unit)))
            continue
        try:
            vals = [{k: _render_cell(t, c) for k, t in templates.items() if t} for c in cands]
        except (ValueError, KeyError) as e:
            report["skipped"].append((line, f"cannot render a mapped value: {e}"))
            continue
        differ = sorted({k for v in vals[1:] for k in v if v[k] != vals[0][k]})
        if differ:
            report["skipped"].append((line, f"ambiguous: {len(cands)} ways to split its commas give different {differ}"))
            continue
        v, g = vals[0], generated[i]
        try:
            s0 = _mapped_number(v, "s0", g.s0, dom.unit)
            b0 = _mapped_number(v, "b0", g.b0, dom.unit)
        except ValueError as e:
            report["skipped"].append((line, str(e)))
            continue
        if (dom.focal_prefers == "lower" and not s0 < b0) or (dom.focal_prefers == "higher" and not s0 > b0):
            src = lambda k: "" if k in v else " (generated: no CSV column)"        # noqa: E731
            report["skipped"].append((line, f"target {s0:g}{src('s0')} and opening {b0:g}{src('b0')} contradict "
                                            f"focal_prefers={dom.focal_prefers}"))
            continue
        frac = (g.reservation - g.b0) / (g.s0 - g.b0)   # keep the generated reservation's relative place
        ctx = dict(g.context)
        ctx.update({k: val for k, val in v.items() if k not in ("s0", "b0")})
        out.append(Scenario(dom.key, i, s0, b0, round(b0 + frac * (s0 - b0), 3), g.patience, g.persona, ctx))
        report["read"] += 1
        report["repaired"] += len(cells) != len(columns)
    return out, report


def _mapped_number(v, key, default, unit):
    if key not in v:
        return float(default)
    x = parse_offer(v[key], unit) if unit == "clock" else None
    if x is None:
        try:
            x = float(v[key])
        except ValueError:
            raise ValueError(f"{key}: '{v[key]}' is not a {unit} value") from None
    return float(x)


def use_csv_scenarios(src, cfg, doms, out, scenario_seed, domains_file):
    """--scenarios-csv PATH: the chosen domains play the EmoMAS benchmark's scenarios instead of
    generated ones. PATH is a folder holding each domain's CSV (the file named in its `emomas`
    section of domains.yaml), or one CSV file when a single domain is chosen. Prints and saves
    how many rows were read, repaired and skipped (and why). Returns {domain: file sha} or None."""
    from runs import StageError, sha, text_sha, write_json_atomic
    if not src:
        return None
    if os.path.isfile(src) and len(doms) != 1:
        raise StageError(f"--scenarios-csv {src} is one file: choose its domain with --domains")
    shas, reports = {}, {}
    for d in doms:
        dom = cfg.domains[d]
        if not dom.emomas:
            raise StageError(f"--scenarios-csv: domain '{d}' has no 'emomas' section in {domains_file}")
        path = src if os.path.isfile(src) else os.path.join(src, dom.emomas["file"])
        try:
            scs, rep = import_scenarios_csv(dom, path, scenario_seed)
        except ScenarioCsvError as e:
            raise StageError(str(e)) from None
        dom.imported = scs
        shas[d], reports[d] = sha(path) + "+" + text_sha(json.dumps(dom.emomas, sort_keys=True)), rep
        n_test = sum(sc.id in TEST_IDS for sc in scs)
        print(f"[scenarios] {d}: {path}: {rep['rows']} rows, {rep['read']} read ({rep['repaired']} repaired, "
              f"{n_test} of them test scenarios), {len(rep['skipped'])} skipped")
        for line, why in rep["skipped"]:
            print(f"[scenarios]   line {line}: {why}")
    os.makedirs(out, exist_ok=True)
    write_json_atomic(os.path.join(out, "scenarios_import.json"), reports)
    return shas
