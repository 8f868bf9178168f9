"""Training: Hungarian matcher, set-criterion losses, training loop (steps, checkpoints, export)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from maskdino_lrp.train.losses import SetCriterion, dice_loss, sigmoid_ce_loss, sigmoid_focal_loss, weight_dict_from_config
from maskdino_lrp.train.matcher import (
    HungarianMatcher,
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    masks_to_boxes,
)

NUM_CLASSES = 4


def make_targets(seed: int = 0, n_per_image=(3, 2), size: int = 32):
    """Targets with block-structured masks (exact at 1/4 resolution) and their boxes."""
    g = torch.Generator().manual_seed(seed)
    targets = []
    for n in n_per_image:
        low = torch.zeros(n, size // 4, size // 4)
        boxes = []
        for k in range(n):
            x0, y0 = (int(v) for v in torch.randint(0, 4, (2,), generator=g))
            w, h = (int(v) for v in torch.randint(2, 4, (2,), generator=g))
            low[k, y0:y0 + h, x0:x0 + w] = 1
            boxes.append([x0 / 8 + w / 16, y0 / 8 + h / 16, w / 8, h / 8])
        masks = F.interpolate(low[:, None], scale_factor=4, mode="nearest")[:, 0]
        targets.append({"labels": torch.randint(0, NUM_CLASSES, (n,), generator=g),
                        "boxes": torch.tensor(boxes), "masks": masks})
    return targets


def perfect_outputs(targets, num_queries: int = 6, perms=None, size: int = 32):
    """Outputs whose query perm[k] predicts target k exactly; the other queries predict nothing."""
    b = len(targets)
    logits = torch.full((b, num_queries, NUM_CLASSES), -12.0)
    boxes = torch.tensor([0.5, 0.5, 0.1, 0.1]).repeat(b, num_queries, 1)
    masks = torch.full((b, num_queries, size // 4, size // 4), -20.0)
    for i, t in enumerate(targets):
        perm = perms[i] if perms is not None else torch.arange(len(t["labels"]))
        for k, q in enumerate(perm.tolist()):
            logits[i, q, t["labels"][k]] = 12.0
            boxes[i, q] = t["boxes"][k]
            low = F.avg_pool2d(t["masks"][k][None, None], 4)[0, 0]
            masks[i, q] = torch.where(low > 0.5, 20.0, -20.0)
    return {"pred_logits": logits, "pred_boxes": boxes, "pred_masks": masks}


def make_criterion(num_points: int = 0, deep: bool = False) -> SetCriterion:
    weights = {"loss_ce": 4.0, "loss_mask": 5.0, "loss_dice": 5.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    if deep:
        weights.update({k + s: v for k, v in list(weights.items()) for s in ("_0", "_1", "_interm")})
    return SetCriterion(NUM_CLASSES, HungarianMatcher(num_points=num_points), weights, num_points=num_points)


# ------------------------------------------------------------------------------------------ boxes


def test_giou_hand_computed():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 3.0, 1.0]])
    g = generalized_box_iou(a, b)
    # overlap 1, union 7, hull 9: 1/7 - 2/9
    assert g[0, 0].item() == pytest.approx(1 / 7 - 2 / 9, abs=1e-5)
    # disjoint unit boxes 1 apart: IoU 0, union 2, hull 3
    assert g[1, 1].item() == pytest.approx(-1 / 3, abs=1e-5)
    assert torch.allclose(torch.diag(generalized_box_iou(a, a)), torch.ones(2), atol=1e-5)
    with pytest.raises(ValueError):
        generalized_box_iou(torch.tensor([[1.0, 1.0, 0.0, 0.0]]), b)


def test_box_conversions_and_masks_to_boxes():
    xyxy = torch.tensor([[1.0, 2.0, 5.0, 10.0]])
    assert torch.allclose(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(xyxy)), xyxy)
    m = torch.zeros(2, 8, 8, dtype=torch.bool)
    m[0, 2:5, 1:4] = True
    assert masks_to_boxes(m).tolist() == [[1.0, 2.0, 4.0, 5.0], [0.0, 0.0, 0.0, 0.0]]


# ------------------------------------------------------------------------------------------ closed forms


def test_focal_loss_closed_form():
    ln2 = math.log(2.0)
    x = torch.zeros(1, 1, 2)
    t = torch.tensor([[[1.0, 0.0]]])
    # p = 0.5: CE = ln 2, modulating factor 0.25, alpha 0.25 for the positive, 0.75 for the negative
    expected = 0.25 * 0.25 * ln2 + 0.75 * 0.25 * ln2
    assert sigmoid_focal_loss(x, t, 1.0).item() == pytest.approx(expected, rel=1e-6)
    assert sigmoid_focal_loss(x, t, 2.0).item() == pytest.approx(expected / 2, rel=1e-6)
    x = torch.tensor([[[2.0]]])
    p = 1 / (1 + math.exp(-2.0))
    assert sigmoid_focal_loss(x, torch.ones(1, 1, 1), 1.0).item() == pytest.approx(
        0.25 * (1 - p) ** 2 * -math.log(p), rel=1e-5)


def test_dice_and_bce_closed_form():
    logits = torch.zeros(1, 4)
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    # p = 0.5 everywhere: 2·Σpt = 2, Σp + Σt = 4 → 1 - 3/5
    assert dice_loss(logits, targets, 1.0).item() == pytest.approx(0.4, rel=1e-6)
    assert sigmoid_ce_loss(logits, targets, 1.0).item() == pytest.approx(math.log(2.0), rel=1e-6)
    big = torch.tensor([[30.0, 30.0, -30.0, -30.0]])
    assert dice_loss(big, targets, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    assert sigmoid_ce_loss(big, targets, 1.0).item() == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------------------ matcher


@pytest.mark.parametrize("num_points", [0, 64])
def test_matcher_perfect_predictions(num_points):
    torch.manual_seed(0)
    targets = make_targets()
    outputs = perfect_outputs(targets)
    for (src, tgt), t in zip(HungarianMatcher(num_points=num_points)(outputs, targets), targets):
        assert src.tolist() == list(range(len(t["labels"])))
        assert tgt.tolist() == list(range(len(t["labels"])))


@pytest.mark.parametrize("use", [("cls", "box", "mask"), ("box",), ("mask",)])
def test_matcher_recovers_permutation(use):
    torch.manual_seed(1)
    targets = make_targets(seed=3)
    perms = [torch.randperm(6)[: len(t["labels"])] for t in targets]
    outputs = perfect_outputs(targets, perms=perms)
    for (src, tgt), perm in zip(HungarianMatcher()(outputs, targets, use=use), perms):
        assert dict(zip(tgt.tolist(), src.tolist())) == dict(enumerate(perm.tolist()))


def test_matcher_empty_image():
    targets = make_targets(n_per_image=(0, 2))
    indices = HungarianMatcher()(perfect_outputs(targets), targets)
    assert indices[0][0].numel() == 0 and indices[1][0].numel() == 2


# ------------------------------------------------------------------------------------------ criterion


def test_losses_small_for_perfect_and_large_for_wrong():
    targets = make_targets()
    crit = make_criterion()
    good = crit.unweighted(perfect_outputs(targets), targets)
    assert set(good) == {"loss_ce", "loss_bbox", "loss_giou", "loss_mask", "loss_dice"}
    for name, value in good.items():
        assert value.item() < 1e-3, name
    wrong = perfect_outputs(targets)
    wrong["pred_logits"] = -wrong["pred_logits"]  # right masks/boxes, every class wrong
    bad = crit.unweighted(wrong, targets)
    assert bad["loss_ce"] > 1.0
    shifted = perfect_outputs(targets)
    shifted["pred_boxes"] = shifted["pred_boxes"].roll(1, dims=1)
    shifted["pred_masks"] = shifted["pred_masks"].roll(2, dims=-1)
    bad = crit.unweighted(shifted, targets)
    for name in ("loss_bbox", "loss_giou", "loss_mask", "loss_dice"):
        assert bad[name] > 0.05, name


def test_deep_supervision_and_weights():
    targets = make_targets()
    out = perfect_outputs(targets)
    aux = [perfect_outputs(targets) for _ in range(2)]
    aux[0]["pred_logits"] = -aux[0]["pred_logits"]
    out["aux_outputs"] = aux
    out["interm_outputs"] = perfect_outputs(targets)
    crit = make_criterion(deep=True)
    raw = crit.unweighted(out, targets)
    assert {"loss_ce_0", "loss_dice_1", "loss_giou_interm"} <= set(raw)
    weighted = crit(out, targets)
    assert weighted["loss_ce_0"].item() == pytest.approx(4.0 * raw["loss_ce_0"].item())
    assert raw["loss_ce_0"] > 1.0 and raw["loss_ce_1"] < 1e-3


def test_point_sampled_mask_losses():
    # points concentrate on the (interpolated, hence uncertain) mask borders: perfect is small, not zero
    torch.manual_seed(0)
    targets = make_targets()
    crit = make_criterion(num_points=256)
    good = crit.unweighted(perfect_outputs(targets), targets)
    shifted = perfect_outputs(targets)
    shifted["pred_masks"] = shifted["pred_masks"].roll(2, dims=-1)
    bad = crit.unweighted(shifted, targets)
    assert good["loss_dice"] < 0.25 and bad["loss_dice"] > 2 * good["loss_dice"]
    assert bad["loss_mask"] > 2 * good["loss_mask"]


def test_weight_dict_from_config():
    from maskdino_lrp.model.config import load_config

    cfg = load_config("tiny")
    w = weight_dict_from_config(cfg)
    layers = cfg["MODEL"]["MaskDINO"]["DEC_LAYERS"]
    assert w["loss_ce"] == 4.0 and w["loss_giou_interm"] == 2.0 and w[f"loss_dice_{layers - 1}"] == 5.0
    assert f"loss_ce_{layers}" not in w


# ------------------------------------------------------------------------------------------ loop (needs the model)


TINY = dict(preset="tiny", image_size=64, batch_size=2, threads=2, warmup_steps=0, log_every=0, val_every=0)


def test_training_steps_reduce_loss_on_fixed_batch():
    from maskdino_lrp.train.losses import build_criterion
    from maskdino_lrp.train.loop import TrainConfig, build_optimizer, build_training_model, make_batch, model_inputs, pad_targets, train_step

    torch.manual_seed(0)
    cfg = TrainConfig(**TINY, lr=5e-4, schedule="constant")
    model = build_training_model(cfg)
    model.train()
    crit = build_criterion(model.cfg)
    opt = build_optimizer(model, cfg)
    images, targets = make_batch(cfg, 0)

    def loss_now():
        x = model_inputs(model, images)
        with torch.no_grad():
            return float(sum(crit(model(x), pad_targets(targets, tuple(x.shape[-2:]))).values()))

    before = loss_now()
    for _ in range(3):
        stats = train_step(model, crit, opt, images, targets, cfg, 0)
        assert math.isfinite(stats["loss"])
    assert loss_now() < before


def test_every_decoder_layer_predicts_masks_in_training():
    from maskdino_lrp.train.loop import TrainConfig, build_training_model, make_batch, model_inputs

    cfg = TrainConfig(**TINY)
    model = build_training_model(cfg)
    model.train()
    images, _ = make_batch(cfg, 0)
    out = model(model_inputs(model, images))
    assert out["pred_masks"] is not None
    assert all(a["pred_masks"] is not None for a in out["aux_outputs"])
    assert out["interm_outputs"]["pred_masks"] is not None


def test_resume_gives_identical_next_step(tmp_path):
    from maskdino_lrp.train.loop import TrainConfig, train

    cfg = TrainConfig(**TINY, steps=2, num_points=32, ckpt_every=1)  # point sampling consumes the RNG
    full = train(cfg, out_dir=str(tmp_path / "full"), progress=False)
    part = train(cfg, out_dir=str(tmp_path / "part"), progress=False, stop_at=1)
    assert part["export"] is None and (tmp_path / "part" / "last.pt").exists()
    resumed = train(cfg, out_dir=str(tmp_path / "part"), progress=False)
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["last"]["loss"] == full["last"]["loss"]


def test_export_fp16_safetensors_roundtrip(tmp_path):
    """BN-trained weights exported as fp16 load into the configured FrozenBN model with the same outputs."""
    from safetensors.torch import load_file

    from maskdino_lrp.model.config import load_config
    from maskdino_lrp.model.maskdino import MaskDINO
    from maskdino_lrp.train.loop import TrainConfig, build_training_model, export_weights, make_batch, model_inputs

    torch.manual_seed(0)
    cfg = TrainConfig(**TINY)
    model = build_training_model(cfg)
    assert model.cfg["MODEL"]["RESNETS"]["NORM"] == "BN" and model.export_cfg["MODEL"]["RESNETS"]["NORM"] == "FrozenBN"
    images, _ = make_batch(cfg, 0)
    x = model_inputs(model, images)
    model.train()
    with torch.no_grad():
        for _ in range(3):  # move the BatchNorm running statistics away from their initial values
            model(x)
    model.eval()
    with torch.no_grad():  # the reference: the same model with fp16-rounded weights
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())
    path = export_weights(model, tmp_path / "w.safetensors")
    tensors = load_file(str(path))
    assert all(t.dtype == torch.float16 for t in tensors.values() if t.is_floating_point())
    assert not any(k.endswith("num_batches_tracked") for k in tensors)
    shipped_cfg = load_config(tmp_path / "w.yaml")
    assert shipped_cfg == model.export_cfg
    shipped = MaskDINO(shipped_cfg).eval()
    result = shipped.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    assert not result.unexpected_keys
    # missing keys are only the aliases of shared tensors (the box MLP under several names)
    assert all("bbox_embed" in k or k.startswith("sem_seg_head.predictor.decoder.norm") for k in result.missing_keys)
    with torch.no_grad():
        a, b = model(x), shipped(x)
    for key in ("pred_logits", "pred_boxes", "pred_masks"):
        assert torch.allclose(a[key], b[key], atol=1e-4, rtol=1e-4), key


@pytest.mark.parametrize("training", [True, False])
def test_training_forward_without_dn_equals_model_forward(training):
    from maskdino_lrp.train.denoising import training_forward
    from maskdino_lrp.train.loop import TrainConfig, build_training_model, make_batch, model_inputs

    torch.manual_seed(0)
    cfg = TrainConfig(**TINY)
    model = build_training_model(cfg).train(training)
    images, targets = make_batch(cfg, 0)
    x = model_inputs(model, images)
    with torch.no_grad():
        torch.manual_seed(1)
        a = model(x)
        torch.manual_seed(1)
        b = training_forward(model, x, targets, dn_num=0)
    for key in ("pred_logits", "pred_boxes", "pred_masks"):
        assert torch.equal(a[key], b[key]), key
    assert len(a["aux_outputs"]) == len(b["aux_outputs"])
    for la, lb in zip(a["aux_outputs"], b["aux_outputs"]):
        for key in ("pred_logits", "pred_boxes"):
            assert torch.equal(la[key], lb[key]), key
        assert (la["pred_masks"] is None) == (lb["pred_masks"] is None)
        if la["pred_masks"] is not None:
            assert torch.equal(la["pred_masks"], lb["pred_masks"])
    for key in ("pred_logits", "pred_boxes", "pred_masks"):
        assert torch.equal(a["interm_outputs"][key], b["interm_outputs"][key]), key


def test_denoising_queries_and_losses():
    from maskdino_lrp.train.denoising import dn_indices, make_dn_queries, training_forward
    from maskdino_lrp.train.losses import build_criterion
    from maskdino_lrp.train.loop import TrainConfig, build_training_model, make_batch, model_inputs, pad_targets

    torch.manual_seed(0)
    cfg = TrainConfig(**TINY)
    model = build_training_model(cfg).train()
    dec = model.sem_seg_head.predictor
    images, targets = make_batch(cfg, 0)
    counts = [len(t["labels"]) for t in targets]
    dn = make_dn_queries(targets, dec, dn_num=10, noise_scale=0.0)
    most = max(counts)
    assert dn.single_pad == most and dn.groups == 10 // most and dn.pad_size == dn.groups * most
    # without noise, the denoising boxes are the ground truth (inverse sigmoid)
    src, tgt = dn_indices(targets, dn)[0]
    assert torch.allclose(dn.bbox[0, src].sigmoid(), targets[0]["boxes"][tgt], atol=1e-4)
    m = dn.attn_mask
    q = dn.pad_size
    assert m[q:, :q].all() and not m[:, q:].any()  # matching queries never see denoising ones
    if dn.groups > 1:
        assert m[0, most] and not m[0, 0] and m[most, 0]  # groups do not see each other
    x = model_inputs(model, images)
    out = training_forward(model, x, targets, dn_num=10, noise_scale=0.4)
    assert out["pred_logits"].shape[1] == dec.num_queries  # the matching part is cut out unchanged in size
    assert out["dn_outputs"]["pred_logits"].shape[1] == dn.pad_size
    assert all(a["pred_masks"] is not None for a in out["dn_outputs"]["aux_outputs"])
    crit = build_criterion(load_dn_config(model))
    losses = crit(out, pad_targets(targets, tuple(x.shape[-2:])))
    layers = model.cfg["MODEL"]["MaskDINO"]["DEC_LAYERS"]
    assert {"loss_ce_dn", "loss_mask_dn", f"loss_giou_dn_{layers - 1}"} <= set(losses)
    total = sum(losses.values())
    total.backward()
    assert dec.label_enc.weight.grad is not None and dec.label_enc.weight.grad.abs().sum() > 0


def load_dn_config(model):
    import copy

    cfg = copy.deepcopy(model.cfg)
    cfg["MODEL"]["MaskDINO"]["DN"] = "seg"
    return cfg


def test_grid_sample_deform_attn_core_matches_model_core():
    from maskdino_lrp.model import deform_attn
    from maskdino_lrp.train.loop import fast_deform_attn, grid_sample_deform_attn_core

    torch.manual_seed(0)
    shapes = [(3, 5), (6, 10)]
    n, m, d, lq, p = 2, 4, 8, 7, 3
    value = torch.randn(n, sum(h * w for h, w in shapes), m, d, requires_grad=True)
    loc = (torch.rand(n, lq, m, len(shapes), p, 2) * 1.4 - 0.2).requires_grad_()  # some samples fall outside
    weights = torch.rand(n, lq, m, len(shapes), p).softmax(-1).requires_grad_()
    starts = torch.tensor([0, 15])
    ref = deform_attn.ms_deform_attn_core(value, shapes, starts, loc, weights)
    fast = grid_sample_deform_attn_core(value, shapes, starts, loc, weights)
    assert torch.allclose(ref, fast, atol=1e-5)
    g_ref = torch.autograd.grad(ref.square().sum(), (value, loc, weights))
    g_fast = torch.autograd.grad(fast.square().sum(), (value, loc, weights))
    for a, b in zip(g_ref, g_fast):
        assert torch.allclose(a, b, atol=1e-4)
    original = deform_attn.ms_deform_attn_core
    with fast_deform_attn():
        assert deform_attn.ms_deform_attn_core is grid_sample_deform_attn_core
    assert deform_attn.ms_deform_attn_core is original


def test_sigterm_stops_with_a_checkpoint_and_the_rerun_resumes(tmp_path, monkeypatch):
    """A SIGTERM mid-run (a scheduler's pre-emption) ends after the current step with a checkpoint."""
    import os
    import signal

    from maskdino_lrp.train import loop

    cfg = loop.TrainConfig(**TINY, steps=3, num_points=32, ckpt_every=0)
    full = loop.train(cfg, out_dir=str(tmp_path / "full"), progress=False)
    real_step = loop.train_step

    def step_then_terminate(*args, **kwargs):
        out = real_step(*args, **kwargs)
        if args[-1] == 0:  # the step index
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(loop, "train_step", step_then_terminate)
    with pytest.raises(SystemExit) as stopped:
        loop.train(cfg, out_dir=str(tmp_path / "part"), progress=False)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert torch.load(tmp_path / "part" / "last.pt", weights_only=False)["step"] == 1
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is restored
    monkeypatch.setattr(loop, "train_step", real_step)
    resumed = loop.train(cfg, out_dir=str(tmp_path / "part"), progress=False)
    for k, v in full["model"].state_dict().items():
        assert torch.equal(v, resumed["model"].state_dict()[k]), k
