"""Compare explanation methods on the synthetic shapes: every method × metric, mean and 95 % CI.

    >>> from maskdino_lrp.eval.run import evaluate
    >>> report = evaluate("demo", checkpoint=None, n_images=20, seed=0, out_dir="eval_out")

    python -m maskdino_lrp.eval --config demo --images 20 --seed 0 --out eval_out

What is evaluated: for each image ``generate_sample(seed, i)`` the model's detections are matched to
the ground-truth objects (Hungarian on box IoU; a pair needs score ≥ ``score_threshold``, IoU ≥
``iou_threshold`` and, by default, the right class). Each matched (image, detection) pair is one
unit: its query and predicted label are explained by every method (the class logit), and every
metric of :mod:`maskdino_lrp.eval.metrics` is computed on the map at the model input size against
the matched object's mask and box (nearest-neighbour resized to the model input when sizes differ).
The random-order deletion / insertion curves of the same pairs are the baseline; the *gaps* are
paired per pair. Means carry Student-t 95 % intervals over pairs (N given per cell where it differs).

Outputs in ``out_dir`` (each written atomically): ``results.md`` and ``results.csv`` (method ×
metric: mean, CI, N), ``pairs.csv`` (every pair × method, raw), ``curves.csv`` and
``deletion.png`` / ``insertion.png`` (mean curves), ``summary.md``, ``settings.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..fileio import atomic_write_bytes
from . import metrics as M
from .methods import DEFAULT_METHODS, LRP_METHODS, Method, MethodError, available_methods, captum_available, get_method

log = logging.getLogger(__name__)

__all__ = ["EvalSettings", "Pair", "match_detections", "evaluate", "main", "METRICS"]

# metric key → (group, label, direction: +1 higher is better, -1 lower is better)
METRICS: dict[str, tuple[str, str, int]] = {
    "mass_accuracy": ("localisation", "relevance mass acc.", +1),
    "rank_accuracy": ("localisation", "relevance rank acc.", +1),
    "pointing_game": ("localisation", "pointing game", +1),
    "pointing_game_tol": ("localisation", "pointing game (tol)", +1),
    "energy_pointing_game": ("localisation", "energy pointing game", +1),
    "leak": ("localisation", "leak to other objects", -1),
    "deletion_auc": ("faithfulness", "deletion AUC", -1),
    "deletion_gap": ("faithfulness", "deletion gap vs random", +1),
    "insertion_auc": ("faithfulness", "insertion AUC", +1),
    "insertion_gap": ("faithfulness", "insertion gap vs random", +1),
    "aopc": ("faithfulness", "AOPC (deletion)", +1),
    "deletion_auc_fixed_query": ("faithfulness", "deletion AUC (fixed query)", -1),
    "token_deletion_auc": ("faithfulness: encoder tokens", "token deletion AUC", -1),
    "token_deletion_gap": ("faithfulness: encoder tokens", "token deletion gap vs random", +1),
    "token_insertion_auc": ("faithfulness: encoder tokens", "token insertion AUC", +1),
    "token_insertion_gap": ("faithfulness: encoder tokens", "token insertion gap vs random", +1),
    "token_aopc": ("faithfulness: encoder tokens", "token AOPC (deletion)", +1),
    "conservation_error": ("sanity and cost", "conservation error", -1),
    "bias_share": ("sanity and cost", "bias share", 0),
    "positional_share": ("sanity and cost", "positional share", 0),
    "residual_share": ("sanity and cost", "residual share", 0),
    "randomisation_spearman": ("sanity and cost", "randomisation rank corr.", -1),
    "seconds": ("sanity and cost", "seconds / explanation", -1),
    "peak_memory_mib": ("sanity and cost", "peak memory MiB", -1),
}


@dataclass
class EvalSettings:
    """Everything that decides the numbers; written to settings.json and summary.md."""

    config: str = "demo"
    checkpoint: str | None = None
    n_images: int = 20
    seed: int = 1  # the shipped demo model was trained on seed 0's images
    image_size: int = 160
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    steps: int = 20  # deletion / insertion steps from 0 % to 100 % (20 → 5 % each)
    units: list[str] = field(default_factory=lambda: ["pixels"])  # what deletion / insertion removes
    max_fraction: float = 1.0  # the curves stop there: steps of max_fraction / steps
    replacement: str = "mean"
    blur_sigma: float = 5.0
    aopc_steps: int = 10  # AOPC over the first k steps (with steps=20: the first 50 %)
    pointing_tolerance: float = 2.0
    score_threshold: float = 0.3
    iou_threshold: float = 0.5
    require_class: bool = True
    max_pairs_per_image: int | None = None
    randomisation: bool = True
    batch_size: int = 8
    device: str = "cpu"
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Pair:
    """One explained detection matched to a ground-truth object."""

    image: int
    query: int
    label: int
    gt: int
    iou: float
    score: float


# ----------------------------------------------------------------------------- matching
def _box_iou_xyxy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    return inter / np.maximum(area_a[:, None] + area_b[None] - inter, 1e-12)


def match_detections(detections: Any, gt_boxes: np.ndarray, gt_classes: np.ndarray, image: int = 0,
                     score_threshold: float = 0.3, iou_threshold: float = 0.5, require_class: bool = True
                     ) -> list[Pair]:
    """Detections ↔ ground truth by the Hungarian algorithm on box IoU (one detection per object).

    A query is kept once (its best-scoring label); pairs below the score or IoU thresholds, or with
    the wrong class when ``require_class``, are dropped. Sorted by detection score.
    """
    from scipy.optimize import linear_sum_assignment

    seen: set[int] = set()
    dets = []
    for q, label, score, box in zip(detections.query_indices.tolist(), detections.labels.tolist(),
                                    detections.scores.tolist(), detections.boxes.tolist()):
        if q in seen or score < score_threshold:
            continue
        seen.add(q)
        dets.append((q, label, score, box))
    if not dets or len(gt_boxes) == 0:
        return []
    iou = _box_iou_xyxy(np.asarray([d[3] for d in dets], dtype=np.float64), np.asarray(gt_boxes, dtype=np.float64))
    allowed = iou >= iou_threshold
    if require_class:
        allowed &= np.asarray([d[1] for d in dets])[:, None] == np.asarray(gt_classes)[None, :]
    cost = np.where(allowed, -iou, 1e6)
    rows, cols = linear_sum_assignment(cost)
    pairs = [Pair(image, dets[r][0], dets[r][1], int(c), float(iou[r, c]), float(dets[r][2]))
             for r, c in zip(rows, cols) if allowed[r, c]]
    return sorted(pairs, key=lambda p: -p.score)


# ----------------------------------------------------------------------------- io
def _atomic_write(path: Path, data: str | bytes) -> None:
    """Write via a temporary file in the same folder and rename: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data.encode() if isinstance(data, str) else data)


