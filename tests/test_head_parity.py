"""The MaskDINO head against the official reference tensors, official key sets, and config variants."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import fixture_dir
from maskdino_lrp.model import deform_attn as da
from maskdino_lrp.model.decoder import MaskDINODecoder, MaskProduct, bitmasks_to_boxes, masks_to_boxes
from maskdino_lrp.model.deform_attn import MSDeformAttn
from maskdino_lrp.model.head import MaskDINOHead, build_sem_seg_head
from maskdino_lrp.model.position_encoding import PositionEmbeddingSine, gen_sineembed_for_position

PREFIX = "sem_seg_head."


def _config(folder) -> tuple[dict, dict, dict]:
    """(nested official cfg, input_shape, raw config.json) of a fixture folder."""
    raw = json.loads((folder / "config.json").read_text())
    cfg = {"MODEL": {"SEM_SEG_HEAD": copy.deepcopy(raw["MODEL.SEM_SEG_HEAD"]),
                     "MaskDINO": copy.deepcopy(raw["MODEL.MaskDINO"])}}
    shape = {k: (raw["backbone_feature_channels"][k], raw["backbone_feature_strides"][k])
             for k in raw["backbone_feature_channels"]}
    return cfg, shape, raw


def _official_state_dict(folder) -> dict[str, torch.Tensor]:
    return {k[len(PREFIX):]: v for k, v in load_file(str(folder / "state_dict.safetensors")).items()}


@pytest.fixture(scope="module")
def small():
    folder = fixture_dir("r50_3s_small")
    cfg, shape, raw = _config(folder)
    torch.manual_seed(0)
    head = build_sem_seg_head(cfg, shape).eval()
    result = head.load_state_dict(_official_state_dict(folder), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    io = load_file(str(folder / "io.safetensors"))
    return head, io, cfg, shape, raw


def _run_recorded(head: MaskDINOHead, features: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Forward with hooks recording the tensors the fixture holds."""
    rec: dict = {"enc": [], "dec": [], "attn": []}
    handles = []

    def on_predictor(_m, args, kwargs):
        rec["multi_scale"] = list(args[0])
        rec["mask_features"] = args[1]

    handles.append(head.predictor.register_forward_pre_hook(on_predictor, with_kwargs=True))
    for layer in head.pixel_decoder.transformer.encoder.layers:
        handles.append(layer.register_forward_hook(lambda _m, _a, out: rec["enc"].append(out)))
    for layer in head.predictor.decoder.layers:
        handles.append(layer.register_forward_hook(lambda _m, _a, out: rec["dec"].append(out)))
    for module in head.modules():
        if isinstance(module, MSDeformAttn):  # what the sampling core receives, recomputed from the call
            handles.append(module.register_forward_hook(
                lambda m, args, _out: rec["attn"].append(da.sampling_locations_and_weights(m, args[0], args[1], args[3]))))
    try:
        with torch.no_grad():
            out = head(features)
    finally:
        for h in handles:
            h.remove()
    return out, rec


def test_official_keys_load_strict_with_shared_modules(small):
    head, *_ = small
    folder = fixture_dir("r50_3s_small")
    keys = [line.split("\t")[0][len(PREFIX):] for line in (folder / "state_dict_keys.txt").read_text().splitlines()
            if line.strip()]
    assert list(head.state_dict().keys()) == keys  # same keys, same order as the official module
    pred = head.predictor
    assert pred.decoder.norm is pred.decoder_norm
    assert pred.decoder.bbox_embed is pred.bbox_embed
    assert all(m is pred._bbox_embed for m in pred.bbox_embed)
    raw = json.loads((folder / "config.json").read_text())
    assert sum(p.numel() for p in head.parameters()) == raw["num_parameters_sem_seg_head"]


