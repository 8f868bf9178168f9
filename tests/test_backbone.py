"""The detectron2-style ResNet against the official detectron2 outputs (../shared fixtures)."""
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import fixture_dir
from maskdino_lrp.model.backbone import FrozenBatchNorm2d, ResNet, build_resnet_backbone
from maskdino_lrp.model.config import load_config


@pytest.fixture(scope="module")
def backbone_fixtures():
    folder = fixture_dir("backbones")
    return json.loads((folder / "config.json").read_text()), load_file(str(folder / "backbones.safetensors"))


@pytest.mark.parametrize("variant", ["r50_narrow", "r18"])
def test_backbone_matches_detectron2(variant, backbone_fixtures):
    configs, tensors = backbone_fixtures
    cfg = {"MODEL": {"RESNETS": configs[variant]["MODEL.RESNETS"]}}
    prefix = f"{variant}.backbone."
    state = {k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)}  # r18 is float16
    model = build_resnet_backbone(cfg).eval()
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert set(model.state_dict()) == set(state)
    assert sum(p.numel() for p in model.parameters()) == configs[variant]["num_parameters"]  # conv weights
    with torch.no_grad():
        out = model(tensors[f"{variant}.input.image"].float())
    assert list(out) == ["res2", "res3", "res4", "res5"]
    for name in ("res2", "res3", "res4", "res5"):
        ref = tensors[f"{variant}.output.{name}"].float()
        assert tuple(out[name].shape) == tuple(ref.shape) == tuple(configs[variant]["outputs"][name])
        err = (out[name] - ref).abs().max().item()
        # 1e-4 absolute, except where the reference itself cannot be that exact: the random frozen-BN
        # statistics push r50_narrow's res4/res5 to |x| ~ 1.6e3 / 4.9e3, where the float32 reference carries
        # ~1e-6 relative rounding (a float64 run of this model differs from it by 1.2e-3 / 3.2e-3).
        tol = max(1e-4, 2e-6 * ref.abs().max().item())
        assert err <= tol, f"{variant} {name}: max abs error {err} > {tol}"


def test_r50_official_key_names_and_shapes():
    model = build_resnet_backbone(load_config("maskdino_r50_3s_coco"))
    state = model.state_dict()
    assert tuple(state["stem.conv1.weight"].shape) == (64, 3, 7, 7)
    assert tuple(state["stem.conv1.norm.running_mean"].shape) == (64,)
    assert tuple(state["res2.0.shortcut.weight"].shape) == (256, 64, 1, 1)
    assert tuple(state["res2.0.shortcut.norm.weight"].shape) == (256,)
    assert tuple(state["res3.0.conv1.weight"].shape) == (128, 256, 1, 1)
    assert tuple(state["res4.5.conv2.weight"].shape) == (256, 256, 3, 3)
    assert tuple(state["res5.2.conv3.norm.running_var"].shape) == (2048,)
    assert "res2.1.shortcut.weight" not in state and "res5.3.conv1.weight" not in state
    # 5 stem tensors + 16 blocks × 3 convs × 5 + 4 shortcuts × 5: the 265 backbone keys of an official R50
    assert len(state) == 265
    # weights + norm affine terms = torchvision's ResNet-50 without its fc layer
    assert sum(v.numel() for k, v in state.items() if not k.endswith(("running_mean", "running_var"))) == 23_508_032
    assert model.output_shape() == {"res2": (256, 4), "res3": (512, 8), "res4": (1024, 16), "res5": (2048, 32)}
    assert model.output_shape()["res4"].channels == 1024
    assert isinstance(model.stem.max_pool, nn.MaxPool2d)
    assert isinstance(model.res3[0].conv2.norm, FrozenBatchNorm2d)
    # MaskDINO's configs set STRIDE_IN_1X1 False: the stride sits on the 3×3; True puts it on the first 1×1
    assert model.res3[0].conv1.stride == (1, 1) and model.res3[0].conv2.stride == (2, 2)
    flipped = ResNet(depth=50, stride_in_1x1=True, out_features=["res3"])
    assert flipped.res3[0].conv1.stride == (2, 2) and flipped.res3[0].conv2.stride == (1, 1)
    assert not hasattr(flipped, "res4")  # stages after the last requested feature are not built


