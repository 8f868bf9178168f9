"""One image of an evaluation: match its detections, explain them with every method, score every map.

For each matched (image, detection) pair and each method: the localisation metrics against the
object's mask and box, and per unit (pixels, image patches, encoder tokens) and per replacement the MIF deletion,
insertion and LIF deletion curves with their AUCs, SRG and gaps to a random order on the same pair.
All orders' curves of one (pair, unit, replacement) are scored in shared batches (:mod:`.curves`).
What does not depend on the pair is computed once per image: the token unit's backbone features and
encoder input, the curves' start (the clean forward) and each (unit, replacement)'s neutral input.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import metrics as M
from .curves import CurveProbe, curve_counts
from .matching import Pair, match_detections
from .methods import Method
from .settings import MODES, RANDOM_ORDER, UNIT_PREFIX, EvalSettings, column

log = logging.getLogger(__name__)

__all__ = ["ImageContext", "evaluate_image"]


@dataclass
class ImageContext:
    """What every image of a run shares (the models, methods and data)."""

    settings: EvalSettings
    model: Any
    random_model: Any
    methods: dict[str, Method]
    shapes_cfg: Any
    warmed_up: bool = False
    n_pairs: int = 0
    # share forwards between an image's pairs (the clean forward, neutral inputs, the token path's
    # pre-encoder part); False runs the unshared reference path, which gives the same curves
    reuse_forwards: bool = True


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


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _localisation(relevance: torch.Tensor, extras: dict, pair: Pair, masks: np.ndarray, boxes: np.ndarray,
                  settings: EvalSettings) -> dict[str, float]:
    e = relevance.numpy()
    mask = masks[pair.gt]
    others = np.delete(masks, pair.gt, axis=0)
    row = {
        "mass_accuracy": M.relevance_mass_accuracy(e, mask),
        "mass_accuracy_tol": M.relevance_mass_accuracy(e, mask, settings.pointing_tolerance),
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
                row[f"{key}_share"] = extras[key] / target if abs(target) > 1e-12 else float("nan")
    return row


def _attribute_all(ctx: ImageContext, prepared: Any, pairs: list[Pair], part: dict[str, Any]) -> dict[str, tuple]:
    """method → (maps, random model's maps or None, peak MiB); a failing method is noted and left out."""
    settings, model, random_model = ctx.settings, ctx.model, ctx.random_model
    queries = [p.query for p in pairs]
    labels = [p.label for p in pairs]
    if not ctx.warmed_up:  # lazy initialisation (kernels, caches) must not count as one method's run time
        for method in ctx.methods.values():
            if not method.needs_warm_up:
                continue
            with contextlib.suppress(Exception):
                method.attribute_batch(model, prepared, queries[:1], labels[:1])
        ctx.warmed_up = True
    done = {}
    for name, method in ctx.methods.items():
        try:
            # run time from the attribution that is evaluated; peak memory from a second call of the
            # same size (the randomised model's, else a repeat), so the memory sampler and its
            # malloc_trim cannot slow the timed call
            maps = method.attribute_batch(model, prepared, queries, labels)
            if random_model is None and not settings.measure_memory:  # the second call would only measure memory
                done[name] = (maps, None, math.nan)
                continue
            with M.PeakMemory(settings.device) as memory:
                second = method.attribute_batch(random_model if random_model is not None else model,
                                                prepared, queries, labels)
            done[name] = (maps, second.maps if random_model is not None else None, memory.peak_mib)
        except Exception as exc:  # one failing method must not sink a long run
            part["failures"][name] = part["failures"].get(name, 0) + 1
            log.warning("method %s failed on image %d: %s", name, part["image"], exc)
            part["notes"].append(f"`{name}` failed on image {part['image']}: {type(exc).__name__}: {exc}")
    return done


@dataclass
class _PerturbationInputs:
    """What every pair of one image perturbs: the pixel image and its neutral images, the shared encoder
    tokens and their neutral tokens, per replacement; and the forwards every pair shares.

    With ``reuse`` the start of every curve (the image itself, all tokens kept) is scored from the
    image's clean forward, each (unit, replacement)'s neutral input runs once for all pairs, and
    orders that replace the same set at a step share that input; without, every pair runs start and
    neutral again, every order its own inputs, and the tokens go through the head on B copies of the
    features (the reference path the shared one must equal)."""

    image: torch.Tensor
    neutrals: dict[str, torch.Tensor]
    tokens: Any  # M.TokenFeatures or None
    token_neutrals: dict[str, torch.Tensor]
    padded_size: tuple[int, int]
    clean: dict[str, torch.Tensor]  # the clean forward's pred_logits and pred_boxes
    reuse: bool = True
    neutral_outputs: dict[tuple[str, str], dict[str, torch.Tensor]] = field(default_factory=dict)
    forwards: int = 0  # forwards run here (the neutral inputs)

    @classmethod
    def build(cls, model: Any, prepared: Any, settings: EvalSettings, index: int, outputs: dict[str, Any],
              reuse: bool = True) -> "_PerturbationInputs":
        image = _pixel_image(model, prepared)
        neutrals = {r: M.make_replacement(r, settings.blur_sigma, _seed(settings.seed, index, 3))(image)
                    for r in settings.replacements}
        tokens = M.TokenFeatures(model, prepared.tensor) if "tokens" in settings.units else None
        token_neutrals = {r: tokens.neutral(r, settings.blur_sigma, _seed(settings.seed, index, 4))
                          for r in settings.replacements} if tokens is not None else {}
        clean = {k: outputs[k].detach() for k in ("pred_logits", "pred_boxes")}
        return cls(image, neutrals, tokens, token_neutrals, tuple(prepared.tensor.shape[-2:]), clean, reuse)

    def probe(self, unit: str, replacement: str, model: Any, pair: Pair, box: torch.Tensor,
              pixel_scorer: Any, rng: np.random.Generator, patch: int = 1) -> tuple[CurveProbe, np.ndarray]:
        """The pair's probe in one unit and replacement, and a random removal order of the same kind."""
        if unit in ("pixels", "patches"):
            probe = CurveProbe(unit, replacement, pixel_scorer, self.image, self.neutrals[replacement],
                               patch=patch if unit == "patches" else 1)
            order = M.relevance_order(rng.random(probe.grid))
        else:
            scorer = M.TokenScore(model, self.tokens, pair.query, pair.label, box,
                                  neutral=self.token_neutrals[replacement], shared=self.reuse)
            keep = torch.ones(1, 1, self.tokens.num_tokens)
            probe = CurveProbe(unit, replacement, scorer, keep, torch.zeros_like(keep), self.tokens.shapes)
            order = M.level_balanced_order(rng.random(probe.size), self.tokens.shapes)
        probe.by_content = self.reuse
        if self.reuse:
            neutral = ("tokens" if unit == "tokens" else "pixels", replacement)  # patches: the pixels' neutral image
            if neutral not in self.neutral_outputs:
                self.neutral_outputs[neutral] = probe.scorer.outputs(probe.neutral[None])
                self.forwards += 1
            probe.known = {("start",): probe.scorer.score(self.clean).numpy()[0],
                           ("neutral",): probe.scorer.score(self.neutral_outputs[neutral]).numpy()[0]}
        return probe, order


def _pair_curves(k: int, pair: Pair, box: torch.Tensor, attributions: dict[str, tuple], inputs: _PerturbationInputs,
                 ctx: ImageContext, part: dict[str, Any], pair_rows: dict[str, dict]) -> None:
    """Every curve of pair ``k`` (per unit and replacement, all methods' orders and the random one together):
    the curves go into ``part``, the faithfulness metrics into each method's row of ``pair_rows``."""
    settings = ctx.settings
    fractions = M.perturbation_fractions(settings.steps, settings.max_fraction)
    pixel_scorer = M.DetectorScore(ctx.model, pair.query, pair.label, box)
    for u, unit in enumerate(settings.units):
        prefix = UNIT_PREFIX[unit]
        for replacement in settings.replacements:
            # the same random order under every replacement, so their baselines differ only by the replacement
            rng = np.random.default_rng([settings.seed, part["image"], k, 1 + u])
            forwards = inputs.forwards
            probe, random_order = inputs.probe(unit, replacement, ctx.model, pair, box, pixel_scorer, rng,
                                               settings.patch_size)
            orders = {RANDOM_ORDER: random_order}
            for name, (attribution, _, _) in attributions.items():
                tokens = attribution.tokens[k] if attribution.tokens is not None else None
                orders[name] = probe.order(attribution.maps[k], tokens, settings.seed, inputs.padded_size)
            counts = curve_counts(probe.size, settings.steps, settings.max_fraction)
            curves = probe.curves(orders, counts, MODES, settings.batch_size)
            part["forwards"] += probe.forwards + inputs.forwards - forwards
            baseline = {mode: M.area_under_curve(curves[RANDOM_ORDER][mode][:, 0], fractions) for mode in MODES}
            for name, by_mode in curves.items():
                for mode, scores in by_mode.items():
                    part["curves"].setdefault(name, {}).setdefault(f"{prefix}{mode}@{replacement}", []).append(
                        scores[:, 0].tolist())
                if name in pair_rows:
                    found = probe.metrics(by_mode, fractions, settings.aopc_steps, baseline)
                    pair_rows[name].update({column(key, replacement): v for key, v in found.items()})


def evaluate_image(index: int, ctx: ImageContext) -> dict[str, Any]:
    """Everything one image contributes: metric rows, curves, failures, notes and cost (JSON-ready)."""
    from ..data.shapes import generate_sample

    settings, model = ctx.settings, ctx.model
    start = time.perf_counter()
    part: dict[str, Any] = {"image": index, "n_pairs": 0, "records": [], "failures": {}, "notes": [],
                            "curves": {name: {} for name in [*settings.methods, RANDOM_ORDER]},
                            "forwards": 0, "method_seconds": 0.0, "curve_seconds": 0.0}
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

    t0 = time.perf_counter()
    attributions = _attribute_all(ctx, prepared, pairs, part)
    part["method_seconds"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    inputs = _PerturbationInputs.build(model, prepared, settings, index, outputs, ctx.reuse_forwards)
    rows = []
    for k, pair in enumerate(pairs):
        pair_rows = {}
        for name, (attribution, random_maps, peak) in attributions.items():
            row = {"method": name, **asdict(pair)}
            row.update(_localisation(attribution.maps[k], attribution.extras[k], pair, masks, boxes, settings))
            if random_maps is not None:
                row["randomisation_spearman"] = M.rank_correlation(attribution.maps[k], random_maps[k])
            row["seconds"] = attribution.seconds_per_map
            row["peak_memory_mib"] = peak
            pair_rows[name] = row
        _pair_curves(k, pair, outputs["pred_boxes"][0, pair.query], attributions, inputs, ctx, part, pair_rows)
        rows.extend(pair_rows.values())
    part["curve_seconds"] = time.perf_counter() - t0
    part["records"] = [{key: float(v) if isinstance(v, (np.floating, np.integer)) else v for key, v in row.items()}
                       for row in rows]
    part["seconds"] = time.perf_counter() - start
    return part