def test_matches_official_reference_tensors(small):
    head, io, *_ = small
    features = {k: io[f"input.features.{k}"] for k in ("res2", "res3", "res4", "res5")}
    out, rec = _run_recorded(head, features)
    ours: dict[str, torch.Tensor] = {"pixel_decoder.mask_features": rec["mask_features"]}
    for i, t in enumerate(rec["multi_scale"]):
        ours[f"pixel_decoder.multi_scale_features.{i}"] = t
    for k in ("pred_logits", "pred_boxes", "pred_masks"):
        ours[f"output.{k}"] = out[k]
        ours[f"output.interm_outputs.{k}"] = out["interm_outputs"][k]
    for i, aux in enumerate(out["aux_outputs"]):
        for k, v in aux.items():
            if v is not None:
                ours[f"output.aux_outputs.{i}.{k}"] = v
    for i, t in enumerate(rec["enc"]):
        ours[f"intermediate.encoder.layer{i}.out"] = t
    for i, t in enumerate(rec["dec"]):
        ours[f"intermediate.decoder.layer{i}.out"] = t
    # one run: encoder layers 0..1 then decoder layers 0..2. The fixture's hook counted decoder calls
    # over two runs: its decoder.layer3/4 are the second run's encoder calls, layer5..7 its decoder.
    n_enc, n_dec = len(rec["enc"]), len(rec["dec"])
    calls = rec["attn"]
    assert len(calls) == n_enc + n_dec
    names = [f"encoder.layer{i}" for i in range(n_enc)] + [f"decoder.layer{i}" for i in range(n_dec)] \
        + [f"decoder.layer{n_dec + i}" for i in range(n_enc)] + [f"decoder.layer{n_dec + n_enc + i}" for i in range(n_dec)]
    for name, (loc, weights) in zip(names, calls + calls):
        ours[f"intermediate.{name}.msdeformattn.sampling_locations"] = loc
        ours[f"intermediate.{name}.msdeformattn.attention_weights"] = weights

    expected_keys = {k for k in io if not k.startswith("input.")}
    assert set(ours) == expected_keys
    failures = []
    for key in sorted(expected_keys):
        tol = 1e-4 if key.endswith("pred_masks") else 1e-5
        assert ours[key].shape == io[key].shape, key
        err = (ours[key] - io[key]).abs().max().item()
        if not err <= tol:
            failures.append(f"{key}: {err:.3e} > {tol}")
    assert not failures, "\n".join(failures)


def test_full_size_keys_shapes_and_parameter_count():
    folder = fixture_dir("full_size_keys")
    cfg, shape, raw = _config(folder)
    head = build_sem_seg_head(cfg, shape)
    expected = {}
    for line in (folder / "state_dict_keys.txt").read_text().splitlines():
        if line.strip():
            key, dims = line.split("\t")
            expected[key[len(PREFIX):]] = list(json.loads(dims))
    got = {k: list(v.shape) for k, v in head.state_dict().items()}
    assert got == expected
    assert sum(p.numel() for p in head.parameters()) == raw["num_parameters_sem_seg_head"]


# ----------------------------------------------------------------------------- variants
def _perturbed_head(cfg: dict, shape: dict, seed: int = 0) -> MaskDINOHead:
    """A head with random, non-degenerate weights (the official init zeroes offsets and box deltas)."""
    torch.manual_seed(seed)
    head = build_sem_seg_head(cfg, shape).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.05 if p.dim() > 1 else 0.1))
    return head


