"""MaskDINO's set criterion: focal classification, box L1 + GIoU and mask BCE + dice losses.

Every decoder layer (``aux_outputs``), the final layer and the two-stage encoder proposals
(``interm_outputs``) are matched to the targets on their own and get the same losses (deep
supervision). Each loss is normalised by the number of target objects in the batch and scaled by
the official weights (``MODEL.MaskDINO.CLASS_WEIGHT`` etc.); layer ``i``'s losses carry the suffix
``_i``, the encoder proposals' the suffix ``_interm``. Denoising outputs (``dn_outputs``, see
:mod:`.denoising`) get the same losses with their fixed assignment (suffixes ``_dn`` and ``_dn_i``).

Masks are compared either on sampled points (``num_points > 0``: uniformly random points mixed with
the most uncertain ones, as in the official code) or densely at the prediction's resolution with
the targets area-downsampled to it (``num_points == 0``), which is exact and cheap on CPU.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..model.config import get
from .matcher import (
    FOCAL_ALPHA,
    FOCAL_GAMMA,
    HungarianMatcher,
    box_cxcywh_to_xyxy,
    generalized_box_iou,
    point_sample,
    resize_targets,
)

log = logging.getLogger(__name__)

Indices = Sequence[tuple[torch.Tensor, torch.Tensor]]


# ----------------------------------------------------------------------------------------------
# Elementwise losses (sums normalised by the number of objects)
# ----------------------------------------------------------------------------------------------


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, num_objects: float,
                       alpha: float = FOCAL_ALPHA, gamma: float = FOCAL_GAMMA) -> torch.Tensor:
    """Sum over all elements of the binary focal loss of ``logits`` against 0/1 ``targets``, / num_objects."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.sum() / num_objects


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, num_objects: float) -> torch.Tensor:
    """Σ_n [1 - (2 Σ p·t + 1) / (Σ p + Σ t + 1)] over rows of (N, P) logits / soft targets, / num_objects."""
    prob = logits.sigmoid().flatten(1)
    targets = targets.flatten(1)
    numerator = 2 * (prob * targets).sum(-1)
    denominator = prob.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_objects


def sigmoid_ce_loss(logits: torch.Tensor, targets: torch.Tensor, num_objects: float) -> torch.Tensor:
    """Σ_n mean_p BCE(logit, target) over rows of (N, P) logits / soft targets, / num_objects."""
    loss = F.binary_cross_entropy_with_logits(logits.flatten(1), targets.flatten(1), reduction="none")
    return loss.mean(1).sum() / num_objects


def uncertain_points(logits: torch.Tensor, num_points: int, oversample_ratio: float,
                     importance_ratio: float) -> torch.Tensor:
    """(N, P, 2) points in [0, 1]²: the most uncertain (|logit| smallest) of an oversampled random set, plus random ones."""
    n = logits.shape[0]
    num_sampled = max(int(num_points * oversample_ratio), num_points)
    coords = torch.rand(n, num_sampled, 2, device=logits.device)
    uncertainty = -point_sample(logits, coords)[:, 0].abs()
    num_uncertain = int(importance_ratio * num_points)
    num_random = num_points - num_uncertain
    idx = uncertainty.topk(num_uncertain, dim=1).indices
    chosen = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 2))
    if num_random > 0:
        chosen = torch.cat([chosen, torch.rand(n, num_random, 2, device=logits.device)], dim=1)
    return chosen


# ----------------------------------------------------------------------------------------------
# The criterion
# ----------------------------------------------------------------------------------------------


def _src_index(indices: Indices) -> tuple[torch.Tensor, torch.Tensor]:
    batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    return batch, torch.cat([src for src, _ in indices])


