"""The data-set summary of a run folder, beside the per-image outputs.

- ``dataset_explanations.csv``: one row per explanation (image × explained query): output folder, source
  key, COCO image id (where the image came from an annotation file), query, label, class, score, target,
  target value and the relative conservation error per complete cut;
- ``dataset_classes.csv``: per class, the number of explanations and images and the mean over its
  explanations of the relevance share on each encoder level at each token stop (``share:<stop>:<level>``,
  summing to 1 over the levels of a stop), and per token / query stop the relevance reaching it as a
  fraction of the target (``fraction:<stop>``: Σ relevance at the stop / Σ target over the class's
  explanations, so a near-zero target does not swamp the mean; ``encoder_layer<i>``, ``decoder_layer<i>``,
  … as the run's stops kept them: ``--stops …,encoder_layers,decoder_layers``).

The rows follow the images' source keys and the queries' order, so the files depend on the outputs
alone, not on the order in which a run (or its workers) finished the images. Figures come from each
image's ``summary.json`` (written since ``level_shares`` / ``layer_fractions`` exist), else from its CSVs.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterator

from ..fileio import atomic_write_text

EXPLANATIONS = "dataset_explanations.csv"
CLASSES = "dataset_classes.csv"
_LAYER_STOP = re.compile(r"^(encoder_input|encoder_layer\d+|memory|query_init|decoder_layer\d+)$")

__all__ = ["EXPLANATIONS", "CLASSES", "dataset_rows", "write_dataset_summary"]


def _num(value: Any) -> str:
    if value is None:
        return ""
    value = float(value)
    return "" if not math.isfinite(value) else f"{value:.9g}"


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _shares_from_csv(folder: Path, files: dict) -> tuple[dict, dict]:
    """``level_shares`` and ``layer_fractions`` of a query from its token and layer CSVs (older outputs)."""
    shares: dict[str, dict[str, float]] = {}
    for stop, name in (files.get("tokens") or {}).items():
        per_level: dict[str, float] = {}
        try:
            with open(folder / name, newline="", encoding="utf-8") as f:
                for row in csv.DictReader(f):
                    per_level[row["level"]] = per_level.get(row["level"], 0.0) + float(row["relevance"])
        except (OSError, KeyError, ValueError):
            continue
        shares[stop] = per_level
    fractions: dict[str, float] = {}
    if files.get("layers"):
        try:
            with open(folder / files["layers"], newline="", encoding="utf-8") as f:
                fractions = {row["stop"]: float(row["fraction_of_target"]) for row in csv.DictReader(f)
                             if row.get("kind") != "target"}
        except (OSError, KeyError, ValueError):
            fractions = {}
    return shares, fractions


def dataset_rows(out_dir: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """One dict per explanation of every finished image the run's manifest lists, by source key and query:
    the index columns plus ``level_shares`` and ``layer_fractions``."""
    out = Path(out_dir)
    manifest = _read_json(out / "manifest.json") or {}
    images = manifest.get("images", {})
    for key in sorted(images):
        record = images[key]
        if not isinstance(record, dict) or record.get("status") != "done" or not record.get("output"):
            continue
        folder = out / str(record["output"])
        summary = _read_json(folder / "summary.json")
        if summary is None:
            continue
        for q in summary.get("queries", []):
            shares, fractions = q.get("level_shares"), q.get("layer_fractions")
            if shares is None or fractions is None:
                shares, fractions = _shares_from_csv(folder, q.get("files", {}))
            yield {"image": record["output"], "source_key": key, "image_id": summary.get("image_id",
                                                                                        record.get("image_id")),
                   "query": q.get("query"), "label": q.get("label"), "class": q.get("class"), "score": q.get("score"),
                   "class_score": q.get("class_score"), "target": summary.get("target"),
                   "target_value": q.get("target_value"), "conservation": q.get("conservation") or {},
                   "level_shares": shares, "layer_fractions": fractions}


def _ratio_of_sums(group: list[dict], stop: str) -> str:
    """Σ relevance at ``stop`` / Σ target over the explanations that kept the stop."""
    pairs = [(g["layer_fractions"].get(stop), g["target_value"]) for g in group]
    pairs = [(f * t, t) for f, t in pairs if f is not None and t is not None and math.isfinite(f * t)]
    total = sum(t for _, t in pairs)
    return _num(sum(r for r, _ in pairs) / total) if pairs and total else ""


def _csv_text(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def write_dataset_summary(out_dir: str | os.PathLike) -> list[Path]:
    """Write ``dataset_explanations.csv`` and ``dataset_classes.csv`` into the run folder (atomically)."""
    out = Path(out_dir)
    rows = list(dataset_rows(out))
    cuts = list(dict.fromkeys(cut for r in rows for cut in r["conservation"]))
    index = [[r["image"], r["source_key"], "" if r["image_id"] is None else r["image_id"], r["query"], r["label"],
              r["class"], _num(r["score"]), _num(r["class_score"]), r["target"], _num(r["target_value"]),
              *(_num(r["conservation"].get(c)) for c in cuts)] for r in rows]
    header = ["image", "source_key", "image_id", "query", "label", "class", "score", "class_score", "target",
              "target_value", *(f"conservation:{c}" for c in cuts)]
    atomic_write_text(out / EXPLANATIONS, _csv_text(header, index))

    share_cols = list(dict.fromkeys((stop, level) for r in rows for stop, levels in r["level_shares"].items()
                                    for level in levels))
    fraction_cols = list(dict.fromkeys(stop for r in rows for stop in r["layer_fractions"] if _LAYER_STOP.match(stop)))
    classes: dict[tuple[str, Any], list[dict]] = {}
    for r in rows:
        classes.setdefault((str(r["class"]), r["label"]), []).append(r)

    def mean(values: list[float]) -> str:
        values = [v for v in values if v is not None and math.isfinite(v)]
        return _num(sum(values) / len(values)) if values else ""

    table = []
    by_label = lambda item: (item[0][1] if isinstance(item[0][1], int) else float("inf"), item[0][0])  # noqa: E731
    for (name, label), group in sorted(classes.items(), key=by_label):
        table.append([name, label, len(group), len({g["source_key"] for g in group}),
                      mean([g["target_value"] for g in group]),
                      *(mean([g["level_shares"].get(stop, {}).get(level) for g in group])
                        for stop, level in share_cols),
                      *(_ratio_of_sums(group, stop) for stop in fraction_cols)])
    header = ["class", "label", "explanations", "images", "mean_target_value",
              *(f"share:{stop}:{level}" for stop, level in share_cols), *(f"fraction:{stop}" for stop in fraction_cols)]
    atomic_write_text(out / CLASSES, _csv_text(header, table))
    return [out / EXPLANATIONS, out / CLASSES]
