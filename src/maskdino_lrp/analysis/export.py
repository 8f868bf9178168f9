"""Writing explanations to disk: token CSVs, per-layer totals, raw arrays and metadata.

Layout of :func:`save_explanation` (``out_dir/<image_name>/``), one set of files per explained query
``qNNN`` (the decoder query index):

- ``qNNN_tokens_<stop>.csv`` for every token stop (``encoder_input``, ``encoder_layer<i>``, ``memory``):
  one row per encoder token, ``level,y,x,relevance,raw`` — ``relevance`` is the raw value divided by
  the sum over all tokens (so the column sums to 1; the format the thesis prototype validated), ``raw``
  the unnormalised relevance;
- ``qNNN_layers.csv``: the target value and every stop's relevance sum (also ``encoder_layer<i>`` /
  ``decoder_layer<i>`` where requested), positive / negative / absolute mass, fraction of the target;
- ``qNNN_relevance.npz``: every stop's raw array (unnormalised; ``pixels`` at the model input's
  resolution, ``input_size``, not the photo's), channel relevance if kept, and the detection's mask as
  COCO compressed RLE at the image size: ``detection_mask_rle`` (the counts string) and
  ``detection_mask_size`` (H, W) — :func:`load_detection_mask` decodes it;
- ``qNNN_meta.json``: image, query, class, scores, box, mask area and mask RLE (``mask_rle``, the COCO
  ``{"size", "counts"}`` form), target value, conservation figures per cut, composite, levels, the
  files above;
- ``qNNN_pixels.png`` / ``qNNN_tokens_<stop>.png`` (format ``png``, see :mod:`.render`) and
  ``image.png`` (the input, longest side at most :data:`~.render.IMAGE_MAX_SIDE` px: ``display_size``
  in the summary);
- ``summary.json`` for the image, written last: an image folder with a summary is complete.

Nothing here is allocated at the photo's size times the number of queries: masks stay RLE, pixel
relevance stays at the model input's size, and images are rendered at a bounded size (see :mod:`.render`).

Every file is written atomically: to a temporary file in the same folder, then ``os.replace``, so an
interrupted run never leaves a half-written file under a final name (only ``.*.tmp`` files, which
:func:`remove_stale_temp_files` clears).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import sys
import unicodedata
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

FORMATS = ("csv", "npz", "png")
DEFAULT_FORMATS = FORMATS
SUMMARY = "summary.json"
FORMAT_VERSION = 2  # 2: detection masks as COCO RLE (was a full-size bool array), pixel maps at input size
_TEMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")
_TOKEN_STOP_RE = re.compile(r"^(encoder_input|encoder_layer\d+|memory)$")


from ..fileio import atomic_write_bytes, atomic_write_text  # noqa: E402


class ExportError(ValueError):
    """An explanation or output location that cannot be written."""


# ----------------------------------------------------------------------------- atomic files
def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """JSON (strict: NaN/Inf become null) written atomically."""
    return atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n")


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the ``.<name>.<random>.tmp`` files an interrupted atomic write left in ``folder``."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in os.scandir(folder):
        if entry.is_file() and _TEMP_RE.match(entry.name):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ----------------------------------------------------------------------------- names
def _name_char_ok(ch: str) -> bool:
    """Letters, marks and digits of any script (where the file system's encoding has them) and ``._-``."""
    if ch in "._-":
        return True
    if unicodedata.category(ch)[0] not in "LMN":
        return False
    try:
        ch.encode(sys.getfilesystemencoding())
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def safe_name(name: str) -> str:
    """A file-system-safe folder / file name: letters and digits of any script (NFC), ``._-``; every run
    of other characters becomes one ``_``; no leading / trailing ``._``."""
    out: list[str] = []
    for ch in unicodedata.normalize("NFC", str(name)):
        if _name_char_ok(ch):
            out.append(ch)
        elif not out or out[-1] != "\0":
            out.append("\0")
    name = "".join(out).replace("\0", "_").strip("._")
    return name or "image"


def query_prefix(query: int, used: set[str] | None = None) -> str:
    """``qNNN`` for a query index (unique within ``used``: a repeated query gets ``qNNN_2`` …)."""
    base = f"q{int(query):03d}"
    if used is None:
        return base
    name, n = base, 1
    while name in used:
        n += 1
        name = f"{base}_{n}"
    used.add(name)
    return name


# ----------------------------------------------------------------------------- what is exported
def token_relevance(expl) -> dict[str, torch.Tensor]:
    """Token stops as (K, T) tensors in :attr:`Explanation.levels` order.

    ``encoder_input`` and ``encoder_layer<i>`` come as they are; ``memory`` is assembled from the
    per-level ``memory@<level>`` maps (the decoder's memory) when every level is present.
    """
    total = sum(lv.size for lv in expl.levels)
    out: dict[str, torch.Tensor] = {}
    for key, value in expl.relevance.items():
        if _TOKEN_STOP_RE.match(key) and value.ndim == 2 and value.shape[1] == total:
            out[key] = value
    if "memory" not in out:
        parts = [expl.relevance.get(f"memory@{i}") for i in range(len(expl.levels))]
        if expl.levels and all(p is not None for p in parts):
            parts = [p.reshape(p.shape[0], -1) for p in parts]
            if all(p.shape[1] == lv.size for p, lv in zip(parts, expl.levels)):
                out["memory"] = torch.cat(parts, dim=1)
    return out


def stop_kind(key: str) -> str:
    if key == "pixels":
        return "pixels"
    if key.startswith(("encoder_input", "encoder_layer", "memory")):
        return "tokens"
    if key.startswith(("query_init", "decoder_layer")):
        return "queries"
    return "spatial"


def normalise(raw: np.ndarray) -> tuple[np.ndarray, float]:
    """``raw / raw.sum()`` in float64 and the sum; all zeros when the sum is 0 or not finite."""
    raw64 = np.asarray(raw, dtype=np.float64)
    total = float(raw64.sum())
    if total == 0.0 or not math.isfinite(total):
        return np.zeros_like(raw64), total
    return raw64 / total, total


def _fmt(dtype: np.dtype) -> str:
    return "{:.17g}" if np.dtype(dtype) == np.float64 else "{:.9g}"


def token_table(expl, stop: str, k: int) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(level names, y, x, raw) per token of row ``k`` at a token stop, in level order."""
    tokens = token_relevance(expl)[stop][k].detach().cpu().numpy()
    names, ys, xs = [], [], []
    for lv in expl.levels:
        yy, xx = np.divmod(np.arange(lv.size), lv.width)
        names.extend([lv.name] * lv.size)
        ys.append(yy)
        xs.append(xx)
    return names, np.concatenate(ys), np.concatenate(xs), tokens, np.arange(tokens.size)


def token_csv_text(expl, stop: str, k: int) -> tuple[str, float]:
    """The ``level,y,x,relevance,raw`` CSV of one query row and token stop, and the raw sum."""
    names, ys, xs, raw, _ = token_table(expl, stop, k)
    norm, total = normalise(raw)
    fraw = _fmt(raw.dtype)
    lines = ["level,y,x,relevance,raw"]
    lines.extend(f"{n},{y},{x},{v:.12g},{fraw.format(r)}" for n, y, x, v, r in zip(names, ys.tolist(), xs.tolist(),
                                                                                  norm.tolist(), raw.tolist()))
    return "\n".join(lines) + "\n", total


def layer_rows(expl, k: int) -> list[dict]:
    """Target value and every stop's relevance sum for row ``k`` (plus the assembled memory cut)."""
    target = float(expl.target_values[k])
    rows = [{"stop": "target", "kind": "target", "elements": 1, "sum": target, "positive": max(target, 0.0),
             "negative": min(target, 0.0), "abs_sum": abs(target), "fraction_of_target": 1.0}]

    def row(name: str, kind: str, values: torch.Tensor) -> dict:
        v = values.detach().double().flatten()
        s = float(v.sum())
        return {"stop": name, "kind": kind, "elements": int(v.numel()), "sum": s,
                "positive": float(v.clamp(min=0).sum()), "negative": float(v.clamp(max=0).sum()),
                "abs_sum": float(v.abs().sum()), "fraction_of_target": s / target if target else float("nan")}

    for key, value in expl.relevance.items():
        rows.append(row(key, stop_kind(key), value[k]))
    parts = [v[k].flatten() for key, v in expl.relevance.items() if key.startswith(("memory@", "lateral"))]
    if parts and "memory" not in expl.relevance:
        rows.append(row("memory", "cut", torch.cat([p.double() for p in parts])))
    return rows


def level_shares(expl, tokens: Mapping[str, torch.Tensor], k: int) -> dict[str, dict[str, float]]:
    """Per token stop, the share of row ``k``'s relevance on each encoder level (the CSV's normalised
    ``relevance`` summed over the level's tokens; the shares sum to 1)."""
    out = {}
    for stop, values in tokens.items():
        norm, _ = normalise(values[k].detach().cpu().numpy())
        out[stop] = {lv.name: float(norm[lv.start:lv.start + lv.size].sum()) for lv in expl.levels}
    return out


def layers_csv_text(expl, k: int) -> str:
    cols = ("stop", "kind", "elements", "sum", "positive", "negative", "abs_sum", "fraction_of_target")
    lines = [",".join(cols)]
    for r in layer_rows(expl, k):
        lines.append(",".join(str(r[c]) if c in ("stop", "kind", "elements") else f"{r[c]:.12g}" for c in cols))
    return "\n".join(lines) + "\n"


def conservation_for(expl, k: int) -> dict[str, dict[str, float]]:
    """Per complete cut: target, relevance at the cut, ledger shares, residual, |residual| / |target| and
    |residual| / max(|target|, |relevance at the cut|)."""
    out = {}
    for cut, row in expl.conservation.items():
        entry = {name: float(values[k]) for name, values in row.items()}
        t = entry.get("target", float("nan"))
        residual = abs(entry.get("residual", float("nan")))
        entry["relative_error"] = residual / abs(t) if t else float("inf")
        # relative to the relevance that flows: a logit near 0 can carry a large relevance mass whose small
        # non-conserved part would look huge against |target| alone
        scale = max(abs(t), abs(entry.get("total", 0.0)))
        entry["residual_share"] = residual / scale if scale else float("inf")
        out[cut] = entry
    return out


def compact_mask(mask: Any):
    """A detection's mask as :class:`~maskdino_lrp.model.masks.CompactMask` (from RLE, COCO dict or dense array)."""
    from ..model.masks import CompactMask

    return CompactMask.coerce(mask)


def load_detection_mask(path: str | os.PathLike) -> np.ndarray | None:
    """The dense (H, W) bool detection mask stored in a ``qNNN_relevance.npz`` or ``qNNN_meta.json``
    (COCO RLE; format version 1's full-size ``detection_mask`` array is read as it is); None if absent."""
    from ..model.masks import CompactMask

    path = Path(path)
    if path.suffix == ".json":
        rle = json.loads(path.read_text()).get("mask_rle")
        return None if rle is None else CompactMask.from_coco(rle).decode()
    with np.load(path, allow_pickle=False) as data:
        if "detection_mask_rle" in data.files:
            return CompactMask(data["detection_mask_size"].tolist(), str(data["detection_mask_rle"])).decode()
        if "detection_mask" in data.files:
            return np.asarray(data["detection_mask"], dtype=bool)
    return None


def _levels(expl) -> list[dict]:
    return [{"name": lv.name, "stride": lv.stride, "height": lv.height, "width": lv.width, "start": lv.start}
            for lv in expl.levels]


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """The ``.npz`` (what ``np.savez`` writes) with fixed member dates: the same arrays give the same bytes,
    whenever and wherever they are written (np.savez stamps each member with the current time)."""
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, value in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0)), member.getvalue())
    return buf.getvalue()


