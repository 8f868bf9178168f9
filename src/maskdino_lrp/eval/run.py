"""Compare explanation methods on the synthetic shapes: every method × metric, mean and 95 % CI.

    >>> from maskdino_lrp.eval.run import evaluate
    >>> report = evaluate("demo", checkpoint=None, n_images=20, seed=0, out_dir="eval_out")

    python -m maskdino_lrp.eval --config demo --images 20 --seed 0 --out eval_out

What is evaluated: for each image ``generate_sample(seed, i)`` the model's detections are matched to
the ground-truth objects (:mod:`.matching`). Each matched (image, detection) pair is one unit: its
query and predicted label are explained by every method (the class logit), and every metric of
:mod:`.metrics` is computed on the map (:mod:`.per_image`): localisation against the object's mask and
box; per unit and per replacement the MIF deletion, insertion and LIF deletion curves (:mod:`.curves`),
their AUCs, SRG and the gaps to a random order on the same pairs. Means carry Student-t 95 % intervals
over pairs, paired comparisons against lrp-default and the methods' rank stability across
replacements (:mod:`.stats`). Each image's results are kept in a resumable store (:mod:`.parts`);
the outputs are written by :mod:`.report`; the command line is :mod:`.args`.

Cost: perturbed forwards dominate. Per pair, unit and replacement the curves take at most (methods + 1)
· 2 · (steps − 1) forwards over the whole range (LIF reuses insertion's images; + 1 per order on an
odd number of tokens; orders that replace the same set at a step share its image), (methods + 1) · 3 ·
steps when ``max_fraction`` < 1; per image, unit and replacement one more for the neutral input (the
start is the image's clean forward). D-RISE adds 2 · ``n_masks`` per image (the timed call and the
memory call). On the 2-core CPU machine a forward of the demo model takes about 45 ms;
summary.md reports the run's own seconds and forwards per pair.

Outputs in ``out_dir`` (each written atomically): ``results.md`` and ``results.csv`` (method ×
metric × replacement: mean, CI, N), ``paired.csv``, ``stability.md`` / ``stability.csv``,
``pairs.csv`` (every pair × method, raw), ``curves.csv`` and ``curves_<unit><replacement>.png``,
``summary.md``, ``settings.json``.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ..model.checkpoint import shipped_weights
from . import metrics as M
from .matching import Pair, match_detections
from .methods import DEFAULT_METHODS, MethodError, available_methods, captum_available, get_method
from .parts import PartStore
from .per_image import ImageContext, evaluate_image
from .report import write_outputs
from .settings import METRICS, RANDOM_ORDER, UNITS, EvalSettings, columns_of
from .stats import aggregate, paired_comparison

log = logging.getLogger(__name__)

__all__ = ["EvalSettings", "Pair", "match_detections", "evaluate", "main", "METRICS", "paired_comparison"]

_evaluate_image = evaluate_image  # the per-image step, looked up at call time (tests count its calls)


def _random_model(settings: EvalSettings) -> Any:
    """The same architecture with fresh random weights (Adebayo et al.'s full randomisation)."""
    from .. import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed + 7919)
        model = build_model(settings.config)
    return model.to(settings.device).eval()


def _check(settings: EvalSettings) -> None:
    bad = [r for r in settings.replacements if r not in M.REPLACEMENTS]
    if not settings.replacements or bad or len(set(settings.replacements)) != len(settings.replacements):
        raise ValueError(f"replacements must be distinct names from {list(M.REPLACEMENTS)}, got "
                         f"{settings.replacements!r}; e.g. --replacement mean,blur,noise,zero")
    if not settings.blur_sigma > 0:
        raise ValueError(f"--blur-sigma must be > 0, got {settings.blur_sigma}")
    if not 0.0 < settings.max_fraction <= 1.0:
        raise ValueError(f"--max-fraction must be in (0, 1], got {settings.max_fraction}")
    if settings.n_images < 1 or settings.steps < 1:
        raise ValueError(f"--images and --steps must be at least 1, got {settings.n_images} and {settings.steps}")
    if settings.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {settings.batch_size}")
    if not settings.units or set(settings.units) - set(UNITS) or len(set(settings.units)) != len(settings.units):
        raise ValueError(f"units must be distinct names from {list(UNITS)}, got {settings.units!r}; "
                         "e.g. --units pixels,patches")
    if settings.patch_size < 2:
        raise ValueError(f"--patch-size must be at least 2 (1 is the pixels unit), got {settings.patch_size}")


def _progress(iterable: Iterable, enabled: bool) -> Any:
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return iterable
    return tqdm(iterable, desc="evaluating", unit="image", file=sys.stderr, dynamic_ncols=True)