def _csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if (isinstance(v, float) and math.isnan(v)) else v for v in row])
    return buf.getvalue()


# ----------------------------------------------------------------------------- the run
def _resolve_checkpoint(config: str, checkpoint: str | None) -> str | None:
    if checkpoint is not None or config != "demo":
        return checkpoint
    shipped = Path(__file__).resolve().parents[1] / "weights" / "demo.safetensors"
    return str(shipped) if shipped.is_file() else None


def _gt_at_input(sample: Any, prepared: Any) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth masks (N, h, w) and xyxy boxes at the model input size (nearest-neighbour masks)."""
    rh, rw = prepared.resized_size
    h, w = sample.masks.shape[-2:]
    masks = sample.masks
    if (h, w) != (rh, rw):
        t = torch.from_numpy(masks.astype(np.float32))[None]
        masks = F.interpolate(t, size=(rh, rw), mode="nearest-exact")[0].numpy() > 0.5
    boxes = np.asarray(sample.boxes, dtype=np.float64) * np.array([rw / w, rh / h, rw / w, rh / h])
    return masks.astype(bool), boxes


def _pixel_image(model: Any, prepared: Any) -> torch.Tensor:
    """The model input in pixel values (3, h, w), model channel order, padding cropped."""
    rh, rw = prepared.resized_size
    return (prepared.tensor[0, :, :rh, :rw] * model.pixel_std + model.pixel_mean).detach()


def _random_model(settings: EvalSettings) -> Any:
    """The same architecture with fresh random weights (Adebayo et al.'s full randomisation)."""
    from .. import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed + 7919)
        model = build_model(settings.config)
    return model.to(settings.device).eval()


def _method_metrics(attribution_map: torch.Tensor, extras: dict, pair: Pair, masks: np.ndarray, boxes: np.ndarray,
                    settings: EvalSettings) -> dict[str, float]:
    e = attribution_map.numpy()
    mask = masks[pair.gt]
    others = np.delete(masks, pair.gt, axis=0)
    row = {
        "mass_accuracy": M.relevance_mass_accuracy(e, mask),
        "rank_accuracy": M.relevance_rank_accuracy(e, mask),
        "pointing_game": M.pointing_game(e, mask),
        "pointing_game_tol": M.pointing_game(e, mask, settings.pointing_tolerance),
        "energy_pointing_game": M.energy_pointing_game(e, boxes[pair.gt]),
        "leak": M.leak_to_other_objects(e, mask, others),
    }
    if "target" in extras and "total" in extras:
        target = extras["target"]
        row["conservation_error"] = M.conservation_error(extras["total"], target)
        for key in ("bias", "positional", "residual"):
            if key in extras:
                row[f"{key}_share"] = extras[key] / target if abs(target) > 1e-12 else math.nan
    return row


