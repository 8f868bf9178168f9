"""Explanation-quality metrics (definitions in shared/docs/evaluation.md), on plain maps and masks.

Every map ``E`` is a 2-D array of relevance over pixels (numpy or torch; used as float64). Choices
where the doc leaves room, stated once here:

* **Positive part.** The mass-based metrics (mass accuracy, energy pointing game, leak) use
  ``max(E, 0)``. A map without positive relevance gives NaN (undefined), which the aggregation
  excludes and counts (N per metric).
* **Ties.** Rank accuracy and the pointing game take the *expected* value under uniformly random
  tie-breaking, computed exactly: a constant map scores the mask's area fraction on both, a map
  with one maximum scores 0 or 1. Perturbation orders break ties with a seeded random permutation.
* **Pointing-game tolerance** ``t`` px: a hit if the maximum lies within Euclidean distance ``t``
  of a mask pixel (Zhang et al. use 15 px on COCO; our images are 160 px).
* **Boxes** are xyxy pixels with exclusive right/bottom edges (``x1`` = last column + 1), as the
  shapes data writes them; a pixel belongs to a box when its centre does.
* **Deletion / insertion** (Petsiuk et al. 2018): pixels are taken in order of decreasing relevance
  (signed: most positive first), ``steps`` equal steps from 0 % to 100 % of the pixels; removed
  pixels get the value of a neutral image (:data:`REPLACEMENTS`): ``mean`` (per-image, per-channel
  mean colour), ``blur`` (Gaussian blur), ``noise`` (uniform noise over each channel's own range,
  seeded) or ``zero`` (black). The curve is a model score per step; the area under it is the
  trapezoid over the removed fraction, divided by the fraction range.
* **Both orders** (Blücher, Vielhaben & Strodthoff, TMLR 2024): MIF removes the most relevant first
  (the deletion curve), LIF the least relevant first (the deletion curve of the reversed order).
  The symmetric relevance gain SRG = AUC(LIF) − AUC(MIF) (:func:`symmetric_relevance_gain`) is less
  sensitive to the replacement than either curve alone, since the replacement's own effect on the
  score appears in both. Over the whole range LIF-deletion at fraction f is MIF-insertion at 1 − f,
  the same images, so the evaluation computes each distinct perturbed image once.
* **Encoder tokens** (the ``tokens`` unit): the deformable encoder's input tokens are removed
  instead of pixels; a removed token is replaced by its level's neutral token grid — the same
  replacements, applied to each level's (C, h, w) token grid: ``mean`` = the level's mean token,
  ``blur`` with σ / stride tokens (the same extent in pixels), ``noise`` over each channel's range,
  ``zero`` — before the position encoding is added, and the model runs on from there (:class:`TokenScore`; the
  FPN's stride-4 lateral path reads the backbone directly and is not perturbed). Every step removes
  the same fraction of every level, each level's tokens in order of relevance
  (:func:`level_balanced_order`), so levels whose tokens cover more pixels are not favoured.
  A pixel map becomes a token map by summing it over each token's footprint (:func:`pool_to_tokens`).
* **AOPC** (Samek et al. 2017): ``1/(k+1) Σ_{j=0..k} (s_0 − s_j)`` over the first ``k`` steps.
* **Confidence intervals**: Student-t by default (:func:`mean_ci`); a percentile bootstrap
  (:func:`bootstrap_ci`) is there to check it.
"""
from __future__ import annotations

import inspect
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..box_ops import box_cxcywh_to_xyxy, elementwise_box_iou
from ..model.pixel_decoder import encoder_call_inputs

__all__ = [
    "Estimate", "mean_ci", "bootstrap_ci", "paired_difference",
    "box_mask", "relevance_mass_accuracy", "relevance_rank_accuracy", "pointing_game",
    "energy_pointing_game", "leak_to_other_objects", "conservation_error", "rank_correlation",
    "mean_replacement", "blur_replacement", "noise_replacement", "zero_replacement", "REPLACEMENTS",
    "make_replacement", "token_neutral", "symmetric_relevance_gain", "relevance_order", "perturbation_fractions", "perturbed_images",
    "perturbation_curve", "area_under_curve", "aopc", "box_iou_cxcywh", "DetectorScore", "PeakMemory",
    "TokenScore", "TokenFeatures", "pool_to_tokens", "pool_to_patches", "level_balanced_order",
]