class SetCriterion(nn.Module):
    """Hungarian-matched DETR losses with deep supervision, as in MaskDINO's ``SetCriterion``.

    ``forward(outputs, targets)`` returns the *weighted* losses by name (sum them for the total).
    ``targets`` is a list (one per image) of dicts with ``labels`` (N,), ``boxes`` (N, 4) normalised
    cx cy w h and ``masks`` (N, H, W) at the (padded) input resolution.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: Mapping[str, float],
                 losses: Sequence[str] = ("labels", "masks", "boxes"), num_points: int = 0,
                 oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75,
                 focal_alpha: float = FOCAL_ALPHA, dn_losses: Sequence[str] = ("labels", "masks", "boxes")):
        super().__init__()
        unknown = set(losses) - {"labels", "masks", "boxes"}
        if unknown:
            raise ValueError(f"unknown losses {sorted(unknown)}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.losses = list(losses)
        self.dn_losses = list(dn_losses)
        self.num_points = int(num_points)
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.focal_alpha = focal_alpha
        self._warned_no_masks = False

    # -------------------------------------------------------------- single losses
    def loss_labels(self, outputs, targets, indices, num_objects):
        logits = outputs["pred_logits"].float()
        onehot = torch.zeros_like(logits)
        batch, src = _src_index(indices)
        labels = torch.cat([t["labels"][tgt] for t, (_, tgt) in zip(targets, indices)])
        onehot[batch, src, labels] = 1.0
        return {"loss_ce": sigmoid_focal_loss(logits, onehot, num_objects, alpha=self.focal_alpha)}

    def loss_boxes(self, outputs, targets, indices, num_objects):
        batch, src = _src_index(indices)
        src_boxes = outputs["pred_boxes"][batch, src].float()
        tgt_boxes = torch.cat([t["boxes"][tgt] for t, (_, tgt) in zip(targets, indices)]).to(src_boxes)
        l1 = F.l1_loss(src_boxes, tgt_boxes, reduction="none").sum() / num_objects
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes)))
        return {"loss_bbox": l1, "loss_giou": (1 - giou).sum() / num_objects}

    def loss_masks(self, outputs, targets, indices, num_objects):
        batch, src = _src_index(indices)
        src_masks = outputs["pred_masks"][batch, src].float()
        tgt_masks = torch.cat([t["masks"][tgt] for t, (_, tgt) in zip(targets, indices)]).to(src_masks)
        if self.num_points > 0:
            with torch.no_grad():
                coords = uncertain_points(src_masks[:, None], self.num_points, self.oversample_ratio,
                                          self.importance_sample_ratio)
                tgt = point_sample(tgt_masks[:, None], coords)[:, 0]
            src_pts = point_sample(src_masks[:, None], coords)[:, 0]
        else:
            src_pts = src_masks.flatten(1)
            tgt = resize_targets(tgt_masks, tuple(src_masks.shape[-2:])).flatten(1)
        return {"loss_mask": sigmoid_ce_loss(src_pts, tgt, num_objects),
                "loss_dice": dice_loss(src_pts, tgt, num_objects)}

    def get_loss(self, name: str, outputs, targets, indices, num_objects) -> dict[str, torch.Tensor]:
        if name == "masks" and outputs.get("pred_masks") is None:
            if not self._warned_no_masks:
                log.warning("an output has no pred_masks (is the decoder in training mode?); its mask losses are skipped")
                self._warned_no_masks = True
            return {}
        return {"labels": self.loss_labels, "boxes": self.loss_boxes, "masks": self.loss_masks}[name](
            outputs, targets, indices, num_objects)

    # -------------------------------------------------------------- all outputs
    def _one_output(self, outputs, targets, num_objects, suffix: str, indices=None,
                    names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        if indices is None:
            indices = self.matcher(outputs, targets)
        out = {}
        for name in self.losses if names is None else names:
            for key, value in self.get_loss(name, outputs, targets, indices, num_objects).items():
                out[key + suffix] = value
        return out

    def unweighted(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """All losses by name, before weighting."""
        masks = outputs.get("pred_masks")
        if self.num_points == 0 and masks is not None:
            # dense mode: downsample the targets to the prediction resolution once for all layers
            size = tuple(masks.shape[-2:])
            targets = [{**t, "masks": resize_targets(t["masks"], size)} for t in targets]
        num_objects = max(float(sum(len(t["labels"]) for t in targets)), 1.0)
        losses = self._one_output(outputs, targets, num_objects, "")
        for i, aux in enumerate(outputs.get("aux_outputs") or []):
            losses.update(self._one_output(aux, targets, num_objects, f"_{i}"))
        if outputs.get("interm_outputs") is not None:
            losses.update(self._one_output(outputs["interm_outputs"], targets, num_objects, "_interm"))
        dn = outputs.get("dn_outputs")
        if dn is not None:  # denoising queries: fixed assignment, normalised by objects × groups
            indices, n_dn = outputs["dn_indices"], num_objects * outputs["dn_groups"]
            losses.update(self._one_output(dn, targets, n_dn, "_dn", indices, self.dn_losses))
            for i, aux in enumerate(dn.get("aux_outputs") or []):
                losses.update(self._one_output(aux, targets, n_dn, f"_dn_{i}", indices, self.dn_losses))
        return losses

    def forward(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Weighted losses by name; losses without a weight are dropped (as in the official model)."""
        losses = self.unweighted(outputs, targets)
        return {k: v * self.weight_dict[k] for k, v in losses.items() if k in self.weight_dict}


