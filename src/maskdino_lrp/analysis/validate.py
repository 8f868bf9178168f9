"""Checks on written explanations (the thesis prototype's validation), for a run folder or one file.

Every ``validate`` failure is one row (one line) naming the file and the problem; the command exits 1.

On every token CSV (``level,y,x,relevance,raw``, or with ``query,stop`` columns: per query and stop):
the ``relevance`` column sums to 1 within ``tolerance``; no NaN/Inf; ``relevance × Σraw`` reproduces
``raw``; and distribution statistics (informational): entropy of |R| (nats), entropy normalised by
log N, the share of Σ|R| held by the top 1% tokens, positive and negative mass (shares of Σ|R|).

On each query's metadata: the target is finite; at each complete cut
|residual| / max(|target|, |relevance at the cut|) ≤ ``max_residual`` (relative to the relevance that
flows: a logit near 0 can carry much relevance; computed from the cut's residual, target and total);
every referenced file exists; the ``.npz`` is readable (a truncated file fails) and finite. Cross-checks
(:func:`cross_check`): the token CSVs' rows are in the levels' order (moved rows fail), their raw
column equals the npz and sums to the metadata's token sum (a CSV edited to stay self-consistent
fails), the per-layer CSV's sums equal the npz's and its target the metadata's, the conservation
totals equal the npz's sums.

On a run folder: no lock of a run in progress or killed (``.maskdino-lrp.lock``), no temporary files
of an interrupted write, a ``manifest.json`` when the image folders were written by a run, the run
marked finished, every image folder complete (a ``summary.json``) and listed in the manifest, every
finished image's folder present with the same source and queries, no folder shared by two images.
Failed images are listed (informational).

``validate(path)`` returns a :class:`ValidationResult`: a table of checks (name, file, value, ok,
message) and ``ok``.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .export import _TEMP_RE, SUMMARY

DEFAULT_TOLERANCE = 1e-4
# allowed |residual| / max(|target|, |relevance at the cut|) at a complete cut: the default composite's
# epsilon / AttnLRP rules are not exactly conservative (on random weights about 0.1-0.2 goes to the residual)
DEFAULT_MAX_RESIDUAL = 0.5
MANIFEST = "manifest.json"
TOKEN_COLUMNS = ("level", "y", "x", "relevance")
_QUERY_FILE_RE = re.compile(r"^q\d{3,}(_\d+)?_")  # qNNN_… files of save_explanation


@dataclass
class Check:
    name: str
    file: str
    value: Any
    ok: bool
    message: str = ""


@dataclass
class ValidationResult:
    """The checks run on ``path``; ``ok`` when none failed."""

    path: Path
    checks: list[Check] = field(default_factory=list)
    statistics: list[dict] = field(default_factory=list)  # one row per token distribution

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def add(self, name: str, file: str | Path, value: Any, ok: bool, message: str = "") -> Check:
        check = Check(name, self._rel(file), value, bool(ok), message)
        self.checks.append(check)
        return check

    def _rel(self, file: str | Path) -> str:
        try:
            root = self.path if self.path.is_dir() else self.path.parent
            return Path(file).relative_to(root).as_posix() or "."
        except ValueError:
            return str(file)

    def table(self, failed_only: bool = False, max_rows: int | None = None) -> str:
        """The checks as an aligned text table (only failures with ``failed_only``)."""
        rows = [c for c in self.checks if not (failed_only and c.ok)]
        shown = rows if max_rows is None else rows[:max_rows]
        cells = [("check", "file", "value", "ok", "message")]
        for c in shown:
            cells.append((c.name, c.file, _fmt(c.value), "ok" if c.ok else "FAIL", c.message))
        widths = [min(max(len(r[i]) for r in cells), 60) for i in range(4)]
        lines = ["  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in cells]
        if len(shown) < len(rows):
            lines.append(f"... {len(rows) - len(shown)} more")
        return "\n".join(line.rstrip() for line in lines)

    def summary(self) -> str:
        n_fail = len(self.failures)
        files = len({c.file for c in self.checks})
        return (f"{'OK' if self.ok else 'FAILED'}: {len(self.checks)} checks on {files} file(s) under {self.path}"
                + (f", {n_fail} failed" if n_fail else ""))

    def to_dict(self) -> dict:
        return {"path": str(self.path), "ok": self.ok,
                "checks": [{"name": c.name, "file": c.file, "value": _jsonable(c.value), "ok": c.ok,
                            "message": c.message} for c in self.checks],
                "statistics": self.statistics}

    def __str__(self) -> str:
        return self.summary()


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


# ----------------------------------------------------------------------------- statistics
def distribution_statistics(values: Iterable[float]) -> dict[str, float]:
    """Entropy (nats) and normalised entropy of p = |R| / Σ|R|, share of Σ|R| held by the top 1% tokens
    (at least one token), positive and negative mass (shares of Σ|R|)."""
    r = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64)
    n = r.size
    a = np.abs(r)
    total = float(a.sum())
    if n == 0 or total == 0 or not math.isfinite(total):
        return {"tokens": n, "entropy": float("nan"), "normalised_entropy": float("nan"),
                "top1pct_share": float("nan"), "positive_mass": float("nan"), "negative_mass": float("nan")}
    p = a / total
    nz = p[p > 0]
    entropy = float(-(nz * np.log(nz)).sum())
    top = max(1, math.ceil(0.01 * n))
    return {
        "tokens": n,
        "entropy": entropy,
        "normalised_entropy": entropy / math.log(n) if n > 1 else 0.0,
        "top1pct_share": float(np.sort(a)[::-1][:top].sum() / total),
        "positive_mass": float(r[r > 0].sum() / total),
        "negative_mass": float(-r[r < 0].sum() / total),
    }


# ----------------------------------------------------------------------------- per file
def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        rows = list(reader)
    return [h.strip() for h in header] if header else [], rows


def _floats(rows: list[list[str]], index: int) -> tuple[np.ndarray, int | None]:
    """Column as floats (unparsable → NaN) and the first CSV line number that is not a finite number."""
    out = np.empty(len(rows), dtype=np.float64)
    first_bad = None
    for i, row in enumerate(rows):
        try:
            out[i] = float(row[index])
        except (ValueError, IndexError):
            out[i] = float("nan")
        if first_bad is None and not math.isfinite(out[i]):
            first_bad = i + 2  # header is line 1
    return out, first_bad


def check_token_csv(result: ValidationResult, path: Path, header: list[str], rows: list[list[str]],
                    tolerance: float) -> None:
    missing = [c for c in TOKEN_COLUMNS if c not in header]
    if missing:
        result.add("columns", path, None, False, f"missing column(s) {', '.join(missing)}; expected {','.join(TOKEN_COLUMNS)}[,raw]")
        return
    if not rows:
        result.add("rows", path, 0, False, "no token rows")
        return
    rel, bad_rel = _floats(rows, header.index("relevance"))
    raw, bad_raw = _floats(rows, header.index("raw")) if "raw" in header else (None, None)
    if "query" in header and "stop" in header:
        qi, si = header.index("query"), header.index("stop")
        keys = [(r[qi] if len(r) > qi else "", r[si] if len(r) > si else "") for r in rows]
    else:
        keys = [None] * len(rows)
    groups: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    for key, idx in groups.items():
        idx = np.asarray(idx)
        label = "" if key is None else f" [query {key[0]}, {key[1]}]"
        r = rel[idx]
        n_bad = int((~np.isfinite(r)).sum()) + (int((~np.isfinite(raw[idx])).sum()) if raw is not None else 0)
        first = min(b for b in (bad_rel, bad_raw) if b is not None) if n_bad else None
        result.add("finite" + label, path, n_bad, n_bad == 0,
                   "" if n_bad == 0 else f"{n_bad} NaN/Inf or non-numeric value(s) (first at line {first})")
        if n_bad:
            continue
        total = float(r.sum())
        ok = abs(total - 1.0) <= tolerance
        result.add("sums to 1" + label, path, total, ok,
                   "" if ok else f"relevance sums to {total:.9g}, expected 1 ± {tolerance:g}")
        if raw is not None:
            s = float(raw[idx].sum())
            scale = float(np.abs(raw[idx]).max()) or 1.0
            err = float(np.abs(r * s - raw[idx]).max()) / scale if s != 0 else float(np.abs(r).max())
            ok = err <= max(tolerance, 1e-6) * max(1.0, float(np.abs(r).sum()))
            result.add("relevance = raw / Σraw" + label, path, err, ok,
                       "" if ok else f"relevance and raw columns disagree (max relative deviation {err:.3g})")
        stats = distribution_statistics(raw[idx] if raw is not None else r)
        result.statistics.append({"file": result._rel(path), "group": None if key is None else list(key), **stats})
        for name in ("entropy", "normalised_entropy", "top1pct_share", "positive_mass", "negative_mass"):
            result.add(name + label, path, stats[name], True, "statistic")


def check_layers_csv(result: ValidationResult, path: Path, header: list[str], rows: list[list[str]]) -> None:
    if "stop" not in header or "sum" not in header:
        result.add("columns", path, None, False, "missing column(s) stop/sum of a per-layer totals CSV")
        return
    cols = [c for c in ("sum", "positive", "negative", "abs_sum") if c in header]
    n_bad, first = 0, None
    for c in cols:
        v, bad = _floats(rows, header.index(c))
        n_bad += int((~np.isfinite(v)).sum())
        if bad is not None:
            first = bad if first is None else min(first, bad)
    result.add("finite", path, n_bad, n_bad == 0,
               "" if n_bad == 0 else f"{n_bad} NaN/Inf value(s) in the layer totals (first at line {first})")


def check_csv(result: ValidationResult, path: Path, tolerance: float) -> tuple[list[str], list[list[str]]] | None:
    """Check one CSV on its own; returns what was read (header, rows) for the cross-checks."""
    try:
        header, rows = _read_csv(path)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        result.add("readable", path, None, False, f"cannot read CSV: {exc}")
        return None
    if "relevance" in header:
        check_token_csv(result, path, header, rows, tolerance)
    elif "stop" in header and "sum" in header:
        check_layers_csv(result, path, header, rows)
    else:
        result.add("columns", path, None, False,
                   f"not a maskdino-lrp CSV (header {','.join(header) or 'empty'}); expected {','.join(TOKEN_COLUMNS)},raw")
    return header, rows


def _load_json(result: ValidationResult, path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        result.add("readable", path, None, False, f"cannot read JSON: {exc}")
        return None
    if not isinstance(data, dict):
        result.add("readable", path, None, False, "JSON does not hold an object")
        return None
    return data


def _referenced(files: Any) -> list[str]:
    out = []
    if isinstance(files, dict):
        for v in files.values():
            out.extend(_referenced(v))
    elif isinstance(files, list):
        for v in files:
            out.extend(_referenced(v))
    elif isinstance(files, str):
        out.append(files)
    return out


def _check_files_exist(result: ValidationResult, path: Path, files: Any) -> None:
    names = _referenced(files)
    missing = [n for n in names if not (path.parent / n).is_file()]
    result.add("files exist", path, len(names) - len(missing), not missing,
               "" if not missing else f"{len(missing)} referenced file(s) missing: {', '.join(missing[:5])}")


def _share(row: dict) -> float | None:
    """|residual| / max(|target|, |relevance at the cut|), from the cut's own figures where they are there."""
    try:
        residual, target, total = (float(row[k]) for k in ("residual", "target", "total"))
    except (KeyError, TypeError, ValueError):
        v = row.get("residual_share")
        return float(v) if isinstance(v, (int, float)) else None
    scale = max(abs(target), abs(total))
    return abs(residual) / scale if scale else (0.0 if residual == 0 else float("inf"))


