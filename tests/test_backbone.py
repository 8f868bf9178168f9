"""The detectron2-style ResNet against the official detectron2 outputs (../shared fixtures)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import fixture_dir
from maskdino_lrp.model.backbone import ResNet, build_resnet_backbone
from maskdino_lrp.model.config import load_config


def _build(variant_cfg: dict) -> ResNet:
    r = variant_cfg["MODEL.RESNETS"]
    return ResNet(depth=r["DEPTH"], stem_out_channels=r["STEM_OUT_CHANNELS"], res2_out_channels=r["RES2_OUT_CHANNELS"],
                  num_groups=r["NUM_GROUPS"], width_per_group=r["WIDTH_PER_GROUP"], stride_in_1x1=r["STRIDE_IN_1X1"],
                  res5_dilation=r["RES5_DILATION"], norm=r["NORM"], out_features=r["OUT_FEATURES"])


@pytest.mark.parametrize("variant", ["r50_narrow", "r18"])
def test_backbone_matches_detectron2(variant):
    folder = fixture_dir("backbones")
    cfg = json.loads((folder / "config.json").read_text())[variant]
    tensors = load_file(str(folder / "backbones.safetensors"))
    prefix = f"{variant}.backbone."
    state = {k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)}
    model = _build(cfg).eval()
    missing, unexpected = model.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    with torch.no_grad():
        out = model(tensors[f"{variant}.input.image"].float())
    for name in ("res2", "res3", "res4", "res5"):
        ref = tensors[f"{variant}.output.{name}"].float()
        assert out[name].shape == ref.shape
        err = (out[name] - ref).abs().max().item()
        # 1e-4 absolute, or float32 rounding of a deep conv stack: the random frozen-BN statistics push
        # r50_narrow's res4/res5 to |x| ~ 5e3, where 2e-6 relative (~16 ulp) is the honest bound.
        tol = max(1e-4, 2e-6 * ref.abs().max().item())
        assert err <= tol, f"{variant} {name}: max abs error {err} > {tol}"
    assert sum(p.numel() for p in model.state_dict().values()) > 0


def test_r50_official_key_names_and_shapes():
    model = build_resnet_backbone(load_config("maskdino_r50_3s_coco"))
    state = model.state_dict()
    assert tuple(state["res2.0.shortcut.weight"].shape) == (256, 64, 1, 1)
    assert tuple(state["res5.2.conv3.norm.running_var"].shape) == (2048,)
    assert tuple(state["stem.conv1.weight"].shape) == (64, 3, 7, 7)
    assert model.output_shape() == {"res2": (256, 4), "res3": (512, 8), "res4": (1024, 16), "res5": (2048, 32)}


@pytest.mark.parametrize("depth", [34, 101])
def test_other_depths_build_and_run(depth):
    model = ResNet(depth=depth, stem_out_channels=8, res2_out_channels=64 if depth == 34 else 32, width_per_group=8).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out["res5"].shape[-2:] == (2, 2)


def test_unsupported_values_name_the_key():
    with pytest.raises(ValueError, match="DEPTH=152"):
        ResNet(depth=152)