def weight_dict_from_config(cfg: Mapping[str, Any]) -> dict[str, float]:
    """The official loss weights: base, ``_interm`` (two-stage) and ``_i`` for every decoder layer."""
    m = get(cfg, "MODEL.MaskDINO")
    base = {"loss_ce": m["CLASS_WEIGHT"], "loss_mask": m["MASK_WEIGHT"], "loss_dice": m["DICE_WEIGHT"],
            "loss_bbox": m["BOX_WEIGHT"], "loss_giou": m["GIOU_WEIGHT"]}
    weights = dict(base)
    if m["TWO_STAGE"]:
        weights.update({k + "_interm": v for k, v in base.items()})
    if m["DN"] in ("seg", "standard"):
        weights.update({k + "_dn": v for k, v in base.items()
                        if m["DN"] == "seg" or k not in ("loss_mask", "loss_dice")})
    if m["DEEP_SUPERVISION"]:
        snapshot = dict(weights)
        for i in range(m["DEC_LAYERS"]):
            weights.update({k + f"_{i}": v for k, v in snapshot.items()})
    return {k: float(v) for k, v in weights.items()}


def build_criterion(cfg: Mapping[str, Any], num_points: int | None = None) -> SetCriterion:
    """SetCriterion + HungarianMatcher with the config's weights.

    ``num_points`` None uses dense masks at the prediction resolution (cheap on CPU); pass
    ``cfg MODEL.MaskDINO.TRAIN_NUM_POINTS`` for the official point sampling.
    """
    m = get(cfg, "MODEL.MaskDINO")
    points = 0 if num_points is None else int(num_points)
    matcher = HungarianMatcher(cost_class=m["COST_CLASS_WEIGHT"], cost_mask=m["COST_MASK_WEIGHT"],
                               cost_dice=m["COST_DICE_WEIGHT"], cost_box=m["COST_BOX_WEIGHT"],
                               cost_giou=m["COST_GIOU_WEIGHT"], num_points=points)
    losses = ["labels", "masks", "boxes"] if m["BOX_LOSS"] else ["labels", "masks"]
    dn_losses = ["labels", "masks", "boxes"] if m["DN"] == "seg" else ["labels", "boxes"]
    return SetCriterion(int(get(cfg, "MODEL.SEM_SEG_HEAD.NUM_CLASSES")), matcher, weight_dict_from_config(cfg),
                        losses=losses, num_points=points, oversample_ratio=m["OVERSAMPLE_RATIO"],
                        importance_sample_ratio=m["IMPORTANCE_SAMPLE_RATIO"], dn_losses=dn_losses)
