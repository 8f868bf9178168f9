"""D-RISE on hand-made cases: the similarity by hand, the masks' statistics, and toy detectors whose answer is known."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from maskdino_lrp.eval import drise as D
from maskdino_lrp.eval.methods import get_method


def test_detection_similarity_by_hand():
    target_box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    target_probs = torch.tensor([[1.0, 0.0]])
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0], [20.0, 20.0, 30.0, 30.0]]])
    probs = torch.tensor([[[0.8, 0.2], [1.0, 0.0], [1.0, 0.0]]])
    # query 0: IoU 1 · cos 0.8/√0.68 · objectness 0.8; query 1: IoU 0.5 · 1 · 1; query 2: IoU 0
    expected = max(0.8 / np.sqrt(0.68) * 0.8, 0.5)
    sim = D.detection_similarity(target_box, target_probs, boxes, probs, probs.amax(-1))
    assert sim.shape == (1, 1) and float(sim) == pytest.approx(expected, rel=1e-6)
    # a detection of the other class with the same box scores 0
    other = D.detection_similarity(target_box, target_probs, boxes[:, :1], torch.tensor([[[0.0, 0.9]]]),
                                   torch.tensor([[0.9]]))
    assert float(other) == pytest.approx(0.0, abs=1e-7)


def test_random_masks_are_smooth_shifted_and_keep_p_on_average():
    g = torch.Generator().manual_seed(0)
    masks = D.random_masks(400, (24, 20), grid=4, p=0.3, generator=g)
    assert masks.shape == (400, 1, 24, 20) and masks.min() >= 0 and masks.max() <= 1
    assert float(masks.mean()) == pytest.approx(0.3, abs=0.03)  # 400 masks × 16 cells: SE ≈ 0.006
    assert len(torch.unique(masks)) > 2  # bilinear upsampling: not binary
    again = D.random_masks(400, (24, 20), grid=4, p=0.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(masks, again)
    with pytest.raises(ValueError, match="0 < p <= 1"):
        D.random_masks(3, (8, 8), p=0.0)


def _region_detector(region: tuple[slice, slice], box: torch.Tensor):
    """One detection at a fixed box whose class-0 probability is the mean brightness of ``region``."""

    def detect(images):
        b = images.shape[0]
        p0 = images[:, 0, region[0], region[1]].mean((1, 2))
        probs = torch.stack([p0, torch.full_like(p0, 0.05)], -1)[:, None]  # (B, 1, 2)
        return box.expand(b, 1, 4), probs

    return detect


def test_drise_peaks_on_the_only_region_the_score_depends_on():
    image = torch.ones(3, 32, 32)
    region = (slice(20, 28), slice(4, 12))
    box = torch.tensor([4.0, 20.0, 12.0, 28.0])
    detect = _region_detector(region, box)
    saliency = D.drise_saliency(detect, image, box[None], torch.tensor([[1.0, 0.0]]), n_masks=1000, grid=8, p=0.5,
                                batch_size=64, generator=torch.Generator().manual_seed(1))
    s = saliency[0]
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[region] = True
    peak = int(s.argmax())
    assert inside.flatten()[peak], "the map's maximum lies outside the region the score depends on"
    # far from the region (beyond the masks' smoothing) the map is flat up to sampling noise; the region
    # stands out of that noise by far
    far = s[:8, 20:]
    contrast = float(s[inside].mean() - s[~inside].mean())
    assert contrast > 4 * float(far.std()), (contrast, float(far.std()))
    # a detector that ignores the image: every mask weighs the same, the map is the mean mask (flat)
    flat = D.drise_saliency(lambda x: (box.expand(x.shape[0], 1, 4), torch.full((x.shape[0], 1, 2), 0.5)), image,
                            box[None], torch.tensor([[1.0, 0.0]]), n_masks=1000, grid=8, p=0.5, batch_size=64,
                            generator=torch.Generator().manual_seed(1))[0]
    assert float(flat[inside].mean() - flat[~inside].mean()) < 0.2 * contrast


class _ToyModel(nn.Module):
    """A 'detector' with the MaskDINO interface: two queries, fixed boxes; query 0's class-0 probability
    follows the brightness of the top-left quarter, query 1's class-1 probability the bottom-right one."""

    def __init__(self):
        super().__init__()
        self.register_buffer("pixel_mean", torch.zeros(3, 1, 1))
        self.register_buffer("pixel_std", torch.ones(3, 1, 1))

    def normalize_and_pad(self, images):
        return (images - self.pixel_mean) / self.pixel_std

    def forward(self, x):
        b = x.shape[0]
        tl = x[:, 0, :8, :8].mean((1, 2))
        br = x[:, 0, 8:, 8:].mean((1, 2))
        logit = lambda p: torch.logit(p.clamp(1e-4, 1 - 1e-4))  # noqa: E731
        low = torch.full_like(tl, -6.0)
        logits = torch.stack([torch.stack([logit(tl), low], -1), torch.stack([low, logit(br)], -1)], 1)
        boxes = torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5]]).expand(b, 2, 4)
        return {"pred_logits": logits, "pred_boxes": boxes}


def test_drise_method_explains_each_query_by_its_own_region():
    model = _ToyModel()
    image = torch.full((1, 3, 16, 16), 0.9)
    prepared = SimpleNamespace(tensor=image, resized_size=(16, 16), rgb=np.zeros((16, 16, 3), np.uint8))
    method = get_method("d-rise", n_masks=200, grid=4, batch_size=50)
    result = method.attribute_batch(model, prepared, [0, 1], [0, 1])
    assert result.maps.shape == (2, 16, 16)
    q0, q1 = result.maps
    assert q0[:8, :8].mean() > q0[8:, 8:].mean() and q1[8:, 8:].mean() > q1[:8, :8].mean()
    # reproducible: the masks are seeded by the image content
    torch.testing.assert_close(method.attribute_batch(model, prepared, [0, 1], [0, 1]).maps, result.maps)
    with pytest.raises(ValueError, match="n_masks"):
        get_method("d-rise", n_masks=0)
