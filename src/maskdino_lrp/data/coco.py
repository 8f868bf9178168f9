"""COCO-format export of synthetic samples, and COCO box / mask AP via pycocotools.

Category ids are ``class index + 1`` (COCO ids start at 1); image ids are ``position in the list + 1``.
Boxes follow the pixel-edge convention of :mod:`maskdino_lrp.data.shapes`: xyxy with x1 = last
column + 1, so COCO's xywh box of a mask is exactly ``(x0, y0, x1 - x0, y1 - y0)``.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..fileio import atomic_write_bytes
from .shapes import Sample

# Per image: (scores (K,), labels (K,), boxes (K,4) xyxy pixels, masks (K,H,W) bool) or a mapping
# with the keys "scores", "labels", "boxes", "masks". masks may be None (then no mask AP).
Prediction = Union[tuple, Mapping[str, Any]]

METRICS = ("AP", "AP50", "AP75")  # COCOeval.stats[:3]: AP@[.5:.95], AP@.5, AP@.75 (all areas, 100 dets)


def _file_name(sample: Sample) -> str:
    return f"shapes_s{sample.seed}_{sample.index:06d}.png"


def _encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE of a (H, W) bool mask, with ``counts`` as str (JSON-serialisable)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def to_coco(samples: Sequence[Sample]) -> dict[str, Any]:
    """COCO ground-truth dict (images, annotations with RLE masks, categories) for ``samples``."""
    if not samples:
        raise ValueError("to_coco needs at least one sample")
    class_names = samples[0].class_names
    images, annotations = [], []
    for image_id, s in enumerate(samples, start=1):
        if s.class_names != class_names:
            raise ValueError(f"sample {image_id - 1} has class_names {s.class_names}, expected {class_names}")
        h, w = s.image.shape[:2]
        images.append({"id": image_id, "file_name": _file_name(s), "height": h, "width": w})
        for cls, box, mask in zip(s.classes, s.boxes, s.masks):
            x0, y0, x1, y1 = (float(v) for v in box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(cls) + 1,
                    "segmentation": _encode_mask(mask),
                    "area": float(mask.sum()),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(class_names)]
    return {
        "info": {"description": "maskdino_lrp synthetic shapes"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def export_coco(samples: Sequence[Sample], out_dir: str | os.PathLike[str]) -> Path:
    """Write ``out_dir/images/*.png`` and ``out_dir/annotations.json``; return the JSON path."""
    out = Path(out_dir)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    gt = to_coco(samples)
    for s, info in zip(samples, gt["images"]):
        buf = io.BytesIO()
        Image.fromarray(s.image).save(buf, format="PNG")
        atomic_write_bytes(image_dir / info["file_name"], buf.getvalue())
    json_path = out / "annotations.json"
    atomic_write_bytes(json_path, json.dumps(gt).encode("utf-8"))
    return json_path


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _unpack(pred: Prediction, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(scores, labels, boxes, masks-or-None) of one image's prediction, checked for shape."""
    if isinstance(pred, Mapping):
        missing = [k for k in ("scores", "labels", "boxes") if k not in pred]
        if missing:
            raise ValueError(f"prediction {i} lacks keys {missing}")
        scores, labels, boxes, masks = pred["scores"], pred["labels"], pred["boxes"], pred.get("masks")
    else:
        if len(pred) != 4:
            raise ValueError(f"prediction {i} must be (scores, labels, boxes, masks), got {len(pred)} items")
        scores, labels, boxes, masks = pred
    scores = _as_numpy(scores).astype(np.float64).reshape(-1)
    labels = _as_numpy(labels).astype(np.int64).reshape(-1)
    boxes = _as_numpy(boxes).astype(np.float64).reshape(-1, 4)
    k = len(scores)
    if len(labels) != k or len(boxes) != k:
        raise ValueError(f"prediction {i}: scores ({k}), labels ({len(labels)}), boxes ({len(boxes)}) differ in length")
    if masks is not None:
        masks = _as_numpy(masks)
        if masks.dtype != bool:
            masks = masks > 0.5
        if masks.ndim != 3 or len(masks) != k:
            raise ValueError(f"prediction {i}: masks must be (K={k}, H, W), got {masks.shape}")
    return scores, labels, boxes, masks


def _coco_stats(gt: COCO, results: list[dict[str, Any]], iou_type: str) -> np.ndarray:
    """COCOeval(...).stats (12 numbers; -1 where undefined) for one iou_type, printing silenced."""
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iouType=iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats, dtype=np.float64)


def evaluate_detections(samples: Sequence[Sample], predictions: Sequence[Prediction]) -> dict[str, float]:
    """COCO box and mask AP, AP50, AP75 of per-image predictions, in [0, 1].

    Keys: ``box_AP, box_AP50, box_AP75, mask_AP, mask_AP50, mask_AP75`` (mask keys only when every
    prediction has masks; COCO's small/medium/large split is left out, its thresholds suit COCO-sized
    images, not these). Labels are class indices (0-based); COCO keeps
    the 100 highest-scoring detections per image. A metric is 0 when there are no detections at all
    and NaN when undefined (no ground-truth objects).
    """
    if len(samples) != len(predictions):
        raise ValueError(f"{len(samples)} samples but {len(predictions)} predictions")
    gt_dict = to_coco(samples)
    n_classes = len(gt_dict["categories"])
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = gt_dict
        gt.createIndex()

    box_results: list[dict[str, Any]] = []
    mask_results: list[dict[str, Any]] = []
    with_masks = True
    for i, (s, pred) in enumerate(zip(samples, predictions)):
        scores, labels, boxes, masks = _unpack(pred, i)
        if masks is None:
            with_masks = False
        elif masks.shape[1:] != s.image.shape[:2]:
            raise ValueError(f"prediction {i}: masks are {masks.shape[1:]}, image is {s.image.shape[:2]}")
        if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
            raise ValueError(f"prediction {i}: labels must be in [0, {n_classes - 1}], got {labels.tolist()}")
        for k in range(len(scores)):
            x0, y0, x1, y1 = boxes[k]
            common = {"image_id": i + 1, "category_id": int(labels[k]) + 1, "score": float(scores[k])}
            box_results.append({**common, "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]})
            if masks is not None:
                mask_results.append({**common, "segmentation": _encode_mask(masks[k])})

    has_gt = len(gt_dict["annotations"]) > 0
    out: dict[str, float] = {}
    iou_types = [("box", "bbox", box_results)]
    if with_masks:
        iou_types.append(("mask", "segm", mask_results))
    for prefix, iou_type, results in iou_types:
        if not has_gt:
            stats = np.full(12, np.nan)
        elif not results:  # loadRes cannot take an empty list; nothing detected means AP 0
            stats = np.zeros(12)
        else:
            stats = _coco_stats(gt, results, iou_type)
            stats = np.where(stats < 0, np.nan, stats)  # -1: undefined
        for j, name in enumerate(METRICS):
            out[f"{prefix}_{name}"] = float(stats[j])
    return out
