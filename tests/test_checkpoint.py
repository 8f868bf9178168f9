"""Reading .pth / .pkl / .safetensors checkpoints and loading them with a key report."""
import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from maskdino_lrp.model.backbone import ResNet
from maskdino_lrp.model.checkpoint import CheckpointError, LoadReport, load_checkpoint, read_state_dict


class Tiny(nn.Module):
    """A conv + BN 'backbone', a linear head shared under a second name, a non-persistent buffer."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.head = nn.Linear(4, 2)
        self.shared = self.head  # the same tensors under shared.* too, as MaskDINO's bbox_embed
        self.register_buffer("pixel_mean", torch.zeros(3), persistent=False)


def _source(seed=0):
    torch.manual_seed(seed)
    model = Tiny()
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.normal_()
    return model


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pth_round_trip_with_training_state(tmp_path):
    src = _source()
    path = tmp_path / "model_final.pth"
    torch.save({"model": src.state_dict(), "iteration": 7, "optimizer": {"state": {}, "param_groups": []},
                "trainer": {"best": np.float64(0.5), "hist": np.arange(3)}}, path)  # numpy: weights_only fallback
    dst = Tiny()
    report = load_checkpoint(dst, path)
    assert isinstance(report, LoadReport) and report.ok, str(report)
    assert _same(src, dst)
    assert "iteration" in str(report) and "optimizer" in str(report)
    assert set(read_state_dict(path)) == set(src.state_dict())


@pytest.mark.parametrize("wrapped", [True, False])
def test_pkl_numpy_round_trip(tmp_path, wrapped):
    src = _source(1)
    arrays = {k: v.numpy() for k, v in src.state_dict().items()}
    path = tmp_path / "model.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "Detectron2 Model Zoo"} if wrapped else arrays, f, protocol=2)
    state = read_state_dict(path)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    dst = Tiny()
    report = load_checkpoint(dst, path)
    assert report.ok, str(report)
    assert _same(src, dst)


def test_safetensors_round_trip(tmp_path):
    src = _source(2)
    path = tmp_path / "model.safetensors"
    save_file({k: v.clone().contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = Tiny()
    assert load_checkpoint(dst, path).ok
    assert _same(src, dst)


def test_shared_tensors_load_under_any_name():
    src = _source(3)
    only_head = {k: v for k, v in src.state_dict().items() if not k.startswith("shared.")}
    dst = Tiny()
    report = load_checkpoint(dst, only_head, strict=True)
    assert report.ok and "shared.weight" in report.loaded
    assert torch.equal(dst.shared.weight, src.head.weight)
    assert load_checkpoint(Tiny(), src.state_dict(), strict=True).ok  # both names given: fine too


def test_training_only_and_foreign_entries_are_ignored_with_a_note():
    src = _source(4)
    state = dict(src.state_dict())
    state["criterion.empty_weight"] = torch.ones(3)
    state["teacher.head.weight"] = torch.ones(2, 4)
    state["pixel_mean"] = torch.ones(3)
    dst = Tiny()
    report = load_checkpoint(dst, state, strict=True)
    assert report.ok
    assert {"criterion.empty_weight", "teacher.head.weight", "pixel_mean"} <= set(report.ignored)
    text = str(report)
    assert "criterion.*" in text and "teacher.*" in text and "ignored" in text
    assert torch.equal(dst.pixel_mean, torch.zeros(3))  # non-persistent buffers are not loaded


def test_missing_unexpected_and_mismatch_are_reported_and_strict_raises():
    src = _source(5)
    state = dict(src.state_dict())
    del state["backbone.1.running_var"]
    state["head.extra"] = torch.zeros(5)
    state["backbone.0.weight"] = torch.zeros(4, 3, 5, 5)
    dst = Tiny()
    before = dst.backbone[0].weight.detach().clone()

    with pytest.raises(CheckpointError) as info:
        load_checkpoint(dst, state, strict=True)
    message = str(info.value)
    assert "backbone.1.running_var" in message and "head.extra" in message
    assert "backbone.0.weight: checkpoint [4, 3, 5, 5] vs model [4, 3, 3, 3]" in message
    assert not torch.equal(dst.head.weight, src.head.weight)  # strict failure leaves the model untouched

    with pytest.raises(CheckpointError):  # strict is the default
        load_checkpoint(dst, state)
    report = load_checkpoint(dst, state, strict=False)  # a partial load, asked for
    assert not report.ok
    assert report.missing == ["backbone.1.running_var"]
    assert report.unexpected == ["head.extra"]
    assert report.mismatched == [("backbone.0.weight", (4, 3, 5, 5), (4, 3, 3, 3))]
    assert torch.equal(dst.backbone[0].weight, before)  # a mismatched shape is never loaded
    assert torch.equal(dst.head.weight, src.head.weight)  # everything else is
    text = str(report)
    assert "missing" in text and "[4]" in text and "unexpected" in text and "head.extra [5]" in text


def test_ddp_prefix_prefix_map_and_dtype():
    src = _source(6)
    half = {f"module.{k}": v.half() for k, v in src.state_dict().items()}
    half["iteration"] = 100
    dst = Tiny()
    report = load_checkpoint(dst, half)
    assert report.ok and dst.head.weight.dtype == torch.float32
    assert torch.equal(dst.head.weight, src.head.weight.half().float())
    assert any("module." in n for n in report.notes) and any("float16" in n for n in report.notes)

    bare = {k[len("backbone."):]: v for k, v in src.state_dict().items() if k.startswith("backbone.")}
    with pytest.raises(CheckpointError, match=r"try prefix_map=\{'': 'backbone.'\}"):  # the hint is in the error
        load_checkpoint(Tiny(), bare)
    report = load_checkpoint(Tiny(), bare, strict=False)
    assert not report.loaded and any("prefix_map={'': 'backbone.'}" in n for n in report.notes)
    dst = Tiny()
    report = load_checkpoint(dst, bare, strict=False, prefix_map={"": "backbone."})
    assert set(report.missing) == {"head.weight", "head.bias", "shared.weight", "shared.bias"}
    assert torch.equal(dst.backbone[0].weight, src.backbone[0].weight)


def test_frozen_bn_backbone_from_bn_training_and_caffe2_style():
    trained = ResNet(depth=18, stem_out_channels=8, res2_out_channels=8, norm="BN", out_features=["res2"])
    frozen = ResNet(depth=18, stem_out_channels=8, res2_out_channels=8, out_features=["res2"])
    report = load_checkpoint(frozen, trained.state_dict(), strict=True)  # num_batches_tracked: ignored
    assert report.ok and any(k.endswith("num_batches_tracked") for k in report.ignored)
    folded = {k: v for k, v in frozen.state_dict().items() if not k.endswith(("running_mean", "running_var"))}
    report = load_checkpoint(frozen, folded, strict=True)
    assert report.ok and any("identity" in n for n in report.notes)
    assert torch.equal(frozen.stem.conv1.norm.running_var, torch.ones(8))


def test_read_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match="does not exist") as info:
        read_state_dict(missing)
    assert str(missing) in str(info.value) and isinstance(info.value, ValueError)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(Tiny(), str(missing))

    odd = tmp_path / "weights.h5"
    odd.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown file type"):
        read_state_dict(odd)
    for name in ("bad.pth", "bad.pkl", "bad.safetensors"):
        path = tmp_path / name
        path.write_bytes(b"\x80\x02garbage that is not a checkpoint")
        with pytest.raises(CheckpointError, match="corrupt") as info:
            read_state_dict(path)
        assert str(path) in str(info.value)


def test_pkl_with_arbitrary_globals_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"x": Evil()}}))
    with pytest.raises(CheckpointError, match="refusing to load global"):
        read_state_dict(path)
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(2)}, "extra": Evil()}, path)
    with pytest.raises(CheckpointError, match="trusted=True") as info:
        read_state_dict(path)
    assert "getcwd" in str(info.value)
    assert torch.equal(read_state_dict(path, trusted=True)["w"], torch.ones(2))  # only for files one trusts
