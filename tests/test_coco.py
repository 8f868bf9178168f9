"""COCO export and COCO AP: round trips, perfect predictions, and hand-computed AP values."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from maskdino_lrp.data.coco import evaluate_detections, export_coco, to_coco
from maskdino_lrp.data.shapes import CLASSES, Sample, iter_samples

KEYS = ["box_AP", "box_AP50", "box_AP75", "mask_AP", "mask_AP50", "mask_AP75"]
# COCO AP samples precision at 101 recall thresholds 0, 0.01, …, 1; recall r reached at precision 1
# (and nothing beyond) gives AP = (number of thresholds <= r) / 101.
RECALL_HALF_AP = 51 / 101


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    return list(iter_samples(seed=5, count=6))


def _rect_sample(boxes: list[tuple[int, int, int, int]], classes: list[int], size: int = 64, index: int = 0) -> Sample:
    """A hand-made sample whose objects are axis-aligned rectangles (xyxy, pixel edges)."""
    masks = np.zeros((len(boxes), size, size), dtype=bool)
    for m, (x0, y0, x1, y1) in zip(masks, boxes):
        m[y0:y1, x0:x1] = True
    return Sample(
        image=np.zeros((size, size, 3), dtype=np.uint8),
        classes=np.array(classes, dtype=np.int64),
        boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
        masks=masks,
        visible_fraction=np.ones(len(boxes), dtype=np.float32),
        index=index,
    )


def _perfect(s: Sample, score: float = 1.0) -> tuple:
    return (np.full(len(s.classes), score), s.classes, s.boxes, s.masks)


def _nothing(s: Sample) -> tuple:
    h, w = s.image.shape[:2]
    return (np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros((0, 4)), np.zeros((0, h, w), dtype=bool))


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools vs numpy 2
def test_to_coco_round_trip(samples: list[Sample]) -> None:
    gt = to_coco(samples)
    json.dumps(gt)  # serialisable as is
    assert [c["name"] for c in gt["categories"]] == list(CLASSES)
    assert [c["id"] for c in gt["categories"]] == list(range(1, len(CLASSES) + 1))
    assert len(gt["images"]) == len(samples)
    assert len(gt["annotations"]) == sum(len(s.classes) for s in samples)
    ann_iter = iter(gt["annotations"])
    for image_id, s in enumerate(samples, start=1):
        for cls, box, mask in zip(s.classes, s.boxes, s.masks):
            ann = next(ann_iter)
            assert ann["image_id"] == image_id and ann["category_id"] == cls + 1 and ann["iscrowd"] == 0
            assert np.array_equal(mask_utils.decode(ann["segmentation"]).astype(bool), mask)
            assert ann["area"] == mask.sum()
            x0, y0, x1, y1 = box
            assert ann["bbox"] == [x0, y0, x1 - x0, y1 - y0]
            assert list(mask_utils.toBbox(ann["segmentation"])) == ann["bbox"]


def test_export_coco_writes_loadable_files(samples: list[Sample], tmp_path: Path) -> None:
    json_path = export_coco(samples[:3], tmp_path / "out")
    assert json_path == tmp_path / "out" / "annotations.json"
    coco = COCO(str(json_path))
    assert len(coco.getImgIds()) == 3
    for info, s in zip(coco.loadImgs(coco.getImgIds()), samples):
        img = np.array(Image.open(tmp_path / "out" / "images" / info["file_name"]))
        assert np.array_equal(img, s.image)
    leftovers = [p.name for p in (tmp_path / "out").rglob("*") if p.name.startswith(".")]
    assert leftovers == []


def test_ground_truth_as_predictions_is_perfect(samples: list[Sample]) -> None:
    stats = evaluate_detections(samples, [_perfect(s) for s in samples])
    assert sorted(stats) == sorted(KEYS)
    for key in KEYS:
        assert stats[key] == pytest.approx(1.0), key


def test_torch_and_mapping_predictions(samples: list[Sample]) -> None:
    preds = [
        {
            "scores": torch.ones(len(s.classes)),
            "labels": torch.from_numpy(s.classes),
            "boxes": torch.from_numpy(s.boxes),
            "masks": torch.from_numpy(s.masks).float(),  # probabilities are thresholded at 0.5
        }
        for s in samples
    ]
    assert evaluate_detections(samples, preds)["mask_AP"] == pytest.approx(1.0)
    no_masks = [dict(p, masks=None) for p in preds]
    stats = evaluate_detections(samples, no_masks)
    assert sorted(stats) == ["box_AP", "box_AP50", "box_AP75"] and stats["box_AP"] == pytest.approx(1.0)


def test_shifted_boxes_lower_ap(samples: list[Sample]) -> None:
    shifted = [(np.ones(len(s.classes)), s.classes, s.boxes + 4.0, np.roll(s.masks, 4, axis=(1, 2))) for s in samples]
    stats = evaluate_detections(samples, shifted)
    assert stats["box_AP"] < 0.9 and stats["mask_AP"] < 0.9
    assert stats["box_AP75"] < stats["box_AP50"]


def test_shift_with_known_iou() -> None:
    # 20x20 square shifted 4 px: IoU = 16*20 / (24*20) = 2/3, a match at IoU thresholds .50 .55 .60 .65,
    # a miss at .70 … .95: AP = 4/10, AP50 = 1, AP75 = 0, for boxes and masks alike.
    gt = _rect_sample([(10, 10, 30, 30)], [2])
    pred = _rect_sample([(14, 10, 34, 30)], [2])
    stats = evaluate_detections([gt], [_perfect(pred)])
    for kind in ("box", "mask"):
        assert stats[f"{kind}_AP"] == pytest.approx(0.4)
        assert stats[f"{kind}_AP50"] == pytest.approx(1.0)
        assert stats[f"{kind}_AP75"] == pytest.approx(0.0)


def test_half_the_objects_found() -> None:
    # two images with one object of class 0 and class 1 each; only image 1 predicted (perfectly):
    # each class has recall 1/2 at precision 1, so every AP = 51/101.
    gts = [_rect_sample([(4, 4, 20, 20), (30, 30, 50, 44)], [0, 1], index=i) for i in range(2)]
    stats = evaluate_detections(gts, [_perfect(gts[0]), _nothing(gts[1])])
    for key in KEYS:
        assert stats[key] == pytest.approx(RECALL_HALF_AP), key


def test_false_positive_ranked_first() -> None:
    # one object; a wrong detection (no overlap) scored above the perfect one: precision is 1/2 at
    # recall 1 and the interpolated precision is 1/2 at every recall threshold, so AP = 0.5.
    gt = _rect_sample([(4, 4, 20, 20)], [1])
    wrong = _rect_sample([(40, 40, 60, 60)], [1])
    pred = (
        np.array([0.9, 0.8]),
        np.array([1, 1]),
        np.concatenate([wrong.boxes, gt.boxes]),
        np.concatenate([wrong.masks, gt.masks]),
    )
    stats = evaluate_detections([gt], [pred])
    for key in KEYS:
        assert stats[key] == pytest.approx(0.5), key


def test_empty_predictions_give_zero(samples: list[Sample]) -> None:
    stats = evaluate_detections(samples, [_nothing(s) for s in samples])
    assert stats == {key: 0.0 for key in KEYS}


def test_no_ground_truth_gives_nan() -> None:
    gt = _rect_sample([], [])
    stats = evaluate_detections([gt], [_perfect(_rect_sample([(1, 1, 9, 9)], [0]))])
    assert all(math.isnan(v) for v in stats.values())


def test_bad_predictions_raise(samples: list[Sample]) -> None:
    with pytest.raises(ValueError, match="2 samples but 1 predictions"):
        evaluate_detections(samples[:2], [_perfect(samples[0])])
    s = samples[0]
    bad_label = (np.ones(1), np.array([len(CLASSES)]), s.boxes[:1], s.masks[:1])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\]"):
        evaluate_detections([s], [bad_label])
    with pytest.raises(ValueError, match="differ in length"):
        evaluate_detections([s], [(np.ones(2), s.classes[:1], s.boxes[:1], None)])
