"""Checks on written explanations (the thesis prototype's validation), for a run folder or one file.

On every token CSV (``level,y,x,relevance,raw``, or with ``query,stop`` columns: per query and stop):
the ``relevance`` column sums to 1 within ``tolerance``; no NaN/Inf; ``relevance × Σraw`` reproduces
``raw``; and distribution statistics (informational): entropy of |R| (nats), entropy normalised by
log N, the share of Σ|R| held by the top 1% tokens, positive and negative mass (shares of Σ|R|).
On the metadata: the target is finite; at each complete cut |residual| / max(|target|, |relevance at the
cut|) ≤ ``max_residual`` (relative to the relevance that flows: a logit near 0 can carry much relevance);
every file the metadata and ``summary.json`` reference exists; raw arrays (``.npz``) are finite.
On the manifest: every image marked done has its summary; failed images are listed.

``validate(path)`` returns a :class:`ValidationResult`: a table of checks (name, file, value, ok,
message) and ``ok``.
"""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .export import SUMMARY

DEFAULT_TOLERANCE = 1e-4
# |residual| / |target| allowed at a complete cut: the default composite's epsilon / AttnLRP rules are
# not exactly conservative (on random weights about 0.1-0.2 of the target goes to the residual)
DEFAULT_MAX_RESIDUAL = 0.5
MANIFEST = "manifest.json"
TOKEN_COLUMNS = ("level", "y", "x", "relevance")


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


def check_csv(result: ValidationResult, path: Path, tolerance: float) -> None:
    try:
        header, rows = _read_csv(path)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        result.add("readable", path, None, False, f"cannot read CSV: {exc}")
        return
    if "relevance" in header:
        check_token_csv(result, path, header, rows, tolerance)
    elif "stop" in header and "sum" in header:
        check_layers_csv(result, path, header, rows)
    else:
        result.add("columns", path, None, False,
                   f"not a maskdino-lrp CSV (header {','.join(header) or 'empty'}); expected {','.join(TOKEN_COLUMNS)},raw")


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


def check_meta(result: ValidationResult, path: Path, max_residual: float) -> None:
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
        err = row.get("residual_share", row.get("relative_error")) if isinstance(row, dict) else None
        ok = isinstance(err, (int, float)) and math.isfinite(err) and err <= max_residual
        msg = "" if ok else (f"|residual|/max(|target|, |relevance at cut|) = {err:.3g} > {max_residual:g} at cut {cut!r}"
                             if isinstance(err, (int, float)) and math.isfinite(err)
                             else f"conservation figures at cut {cut!r} are missing, NaN or Inf")
        result.add(f"conservation {cut}", path, err, ok, msg)
    _check_files_exist(result, path, meta["files"])
    npz = meta["files"].get("npz") if isinstance(meta["files"], dict) else None
    if npz and (path.parent / npz).is_file():
        check_npz(result, path.parent / npz)


def check_npz(result: ValidationResult, path: Path) -> None:
    try:
        with np.load(path, allow_pickle=False) as data:
            bad = [k for k in data.files if np.issubdtype(data[k].dtype, np.floating) and not np.isfinite(data[k]).all()]
            n = len(data.files)
    except (OSError, ValueError) as exc:
        result.add("readable", path, None, False, f"cannot read arrays: {exc}")
        return
    result.add("finite", path, n - len(bad), not bad,
               "" if not bad else f"NaN/Inf in array(s) {', '.join(bad[:5])}")


def check_summary(result: ValidationResult, path: Path) -> None:
    summary = _load_json(result, path)
    if summary is None:
        return
    _check_files_exist(result, path, summary.get("files", []))


def check_manifest(result: ValidationResult, path: Path) -> None:
    manifest = _load_json(result, path)
    if manifest is None:
        return
    images = manifest.get("images", {})
    done = [n for n, r in images.items() if r.get("status") == "done"]
    missing = [n for n in done if not (path.parent / images[n].get("output", n) / SUMMARY).is_file()]
    result.add("finished images complete", path, len(done), not missing,
               "" if not missing else f"{len(missing)} image(s) marked done have no summary.json: {', '.join(missing[:5])}")
    failed = {n: r for n, r in images.items() if r.get("status") == "failed"}
    result.add("failed images", path, len(failed), True,
               "none" if not failed else "; ".join(f"{n}: {r.get('error', '?')}" for n, r in list(failed.items())[:5]))


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
    for root, dirs, files in os.walk(path):
        dirs.sort()
        root_path = Path(root)
        for name in sorted(files):
            f = root_path / name
            if name.startswith("."):
                continue
            if name.endswith(".csv"):
                check_csv(result, f, tolerance)
            elif name == SUMMARY:
                check_summary(result, f)
            elif name == MANIFEST:
                check_manifest(result, f)
            elif name.endswith("_meta.json"):
                check_meta(result, f, max_residual)
    if not result.checks:
        result.add("outputs found", path, 0, False,
                   "no explanation files found (expected *_tokens_*.csv, *_meta.json, summary.json)")
    return result
