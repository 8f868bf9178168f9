"""D-RISE (Petsiuk et al., CVPR 2021): black-box saliency of a detection from randomly masked images.

N random masks M_i (RISE: binary s × s grids, each cell kept with probability p, upsampled bilinearly
to (s + 1) cells and cropped at a random shift, so masks are smooth and not grid-aligned) are applied
to the image (masked pixels set to 0, as RISE does); the detector runs on each masked image (in
batches). A detection is a vector d = (L, O, P): box L, objectness O, class probabilities P. The
similarity of the target d_t to a detection d_j is

    s(d_t, d_j) = IoU(L_t, L_j) · cos(P_t, P_j) · O_j,

the weight of mask i is the similarity of the best-matching detection in the masked image,
w_i = max_j s(d_t, d_j), and the saliency map is Σ_i w_i M_i (normalised by N here, which changes
no ranking). The target has P_t = one-hot of the explained label and O_t = 1.

DETR-family detectors have no objectness output: every query carries per-class sigmoid
probabilities. We take O_j = max_c P_j,c, the query's detection confidence (what the postprocessing
ranks detections by); without it, cos(P_t, P_j) of a query whose probabilities are all near zero
can be close to 1, and the weights would ignore whether the masked image still has the detection.
"""
from __future__ import annotations

import math
import zlib
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..box_ops import box_cxcywh_to_xyxy, elementwise_box_iou
from .methods import Method

__all__ = ["DRise", "random_masks", "detection_similarity", "drise_saliency"]

Detect = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # images → boxes (B, Q, 4) xyxy, probs (B, Q, C)


def random_masks(n: int, size: tuple[int, int], grid: int = 8, p: float = 0.5,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, 1, h, w) RISE masks in [0, 1]: ``grid`` × ``grid`` binary cells kept with probability ``p``,
    upsampled bilinearly to (grid + 1) cells, cropped at a random shift of up to one cell."""
    if n < 1 or grid < 1 or not 0.0 < p <= 1.0:
        raise ValueError(f"random_masks needs n >= 1, grid >= 1 and 0 < p <= 1, got n={n}, grid={grid}, p={p}")
    h, w = size
    cell_h, cell_w = math.ceil(h / grid), math.ceil(w / grid)
    cells = (torch.rand(n, 1, grid, grid, generator=generator) < p).float()
    up = F.interpolate(cells, size=((grid + 1) * cell_h, (grid + 1) * cell_w), mode="bilinear", align_corners=False)
    up = up.clamp_(0.0, 1.0)  # interpolation rounding may step a hair outside
    dy = torch.randint(0, cell_h, (n,), generator=generator)
    dx = torch.randint(0, cell_w, (n,), generator=generator)
    return torch.stack([up[i, :, y:y + h, x:x + w] for i, (y, x) in enumerate(zip(dy.tolist(), dx.tolist()))])


def detection_similarity(target_boxes: torch.Tensor, target_probs: torch.Tensor, boxes: torch.Tensor,
                         probs: torch.Tensor, objectness: torch.Tensor) -> torch.Tensor:
    """D-RISE weights (B, K): for each of B detection sets and K targets, max_j IoU · cos(P_t, P_j) · O_j.

    ``target_boxes`` (K, 4) and ``boxes`` (B, Q, 4) are xyxy; ``target_probs`` (K, C), ``probs`` (B, Q, C),
    ``objectness`` (B, Q)."""
    iou = elementwise_box_iou(boxes[:, None], target_boxes[None, :, None])  # (B, K, Q)
    cos = torch.einsum("kc,bqc->bkq", F.normalize(target_probs, dim=-1), F.normalize(probs, dim=-1))
    return (iou * cos * objectness[:, None]).amax(-1)


def drise_saliency(detect: Detect, image: torch.Tensor, target_boxes: torch.Tensor, target_probs: torch.Tensor,
                   n_masks: int = 500, grid: int = 8, p: float = 0.5, batch_size: int = 16,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """(K, h, w) D-RISE maps of K targets on ``image`` (C, h, w): Σ_i w_i M_i / N over ``n_masks`` masks,
    the masked images run through ``detect`` in batches of ``batch_size`` (the K targets share them)."""
    k = target_boxes.shape[0]
    h, w = image.shape[-2:]
    saliency = torch.zeros(k, h, w, dtype=torch.float64)
    for begin in range(0, n_masks, batch_size):
        masks = random_masks(min(batch_size, n_masks - begin), (h, w), grid, p, generator)  # (B, 1, h, w)
        with torch.no_grad():
            boxes, probs = detect(image[None] * masks)
        objectness = probs.amax(-1)
        weights = detection_similarity(target_boxes.to(boxes), target_probs.to(probs), boxes, probs, objectness)
        saliency += torch.einsum("bk,bhw->khw", weights.double(), masks[:, 0].double())
    return (saliency / n_masks).float()


class DRise(Method):
    """D-RISE (Petsiuk et al. 2021) on the detector's pixel input: a black-box baseline (module doc).

    The K queries of an image share one set of ``n_masks`` masked forwards. Masks are seeded by
    (``seed``, image content): reproducible, different per image."""

    name = "d-rise"
    needs_warm_up = False  # only forwards, already warm; a warm-up call would cost n_masks of them

    def __init__(self, n_masks: int = 500, grid: int = 8, p: float = 0.5, batch_size: int = 16, seed: int = 0):
        if n_masks < 1 or batch_size < 1:
            raise ValueError(f"d-rise needs n_masks >= 1 and batch_size >= 1, got {n_masks} and {batch_size}")
        self.n_masks, self.grid, self.p, self.batch_size, self.seed = n_masks, grid, p, batch_size, seed

    def _maps(self, model: Any, prepared: Any, queries: list[int], labels: list[int]) -> tuple:
        rh, rw = prepared.resized_size
        image = (prepared.tensor[0, :, :rh, :rw] * model.pixel_std + model.pixel_mean).detach()  # pixel values
        hp, wp = prepared.tensor.shape[-2:]
        scale = torch.tensor([wp, hp, wp, hp], dtype=torch.float32)  # boxes are normalised to the padded input

        def detect(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            outputs = model(model.normalize_and_pad(images))
            return box_cxcywh_to_xyxy(outputs["pred_boxes"]) * scale.to(images), outputs["pred_logits"].sigmoid()

        with torch.no_grad():
            boxes, probs = detect(image[None])
        target_boxes = boxes[0, queries]
        target_probs = F.one_hot(torch.tensor(labels), probs.shape[-1]).to(probs)
        content = zlib.crc32(np.ascontiguousarray(prepared.tensor.detach().cpu().numpy()).tobytes())
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, content]).generate_state(1)[0]))
        maps = drise_saliency(detect, image, target_boxes, target_probs, self.n_masks, self.grid, self.p,
                              self.batch_size, generator)
        return maps, None