def check_meta(result: ValidationResult, path: Path, max_residual: float,
               csv_cache: dict[Path, tuple[list[str], list[list[str]]]] | None = None) -> None:
    meta = _load_json(result, path)
    if meta is None:
        return
    needed = [k for k in ("query", "target_value", "conservation", "files") if k not in meta]
    if needed:
        result.add("metadata", path, None, False, f"missing key(s) {', '.join(needed)}")
        return
    t = meta["target_value"]
    ok = isinstance(t, (int, float)) and math.isfinite(t)
    result.add("target finite", path, t, ok, "" if ok else "target value is missing, NaN or Inf")
    for cut, row in (meta.get("conservation") or {}).items():
        share = _share(row) if isinstance(row, dict) else None
        ok = share is not None and math.isfinite(share) and share <= max_residual
        msg = "" if ok else (
            f"|residual| / max(|target|, |relevance at the cut|) = {share:.3g} > {max_residual:g} at cut {cut!r}"
            if share is not None and math.isfinite(share) else f"conservation figures at cut {cut!r} are missing, NaN or Inf")
        result.add(f"conservation {cut}", path, share, ok, msg)
    _check_files_exist(result, path, meta["files"])
    files = meta["files"] if isinstance(meta["files"], dict) else {}
    npz = files.get("npz")
    arrays = None
    if npz and (path.parent / npz).is_file():
        arrays = check_npz(result, path.parent / npz, keep=True)
    cross_check(result, path, meta, arrays, csv_cache)