def _array(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _bool(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x).astype(bool)


def _check_same_shape(relevance: np.ndarray, *masks: np.ndarray) -> None:
    if relevance.ndim != 2:
        raise ValueError(f"a relevance map must be 2-D (H, W), got shape {relevance.shape}")
    for m in masks:
        if m.shape[-2:] != relevance.shape:
            raise ValueError(f"mask shape {m.shape} does not match the relevance map {relevance.shape}")


# ----------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class Estimate:
    """A mean with its confidence interval over ``n`` finite values."""

    mean: float
    low: float
    high: float
    n: int
    method: str = "t"

    def __str__(self) -> str:
        if self.n == 0:
            return "n/a"
        if not math.isfinite(self.low):
            return f"{self.mean:.3g}"
        return f"{self.mean:.3g} [{self.low:.3g}, {self.high:.3g}]"


def _finite(values: Sequence[float] | np.ndarray) -> np.ndarray:
    v = _array(values).ravel()
    return v[np.isfinite(v)]


def mean_ci(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> Estimate:
    """Mean and Student-t confidence interval, mean ± t_{(1+c)/2, n−1} · s/√n, over the finite values.

    One value gives an interval of NaN (no spread can be estimated); none gives NaN throughout.
    """
    from scipy import stats

    v = _finite(values)
    n = int(v.size)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    mean = float(v.mean())
    if n == 1:
        return Estimate(mean, math.nan, math.nan, 1)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * float(v.std(ddof=1)) / math.sqrt(n)
    return Estimate(mean, mean - half, mean + half, n)


def bootstrap_ci(values: Sequence[float] | np.ndarray, confidence: float = 0.95, n_resamples: int = 10000,
                 seed: int = 0) -> Estimate:
    """Mean and percentile-bootstrap confidence interval (``n_resamples`` resamples, seeded)."""
    v = _finite(values)
    n = int(v.size)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, "bootstrap")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, n, size=(n_resamples, n))].mean(1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return Estimate(float(v.mean()), float(low), float(high), n, "bootstrap")


def paired_difference(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    """Per-pair a − b, NaN where either is missing (for paired CIs of method vs. baseline)."""
    a, b = _array(a), _array(b)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same shape, got {a.shape} and {b.shape}")
    return a - b


# ----------------------------------------------------------------------------- localisation
def box_mask(box: Sequence[float], shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: pixels whose centre lies in the xyxy box (exclusive right/bottom edges)."""
    h, w = shape
    x0, y0, x1, y1 = (float(v) for v in box)
    cols = np.arange(w) + 0.5
    rows = np.arange(h) + 0.5
    return ((rows >= y0) & (rows < y1))[:, None] & ((cols >= x0) & (cols < x1))[None, :]


def _positive_share(relevance: Any, region: np.ndarray) -> float:
    e = np.clip(_array(relevance), 0, None)
    region = _bool(region)
    _check_same_shape(e, region)
    total = e.sum()
    if not total > 0:
        return math.nan
    return float(e[region].sum() / total)


def _within(mask: Any, tolerance: float) -> np.ndarray:
    """The mask grown to every pixel within ``tolerance`` px (Euclidean) of it."""
    from scipy import ndimage

    m = _bool(mask)
    return ndimage.distance_transform_edt(~m) <= tolerance if tolerance > 0 and m.any() else m


def relevance_mass_accuracy(relevance: Any, mask: Any, tolerance: float = 0.0) -> float:
    """Σ_{p∈M} max(E_p, 0) / Σ_p max(E_p, 0) (Arras et al. 2022), M grown by ``tolerance`` px; NaN without
    positive relevance."""
    return _positive_share(relevance, _within(mask, tolerance))


def _expected_share_of_top(values: np.ndarray, inside: np.ndarray, k: int) -> float:
    """Expected share of ``inside`` among the k largest values, ties broken uniformly at random."""
    if k <= 0:
        return math.nan
    order = np.argsort(-values, kind="stable")
    threshold = values[order[k - 1]]
    above = values > threshold
    tied = values == threshold
    slots = k - int(above.sum())
    hits = float(inside[above].sum()) + slots * float(inside[tied].sum()) / float(tied.sum())
    return hits / k


def relevance_rank_accuracy(relevance: Any, mask: Any) -> float:
    """Share of the K = |M| highest-relevance pixels that lie in M (Arras et al. 2022); ties: expected."""
    e = _array(relevance)
    m = _bool(mask)
    _check_same_shape(e, m)
    return _expected_share_of_top(e.ravel(), m.ravel(), int(m.sum()))


def pointing_game(relevance: Any, mask: Any, tolerance: float = 0.0) -> float:
    """1 if the maximum of E lies in M (or within ``tolerance`` px of it), else 0; ties: expected hit rate."""
    e = _array(relevance)
    m = _bool(mask)
    _check_same_shape(e, m)
    if not m.any():
        return math.nan
    m = _within(m, tolerance)
    peak = e == e.max()
    return float(m[peak].sum() / peak.sum())


def energy_pointing_game(relevance: Any, box: Sequence[float]) -> float:
    """Σ_{p∈B} max(E, 0) / Σ_p max(E, 0) for the xyxy box B (Wang et al., Score-CAM 2020)."""
    e = _array(relevance)
    return _positive_share(e, box_mask(box, e.shape))


def leak_to_other_objects(relevance: Any, mask: Any, other_masks: Any) -> float:
    """Share of positive relevance on other objects' masks (outside this object's mask); lower is better."""
    m = _bool(mask)
    others = _bool(other_masks)
    if others.ndim == 2:
        others = others[None]
    region = (others.any(0) if others.shape[0] else np.zeros_like(m)) & ~m
    return _positive_share(relevance, region)


def conservation_error(relevance_sum: float, target: float) -> float:
    """|Σ R_input − target| / |target|."""
    return abs(float(relevance_sum) - float(target)) / max(abs(float(target)), 1e-12)


def rank_correlation(a: Any, b: Any) -> float:
    """Spearman rank correlation of two maps (model-randomisation test); NaN if either is constant."""
    from scipy import stats

    x, y = _array(a).ravel(), _array(b).ravel()
    if x.shape != y.shape:
        raise ValueError(f"maps differ in size: {x.shape} vs {y.shape}")
    if np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan
    return float(stats.spearmanr(x, y).statistic)


# ----------------------------------------------------------------------------- perturbation
def mean_replacement(image: torch.Tensor) -> torch.Tensor:
    """Neutral image for (C, H, W) or (1, C, H, W): every pixel set to the image's per-channel mean."""
    return image.mean(dim=(-2, -1), keepdim=True).expand_as(image).clone()


def blur_replacement(image: torch.Tensor, sigma: float = 5.0) -> torch.Tensor:
    """Neutral image: Gaussian blur (σ in px, kernel ±3σ, reflect padding) of (C, H, W) or (1, C, H, W)."""
    if sigma <= 0:
        raise ValueError(f"blur sigma must be > 0, got {sigma}")
    squeeze = image.dim() == 3
    x = image[None] if squeeze else image
    radius = max(1, int(math.ceil(3 * sigma)))
    radius = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    x = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    x = F.pad(x, (0, 0, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    return x[0] if squeeze else x


def noise_replacement(image: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Neutral image: uniform noise over each channel's own [min, max] of (C, H, W) or (1, C, H, W), seeded
    (the pixel analogue of ODAM's noise; for pixel values 0–255 of a natural image about U(0, 255))."""
    g = torch.Generator().manual_seed(int(seed))
    low = image.amin(dim=(-2, -1), keepdim=True)
    high = image.amax(dim=(-2, -1), keepdim=True)
    u = torch.rand(image.shape, generator=g, dtype=torch.float64).to(image)
    return low + u * (high - low)


def zero_replacement(image: torch.Tensor) -> torch.Tensor:
    """Neutral image of zeros: black in pixel values (0–255), the zero token for encoder tokens."""
    return torch.zeros_like(image)


REPLACEMENTS: dict[str, str] = {
    "mean": "per-image, per-channel mean colour",
    "blur": "Gaussian blur",
    "noise": "uniform noise over each channel's range, seeded",
    "zero": "black pixels, zero tokens",
}


def make_replacement(name: str, blur_sigma: float = 5.0, seed: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """The neutral-image function of a replacement name (see :data:`REPLACEMENTS`)."""
    if name == "mean":
        return mean_replacement
    if name == "blur":
        return lambda image: blur_replacement(image, blur_sigma)
    if name == "noise":
        return lambda image: noise_replacement(image, seed)
    if name == "zero":
        return zero_replacement
    raise ValueError(f"replacement must be one of {list(REPLACEMENTS)}, got {name!r}")


def token_neutral(tokens: torch.Tensor, shapes: Sequence[tuple[int, int]], padded_size: tuple[int, int],
                  name: str, blur_sigma: float = 5.0, seed: int = 0) -> torch.Tensor:
    """Neutral encoder tokens (T, C): the replacement applied to each level's (C, h, w) token grid; blur's σ
    is divided by the level's stride so that it covers the same extent in pixels as on the image."""
    out = []
    start = 0
    for level, (h, w) in enumerate(shapes):
        grid = tokens[start:start + h * w].t().reshape(-1, h, w)  # (C, h, w)
        stride = padded_size[0] / h
        replace = make_replacement(name, blur_sigma / stride, seed + level)
        out.append(replace(grid).reshape(grid.shape[0], h * w).t())
        start += h * w
    if start != tokens.shape[0]:
        raise ValueError(f"level shapes {list(shapes)} cover {start} tokens, the tokens are {tokens.shape[0]}")
    return torch.cat(out)


def relevance_order(relevance: Any, seed: int = 0) -> np.ndarray:
    """Flat pixel indices, most relevant first; equal values in a seeded random order."""
    e = _array(relevance).ravel()
    tie_break = np.random.default_rng(seed).permutation(e.size)
    return np.lexsort((tie_break, -e))


def perturbation_fractions(steps: int, max_fraction: float = 1.0) -> np.ndarray:
    """The perturbed fractions 0, m/steps, …, m (m = ``max_fraction``, default 1: the whole image)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 < max_fraction <= 1.0:
        raise ValueError(f"max_fraction must be in (0, 1], got {max_fraction}")
    return np.linspace(0.0, max_fraction, steps + 1)


def perturbed_images(image: torch.Tensor, neutral: torch.Tensor, order: np.ndarray, counts: Sequence[int],
                     mode: str = "deletion") -> torch.Tensor:
    """(len(counts), C, H, W): the first ``counts[i]`` pixels of ``order`` removed (deletion: set to
    ``neutral``) or inserted (insertion: taken from ``image`` into ``neutral``)."""
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    c, h, w = image.shape[-3:]
    rank = torch.empty(h * w, dtype=torch.long)
    rank[torch.as_tensor(np.ascontiguousarray(order), dtype=torch.long)] = torch.arange(h * w)  # reversed views too
    chosen = rank[None] < torch.as_tensor(list(counts), dtype=torch.long)[:, None]  # (B, HW)
    chosen = chosen.view(-1, 1, h, w).to(image.device)
    first, second = (neutral, image) if mode == "deletion" else (image, neutral)
    return torch.where(chosen, first.reshape(1, c, h, w), second.reshape(1, c, h, w))


def perturbation_curve(score_fn: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor,
                       neutral: torch.Tensor, relevance: Any, steps: int = 20, mode: str = "deletion",
                       batch_size: int = 8, seed: int = 0, endpoints: tuple[Any, Any] | None = None,
                       order: np.ndarray | None = None, max_fraction: float = 1.0) -> np.ndarray:
    """Scores (steps+1,) or (steps+1, S) along a deletion or insertion curve.

    ``score_fn`` maps a batch of images (B, C, H, W) to (B,) or (B, S) scores. ``endpoints`` =
    (score of ``image``, score of ``neutral``), if already known, saves the two order-independent
    forwards. ``order`` (flat indices, first removed first) replaces the order of ``relevance``.
    ``max_fraction`` < 1 stops the curve there (finer steps where a detector's score changes).
    """
    c, h, w = image.shape[-3:]
    order = relevance_order(relevance, seed) if order is None else np.asarray(order)
    if order.size != h * w:
        raise ValueError(f"relevance has {order.size} pixels, the image {h * w}")
    fractions = perturbation_fractions(steps, max_fraction)
    counts = np.round(fractions * h * w).astype(int)
    results: list[Any] = [None] * len(counts)
    if endpoints is not None:
        original, blank = endpoints
        results[0] = original if mode == "deletion" else blank
        if counts[-1] == h * w:
            results[-1] = blank if mode == "deletion" else original
    todo = [i for i, r in enumerate(results) if r is None]
    for begin in range(0, len(todo), batch_size):
        idx = todo[begin: begin + batch_size]
        batch = perturbed_images(image, neutral, order, counts[idx], mode)
        with torch.no_grad():
            scores = _array(score_fn(batch))
        for i, s in zip(idx, scores):
            results[i] = s
    return np.stack([_array(r) for r in results])


def area_under_curve(scores: Any, fractions: Any | None = None) -> float:
    """Trapezoidal area under a curve over the perturbed fraction, divided by the fraction range: over
    [0, 1] (the default) the area itself, over [0, m] the curve's mean height, so AUCs stay in the scores' range."""
    s = _array(scores)
    x = perturbation_fractions(len(s) - 1) if fractions is None else _array(fractions)
    return float(np.trapezoid(s, x) / (x[-1] - x[0]))


def aopc(scores: Any, k: int | None = None) -> float:
    """Area over the perturbation curve, 1/(k+1) Σ_{j=0..k} (s_0 − s_j) (Samek et al. 2017)."""
    s = _array(scores)
    k = len(s) - 1 if k is None else min(int(k), len(s) - 1)
    return float(np.mean(s[0] - s[: k + 1]))


def symmetric_relevance_gain(lif_auc: float, mif_auc: float) -> float:
    """SRG = AUC(LIF) − AUC(MIF) (Blücher et al. 2024): higher is better; 0 for an order unrelated to the score."""
    return float(lif_auc) - float(mif_auc)


# ----------------------------------------------------------------------------- the detector's score
def box_iou_cxcywh(boxes: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """IoU of (..., 4) cx cy w h boxes with one cx cy w h box → (...)."""
    return elementwise_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(box))


class DetectorScore:
    """The explained detection's class score on perturbed copies of its image.

    Called on pixel-value images (B, 3, h, w) in the model's channel order at the model input size
    (resized, unpadded); normalises and pads them, runs the model, and returns (B, 2):
    column 0 = sigmoid class score of the query whose box best matches the original box (IoU; the
    one-target case of the Hungarian match, since DETR queries can swap roles), column 1 = the same
    query index as explained, without re-matching.
    """

    columns = ("matched", "fixed_query")

    def __init__(self, model: torch.nn.Module, query: int, label: int, box: torch.Tensor):
        self.model = model
        self.query = int(query)
        self.label = int(label)
        self.box = box.detach().reshape(4)  # cx cy w h, normalised to the padded input

    def _outputs(self, images: torch.Tensor) -> dict[str, Any]:
        return self.model(self.model.normalize_and_pad(images))

    def outputs(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's ``pred_logits`` and ``pred_boxes`` on a batch of inputs; they do not depend on the
        explained pair, so one image's pairs can share them (its clean forward, its neutral inputs)."""
        with torch.no_grad():
            outputs = self._outputs(inputs)
        return {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.score(self.outputs(images))

    def score(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, 2) scores of this pair from outputs of :meth:`outputs` (or of the model itself)."""
        iou = box_iou_cxcywh(outputs["pred_boxes"], self.box.to(outputs["pred_boxes"]))  # (B, Q)
        # prefer the explained query on equal IoU (argmax takes the first maximum)
        iou[:, self.query] += 1e-6
        matched = iou.argmax(1)
        probs = outputs["pred_logits"][..., self.label].sigmoid()  # (B, Q)
        rows = torch.arange(probs.shape[0], device=probs.device)
        return torch.stack([probs[rows, matched], probs[:, self.query]], 1).cpu()


class TokenFeatures:
    """What every token-level perturbation of one image shares: the backbone features and the encoder's
    input tokens (T, C) of the normalised, padded input ``tensor`` (1, 3, Hp, Wp), computed once."""

    def __init__(self, model: torch.nn.Module, tensor: torch.Tensor):
        self.encoder = model.sem_seg_head.pixel_decoder.transformer.encoder
        self.padded_size: tuple[int, int] = tuple(tensor.shape[-2:])
        captured: dict[str, Any] = {}

        def grab(_module, args, kwargs):
            captured["src"], shapes = encoder_call_inputs(args, kwargs)
            captured["shapes"] = [(int(h), int(w)) for h, w in shapes.tolist()]

        with torch.no_grad():
            self.features = model.backbone(tensor)
            handle = self.encoder.register_forward_pre_hook(grab, with_kwargs=True)
            try:
                model.sem_seg_head(self.features)
            finally:
                handle.remove()
        self.tokens: torch.Tensor = captured["src"][0]  # (T, C)
        self.shapes: list[tuple[int, int]] = captured["shapes"]
        self.num_tokens = sum(h * w for h, w in self.shapes)

    def neutral(self, replacement: str = "mean", blur_sigma: float = 5.0, seed: int = 0) -> torch.Tensor:
        """Neutral tokens (T, C) of a replacement (:func:`token_neutral`)."""
        return token_neutral(self.tokens, self.shapes, self.padded_size, replacement, blur_sigma, seed)


class TokenScore(DetectorScore):
    """:class:`DetectorScore` with the deformable encoder's input tokens perturbed instead of pixels.

    Called on keep masks (B, 1, 1, T) over the encoder tokens (encoder order, 1 = keep, 0 = replace
    by ``neutral`` (T, C), by default the mean token of its level). ``source`` is the image's
    :class:`TokenFeatures` (shared by its pairs: the backbone runs once per image) or the normalised,
    padded input (1, 3, Hp, Wp) itself.

    ``shared`` (default): the head runs on the image's features at batch size 1 and the batch of
    perturbed token sets is made at the encoder's input, so what comes before the encoder (input
    projections, position encodings, level embeddings) and the FPN's lateral conv run once per batch,
    not once per perturbed input. ``shared=False`` runs the head on B copies of the features: the
    reference it must equal.
    """

    _BATCHED = ("src", "valid_ratios", "pos", "padding_mask")  # the encoder's per-image arguments

    def __init__(self, model: torch.nn.Module, source: "TokenFeatures | torch.Tensor", query: int, label: int,
                 box: torch.Tensor, neutral: torch.Tensor | None = None, shared: bool = True):
        super().__init__(model, query, label, box)
        self.shared = shared
        shared = source if isinstance(source, TokenFeatures) else TokenFeatures(model, source)
        self.encoder = shared.encoder
        self.padded_size = shared.padded_size
        self.features = shared.features
        self.shapes = shared.shapes
        self.num_tokens = shared.num_tokens
        self.neutral = shared.neutral("mean") if neutral is None else neutral
        if tuple(self.neutral.shape) != tuple(shared.tokens.shape):
            raise ValueError(f"neutral tokens of shape {tuple(self.neutral.shape)}, expected {tuple(shared.tokens.shape)}")

    def _outputs(self, keep: torch.Tensor) -> dict[str, Any]:
        b = keep.shape[0]
        keep = keep.reshape(b, self.num_tokens, 1) > 0.5

        def replace(_module, args, kwargs):
            src, _ = encoder_call_inputs(args, kwargs)
            new = torch.where(keep.to(src.device), src, self.neutral.to(src)[None])
            if not self.shared:
                return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "src": new})
            bound = inspect.signature(self.encoder.forward).bind(*args, **kwargs)
            for name in self._BATCHED:  # batch 1 → b: the same image under b token perturbations
                value = bound.arguments.get(name)
                if isinstance(value, torch.Tensor):
                    bound.arguments[name] = value.expand(b, *value.shape[1:])
            bound.arguments["src"] = new
            return bound.args, bound.kwargs

        handle = self.encoder.register_forward_pre_hook(replace, with_kwargs=True)
        try:
            if self.shared:  # after the encoder the FPN adds the batch-1 lateral conv to b maps (broadcast)
                return self.model.sem_seg_head(self.features)
            return self.model.sem_seg_head({k: v.expand(b, *v.shape[1:]) for k, v in self.features.items()})
        finally:
            handle.remove()


def pool_to_tokens(relevance: Any, shapes: Sequence[tuple[int, int]], padded_size: tuple[int, int]) -> torch.Tensor:
    """A pixel map (h, w) at the model input size → (T,) encoder-token relevance: per level, the sum of
    the map (zero over the padding) over each token's footprint of the padded input; levels in ``shapes`` order."""
    e = torch.as_tensor(_array(relevance))
    hp, wp = padded_size
    padded = F.pad(e, (0, wp - e.shape[1], 0, hp - e.shape[0]))[None, None]
    return torch.cat([(F.adaptive_avg_pool2d(padded, (h, w)) * (hp * wp / (h * w))).flatten() for h, w in shapes])


def pool_to_patches(relevance: Any, patch: int) -> torch.Tensor:
    """A pixel map (h, w) → (⌈h/patch⌉, ⌈w/patch⌉): each ``patch`` × ``patch`` square's sum (the last row and
    column of squares are cut by the image edge)."""
    e = _array(relevance)
    grid = (-(-e.shape[0] // patch), -(-e.shape[1] // patch))
    # the squares are the footprints of a single token level on the map padded to whole squares
    return pool_to_tokens(e, [grid], (grid[0] * patch, grid[1] * patch)).view(grid)


def level_balanced_order(token_relevance: Any, shapes: Sequence[tuple[int, int]], seed: int = 0) -> np.ndarray:
    """Token indices in removal order such that the first ``f·T`` hold ≈ a fraction ``f`` of every level,
    each level's tokens by decreasing relevance (ties: seeded random, as :func:`relevance_order`)."""
    e = _array(token_relevance).ravel()
    keys = np.empty(e.size)
    start = 0
    for level, (h, w) in enumerate(shapes):
        n = h * w
        within = relevance_order(e[start:start + n], seed + level)
        keys[start + within] = (np.arange(n) + 0.5) / n
        start += n
    if start != e.size:
        raise ValueError(f"level shapes {list(shapes)} cover {start} tokens, the relevance has {e.size}")
    return np.argsort(keys, kind="stable")


# ----------------------------------------------------------------------------- cost
class PeakMemory:
    """Peak memory of a block in MiB: CUDA's allocator peak on a GPU; on CPU the resident-set high-water
    mark above the start, sampled every ``interval`` s from /proc after glibc's ``malloc_trim`` (approximate:
    short spikes between samples and memory the allocator keeps are missed; 0 where /proc is unavailable)."""

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.002):
        self.device = torch.device(device)
        self.interval = interval
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0

    def _sample(self, start: int) -> None:
        peak = start
        while not self._stop.is_set():
            peak = max(peak, self._rss())
            time.sleep(self.interval)
        self.peak_mib = max(self.peak_mib, (max(peak, self._rss()) - start) / 2**20)

    @staticmethod
    def _release_free_memory() -> None:
        """Return freed heap pages to the OS (glibc), so the RSS baseline is not inflated by earlier work."""
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass

    def __enter__(self) -> "PeakMemory":
        if self.device.type != "cuda":
            self._release_free_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._thread = threading.Thread(target=self._sample, args=(self._rss(),), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
