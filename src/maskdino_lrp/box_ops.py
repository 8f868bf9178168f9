"""Box operations shared by training's matcher and the evaluation: conversions, area, IoU, generalised IoU.

Boxes are ``xyxy`` (x0, y0, x1, y1) or ``cxcywh`` (centre, width, height), in any consistent unit.
"""
from __future__ import annotations

import torch

__all__ = ["box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh", "box_area", "box_iou", "generalized_box_iou",
           "elementwise_box_iou"]


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) cx cy w h → (..., 4) x0 y0 x1 y1."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) x0 y0 x1 y1 → (..., 4) cx cy w h."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of (..., 4) xyxy boxes (negative for inverted boxes; callers that need it clamp)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise IoU (N, M) and union (N, M) of xyxy boxes ``a`` (N, 4) and ``b`` (M, 4)."""
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return inter / (union + eps), union


def elementwise_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of broadcastable (..., 4) xyxy boxes → (...); degenerate boxes count as empty."""
    top_left = torch.maximum(a[..., :2], b[..., :2])
    bottom_right = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter / (area_a + area_b - inter).clamp(min=1e-12)


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Pairwise generalised IoU (N, M) of xyxy boxes: IoU - (hull - union) / hull."""
    if (a[:, 2:] < a[:, :2]).any() or (b[:, 2:] < b[:, :2]).any():
        raise ValueError("generalized_box_iou needs boxes with x1 >= x0 and y1 >= y0")
    iou, union = box_iou(a, b, eps)
    hull_tl = torch.minimum(a[:, None, :2], b[None, :, :2])
    hull_br = torch.maximum(a[:, None, 2:], b[None, :, 2:])
    wh = (hull_br - hull_tl).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / (hull + eps)