def _npz_stop(arrays: dict[str, np.ndarray], stop: str) -> np.ndarray | None:
    """A token stop's raw relevance from the npz, flattened in level order (``memory`` may be stored per level)."""
    if stop in arrays:
        return np.asarray(arrays[stop], dtype=np.float64).ravel()
    if stop == "memory":
        parts = sorted((k for k in arrays if k.startswith("memory@")), key=lambda k: int(k[7:]))
        if parts:
            return np.concatenate([np.asarray(arrays[k], dtype=np.float64).ravel() for k in parts])
    return None


def _close(a: float, b: float, scale: float, rel: float = 1e-6) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= rel * max(scale, abs(a), abs(b), 1e-30)


def cross_check(result: ValidationResult, path: Path, meta: dict, arrays: dict[str, np.ndarray] | None,
                csv_cache: dict[Path, tuple[list[str], list[list[str]]]] | None = None) -> None:
    """The files of one query against each other: token CSVs' layout (level, y, x in the levels' order) and
    raw column against the npz and the metadata's token sums; the per-layer CSV against the npz and the
    target; the conservation totals against the npz. A CSV edited to stay self-consistent, or rows moved,
    fail here."""
    files = meta["files"] if isinstance(meta["files"], dict) else {}
    folder = path.parent
    levels = meta.get("levels") or []
    token_sums = meta.get("token_sums") or {}
    for stop, fname in (files.get("tokens") or {}).items():
        csv_path = folder / fname
        parsed = (csv_cache or {}).get(csv_path)
        if parsed is None:
            try:
                parsed = _read_csv(csv_path)
            except (OSError, UnicodeDecodeError, csv.Error):
                continue  # reported as missing / unreadable elsewhere
        header, rows = parsed
        if not all(c in header for c in ("level", "y", "x", "raw")):
            continue
        li, yi, xi = header.index("level"), header.index("y"), header.index("x")
        expected = [(lv["name"], str(i // lv["width"]), str(i % lv["width"]))
                    for lv in levels for i in range(int(lv["height"]) * int(lv["width"]))]
        if levels:
            found = [(r[li], r[yi], r[xi]) if len(r) > max(li, yi, xi) else None for r in rows]
            bad = next((i for i, (e, f) in enumerate(zip(expected, found)) if e != f), None)
            ok = bad is None and len(found) == len(expected)
            if ok:
                msg = ""
            elif bad is None:
                msg = f"{len(found)} token rows, the levels in {path.name} have {len(expected)}"
            else:
                msg = (f"rows out of place from line {bad + 2}: expected {','.join(expected[bad])}, found "
                       f"{','.join(found[bad]) if found[bad] else 'a short row'}")
            result.add("token layout", csv_path, len(found), ok, msg)
        raw, _ = _floats(rows, header.index("raw"))
        if stop in token_sums and isinstance(token_sums[stop], (int, float)):
            s = float(raw.sum())
            ok = _close(s, float(token_sums[stop]), float(np.abs(raw).sum()))
            result.add("raw sum = metadata", csv_path, s, ok,
                       "" if ok else f"raw column sums to {s:.9g}, {path.name} records {token_sums[stop]:.9g}")
        ref = _npz_stop(arrays, stop) if arrays is not None else None
        if ref is not None:
            if ref.shape != raw.shape:
                result.add("raw = npz", csv_path, None, False,
                           f"{raw.size} token rows, the npz's {stop!r} has {ref.size} values")
            else:
                dev = np.abs(raw - ref)
                tol = 1e-6 * np.maximum(np.abs(ref), 1e-30) + 1e-6 * float(np.abs(ref).max(initial=0.0)) * 1e-3
                wrong = np.flatnonzero(~(dev <= tol))
                ok = wrong.size == 0
                result.add("raw = npz", csv_path, int(wrong.size), ok,
                           "" if ok else f"{wrong.size} raw value(s) differ from the npz's {stop!r} (first at line "
                           f"{int(wrong[0]) + 2}: {raw[wrong[0]]:.9g} vs {ref[wrong[0]]:.9g})")
    layers = files.get("layers")
    if layers:
        parsed = (csv_cache or {}).get(folder / layers)
        if parsed is None:
            try:
                parsed = _read_csv(folder / layers)
            except (OSError, UnicodeDecodeError, csv.Error):
                parsed = ([], [])
        header, rows = parsed
        if "stop" in header and "sum" in header:
            si, vi = header.index("stop"), header.index("sum")
            values, _ = _floats(rows, vi)
            bad = []
            for row, v in zip(rows, values):
                stop = row[si] if len(row) > si else ""
                if stop == "target":
                    t = meta.get("target_value")
                    if isinstance(t, (int, float)) and not _close(v, float(t), abs(float(t)), 1e-9):
                        bad.append(f"target {v:.9g} vs {t:.9g} in {path.name}")
                elif arrays is not None and stop in arrays and np.issubdtype(arrays[stop].dtype, np.floating):
                    a = np.asarray(arrays[stop], dtype=np.float64)
                    if not _close(v, float(a.sum()), float(np.abs(a).sum())):
                        bad.append(f"{stop} {v:.9g} vs {float(a.sum()):.9g} in the npz")
            result.add("layer sums = npz", folder / layers, len(bad), not bad,
                       "" if not bad else f"{len(bad)} sum(s) disagree: " + "; ".join(bad[:3]))
    if arrays is None:
        return
    for cut, row in (meta.get("conservation") or {}).items():
        if not isinstance(row, dict) or not isinstance(row.get("total"), (int, float)):
            continue
        if cut == "pixels" and "pixels" in arrays:
            parts = [np.asarray(arrays["pixels"], dtype=np.float64)]
            extra = float(row.get("padding") or 0.0)
        elif cut == "memory":
            keys = [k for k in arrays if k.startswith("memory@")] or [k for k in arrays if k == "memory"]
            keys += [k for k in arrays if k.startswith("lateral")]
            if not keys:
                continue
            parts = [np.asarray(arrays[k], dtype=np.float64) for k in keys]
            extra = 0.0
        else:
            continue
        total = sum(float(p.sum()) for p in parts) + extra
        mass = sum(float(np.abs(p).sum()) for p in parts) + abs(extra)
        ok = _close(total, float(row["total"]), mass, 1e-5)
        result.add(f"cut {cut} = npz", path, total, ok,
                   "" if ok else f"relevance at cut {cut!r} is {row['total']:.9g} in {path.name}, the npz sums to {total:.9g}")


def check_npz(result: ValidationResult, path: Path, keep: bool = False) -> dict[str, np.ndarray] | None:
    """Every array readable and finite; returns the arrays with ``keep``."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        result.add("readable", path, None, False, f"cannot read arrays (truncated or corrupt?): {exc}")
        return None
    bad = [k for k, v in arrays.items() if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all()]
    result.add("finite", path, len(arrays) - len(bad), not bad,
               "" if not bad else f"NaN/Inf in array(s) {', '.join(bad[:5])}")
    return arrays if keep else None


def check_summary(result: ValidationResult, path: Path) -> dict | None:
    summary = _load_json(result, path)
    if summary is None:
        return None
    _check_files_exist(result, path, summary.get("files", []))
    return summary


def _version(manifest: dict) -> int:
    v = manifest.get("version", 1)
    return v if isinstance(v, int) else 1


def check_manifest(result: ValidationResult, path: Path) -> dict | None:
    """The manifest against the folders: every finished image's folder complete, its summary of the same
    source and queries, no folder shared by two images, the run finished; failed images listed."""
    manifest = _load_json(result, path)
    if manifest is None:
        return None
    images = manifest.get("images", {})
    if not isinstance(images, dict):
        result.add("manifest", path, None, False, "'images' is not a mapping")
        return None
    run = path.parent
    done = {k: r for k, r in images.items() if isinstance(r, dict) and r.get("status") == "done"}
    missing, wrong, queries = [], [], []
    outputs: dict[str, list[str]] = {}
    for key, rec in done.items():
        out = str(rec.get("output", key))
        outputs.setdefault(out, []).append(key)
        summary_path = run / out / SUMMARY
        if not summary_path.is_file():
            missing.append(out)
            continue
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # reported when the summary itself is checked
        if not isinstance(summary, dict):
            continue
        if "source_key" in summary and summary["source_key"] != key:
            wrong.append(f"{out} holds {summary['source_key']!r}, the manifest says {key!r}")
        listed = [int(q) for q in rec.get("queries", []) if isinstance(q, (int, float))]
        written = [q.get("query") for q in summary.get("queries", []) if isinstance(q, dict)]
        if "queries" in rec and listed != written:
            queries.append(f"{out}: manifest {listed}, summary {written}")
    result.add("finished images complete", path, len(done), not missing,
               "" if not missing else f"{len(missing)} image(s) marked done have no folder with a summary.json: "
               f"{', '.join(missing[:5])}")
    result.add("outputs match sources", path, len(done), not wrong, "; ".join(wrong[:3]))
    result.add("queries match summaries", path, len(done), not queries, "; ".join(queries[:3]))
    shared = {o: ks for o, ks in outputs.items() if len(ks) > 1}
    result.add("one folder per image", path, len(outputs), not shared,
               "" if not shared else "; ".join(f"{o} is the output of {', '.join(map(repr, ks))}"
                                               for o, ks in list(shared.items())[:3]))
    if _version(manifest) >= 2:
        finished = manifest.get("finished") is True
        total = manifest.get("total")
        result.add("run finished", path, len(images), finished,
                   "" if finished else f"the run did not finish ({len(images)} of {total if total is not None else '?'} "
                   "image(s) recorded): run the same command again to complete it")
    failed = {n: r for n, r in images.items() if isinstance(r, dict) and r.get("status") == "failed"}
    result.add("failed images", path, len(failed), True,
               "none" if not failed else "; ".join(f"{n}: {r.get('error', '?')}" for n, r in list(failed.items())[:5]))
    return manifest


def _outputs_of(manifest: dict | None) -> set[str]:
    if not manifest:
        return set()
    out = {str(r.get("output", k)) for k, r in manifest.get("images", {}).items()
           if isinstance(r, dict) and r.get("status") == "done"}
    out |= {str(r.get("output")) for r in (manifest.get("legacy") or {}).values() if isinstance(r, dict)}
    return out


# ----------------------------------------------------------------------------- folders
def check_temp_files(result: ValidationResult, folder: Path) -> None:
    """Temporary files an interrupted atomic write left (``.<name>.<random>.tmp``) anywhere below ``folder``."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found += [Path(root) / f for f in sorted(files) if _TEMP_RE.match(f)]
    result.add("no temporary files", folder, len(found), not found,
               "" if not found else f"{len(found)} temporary file(s) of an interrupted write: "
               + ", ".join(result._rel(p) for p in found[:5]))


def check_lock(result: ValidationResult, folder: Path) -> None:
    from .runner import LOCK, RunLock

    if not (folder / LOCK).exists():
        return
    lock = RunLock(folder)
    owner = lock.held_by_other()
    if owner is not None:
        result.add("no run in progress", folder / LOCK, None, False,
                   f"a run is writing here ({lock.describe(owner)}): validate when it has finished")
    else:
        result.add("no run in progress", folder / LOCK, None, False,
                   f"lock left by a run that was killed ({lock.describe(lock.owner())}): run the same command "
                   "again to finish it")


def _is_output_file(name: str) -> bool:
    return name == SUMMARY or name == "image.png" or bool(_QUERY_FILE_RE.match(name))


def check_image_folder(result: ValidationResult, folder: Path, tolerance: float, max_residual: float) -> dict | None:
    """One image's folder: every CSV, metadata JSON (with its npz and the cross-checks) and the summary."""
    csv_cache: dict[Path, tuple[list[str], list[list[str]]]] = {}
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    for name in names:
        if name.endswith(".csv"):
            parsed = check_csv(result, folder / name, tolerance)
            if parsed is not None:
                csv_cache[folder / name] = parsed
    for name in names:
        if name.endswith("_meta.json"):
            check_meta(result, folder / name, max_residual, csv_cache)
    csv_cache.clear()
    summary = check_summary(result, folder / SUMMARY)
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        _check_tree(result, sub, tolerance, max_residual)
    return summary


def _check_tree(result: ValidationResult, folder: Path, tolerance: float, max_residual: float,
                top: bool = False) -> None:
    """A folder below the one validated: an image folder, a run folder, or a folder holding either."""
    if (folder / SUMMARY).is_file():
        check_image_folder(result, folder, tolerance, max_residual)
    elif (folder / MANIFEST).is_file() or top:
        check_run_folder(result, folder, tolerance, max_residual)
    else:
        files = [p.name for p in folder.iterdir() if p.is_file()]
        if any(_is_output_file(n) or _TEMP_RE.match(n) for n in files):
            result.add("image folder complete", folder, None, False,
                       "no summary.json: an image an interrupted run left unfinished (run the same command again)")
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            _check_tree(result, sub, tolerance, max_residual)
        for name in sorted(files):  # loose files written by maskdino-lrp (explanation_to_csv, …)
            f = folder / name
            if name.endswith(".csv"):
                check_csv(result, f, tolerance)
            elif name.endswith("_meta.json"):
                check_meta(result, f, max_residual)
            elif name.endswith(".npz"):
                check_npz(result, f)


def check_run_folder(result: ValidationResult, folder: Path, tolerance: float, max_residual: float) -> None:
    """A run's folder: no lock and no temporary files left, the manifest against the image folders (each
    listed, each complete, none missing), every image folder's files."""
    check_lock(result, folder)
    manifest = check_manifest(result, folder / MANIFEST) if (folder / MANIFEST).is_file() else None
    listed = _outputs_of(manifest)
    runner_written = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (sub / SUMMARY).is_file():
            summary = check_image_folder(result, sub, tolerance, max_residual)
            if summary is not None and "source_key" in summary:
                runner_written.append(sub.name)
            if manifest is not None and sub.name not in listed:
                result.add("listed in manifest", sub, None, False,
                           f"image folder {sub.name} is not listed in {MANIFEST} (left by another run, or copied in)")
        elif (sub / MANIFEST).is_file():
            check_run_folder(result, sub, tolerance, max_residual)
        else:
            before = len(result.checks)
            _check_tree(result, sub, tolerance, max_residual)
            if manifest is not None and len(result.checks) == before:
                result.add("listed in manifest", sub, None, False,
                           f"folder {sub.name} is neither an image folder nor listed in {MANIFEST}")
    if manifest is None and runner_written:
        result.add("manifest present", folder / MANIFEST, None, False,
                   f"no {MANIFEST}, but {len(runner_written)} image folder(s) written by a run (e.g. "
                   f"{runner_written[0]}): the run's record is gone; rerun the command into a new folder")
    from .summary import CLASSES, EXPLANATIONS

    for name in sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        f = folder / name
        if name in (EXPLANATIONS, CLASSES):  # the data-set summary: tables over the images, not token CSVs
            continue
        if name.endswith(".csv"):
            check_csv(result, f, tolerance)
        elif name.endswith("_meta.json"):
            check_meta(result, f, max_residual)


# ----------------------------------------------------------------------------- entry
def validate(path: str | os.PathLike, tolerance: float = DEFAULT_TOLERANCE,
             max_residual: float = DEFAULT_MAX_RESIDUAL) -> ValidationResult:
    """Validate an output folder (a run or one image's folder) or a single CSV / metadata JSON / npz."""
    path = Path(path)
    result = ValidationResult(path)
    if not path.exists():
        raise FileNotFoundError(f"nothing to validate: {path} does not exist")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".csv":
            check_csv(result, path, tolerance)
        elif path.name == SUMMARY:
            check_summary(result, path)
        elif path.name == MANIFEST:
            check_manifest(result, path)
        elif suffix == ".json":
            check_meta(result, path, max_residual)
        elif suffix == ".npz":
            check_npz(result, path)
        else:
            result.add("type", path, None, False, "not a CSV, JSON or npz file written by maskdino-lrp")
        return result
    check_temp_files(result, path)
    before = len(result.checks)
    _check_tree(result, path, tolerance, max_residual, top=True)
    if len(result.checks) == before:
        result.add("outputs found", path, 0, False,
                   "no explanation files found (expected *_tokens_*.csv, *_meta.json, summary.json)")
    return result
