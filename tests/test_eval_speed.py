"""The evaluation's shared forwards (the clean forward and neutral inputs shared by an image's pairs, the
token path's batch-1 pre-encoder part) give the curves of the unshared reference path, with fewer forwards."""
import numpy as np
import pytest
import torch

import maskdino_lrp
from maskdino_lrp.data.shapes import ShapesConfig, generate_sample
from maskdino_lrp.eval import metrics as M
from maskdino_lrp.eval.methods import get_method
from maskdino_lrp.eval.per_image import ImageContext, evaluate_image
from maskdino_lrp.eval.settings import EvalSettings


@pytest.fixture(scope="module")
def model():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = maskdino_lrp.build_model("tiny")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random-init biases are zero; nonzero ones make the scores move under perturbation
        for name, p in net.named_parameters():
            if name.endswith("bias"):
                p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return net


def _context(model, reuse: bool) -> ImageContext:
    settings = EvalSettings(config="tiny", n_images=2, seed=3, image_size=64, steps=3, methods=["gradient"],
                            units=["pixels", "tokens"], replacements=["noise"],
                            score_threshold=0.0, iou_threshold=0.0, require_class=False, max_pairs_per_image=2,
                            randomisation=False, batch_size=8)
    methods = {name: get_method(name) for name in settings.methods}
    return ImageContext(settings, model, None, methods, ShapesConfig(image_size=64), reuse_forwards=reuse)


def test_shared_forwards_give_the_unshared_curves_and_aucs(model):
    fast = evaluate_image(0, _context(model, True))
    slow = evaluate_image(0, _context(model, False))
    assert fast["n_pairs"] == slow["n_pairs"] == 2
    compared = 0
    for a, b in zip(fast["records"], slow["records"]):
        assert a["method"] == b["method"] and a["query"] == b["query"]
        for key, value in b.items():
            if "@" in key:  # every faithfulness metric, per replacement, pixels and tokens
                assert a[key] == pytest.approx(value, abs=1e-6), (a["method"], key)
                compared += 1
    # pairs × (8 pixel metrics with the fixed-query AUC + 7 token metrics)
    assert compared == 2 * (8 + 7)
    spread = 0.0
    for name, by_mode in slow["curves"].items():
        for mode, curves in by_mode.items():
            np.testing.assert_allclose(fast["curves"][name][mode], curves, atol=1e-6, err_msg=f"{name} {mode}")
            spread = max(spread, float(np.ptp(np.asarray(curves))))
    assert spread > 1e-3  # the scores move under perturbation, so equal curves say something
    # per unit: the unshared path runs the start and the neutral input for each of the 2 pairs; the
    # shared one takes the start from the clean forward and runs the neutral input once
    assert slow["forwards"] - fast["forwards"] == 2 * (2 * 2 - 1)


def test_token_score_at_batch_one_features_equals_the_expanded_features(model):
    prepared = model.prepare(generate_sample(0, 0, ShapesConfig(image_size=64)).image)
    with torch.no_grad():
        outputs = model(prepared.tensor)
    features = M.TokenFeatures(model, prepared.tensor)
    keep = (torch.rand(5, 1, 1, features.num_tokens, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    keep[0] = 1.0
    neutral = features.neutral("blur")
    shared = M.TokenScore(model, features, 3, 2, outputs["pred_boxes"][0, 3], neutral=neutral, shared=True)
    expanded = M.TokenScore(model, features, 3, 2, outputs["pred_boxes"][0, 3], neutral=neutral, shared=False)
    a, b = shared.outputs(keep), expanded.outputs(keep)
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a["pred_logits"][1], a["pred_logits"][2])  # different keep masks, different outputs
    # all tokens kept is the clean forward; score() of shared outputs is the pair's (B, 2) columns
    torch.testing.assert_close(a["pred_logits"][0], outputs["pred_logits"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared(keep), shared.score(b), rtol=1e-5, atol=1e-6)


def test_without_memory_measurement_each_method_runs_once_per_image_and_the_maps_are_unchanged(model):
    """With the randomisation test off, the second call of a method serves only the memory column:
    ``measure_memory=False`` skips it (half the attribution calls), leaves the peak empty and changes no
    other number."""
    results = {}
    for measure in (True, False):
        ctx = _context(model, reuse=True)
        ctx.settings.measure_memory = measure
        method = ctx.methods["gradient"]
        calls = []
        original = method.attribute_batch

        def counted(*args, _original=original, **kwargs):
            calls.append(1)
            return _original(*args, **kwargs)

        method.attribute_batch = counted
        ctx.warmed_up = True  # count only the evaluated calls
        part = evaluate_image(0, ctx)
        results[measure] = (len(calls), part["records"])
    (calls_on, rows_on), (calls_off, rows_off) = results[True], results[False]
    assert calls_on == 2 and calls_off == 1
    assert rows_on and len(rows_on) == len(rows_off)
    for a, b in zip(rows_on, rows_off):
        assert np.isnan(b["peak_memory_mib"]) and np.isfinite(a["peak_memory_mib"])
        for key in a:
            if key not in ("seconds", "peak_memory_mib") and isinstance(a[key], float) and np.isfinite(a[key]):
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key