def _features(shape: dict, batch: int, hw: tuple[int, int], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(batch, c, hw[0] // s, hw[1] // s, generator=g) for k, (c, s) in shape.items()}


VARIANTS = {
    "extra_downsampled_level": ({"TOTAL_NUM_FEATURE_LEVELS": 4}, {}, (128, 128), 4),
    "four_in_features": ({"DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES": ["res2", "res3", "res4", "res5"],
                          "TOTAL_NUM_FEATURE_LEVELS": 4, "NUM_FEATURE_LEVELS": 4}, {}, (128, 128), 4),
    "low2high": ({"FEATURE_ORDER": "low2high"}, {}, (128, 128), 3),
    "low2high_extra_level": ({"FEATURE_ORDER": "low2high", "TOTAL_NUM_FEATURE_LEVELS": 4}, {}, (128, 128), 4),
    "non_square": ({}, {}, (96, 160), 3),
    "mask2box": ({}, {"INITIALIZE_BOX_TYPE": "mask2box"}, (128, 128), 3),
    "no_box_init": ({}, {"INITIALIZE_BOX_TYPE": "no"}, (128, 128), 3),
    "learn_tgt": ({}, {"LEARN_TGT": True}, (128, 128), 3),
    "one_stage": ({}, {"TWO_STAGE": False, "INITIALIZE_BOX_TYPE": "no"}, (128, 128), 3),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variants_run_with_correct_shapes(name):
    ssh, mdn, hw, levels = VARIANTS[name]
    cfg, shape, _ = _config(fixture_dir("r50_3s_small"))
    cfg["MODEL"]["SEM_SEG_HEAD"].update(ssh)
    cfg["MODEL"]["MaskDINO"].update(mdn)
    head = _perturbed_head(cfg, shape)
    out, rec = _run_recorded(head, _features(shape, 1, hw))
    q, k = cfg["MODEL"]["MaskDINO"]["NUM_OBJECT_QUERIES"], cfg["MODEL"]["SEM_SEG_HEAD"]["NUM_CLASSES"]
    n_dec = cfg["MODEL"]["MaskDINO"]["DEC_LAYERS"]
    assert len(rec["multi_scale"]) == levels
    assert all(m.n_levels == levels for m in head.modules() if isinstance(m, MSDeformAttn))
    assert out["pred_logits"].shape == (1, q, k)
    assert out["pred_boxes"].shape == (1, q, 4)
    assert out["pred_masks"].shape == (1, q, hw[0] // 4, hw[1] // 4)
    assert len(out["aux_outputs"]) == n_dec
    assert all(a["pred_masks"] is None for a in out["aux_outputs"])  # eval: masks only at the last layer
    assert ("interm_outputs" in out) == cfg["MODEL"]["MaskDINO"]["TWO_STAGE"]
    tensors = [out["pred_logits"], out["pred_boxes"], out["pred_masks"]]
    tensors += [a[k] for a in out["aux_outputs"] for k in ("pred_logits", "pred_boxes")]
    assert all(torch.isfinite(t).all() for t in tensors)
    assert 0 <= out["pred_boxes"].min() and out["pred_boxes"].max() <= 1


def test_batch_elements_equal_single_runs():
    cfg, shape, _ = _config(fixture_dir("r50_3s_small"))
    cfg["MODEL"]["SEM_SEG_HEAD"]["TOTAL_NUM_FEATURE_LEVELS"] = 4
    head = _perturbed_head(cfg, shape, seed=1)
    feats = _features(shape, 2, (96, 160), seed=1)
    with torch.no_grad():
        both = head(feats)
        for i in range(2):
            single = head({k: v[i:i + 1] for k, v in feats.items()})
            for key in ("pred_logits", "pred_boxes", "pred_masks"):
                tol = 1e-4 if key == "pred_masks" else 1e-5
                scale = max(1.0, single[key].abs().max().item())
                err = (both[key][i:i + 1] - single[key]).abs().max().item()
                assert err <= tol * scale, (i, key, err)
                torch.testing.assert_close(both["interm_outputs"][key][i:i + 1], single["interm_outputs"][key],
                                           atol=tol * scale, rtol=0)


# ----------------------------------------------------------------------------- LRP hooks
def test_lrp_hooks_and_autograd_through_head():
    cfg, shape, _ = _config(fixture_dir("r50_3s_small"))
    head = _perturbed_head(cfg, shape)
    pred: MaskDINODecoder = head.predictor
    assert pred.detach_query_content is True
    assert isinstance(pred.mask_product, MaskProduct) and pred.mask_product.equation == "bqc,bchw->bqhw"
    assert isinstance(pred.box_sigmoid, torch.nn.Sigmoid)
    assert all(isinstance(layer.activation, torch.nn.ReLU) for layer in pred.decoder.layers)
    calls = {"mask": 0, "sigmoid": 0}
    seen_tgt = []
    h1 = pred.mask_product.register_forward_hook(lambda *_: calls.__setitem__("mask", calls["mask"] + 1))
    h2 = pred.box_sigmoid.register_forward_hook(lambda *_: calls.__setitem__("sigmoid", calls["sigmoid"] + 1))
    h3 = pred.decoder.register_forward_pre_hook(lambda _m, a, kw: seen_tgt.append(kw["tgt"]), with_kwargs=True)
    feats = {k: v.requires_grad_(True) for k, v in _features(shape, 1, (128, 128)).items()}
    try:
        detached = head(feats)
        pred.detach_query_content = False
        connected = head(feats)
    finally:
        pred.detach_query_content = True
        for h in (h1, h2, h3):
            h.remove()
    n_dec = cfg["MODEL"]["MaskDINO"]["DEC_LAYERS"]
    assert calls == {"mask": 2 * 2, "sigmoid": 2 * n_dec}  # interim + last layer masks; one box per layer
    assert not seen_tgt[0].requires_grad and seen_tgt[1].requires_grad
    for key in ("pred_logits", "pred_boxes", "pred_masks"):
        torch.testing.assert_close(detached[key], connected[key], atol=0, rtol=0)
    # relevance will be computed by autograd: a full backward must work (no in-place ops on the path)
    total = connected["pred_logits"].sum() + connected["pred_masks"].sum() + connected["pred_boxes"].sum()
    total.backward()
    assert all(f.grad is not None and torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0 for f in feats.values())


# ----------------------------------------------------------------------------- config errors, small pieces
@pytest.mark.parametrize("section,key,value", [
    ("SEM_SEG_HEAD", "FEATURE_ORDER", "sideways"),
    ("SEM_SEG_HEAD", "NORM", "BN"),
    ("SEM_SEG_HEAD", "PIXEL_DECODER_NAME", "MSDeformAttnPixelDecoder"),
    ("SEM_SEG_HEAD", "NAME", "SemSegFPNHead"),
    ("SEM_SEG_HEAD", "TOTAL_NUM_FEATURE_LEVELS", 2),
    ("MaskDINO", "INITIALIZE_BOX_TYPE", "boxes"),
    ("MaskDINO", "HIDDEN_DIM", 128),
    ("MaskDINO", "TRANSFORMER_DECODER_NAME", "DINODecoder"),
])
def test_unsupported_config_values_name_the_key(section, key, value):
    cfg, shape, _ = _config(fixture_dir("r50_3s_small"))
    cfg["MODEL"][section][key] = value
    with pytest.raises(ValueError, match=key):
        build_sem_seg_head(cfg, shape)


def test_one_stage_needs_no_box_init():
    cfg, shape, _ = _config(fixture_dir("r50_3s_small"))
    cfg["MODEL"]["MaskDINO"]["TWO_STAGE"] = False  # with INITIALIZE_BOX_TYPE "bitmask"
    with pytest.raises(ValueError, match="INITIALIZE_BOX_TYPE"):
        build_sem_seg_head(cfg, shape)


def test_mask_to_box_conversions():
    masks = torch.zeros(3, 5, 7, dtype=torch.bool)
    masks[0, 1:3, 2:6] = True
    masks[1, 4, 0] = True
    torch.testing.assert_close(bitmasks_to_boxes(masks),
                               torch.tensor([[2.0, 1.0, 6.0, 3.0], [0.0, 4.0, 1.0, 5.0], [0.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(masks_to_boxes(masks)[:2], torch.tensor([[2.0, 1.0, 5.0, 2.0], [0.0, 4.0, 0.0, 4.0]]))
    assert masks_to_boxes(masks)[2].tolist() == [1e8, 1e8, 0.0, 0.0]  # official: empty mask


def test_position_encodings():
    pe = PositionEmbeddingSine(64, normalize=True)
    pos = pe(torch.zeros(2, 3, 4, 6))
    assert pos.shape == (2, 128, 4, 6)
    # first y feature at the last row is sin(2π) ≈ 0, first x feature at column j is sin(2π (j+1)/6)
    torch.testing.assert_close(pos[0, 64, 0], torch.sin(2 * math.pi * torch.arange(1, 7) / (6 + 1e-6)))
    boxes = torch.rand(5, 2, 4)
    assert gen_sineembed_for_position(boxes).shape == (5, 2, 512)
    assert gen_sineembed_for_position(boxes[..., :2]).shape == (5, 2, 256)
    with pytest.raises(ValueError):
        gen_sineembed_for_position(boxes[..., :3])