# ----------------------------------------------------------------------------- the writers
def save_explanation(expl, out_dir: str | os.PathLike, image_name: str | None = None,
                     formats: Sequence[str] | str = DEFAULT_FORMATS, source: str | os.PathLike | None = None,
                     extra: Mapping[str, Any] | None = None) -> dict:
    """Write every query of ``expl`` to ``out_dir/<image_name>/`` (see the module docstring); returns the summary.

    ``formats``: any of ``csv``, ``npz``, ``png`` (metadata JSON and ``summary.json`` are always
    written); ``source`` is recorded as the image's origin; ``extra`` is merged into the summary.
    Usable as a method: ``Explanation.save = save_explanation``.
    """
    if isinstance(formats, str):
        formats = [f.strip() for f in formats.split(",") if f.strip()]
    formats = tuple(dict.fromkeys(FORMATS if "all" in formats else formats))
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ExportError(f"unknown output format {bad[0]!r}; choose from {', '.join(FORMATS)} or all")
    name = safe_name(image_name or expl.meta.get("image_name") or "image")
    folder = Path(out_dir) / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create output folder {folder}: {exc.strerror or exc}") from exc
    tokens = token_relevance(expl)
    files: list[str] = []
    queries: list[dict] = []
    used: set[str] = set()
    common = {
        "image": name, "source": str(source) if source is not None else expl.meta.get("source"),
        "image_size": list(expl.image.shape[:2]), "input_size": list(expl.input_size),
        "pixels_size": list(expl.relevance["pixels"].shape[1:]) if "pixels" in expl.relevance else None,
        "composite": expl.composite, "target": expl.target, "stops": list(expl.relevance),
        "levels": _levels(expl),
    }
    if "png" in formats:
        from .render import save_image

        from .render import IMAGE_MAX_SIDE, display_size

        save_image(expl.image, folder / "image.png", max_side=IMAGE_MAX_SIDE)
        common["display_size"] = list(display_size(*expl.image.shape[:2], IMAGE_MAX_SIDE))
        files.append("image.png")
    for k, query in enumerate(expl.queries.tolist()):
        prefix = query_prefix(query, used)
        det = dict(expl.detections[k]) if k < len(expl.detections) else {"query": query}
        mask = compact_mask(det.pop("mask", None))
        qfiles: dict[str, Any] = {"meta": f"{prefix}_meta.json"}
        token_sums = {}
        if "csv" in formats:
            qfiles["tokens"] = {}
            for stop in tokens:
                text, total = token_csv_text(expl, stop, k)
                token_sums[stop] = total
                fname = f"{prefix}_tokens_{stop}.csv"
                atomic_write_text(folder / fname, text)
                qfiles["tokens"][stop] = fname
            qfiles["layers"] = f"{prefix}_layers.csv"
            atomic_write_text(folder / qfiles["layers"], layers_csv_text(expl, k))
        else:
            token_sums = {stop: float(t[k].double().sum()) for stop, t in tokens.items()}
        if "npz" in formats:
            arrays = {key: v[k].detach().cpu().numpy() for key, v in expl.relevance.items()}
            arrays.update({f"channels:{key}": v[k].detach().cpu().numpy() for key, v in expl.channel_relevance.items()})
            if mask is not None:  # COCO RLE: a few KB where the dense mask of a 24 MP photo takes 24 MB
                arrays["detection_mask_rle"] = np.array(mask.counts.decode("ascii"))
                arrays["detection_mask_size"] = np.array(mask.size, dtype=np.int64)
            qfiles["npz"] = f"{prefix}_relevance.npz"
            atomic_write_bytes(folder / qfiles["npz"], _npz_bytes(arrays))
        if "png" in formats:
            from .render import render_pixels, render_tokens

            if "pixels" in expl.relevance:
                qfiles["pixels_png"] = f"{prefix}_pixels.png"
                render_pixels(expl, k, folder / qfiles["pixels_png"])
            qfiles["tokens_png"] = {}
            for stop in tokens:
                fname = f"{prefix}_tokens_{stop}.png"
                render_tokens(expl, stop, k, folder / fname)
                qfiles["tokens_png"][stop] = fname
        conservation = conservation_for(expl, k)
        meta = {
            **common, "row": k, "query": int(query), "label": int(expl.labels[k]),
            "class": det.get("class", str(int(expl.labels[k]))), "class_score": det.get("class_score"),
            "score": det.get("score"), "box": det.get("box"),
            "mask_area": mask.area if mask is not None else None,
            "mask_rle": mask.to_coco() if mask is not None else None,
            "target_value": float(expl.target_values[k]), "conservation": conservation,
            "token_sums": token_sums, "level_shares": level_shares(expl, tokens, k),
            "layer_fractions": {r["stop"]: r["fraction_of_target"] for r in layer_rows(expl, k)
                                if r["kind"] != "target"},
            "dtype": str(next(iter(expl.relevance.values())).dtype).replace("torch.", ""),
            "files": qfiles, "meta": {k2: v for k2, v in expl.meta.items() if k2 not in ("image_name", "source")},
            "format_version": FORMAT_VERSION,
        }
        atomic_write_json(folder / qfiles["meta"], meta)
        for v in qfiles.values():
            files.extend(v.values() if isinstance(v, dict) else [v])
        queries.append({key: meta[key] for key in ("row", "query", "label", "class", "class_score", "score", "box",
                                                   "mask_area", "target_value", "level_shares", "layer_fractions")}
                       | {"conservation": {cut: c["relative_error"] for cut, c in conservation.items()},
                          "files": qfiles})
    from .. import __version__

    summary = {
        **common, "tool": f"maskdino-lrp {__version__}", "format_version": FORMAT_VERSION, "formats": list(formats),
        "num_queries": len(queries), "queries": queries, "files": files,
        "timing": {k2: v for k2, v in expl.meta.items() if k2.endswith("seconds")},
        **(dict(extra) if extra else {}),
    }
    atomic_write_json(folder / SUMMARY, summary)
    return summary