def evaluate(config: str = "demo", checkpoint: str | None = None, n_images: int = 20, seed: int = 1,
             out_dir: str | Path = "eval_out", methods: Sequence[str] | None = None, steps: int = 20,
             progress: bool = True, model: Any = None, shard: tuple[int, int] | None = None, resume: bool = True,
             aggregate_only: bool = False, workers: int | None = None, ray_address: str | None = None,
             threads: int | None = None, **options: Any) -> dict[str, Any]:
    """Run the comparison and write the tables, curves and summary to ``out_dir``; returns the results.

    ``options`` are further :class:`EvalSettings` fields (replacements, image_size, score_threshold, …).
    ``model`` may be given directly (then ``config`` still names the architecture for the
    randomisation test). Each image's results are kept in ``out_dir/parts``: a rerun of the same
    command skips the images already done (``resume=False`` redoes them), and ``shard=(i, n)`` does only
    the images with ``index % n == i`` so n processes can share a run; every process aggregates all
    the images done so far, so the one that finishes last writes the complete table;
    ``aggregate_only`` evaluates nothing and writes the tables of what is there (a progress report).
    ``workers`` / ``ray_address`` evaluate the images on Ray workers (:mod:`.distributed`; ``threads``
    per worker) into the same store.
    """
    from .. import build_model

    if shard is not None and not (len(shard) == 2 and 0 <= shard[0] < shard[1]):
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard!r}")

    unknown_options = sorted(set(options) - {f.name for f in fields(EvalSettings)})
    if unknown_options:
        hint = " (one replacement is now replacements=[name])" if "replacement" in unknown_options else ""
        raise ValueError(f"unknown setting(s) {unknown_options}{hint}; settings: "
                         f"{', '.join(f.name for f in fields(EvalSettings))}")
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
    _check(settings)
    out = Path(out_dir)
    notes: list[str] = [f"`{m}` skipped: {why}" for m, why in skipped.items()]

    model_given = model is not None  # else workers build their own from the config
    if model is None:
        if settings.checkpoint is None and shipped_weights(settings.config) is not None:
            settings.checkpoint = str(shipped_weights(settings.config))  # a preset that ships weights uses them
        if settings.checkpoint is None:
            notes.append("no checkpoint: the model has **random weights**; the numbers say nothing about a trained model")
        if not aggregate_only:  # before the parts folder is stamped: a bad config or checkpoint leaves nothing behind
            model = build_model(settings.config, checkpoint=settings.checkpoint)
            if settings.checkpoint is None:
                log.warning("evaluating %s with random weights (no checkpoint)", settings.config)
    out.mkdir(parents=True, exist_ok=True)  # only now: a refused config or checkpoint leaves no folder behind
    parts = PartStore(out / "parts", settings)
    indices = [i for i in range(settings.n_images) if shard is None or i % shard[1] == shard[0]]
    todo = [] if aggregate_only else [i for i in indices if not (resume and parts.has(i))]
    if len(todo) < len(indices):
        log.info("resuming: %d of %d images already done in %s", len(indices) - len(todo), len(indices), parts.folder)
    if todo and (workers or ray_address):
        from .distributed import evaluate_on_ray

        notes.extend(evaluate_on_ray(settings, model if model_given else None, todo, parts, workers=workers,
                                     address=ray_address, threads=threads, progress=progress))
    elif todo:
        context = image_context(settings, model)
        bar = _progress(todo, progress)
        for index in bar:
            parts.write(index, _evaluate_image(index, context))
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(pairs=context.n_pairs)
    return _collect(out, settings, parts, notes)


def image_context(settings: EvalSettings, model: Any) -> ImageContext:
    """What every image's evaluation shares: the model on its device, the randomised model, the methods."""
    from ..data.shapes import ShapesConfig

    model = model.to(settings.device).eval()
    return ImageContext(settings, model, _random_model(settings) if settings.randomisation else None,
                        {name: get_method(name, **settings.method_options.get(name, {})) for name in settings.methods},
                        ShapesConfig(image_size=settings.image_size))


def _collect(out: Path, settings: EvalSettings, parts: PartStore, notes: list[str]) -> dict[str, Any]:
    """Aggregate every image done so far and write the outputs."""
    done = [i for i in range(settings.n_images) if parts.has(i)]
    records: list[dict[str, Any]] = []
    curves: dict[str, dict[str, list[np.ndarray]]] = {name: {} for name in [*settings.methods, RANDOM_ORDER]}
    failures: dict[str, int] = {}
    totals = dict.fromkeys(("images_without_pairs", "n_pairs", "elapsed_seconds", "method_seconds",
                            "curve_seconds", "forwards"), 0)
    for index in done:
        part = parts.read(index)
        records.extend(part["records"])
        for name, by_mode in part["curves"].items():
            for mode, values in by_mode.items():
                curves.setdefault(name, {}).setdefault(mode, []).extend(np.asarray(v) for v in values)
        for name, count in part["failures"].items():
            failures[name] = failures.get(name, 0) + count
        notes.extend(n for n in part["notes"] if n not in notes)
        totals["images_without_pairs"] += part["n_pairs"] == 0
        totals["n_pairs"] += part["n_pairs"]
        totals["elapsed_seconds"] += part["seconds"]
        for key in ("method_seconds", "curve_seconds", "forwards"):
            totals[key] += part.get(key, 0)
    missing = settings.n_images - len(done)
    if missing:
        notes.append(f"**incomplete**: {len(done)} of {settings.n_images} images evaluated ({missing} left to "
                     "other shards or an interrupted run); rerun the same command to finish and re-aggregate")
    columns = columns_of(settings.replacements)
    table = aggregate(records, settings.methods, columns)
    meta = {"n_images": settings.n_images, "n_images_done": len(done), **totals, "captum": captum_available(),
            "failures": failures, "torch": torch.__version__, "device": settings.device}
    written = write_outputs(out, settings, table, records, curves, notes, meta, columns)
    return {"settings": asdict(settings), "table": table, "records": records, "notes": notes, **written, **meta}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m maskdino_lrp.eval --config demo --images N --seed S --out DIR``."""
    from .args import main as args_main

    return args_main(argv)
