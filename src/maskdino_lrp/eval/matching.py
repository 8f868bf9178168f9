"""Which detections are explained: the model's detections matched one-to-one to ground-truth objects."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..box_ops import box_iou

__all__ = ["Pair", "match_detections"]


@dataclass
class Pair:
    """One explained detection matched to a ground-truth object."""

    image: int
    query: int
    label: int
    gt: int
    iou: float
    score: float


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
    pred = torch.as_tensor([d[3] for d in dets], dtype=torch.float64)
    iou = box_iou(pred, torch.as_tensor(np.asarray(gt_boxes), dtype=torch.float64), eps=1e-12)[0].numpy()
    allowed = iou >= iou_threshold
    if require_class:
        allowed &= np.asarray([d[1] for d in dets])[:, None] == np.asarray(gt_classes)[None, :]
    cost = np.where(allowed, -iou, 1e6)
    rows, cols = linear_sum_assignment(cost)
    pairs = [Pair(image, dets[r][0], dets[r][1], int(c), float(iou[r, c]), float(dets[r][2]))
             for r, c in zip(rows, cols) if allowed[r, c]]
    return sorted(pairs, key=lambda p: -p.score)