def explanation_to_csv(expl, path: str | os.PathLike, stops: Sequence[str] | None = None) -> Path:
    """One CSV of token relevance for every query and token stop: ``query,stop,level,y,x,relevance,raw``.

    ``relevance`` is normalised to sum 1 within each (query, stop). Usable as ``Explanation.to_csv``.
    """
    tokens = token_relevance(expl)
    chosen = list(tokens) if stops is None else list(stops)
    missing = [s for s in chosen if s not in tokens]
    if missing:
        raise ExportError(f"no token relevance for stop {missing[0]!r}; token stops here: {', '.join(tokens) or 'none'}")
    lines = ["query,stop,level,y,x,relevance,raw"]
    for k, query in enumerate(expl.queries.tolist()):
        for stop in chosen:
            names, ys, xs, raw, _ = token_table(expl, stop, k)
            norm, _ = normalise(raw)
            fraw = _fmt(raw.dtype)
            lines.extend(f"{query},{stop},{n},{y},{x},{v:.12g},{fraw.format(r)}"
                         for n, y, x, v, r in zip(names, ys.tolist(), xs.tolist(), norm.tolist(), raw.tolist()))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, "\n".join(lines) + "\n")


def plot_explanation(expl, path: str | os.PathLike, k: int = 0, stop: str | None = None) -> Path:
    """A PNG of query row ``k``: the pixel heatmap over the image, or token maps of ``stop``.

    Usable as ``Explanation.plot``.
    """
    from .render import render_pixels, render_tokens

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if stop is None and "pixels" in expl.relevance:
        return render_pixels(expl, k, path)
    tokens = token_relevance(expl)
    stop = stop or next(iter(tokens), None)
    if stop is None:
        raise ExportError("nothing to plot: the explanation has neither pixel nor token relevance")
    return render_tokens(expl, stop, k, path)