def evaluate(config: str = "demo", checkpoint: str | None = None, n_images: int = 20, seed: int = 1,
             out_dir: str | Path = "eval_out", methods: Sequence[str] | None = None, steps: int = 20,
             progress: bool = True, model: Any = None, shard: tuple[int, int] | None = None, resume: bool = True,
             aggregate_only: bool = False, **options: Any) -> dict[str, Any]:
    """Run the comparison and write the tables, curves and summary to ``out_dir``; returns the results.

    ``options`` are further :class:`EvalSettings` fields (replacement, image_size, score_threshold, …).
    ``model`` may be given directly (then ``config`` still names the architecture for the
    randomisation test). Each image's results are kept in ``out_dir/parts``: a rerun of the same
    command skips the images already done (``resume=False`` redoes them), and ``shard=(i, n)`` does only
    the images with ``index % n == i`` so n processes can share a run; every process aggregates all
    the images done so far, so the one that finishes last writes the complete table;
    ``aggregate_only`` evaluates nothing and writes the tables of what is there (a progress report).
    """
    from .. import build_model
    from ..data.shapes import ShapesConfig

    if shard is not None and not (len(shard) == 2 and 0 <= shard[0] < shard[1]):
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard!r}")

    requested = list(methods) if methods is not None else list(DEFAULT_METHODS)
    runnable = available_methods()
    skipped = {m: "captum not installed (pip install --no-deps captum)" for m in requested
               if m not in runnable and m in ("integrated-gradients", "smoothgrad")}
    unknown = [m for m in requested if m not in runnable and m not in skipped]
    if unknown:
        raise MethodError(f"unknown method(s) {unknown}; available: {', '.join(runnable)}")
    settings = EvalSettings(config=str(config), checkpoint=None if checkpoint is None else str(checkpoint),
                            n_images=n_images, seed=seed, steps=steps,
                            methods=[m for m in requested if m not in skipped], **options)
    if settings.replacement not in M.REPLACEMENTS:
        raise ValueError(f"replacement must be one of {list(M.REPLACEMENTS)}, got {settings.replacement!r}")
    if not 0.0 < settings.max_fraction <= 1.0:
        raise ValueError(f"--max-fraction must be in (0, 1], got {settings.max_fraction}")
    if settings.n_images < 1 or settings.steps < 1:
        raise ValueError(f"--images and --steps must be at least 1, got {settings.n_images} and {settings.steps}")
    if not settings.units or set(settings.units) - set(UNITS):
        raise ValueError(f"units must be a non-empty subset of {list(UNITS)}, got {settings.units!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = [f"`{m}` skipped: {why}" for m, why in skipped.items()]

    if model is None:
        settings.checkpoint = _resolve_checkpoint(settings.config, settings.checkpoint)
        if settings.checkpoint is None:
            notes.append("no checkpoint: the model has **random weights**; the numbers say nothing about a trained model")
        if not aggregate_only:  # before the parts folder is stamped: a bad config or checkpoint leaves nothing behind
            model = build_model(settings.config, checkpoint=settings.checkpoint)
            if settings.checkpoint is None:
                log.warning("evaluating %s with random weights (no checkpoint)", settings.config)
    parts = _PartStore(out / "parts", settings)
    indices = [i for i in range(settings.n_images) if shard is None or i % shard[1] == shard[0]]
    todo = [] if aggregate_only else [i for i in indices if not (resume and parts.has(i))]
    if len(todo) < len(indices):
        log.info("resuming: %d of %d images already done in %s", len(indices) - len(todo), len(indices), parts.folder)
    if todo:
        model = model.to(settings.device).eval()
        replace = M.REPLACEMENTS[settings.replacement]
        if settings.replacement == "blur":
            replace = lambda img: M.blur_replacement(img, settings.blur_sigma)  # noqa: E731
        context = _ImageContext(settings, model, _random_model(settings) if settings.randomisation else None,
                                {name: get_method(name, **settings.method_options.get(name, {}))
                                 for name in settings.methods},
                                ShapesConfig(image_size=settings.image_size), replace)
        bar = _progress(todo, progress)
        for index in bar:
            parts.write(index, _evaluate_image(index, context))
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(pairs=context.n_pairs)

    done = [i for i in range(settings.n_images) if parts.has(i)]
    records: list[dict[str, Any]] = []
    curves: dict[str, dict[str, list[np.ndarray]]] = {name: {} for name in [*settings.methods, RANDOM_ORDER]}
    failures: dict[str, int] = {}
    images_without_pairs = n_pairs = 0
    elapsed = 0.0
    for index in done:
        part = parts.read(index)
        records.extend(part["records"])
        for name, by_mode in part["curves"].items():
            for mode, values in by_mode.items():
                curves.setdefault(name, {}).setdefault(mode, []).extend(np.asarray(v) for v in values)
        for name, count in part["failures"].items():
            failures[name] = failures.get(name, 0) + count
        notes.extend(n for n in part["notes"] if n not in notes)
        images_without_pairs += part["n_pairs"] == 0
        n_pairs += part["n_pairs"]
        elapsed += part["seconds"]
    missing = settings.n_images - len(done)
    if missing:
        notes.append(f"**incomplete**: {len(done)} of {settings.n_images} images evaluated ({missing} left to "
                     "other shards or an interrupted run); rerun the same command to finish and re-aggregate")
    table = _aggregate(records, settings.methods)
    meta = {"n_images": settings.n_images, "n_images_done": len(done), "images_without_pairs": images_without_pairs,
            "n_pairs": n_pairs,
            "elapsed_seconds": elapsed, "captum": captum_available(), "failures": failures,
            "torch": torch.__version__, "device": settings.device}
    _write_outputs(out, settings, table, records, curves, notes, meta)
    return {"settings": asdict(settings), "table": table, "records": records, "notes": notes, **meta}


RANDOM_ORDER = "random order (baseline)"
UNITS = ("pixels", "tokens")


@dataclass
class _ImageContext:
    """What every image of a run shares (the models, methods, data and replacement)."""

    settings: EvalSettings
    model: Any
    random_model: Any
    methods: dict[str, Method]
    shapes_cfg: Any
    replace: Any
    warmed_up: bool = False
    n_pairs: int = 0


def _evaluate_image(index: int, ctx: _ImageContext) -> dict[str, Any]:
    """Everything one image contributes: metric rows, curves, failures and notes (JSON-ready)."""
    from ..data.shapes import generate_sample

    settings, model, random_model = ctx.settings, ctx.model, ctx.random_model
    start = time.perf_counter()
    part: dict[str, Any] = {"image": index, "n_pairs": 0, "records": [], "failures": {}, "notes": [],
                            "curves": {name: {} for name in [*settings.methods, RANDOM_ORDER]}}
    curves = part["curves"]
    sample = generate_sample(settings.seed, index, ctx.shapes_cfg)
    prepared = model.prepare(sample.image)
    with torch.no_grad():
        outputs = model(prepared.tensor)
    detections = model.postprocess(outputs, prepared)
    pairs = match_detections(detections, sample.boxes, sample.classes, index, settings.score_threshold,
                             settings.iou_threshold, settings.require_class)
    if settings.max_pairs_per_image is not None:
        pairs = pairs[: settings.max_pairs_per_image]
    if not pairs:
        part["seconds"] = time.perf_counter() - start
        return part
    part["n_pairs"] = len(pairs)
    ctx.n_pairs += len(pairs)
    masks, boxes = _gt_at_input(sample, prepared)
    image = _pixel_image(model, prepared)
    neutral = ctx.replace(image)
    rh, rw = prepared.resized_size
    probes: list[list[_Probe]] = []  # per pair, one per unit
    for k, pair in enumerate(pairs):
        box = outputs["pred_boxes"][0, pair.query]
        per_unit = []
        for unit in settings.units:
            if unit == "pixels":
                probe = _Probe(unit, M.DetectorScore(model, pair.query, pair.label, box), image, neutral)
                random_order = M.relevance_order(np.random.default_rng([settings.seed, index, k, 1]).random((rh, rw)))
            else:
                scorer = M.TokenScore(model, prepared.tensor, pair.query, pair.label, box)
                keep = torch.ones(1, 1, scorer.num_tokens)
                probe = _Probe(unit, scorer, keep, torch.zeros_like(keep), shapes=scorer.shapes)
                random_order = M.level_balanced_order(
                    np.random.default_rng([settings.seed, index, k, 2]).random(scorer.num_tokens), scorer.shapes)
            probe.ends = probe.scorer(torch.stack([probe.start, probe.neutral])).numpy()
            curve = probe.curves(random_order, settings)
            for mode in curve:
                curves[RANDOM_ORDER].setdefault(probe.prefix + mode, []).append(curve[mode][:, 0].tolist())
            fractions = M.perturbation_fractions(settings.steps, settings.max_fraction)
            probe.baseline = {mode: M.area_under_curve(c[:, 0], fractions) for mode, c in curve.items()}
            per_unit.append(probe)
        probes.append(per_unit)
    queries = [p.query for p in pairs]
    labels = [p.label for p in pairs]
    if not ctx.warmed_up:  # lazy initialisation (kernels, caches) must not count as one method's run time
        for method in ctx.methods.values():
            with contextlib.suppress(Exception):
                method.attribute_batch(model, prepared, queries[:1], labels[:1])
        ctx.warmed_up = True
    for name, method in ctx.methods.items():
        try:
            # run time from the attribution that is evaluated; peak memory from a second call of the
            # same size (the randomised model's, else a repeat), so the memory sampler and its
            # malloc_trim cannot slow the timed call
            attribution = method.attribute_batch(model, prepared, queries, labels)
            with M.PeakMemory(settings.device) as memory:
                second = method.attribute_batch(random_model if random_model is not None else model,
                                                prepared, queries, labels)
            random_maps = second.maps if random_model is not None else None
        except Exception as exc:  # one failing method must not sink a long run
            part["failures"][name] = part["failures"].get(name, 0) + 1
            log.warning("method %s failed on image %d: %s", name, index, exc)
            part["notes"].append(f"`{name}` failed on image {index}: {type(exc).__name__}: {exc}")
            continue
        for k, pair in enumerate(pairs):
            relevance = attribution.maps[k]
            row = {"method": name, **asdict(pair)}
            row.update(_method_metrics(relevance, attribution.extras[k], pair, masks, boxes, settings))
            for probe in probes[k]:
                tokens = attribution.tokens[k] if attribution.tokens is not None else None
                curve = probe.curves(probe.order(relevance, tokens, settings.seed), settings)
                for mode in curve:
                    curves[name].setdefault(probe.prefix + mode, []).append(curve[mode][:, 0].tolist())
                row.update(probe.metrics(curve, settings))
            if random_maps is not None:
                row["randomisation_spearman"] = M.rank_correlation(relevance, random_maps[k])
            row["seconds"] = attribution.seconds_per_map
            row["peak_memory_mib"] = memory.peak_mib
            part["records"].append({k2: float(v) if isinstance(v, (np.floating, np.integer)) else v
                                    for k2, v in row.items()})
    part["seconds"] = time.perf_counter() - start
    return part


@dataclass
class _Probe:
    """One pair's deletion / insertion set-up in one unit: ``pixels`` (``start`` = the image, ``neutral``
    its replacement) or ``tokens`` (``start`` = keep every encoder token, ``neutral`` = keep none)."""

    unit: str
    scorer: Any
    start: torch.Tensor
    neutral: torch.Tensor
    shapes: list[tuple[int, int]] | None = None
    ends: np.ndarray | None = None  # scores of start and neutral
    baseline: dict[str, float] = field(default_factory=dict)  # the random order's AUCs

    @property
    def prefix(self) -> str:
        return "" if self.unit == "pixels" else "token_"

    def order(self, pixel_map: torch.Tensor, token_map: torch.Tensor | None, seed: int) -> np.ndarray:
        """Removal order: pixels by relevance; tokens level-balanced, from the method's own token map
        where it has one, else from its pixel map summed over each token's footprint."""
        if self.unit == "pixels":
            return M.relevance_order(pixel_map, seed)
        if token_map is None:
            token_map = M.pool_to_tokens(pixel_map, self.shapes, self.scorer.padded_size)
        return M.level_balanced_order(token_map, self.shapes, seed)

    def curves(self, order: np.ndarray, settings: EvalSettings) -> dict[str, np.ndarray]:
        return {mode: M.perturbation_curve(self.scorer, self.start, self.neutral, None, settings.steps, mode,
                                           settings.batch_size, endpoints=(self.ends[0], self.ends[1]), order=order,
                                           max_fraction=settings.max_fraction)
                for mode in ("deletion", "insertion")}

    def metrics(self, curve: dict[str, np.ndarray], settings: EvalSettings) -> dict[str, float]:
        p = self.prefix
        x = M.perturbation_fractions(settings.steps, settings.max_fraction)
        row = {p + "deletion_auc": M.area_under_curve(curve["deletion"][:, 0], x),
               p + "insertion_auc": M.area_under_curve(curve["insertion"][:, 0], x),
               p + "aopc": M.aopc(curve["deletion"][:, 0], settings.aopc_steps)}
        row[p + "deletion_gap"] = self.baseline["deletion"] - row[p + "deletion_auc"]
        row[p + "insertion_gap"] = row[p + "insertion_auc"] - self.baseline["insertion"]
        if self.unit == "pixels":
            row["deletion_auc_fixed_query"] = M.area_under_curve(curve["deletion"][:, 1], x)
        return row


class _PartStore:
    """One JSON file per evaluated image under ``folder``: a run that dies resumes where it stopped, and
    shards of one run (``--shard i/n``) write side by side. ``settings.json`` there guards against
    mixing runs whose settings differ (the number of images may grow: more images extend a run)."""

    _IGNORED = ("n_images",)

    def __init__(self, folder: Path, settings: EvalSettings):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        fingerprint = {k: v for k, v in asdict(settings).items() if k not in self._IGNORED}
        fingerprint = json.loads(json.dumps(fingerprint, default=str))
        stamp = folder / "settings.json"
        if stamp.is_file():
            previous = json.loads(stamp.read_text())
            # a setting added in a later version counts with its default where an older run lacks it
            defaults = json.loads(json.dumps(asdict(EvalSettings()), default=str))
            changed = sorted(k for k in set(previous) | set(fingerprint)
                             if previous.get(k, defaults.get(k)) != fingerprint.get(k, defaults.get(k)))
            if changed:
                raise ValueError(f"{folder.parent} holds a run with other settings ({', '.join(changed)} differ); "
                                 "use a new --out folder, or delete it to start over")
        else:
            _atomic_write(stamp, json.dumps(fingerprint, indent=2))

    def _path(self, index: int) -> Path:
        return self.folder / f"image-{index:06d}.json"

    def has(self, index: int) -> bool:
        return self._path(index).is_file()

    def write(self, index: int, part: dict[str, Any]) -> None:
        _atomic_write(self._path(index), json.dumps(part))

    def read(self, index: int) -> dict[str, Any]:
        return json.loads(self._path(index).read_text())


def _progress(iterable: Iterable, enabled: bool) -> Any:
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return iterable
    return tqdm(iterable, desc="evaluating", unit="image", file=sys.stderr, dynamic_ncols=True)


PAIRED_METRICS = ("deletion_auc", "insertion_auc", "aopc", "token_deletion_auc", "token_insertion_auc",
                  "mass_accuracy", "rank_accuracy", "leak")


def paired_comparison(records: list[dict[str, Any]], reference: str, methods: Sequence[str],
                      keys: Sequence[str] = PAIRED_METRICS) -> dict[str, dict[str, M.Estimate]]:
    """method → metric → advantage of ``reference`` over the method on the same pairs: the per-pair
    difference signed so that > 0 means ``reference`` is better (lower for ↓ metrics), mean and t 95 % CI.

    Paired intervals are much tighter than comparing two methods' separate intervals, because the
    images' difficulty cancels."""
    by_pair: dict[str, dict[tuple[int, int], dict[str, Any]]] = {}
    for r in records:
        by_pair.setdefault(r["method"], {})[(int(r["image"]), int(r["query"]))] = r
    ours = by_pair.get(reference, {})
    out: dict[str, dict[str, M.Estimate]] = {}
    for name in methods:
        if name == reference or name not in by_pair:
            continue
        common = sorted(set(ours) & set(by_pair[name]))
        row = {}
        for key in keys:
            direction = METRICS[key][2]
            a = [ours[c].get(key, math.nan) for c in common]
            b = [by_pair[name][c].get(key, math.nan) for c in common]
            row[key] = M.mean_ci(direction * M.paired_difference(a, b))
        out[name] = row
    return out


def _aggregate(records: list[dict[str, Any]], methods: Sequence[str]) -> dict[str, dict[str, M.Estimate]]:
    """method → metric → Estimate (mean, t 95 % CI, N over pairs with a finite value)."""
    table: dict[str, dict[str, M.Estimate]] = {}
    for name in methods:
        rows = [r for r in records if r["method"] == name]
        table[name] = {key: M.mean_ci([r.get(key, math.nan) for r in rows]) for key in METRICS}
    return table


# ----------------------------------------------------------------------------- writing
def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return "–"
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 1e-3:
        return f"{value:.2e}"
    return f"{value:.3f}"


def _cell(est: M.Estimate, n_row: int) -> str:
    if est.n == 0:
        return "–"
    text = _fmt(est.mean) if not math.isfinite(est.low) else f"{_fmt(est.mean)} [{_fmt(est.low)}, {_fmt(est.high)}]"
    return text if est.n == n_row else f"{text} (n={est.n})"


def _markdown_tables(table: dict[str, dict[str, M.Estimate]], n_rows: dict[str, int]) -> str:
    lines = []
    for group in ("localisation", "faithfulness", "faithfulness: encoder tokens", "sanity and cost"):
        keys = [k for k, (g, _, _) in METRICS.items() if g == group
                and any(table[m][k].n for m in table)]
        if not keys:
            continue
        arrows = {+1: " ↑", -1: " ↓", 0: ""}
        lines.append(f"### {group.capitalize()}\n")
        lines.append("| method | N | " + " | ".join(METRICS[k][1] + arrows[METRICS[k][2]] for k in keys) + " |")
        lines.append("|---|---|" + "---|" * len(keys))
        for name, row in table.items():
            lines.append(f"| {name} | {n_rows[name]} | " + " | ".join(_cell(row[k], n_rows[name]) for k in keys) + " |")
        lines.append("")
    return "\n".join(lines)


def _paired_markdown(paired: dict[str, dict[str, M.Estimate]], reference: str | None) -> str:
    keys = [k for k in PAIRED_METRICS if any(row[k].n for row in paired.values())]
    if not paired or not keys:
        return ""
    lines = [f"\n### Paired: advantage of {reference} over each method\n",
             "Per-pair difference on the same (image, detection) pairs, signed so that > 0 means "
             f"{reference} is better; mean [95 % CI, Student t]. An interval above 0 is a measured advantage.\n",
             "| method | " + " | ".join(METRICS[k][1] for k in keys) + " |",
             "|---|" + "---|" * len(keys)]
    for name, row in paired.items():
        lines.append(f"| {name} | " + " | ".join(_cell(row[k], row[k].n) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def _plot_curves(curves: dict[str, dict[str, list[np.ndarray]]], mode: str, x: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    colours = plt.get_cmap("tab20").colors
    for i, (name, by_mode) in enumerate(curves.items()):
        if not by_mode.get(mode):
            continue
        mean = np.mean(np.stack(by_mode[mode]), 0)
        if name.startswith("random order"):
            style = {"color": "black", "linestyle": "--", "linewidth": 2}
        else:  # ours solid and thicker, baselines dash-dotted; tab20 has enough distinct colours
            ours = name in LRP_METHODS
            style = {"color": colours[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20],
                     "linestyle": "-" if ours else "-.", "linewidth": 1.8 if ours else 1.2}
        ax.plot(x, mean, label=f"{name} (AUC {M.area_under_curve(mean, x):.3f})", **style)
    tokens = mode.startswith("token_")
    deletion = mode.endswith("deletion")
    what = "encoder tokens (every level alike)" if tokens else "pixels"
    ax.set_xlabel(f"fraction of {what} " + ("removed" if deletion else "inserted"))
    ax.set_ylabel("class score of the matched query")
    ax.set_title(f"{'Token ' if tokens else ''}{'deletion' if deletion else 'insertion'}"
                 f" ({'lower' if deletion else 'higher'} is better)".capitalize())
    ax.set_xlim(0, float(x[-1]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right" if deletion else "lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    _atomic_write(path, buf.getvalue())


def _summary(settings: EvalSettings, table: dict[str, dict[str, M.Estimate]], notes: list[str], meta: dict,
             paired: dict[str, dict[str, M.Estimate]]) -> str:
    lines = [
        "# Explanation-method comparison", "",
        f"- model: `{settings.config}`, checkpoint: `{settings.checkpoint or 'none (random weights)'}`, "
        f"device {meta['device']}, torch {meta['torch']}",
        f"- data: synthetic shapes, seed {settings.seed}, {_images_done(settings, meta)} images of "
        f"{settings.image_size} px"
        + (f" (at most {settings.max_pairs_per_image} detection(s) per image, the highest-scoring)"
           if settings.max_pairs_per_image is not None else "") + "; "
        f"{meta['n_pairs']} (image, detection) pairs matched to ground truth (Hungarian on box IoU ≥ "
        f"{settings.iou_threshold}, score ≥ {settings.score_threshold}"
        f"{', same class' if settings.require_class else ''}); {meta['images_without_pairs']} images had none",
        "- target: class logit of the detection's query and label; maps at the model input size",
        f"- deletion / insertion: {settings.steps} steps of {100 * settings.max_fraction / settings.steps:.3g} % "
        f"up to {100 * settings.max_fraction:.3g} % (AUC = mean score over that range), replacement "
        f"**{settings.replacement}**" + (f" (σ = {settings.blur_sigma} px)" if settings.replacement == "blur" else
                                          " (per-image, per-channel mean colour)")
        + "; score = sigmoid class score of the query re-matched by box IoU; AOPC over the first "
        f"{min(settings.aopc_steps, settings.steps)} steps; gaps are paired against a random order on the same pairs",
        *(["- token deletion / insertion: the deformable encoder's input tokens (before position encoding) are "
           "replaced by their level's mean token, the same fraction of every level per step, each level's tokens "
           "by relevance; token maps are the method's own where it has them (LRP at the encoder input, rollout, "
           "Chefer), else its pixel map summed over each token's footprint; the stride-4 FPN lateral path is "
           "not perturbed"] if "tokens" in settings.units else []),
        f"- pointing game tolerance {settings.pointing_tolerance} px; intervals: Student-t 95 % over pairs",
        "- cost: seconds / explanation = wall time of the evaluated call ÷ the image's K pairs (LRP explains "
        "the K queries in one batched backward, the others loop); peak memory from a second call of the same "
        "size" + (" (on the randomised model)" if settings.randomisation else "")
        + (", CUDA allocator peak" if settings.device.startswith("cuda") else
           ", CPU resident-set growth sampled every 2 ms (approximate)"),
        "- conservation error: |ΣR(pixels + padding) − target| / |target| for LRP; for integrated-gradients "
        "its completeness error |Σ attributions − (f(x) − f(baseline))| / |f(x) − f(baseline)|",
        "- randomisation: Spearman correlation of each map with the same method's map on a freshly initialised "
        "model (Adebayo et al. 2018); `random` is 1 by construction (its map does not depend on the model)"
        if settings.randomisation else "- randomisation test: off",
        f"- run time {meta['elapsed_seconds']:.0f} s (sum over images; shards run side by side)", "",
    ]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## Findings", ""]
    for key in ("deletion_gap", "insertion_gap", "token_deletion_gap", "token_insertion_gap", "mass_accuracy",
                "pointing_game", "leak"):
        label, direction = METRICS[key][1], METRICS[key][2]
        ranked = sorted(((est.mean, name) for name, row in table.items() if (est := row[key]).n),
                        reverse=direction > 0)
        if not ranked:
            continue
        if ranked[0][0] == ranked[-1][0]:
            lines.append(f"- **{label}**: all methods {ranked[0][0]:.3g}")
            continue
        best_name = ranked[0][1]
        best = table[best_name][key]
        ties = [n for _, n in ranked[1:] if _overlaps(table[n][key], best)]
        line = f"- **{label}**: best {best_name} ({best})"
        if ties:
            line += f"; CIs overlap with {', '.join(ties)}"
        if key.endswith("_gap"):
            above = [n for n, row in table.items() if row[key].n > 1 and row[key].low > 0]
            line += f". Above random (CI > 0): {', '.join(above) if above else 'none'}"
        lines.append(line)
    lrp = [m for m in table if m in LRP_METHODS]
    others = [m for m in table if m not in LRP_METHODS and m != "random"]
    for key, label in (("deletion_auc", "deletion AUC"), ("insertion_auc", "insertion AUC"),
                       ("token_deletion_auc", "token deletion AUC"), ("token_insertion_auc", "token insertion AUC"),
                       ("mass_accuracy", "relevance mass accuracy")):
        rows = {m: paired[m][key] for m in others if m in paired and paired[m][key].n > 1}
        if not rows:
            continue
        better = [m for m, est in rows.items() if est.low > 0]
        worse = [m for m, est in rows.items() if est.high < 0]
        lines.append(f"- **lrp-default vs baselines, {label}** (paired 95 % CI of lrp-default's advantage on the "
                     f"same pairs): better than {', '.join(better) or 'none'}; worse than {', '.join(worse) or 'none'}"
                     f"; not separable from {', '.join(m for m in rows if m not in better + worse) or 'none'}")
    if lrp:
        errs = ", ".join(f"{m} {table[m]['conservation_error']}" for m in lrp if table[m]["conservation_error"].n)
        if errs:
            lines.append(f"- conservation error |ΣR − target|/|target| (pixels + padding): {errs}; what biases, "
                         "position encodings and non-conservative rules take is in the shares of results.md")
    lines.append("")
    lines.append("Tables: results.md / results.csv; paired comparisons: paired.csv; raw per pair: pairs.csv; "
                 "curves: curves.csv and the PNGs.")
    return "\n".join(lines) + "\n"


def _images_done(settings: EvalSettings, meta: dict) -> str:
    done = meta.get("n_images_done", settings.n_images)
    return str(done) if done == settings.n_images else f"{done} of {settings.n_images}"


def _overlaps(a: M.Estimate, b: M.Estimate) -> bool:
    if not (math.isfinite(a.low) and math.isfinite(b.low)):
        return True
    return a.low <= b.high and b.low <= a.high


def _write_outputs(out: Path, settings: EvalSettings, table: dict[str, dict[str, M.Estimate]],
                   records: list[dict[str, Any]], curves: dict, notes: list[str], meta: dict) -> None:
    n_rows = {name: sum(1 for r in records if r["method"] == name) for name in table}
    header = (f"# Results: {settings.config}, {meta['n_pairs']} pairs from {_images_done(settings, meta)} images "
              f"(seed {settings.seed})\n\nmean [95 % CI, Student t] over (image, detection) pairs; N = pairs; "
              f"(n=…) where a metric has fewer finite values. Replacement: {settings.replacement}.\n\n")
    reference = "lrp-default" if "lrp-default" in table else next(iter(table), None)
    paired = paired_comparison(records, reference, list(table)) if reference else {}
    _atomic_write(out / "results.md", header + _markdown_tables(table, n_rows) + _paired_markdown(paired, reference))
    _atomic_write(out / "paired.csv", _csv_text(
        ["reference", "method", "metric", "advantage_mean", "ci_low", "ci_high", "n"],
        [(reference, name, key, est.mean, est.low, est.high, est.n)
         for name, row in paired.items() for key, est in row.items() if est.n]))
    _atomic_write(out / "results.csv", _csv_text(
        ["method", "metric", "mean", "ci_low", "ci_high", "n", "higher_is_better"],
        [(name, key, est.mean, est.low, est.high, est.n, {1: "yes", -1: "no", 0: ""}[METRICS[key][2]])
         for name, row in table.items() for key, est in row.items()]))
    fields = ["method", "image", "query", "label", "gt", "iou", "score", *METRICS]
    _atomic_write(out / "pairs.csv", _csv_text(fields, ([r.get(f, math.nan) for f in fields] for r in records)))
    x = M.perturbation_fractions(settings.steps, settings.max_fraction)
    curve_rows = []
    for name, by_mode in curves.items():
        for mode, values in by_mode.items():
            if values:
                stacked = np.stack(values)
                for j, frac in enumerate(x):
                    est = M.mean_ci(stacked[:, j])
                    curve_rows.append((name, mode, frac, est.mean, est.low, est.high, est.n))
    _atomic_write(out / "curves.csv", _csv_text(["method", "mode", "fraction", "mean", "ci_low", "ci_high", "n"],
                                                curve_rows))
    for mode in sorted({mode for by_mode in curves.values() for mode, values in by_mode.items() if values}):
        _plot_curves(curves, mode, x, out / f"{mode}.png")
    _atomic_write(out / "settings.json", json.dumps({**asdict(settings), **meta}, indent=2, default=str))
    _atomic_write(out / "summary.md", _summary(settings, table, notes, meta, paired))


# ----------------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m maskdino_lrp.eval",
                                description="Compare explanation methods (LRP and baselines) on synthetic shapes.")
    p.add_argument("--config", default="demo", help="preset name or YAML (default: demo)")
    p.add_argument("--checkpoint", default=None, help="weights (default for demo: the shipped demo.safetensors)")
    p.add_argument("--images", type=int, default=20, help="number of images (default 20)")
    p.add_argument("--seed", type=int, default=1,
                   help="data seed (default 1; the shipped demo model was trained on seed 0)")
    p.add_argument("--out", default="eval_out", help="output folder (default eval_out)")
    p.add_argument("--methods", default=None,
                   help=f"comma list (default: all available): {', '.join(DEFAULT_METHODS)}")
    p.add_argument("--steps", type=int, default=20, help="deletion/insertion steps over 0..100%% (default 20 = 5%%)")
    p.add_argument("--units", default="pixels",
                   help="what deletion / insertion removes: pixels, tokens (the encoder's input tokens) or "
                        "pixels,tokens (default pixels)")
    p.add_argument("--max-fraction", type=float, default=1.0,
                   help="curves stop at this fraction (e.g. 0.2 with --steps 20: 1%% steps up to 20%%; default 1)")
    p.add_argument("--replacement", choices=sorted(M.REPLACEMENTS), default="mean",
                   help="neutral value for removed pixels (default mean: per-image mean colour)")
    p.add_argument("--image-size", type=int, default=160, help="synthetic image size (default 160)")
    p.add_argument("--score-threshold", type=float, default=0.3)
    p.add_argument("--iou-threshold", type=float, default=0.5)
    p.add_argument("--any-class", action="store_true", help="match detections to objects regardless of class")
    p.add_argument("--max-pairs-per-image", type=int, default=None)
    p.add_argument("--no-randomisation", action="store_true", help="skip the model-randomisation test")
    p.add_argument("--ig-steps", type=int, default=16, help="Integrated Gradients steps (default 16)")
    p.add_argument("--smoothgrad-samples", type=int, default=16, help="SmoothGrad samples (default 16)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 on a shared machine)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="do only images with index %% N == I (run N processes with the same --out; the last to "
                        "finish writes the complete table)")
    p.add_argument("--no-resume", action="store_true", help="redo images already done in --out/parts")
    p.add_argument("--aggregate-only", action="store_true",
                   help="evaluate nothing; write the tables of the images done so far (e.g. while shards run)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard takes I/N with integers, e.g. 0/2, got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return i, n


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m maskdino_lrp.eval --config demo --images N --seed S --out DIR``."""
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        result = evaluate(
            args.config, args.checkpoint, args.images, args.seed, args.out, methods=methods, steps=args.steps,
            progress=not args.quiet, shard=_parse_shard(args.shard), resume=not args.no_resume,
            units=[u.strip() for u in args.units.split(",") if u.strip()], aggregate_only=args.aggregate_only,
            max_fraction=args.max_fraction, replacement=args.replacement, image_size=args.image_size,
            score_threshold=args.score_threshold, iou_threshold=args.iou_threshold,
            require_class=not args.any_class, max_pairs_per_image=args.max_pairs_per_image,
            randomisation=not args.no_randomisation, device=args.device,
            method_options={"integrated-gradients": {"n_steps": args.ig_steps},
                            "smoothgrad": {"nt_samples": args.smoothgrad_samples}},
        )
    except (MethodError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    done = result["n_images_done"]
    print(f"{result['n_pairs']} pairs from {done} of {args.images} images; wrote {Path(args.out) / 'summary.md'}")
    return 0
