"""Synthetic shapes generator: determinism, ground-truth consistency, occlusion, config checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from maskdino_lrp.data.shapes import (
    CLASSES,
    Sample,
    ShapesConfig,
    ShapesDataset,
    collate,
    generate_sample,
    iter_samples,
    sample_to_target,
)

N_SAMPLES = 24  # enough to see every class and some occlusion; ~7 ms per sample


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    return list(iter_samples(seed=11, count=N_SAMPLES))


def _assert_same(a: Sample, b: Sample) -> None:
    for name in ("image", "classes", "boxes", "masks", "visible_fraction"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), name


def test_deterministic_and_order_independent() -> None:
    a = generate_sample(3, 7)
    generate_sample(3, 2)
    generate_sample(5, 7)
    _assert_same(a, generate_sample(3, 7))
    _assert_same(a, list(iter_samples(3, 2, start=6))[1])


def test_different_seed_or_index_differs() -> None:
    a = generate_sample(3, 7)
    assert not np.array_equal(a.image, generate_sample(4, 7).image)
    assert not np.array_equal(a.image, generate_sample(3, 8).image)


def test_types_shapes_and_ranges(samples: list[Sample]) -> None:
    cfg = ShapesConfig()
    s = cfg.image_size
    for smp in samples:
        n = len(smp.classes)
        assert cfg.min_objects <= n <= cfg.max_objects
        assert smp.image.shape == (s, s, 3) and smp.image.dtype == np.uint8
        assert smp.classes.shape == (n,) and smp.classes.dtype == np.int64
        assert smp.boxes.shape == (n, 4) and smp.boxes.dtype == np.float32
        assert smp.masks.shape == (n, s, s) and smp.masks.dtype == bool
        assert smp.visible_fraction.shape == (n,)
        assert ((smp.classes >= 0) & (smp.classes < len(CLASSES))).all()
        assert smp.class_names == CLASSES
    seen = np.unique(np.concatenate([smp.classes for smp in samples]))
    assert seen.tolist() == list(range(len(CLASSES)))


def test_boxes_are_tight_around_masks(samples: list[Sample]) -> None:
    # independent reference: pycocotools' RLE bbox (xywh, w = last - first + 1)
    for smp in samples:
        for box, mask in zip(smp.boxes, smp.masks):
            x, y, w, h = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8))))
            np.testing.assert_array_equal(box, [x, y, x + w, y + h])
            x0, y0, x1, y1 = box.astype(int)
            assert mask[y0:y1, x0:x1].sum() == mask.sum()  # nothing outside the box
            for edge in (mask[y0, x0:x1], mask[y1 - 1, x0:x1], mask[y0:y1, x0], mask[y0:y1, x1 - 1]):
                assert edge.any()  # every box edge touches the mask


def test_visible_masks_disjoint_and_big_enough(samples: list[Sample]) -> None:
    cfg = ShapesConfig()
    occluded = 0
    for smp in samples:
        assert (smp.masks.sum(axis=0) <= 1).all()
        assert (smp.masks.sum(axis=(1, 2)) >= cfg.min_visible_pixels).all()
        assert (smp.visible_fraction >= cfg.min_visible_fraction).all()
        assert (smp.visible_fraction <= 1.0).all()
        occluded += int((smp.visible_fraction < 1.0).sum())
    assert occluded > 0, "no overlap in any sample: occlusion handling is untested"


@pytest.mark.parametrize("min_visible_fraction", [0.3, 0.9])
def test_occlusion_threshold_respected(min_visible_fraction: float) -> None:
    cfg = ShapesConfig(min_visible_fraction=min_visible_fraction, max_objects=6, size_range=(0.3, 0.45))
    fracs = np.concatenate([s.visible_fraction for s in iter_samples(0, 8, cfg)])
    assert (fracs >= min_visible_fraction).all()
    assert (fracs < 1.0).any()


def test_masks_cover_exactly_what_was_painted() -> None:
    # flat background, no clutter, no blur/noise: every pixel outside the masks is the background colour,
    # so no unlabelled object was painted; mask pixels (almost) never are.
    cfg = ShapesConfig(noise_std=0.0, blur_radius=0.0, textured_background=False, distractors=False)
    for smp in iter_samples(2, 6, cfg):
        union = smp.masks.any(axis=0)
        outside = smp.image[~union]
        bg = outside[0]
        assert (outside == bg).all()
        inside = smp.image[union]
        assert (inside == bg).all(axis=1).mean() < 0.01


def test_no_objects_and_other_sizes() -> None:
    empty = generate_sample(0, 0, ShapesConfig(min_objects=0, max_objects=0, image_size=64))
    assert empty.masks.shape == (0, 64, 64) and empty.boxes.shape == (0, 4) and empty.classes.shape == (0,)
    big = generate_sample(0, 0, ShapesConfig(image_size=96))
    assert big.image.shape == (96, 96, 3) and big.masks.shape[1:] == (96, 96)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_size": 150}, r"ShapesConfig\.image_size must be a multiple of 32 in \[64, 1024\], got 150"),
        ({"image_size": 32}, r"image_size must be a multiple of 32 in \[64, 1024\], got 32"),
        ({"image_size": 160.0}, r"image_size must be an integer"),
        ({"min_objects": 4, "max_objects": 2}, r"max_objects must be in \[min_objects=4, 20\], got 2"),
        ({"min_objects": -1}, r"min_objects must be in \[0, 20\]"),
        ({"size_range": (0.5, 0.2)}, r"size_range must be a pair \(lo, hi\) with 0\.05 <= lo <= hi <= 0\.8"),
        ({"noise_std": -1.0}, r"noise_std must be in \[0, 64\], got -1\.0"),
        ({"min_visible_fraction": 0.0}, r"min_visible_fraction must be in \(0, 1\]"),
        ({"distractors": "yes"}, r"distractors must be True or False"),
    ],
)
def test_bad_config_names_field_and_range(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ShapesConfig(**kwargs)


def test_bad_seed_or_index() -> None:
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        generate_sample(-1, 0)
    with pytest.raises(ValueError, match="index must be a non-negative integer"):
        generate_sample(0, 1.5)  # type: ignore[arg-type]


def test_dataset_items_and_collate() -> None:
    ds = ShapesDataset(seed=11, length=3)
    assert len(ds) == 3
    item = ds[1]
    smp = generate_sample(11, 1)
    n, s = len(smp.classes), smp.image.shape[0]
    assert item["image"].shape == (3, s, s) and item["image"].dtype == torch.uint8
    assert torch.equal(item["image"].permute(1, 2, 0), torch.from_numpy(smp.image))
    assert item["labels"].dtype == torch.int64 and item["labels"].tolist() == smp.classes.tolist()
    assert item["masks"].shape == (n, s, s) and item["masks"].dtype == torch.float32
    assert torch.equal(item["boxes_xyxy"], torch.from_numpy(smp.boxes))
    cx, cy, w, h = item["boxes"].unbind(-1)
    x0, y0, x1, y1 = item["boxes_xyxy"].unbind(-1)
    torch.testing.assert_close(cx * s, (x0 + x1) / 2)
    torch.testing.assert_close(w * s, x1 - x0)
    torch.testing.assert_close(cy * s, (y0 + y1) / 2)
    torch.testing.assert_close(h * s, y1 - y0)
    assert ((item["boxes"] > 0) & (item["boxes"] <= 1)).all()
    with pytest.raises(IndexError):
        ds[3]

    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate)
    images, targets = next(iter(loader))
    assert images.shape == (2, 3, s, s) and len(targets) == 2 and "image" not in targets[0]
    assert torch.equal(targets[1]["labels"], item["labels"])
    assert sample_to_target(smp)["image_id"].item() == 1
