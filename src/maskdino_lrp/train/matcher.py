"""Hungarian matching of decoder queries to ground-truth objects (MaskDINO / DINO style).

The cost of assigning query ``q`` to object ``t`` is a weighted sum of

* a sigmoid-focal classification cost (positive minus negative focal term of the target class),
* the L1 distance between normalised ``cx cy w h`` boxes and the negative generalised IoU,
* a per-pixel binary cross-entropy and a dice cost between the predicted mask logits and the
  target mask, either on randomly sampled points (as in the official code) or densely on the
  prediction's own resolution (targets area-downsampled to it), which is cheap at ``H/4`` on CPU.

The assignment itself is :func:`scipy.optimize.linear_sum_assignment` per image.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

# the box operations live in one module; imported here by name because losses and tests import them from the matcher
from ..box_ops import box_area, box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh, generalized_box_iou  # noqa: F401

FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0

# ----------------------------------------------------------------------------------------------
# Boxes
# ----------------------------------------------------------------------------------------------


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy boxes (N, 4), pixel-edge convention (x1 = last column + 1), of (N, H, W) bool masks."""
    n, h, w = masks.shape
    if n == 0:
        return masks.new_zeros((0, 4), dtype=torch.float32)
    rows = masks.any(2)
    cols = masks.any(1)
    ar_h = torch.arange(h, device=masks.device, dtype=torch.float32)
    ar_w = torch.arange(w, device=masks.device, dtype=torch.float32)
    big = float(max(h, w) + 1)
    y0 = torch.where(rows, ar_h, big).amin(1)
    y1 = torch.where(rows, ar_h, -1.0).amax(1) + 1
    x0 = torch.where(cols, ar_w, big).amin(1)
    x1 = torch.where(cols, ar_w, -1.0).amax(1) + 1
    boxes = torch.stack([x0, y0, x1, y1], 1)
    return torch.where(masks.flatten(1).any(1, keepdim=True), boxes, torch.zeros_like(boxes))


# ----------------------------------------------------------------------------------------------
# Mask sampling
# ----------------------------------------------------------------------------------------------


def point_sample(inputs: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear values of (N, C, H, W) maps at (N, P, 2) points in [0, 1]² (x, y) → (N, C, P)."""
    grid = (2.0 * coords - 1.0).unsqueeze(2)
    return F.grid_sample(inputs, grid, mode="bilinear", align_corners=False).squeeze(3)


def resize_targets(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, H, W) target masks → (N, h, w) soft masks: the fraction of each output cell they cover."""
    masks = masks.float()
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *size))
    return F.adaptive_avg_pool2d(masks[:, None], size)[:, 0]


# ----------------------------------------------------------------------------------------------
# Pairwise costs
# ----------------------------------------------------------------------------------------------


def focal_class_cost(logits: torch.Tensor, labels: torch.Tensor,
                     alpha: float = FOCAL_ALPHA, gamma: float = FOCAL_GAMMA) -> torch.Tensor:
    """(Q, C) logits, (N,) labels → (Q, N) focal cost: positive minus negative focal loss of the label."""
    prob = logits.sigmoid()
    pos = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
    neg = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
    return (pos - neg)[:, labels]


def pairwise_sigmoid_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(Q, P) logits, (N, P) soft targets → (Q, N) mean binary cross-entropy over the P positions."""
    p = logits.shape[1]
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return (pos @ targets.T + neg @ (1 - targets).T) / max(p, 1)


def pairwise_dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(Q, P) logits, (N, P) soft targets → (Q, N) dice loss 1 - (2|X∩Y| + 1) / (|X| + |Y| + 1)."""
    prob = logits.sigmoid()
    numerator = 2 * prob @ targets.T
    denominator = prob.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising the weighted matching cost.

    ``num_points > 0`` compares masks on that many random points shared by all masks of an image
    (the official scheme); ``num_points == 0`` compares them densely at the prediction resolution.
    Returns, per image, ``(query_indices, target_indices)`` int64 tensors sorted by query.
    """

    def __init__(self, cost_class: float = 4.0, cost_mask: float = 5.0, cost_dice: float = 5.0,
                 cost_box: float = 5.0, cost_giou: float = 2.0, num_points: int = 0):
        super().__init__()
        if not any((cost_class, cost_mask, cost_dice, cost_box, cost_giou)):
            raise ValueError("at least one matching cost must be non-zero")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.cost_box = cost_box
        self.cost_giou = cost_giou
        self.num_points = int(num_points)

    def cost_matrix(self, outputs: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], b: int,
                    use: Sequence[str] = ("cls", "box", "mask")) -> torch.Tensor:
        """(Q, N) matching cost of image ``b`` of a batch of outputs against its target dict."""
        logits = outputs["pred_logits"][b].float()
        labels = target["labels"]
        cost = self.cost_class * focal_class_cost(logits, labels)
        if "box" in use and "pred_boxes" in outputs and (self.cost_box or self.cost_giou):
            out_box = outputs["pred_boxes"][b].float()
            tgt_box = target["boxes"].to(out_box)
            cost = cost + self.cost_box * torch.cdist(out_box, tgt_box, p=1)
            cost = cost - self.cost_giou * generalized_box_iou(box_cxcywh_to_xyxy(out_box), box_cxcywh_to_xyxy(tgt_box))
        if "mask" in use and outputs.get("pred_masks") is not None and (self.cost_mask or self.cost_dice):
            out_mask = outputs["pred_masks"][b].float()
            tgt_mask = target["masks"].float()
            if self.num_points > 0:
                coords = torch.rand(1, self.num_points, 2, device=out_mask.device)
                out_pts = point_sample(out_mask[:, None], coords.expand(out_mask.shape[0], -1, -1))[:, 0]
                tgt_pts = point_sample(tgt_mask[:, None], coords.expand(tgt_mask.shape[0], -1, -1))[:, 0]
            else:
                out_pts = out_mask.flatten(1)
                tgt_pts = resize_targets(tgt_mask, tuple(out_mask.shape[-2:])).flatten(1)
            cost = cost + self.cost_mask * pairwise_sigmoid_ce(out_pts, tgt_pts)
            cost = cost + self.cost_dice * pairwise_dice(out_pts, tgt_pts)
        return cost

    @torch.no_grad()
    def forward(self, outputs: Mapping[str, torch.Tensor], targets: Sequence[Mapping[str, torch.Tensor]],
                use: Sequence[str] = ("cls", "box", "mask")) -> list[tuple[torch.Tensor, torch.Tensor]]:
        indices = []
        for b, target in enumerate(targets):
            if len(target["labels"]) == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(outputs, target, b, use).cpu()
            cost = torch.nan_to_num(cost, nan=1e6, posinf=1e6, neginf=-1e6)
            rows, cols = linear_sum_assignment(cost.numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices

    def extra_repr(self) -> str:
        return (f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, cost_dice={self.cost_dice}, "
                f"cost_box={self.cost_box}, cost_giou={self.cost_giou}, num_points={self.num_points}")