@pytest.mark.parametrize("depth", [34, 101])
def test_other_depths_build_and_run(depth):
    model = ResNet(depth=depth, stem_out_channels=8, res2_out_channels=64 if depth == 34 else 32,
                   width_per_group=8).eval()
    assert len(model.res4) == (6 if depth == 34 else 23)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out["res5"].shape == (1, 512 if depth == 34 else 256, 2, 2)


def test_dilation_groups_and_norms():
    model = ResNet(depth=50, stem_out_channels=32, res2_out_channels=64, num_groups=4, width_per_group=8,
                   res5_dilation=2, norm="GN", out_features=["stem", "res5"]).eval()
    assert model.output_shape() == {"stem": (32, 4), "res5": (512, 16)}
    assert model.res5[0].conv2.groups == 4 and model.res5[1].conv2.dilation == (2, 2)
    out = model(torch.randn(2, 3, 64, 64, requires_grad=True))
    assert out["res5"].shape == (2, 512, 4, 4) and out["stem"].shape == (2, 32, 16, 16)
    out["res5"].sum().backward()  # no in-place op breaks autograd
    bn = ResNet(depth=18, norm="BN", out_features=["res2"]).eval()
    assert isinstance(bn.res2[0].conv1.norm, nn.BatchNorm2d)


def test_frozen_bn_matches_batchnorm_and_freeze():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    frozen = FrozenBatchNorm2d.convert_frozen_batchnorm(bn)
    assert isinstance(frozen, FrozenBatchNorm2d)
    x = torch.randn(2, 6, 5, 5)
    torch.testing.assert_close(frozen(x), bn(x))
    model = ResNet(depth=18, norm="BN", out_features=["res3"]).freeze(2)
    assert not any(p.requires_grad for p in model.stem.parameters())
    assert not any(p.requires_grad for p in model.res2.parameters())
    assert all(p.requires_grad for p in model.res3.parameters())
    assert isinstance(model.res2[1].conv1.norm, FrozenBatchNorm2d)
    assert isinstance(model.res3[0].conv1.norm, nn.BatchNorm2d)


def test_caffe2_style_norm_without_statistics_loads():
    model = ResNet(depth=18, stem_out_channels=8, res2_out_channels=8, out_features=["res2"])
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(("running_mean", "running_var"))}
    result = model.load_state_dict(state, strict=True)  # detectron2 fills identity statistics
    assert not result.missing_keys
    assert torch.equal(model.stem.conv1.norm.running_var, torch.ones(8))


@pytest.mark.parametrize("key,value,match", [
    ("DEPTH", 200, "DEPTH=200"),
    ("NORM", "SyncGN", "NORM='SyncGN'"),
    ("DEFORM_ON_PER_STAGE", [False, True, True, True], "DEFORM_ON_PER_STAGE"),
    ("RES5_DILATION", 4, "RES5_DILATION=4"),
    ("OUT_FEATURES", ["res6"], "OUT_FEATURES"),
    ("WIDTH_PER_GROUP", 0, "WIDTH_PER_GROUP=0"),
    ("STRIDE_IN_1X1", "yes", "STRIDE_IN_1X1"),
])
def test_unsupported_values_name_the_key(key, value, match):
    with pytest.raises(ValueError, match=match):
        build_resnet_backbone({"MODEL": {"RESNETS": {key: value}}})


def test_basic_block_rejects_dilation():
    with pytest.raises(ValueError, match="RES5_DILATION=2"):
        ResNet(depth=18, res2_out_channels=64, res5_dilation=2)
