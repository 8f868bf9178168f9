"""A detectron2-style ResNet (the module tree of ``detectron2/modeling/backbone/resnet.py``).

Official checkpoints' ``backbone.*`` keys load unchanged: ``stem.conv1`` (+ ``.norm``), stages
``res2``…``res5`` made of blocks with ``conv1``/``conv2``/(``conv3``)/``shortcut``, each conv carrying
its own norm (FrozenBN buffers ``weight``, ``bias``, ``running_mean``, ``running_var``).

Differences from detectron2 (none changes the numbers):

* depth 18/34 accept RES2_OUT_CHANNELS other than 64 (detectron2 asserts 64); the narrow demo
  backbone uses that;
* deformable convolutions (DEFORM_ON_PER_STAGE) and the classification head (``linear``) are not
  implemented; asking for them raises ``ValueError``;
* ``build_resnet_backbone`` does not apply MODEL.BACKBONE.FREEZE_AT (nothing here trains by default);
  call :meth:`ResNet.freeze` for detectron2's freezing;
* activations are ``F.relu`` (not in place) and the stem's max-pool is an ``nn.MaxPool2d`` module, so
  autograd and LRP hooks see every tensor.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Conv2d

__all__ = [
    "BLOCKS_PER_STAGE",
    "ShapeSpec",
    "FrozenBatchNorm2d",
    "get_norm",
    "Conv2d",
    "BasicStem",
    "BasicBlock",
    "BottleneckBlock",
    "ResNet",
    "build_resnet_backbone",
    "build_backbone",
]

BLOCKS_PER_STAGE = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
STAGE_INDEX = {"res2": 1, "res3": 2, "res4": 3, "res5": 4}
NORMS = ("FrozenBN", "BN", "SyncBN", "naiveSyncBN", "GN", "")


class ShapeSpec(NamedTuple):
    """(channels, stride) of one output feature; compares equal to a plain tuple."""

    channels: int
    stride: int


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine terms, all buffers: y = (x − μ)·γ/√(σ² + ε) + β.

    Same arithmetic as detectron2's: the scale and shift are formed first, then one multiply-add.
    """

    _version = 3

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def scale_and_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (scale, shift) of the affine map this norm applies."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale_and_shift()
        return x * scale.to(x.dtype).view(1, -1, 1, 1) + shift.to(x.dtype).view(1, -1, 1, 1)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # As detectron2: checkpoints converted from Caffe2 hold only weight and bias (the statistics were
        # folded in); their identity statistics are then implied, not missing.
        version = local_metadata.get("version", None)
        if version is None or version < 2:
            if prefix + "weight" in state_dict or prefix + "bias" in state_dict:
                state_dict.setdefault(prefix + "running_mean", torch.zeros_like(self.running_mean))
                state_dict.setdefault(prefix + "running_var", torch.ones_like(self.running_var))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    @classmethod
    def convert_frozen_batchnorm(cls, module: nn.Module) -> nn.Module:
        """Replace every ``nn.BatchNorm2d`` / ``nn.SyncBatchNorm`` in ``module`` by a FrozenBatchNorm2d
        holding the same statistics (the eval-mode map is unchanged). Returns the (possibly new) module."""
        if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            frozen = cls(module.num_features, eps=module.eps)
            with torch.no_grad():
                if module.affine:
                    frozen.weight.copy_(module.weight.detach())
                    frozen.bias.copy_(module.bias.detach())
                if module.running_mean is not None:
                    frozen.running_mean.copy_(module.running_mean)
                    frozen.running_var.copy_(module.running_var)
            return frozen.to(module.running_mean.device if module.running_mean is not None else "cpu")
        for name, child in module.named_children():
            new = cls.convert_frozen_batchnorm(child)
            if new is not child:
                module.add_module(name, new)
        return module


def get_norm(norm: str | None, channels: int) -> nn.Module | None:
    """detectron2's norm by name: FrozenBN, BN / SyncBN / naiveSyncBN (all ``nn.BatchNorm2d`` here:
    one process), GN (32 groups), or ""/None for none."""
    if not norm:
        return None
    if norm == "FrozenBN":
        return FrozenBatchNorm2d(channels)
    if norm in ("BN", "SyncBN", "naiveSyncBN"):
        return nn.BatchNorm2d(channels)
    if norm == "GN":
        return nn.GroupNorm(32, channels)
    raise ValueError(f"MODEL.RESNETS.NORM={norm!r} is not supported; use one of {list(NORMS)}")


def _conv(cin: int, cout: int, kernel: int, stride: int, norm: str, padding: int = 0, dilation: int = 1,
          groups: int = 1) -> Conv2d:
    conv = Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=False,
                  norm=get_norm(norm, cout))
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # detectron2's c2_msra_fill
    return conv


class _Block(nn.Module):
    """Common bits of stem and blocks: channel counts, stride, and detectron2's ``freeze``."""

    in_channels: int
    out_channels: int
    stride: int

    def freeze(self) -> "_Block":
        for p in self.parameters():
            p.requires_grad_(False)
        FrozenBatchNorm2d.convert_frozen_batchnorm(self)
        return self


class BasicStem(_Block):
    """7×7 stride-2 conv (+ norm) → ReLU → 3×3 stride-2 max-pool (padding 1): overall stride 4."""

    def __init__(self, in_channels: int = 3, out_channels: int = 64, norm: str = "FrozenBN"):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, 4
        self.conv1 = _conv(in_channels, out_channels, 7, 2, norm, padding=3)
        self.max_pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.max_pool(F.relu(self.conv1(x)))


class BasicBlock(_Block):
    """Two 3×3 convs and a residual connection (ResNet-18/34); a 1×1 projection shortcut when the
    channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1, norm: str = "FrozenBN"):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.shortcut = _conv(in_channels, out_channels, 1, stride, norm) if in_channels != out_channels else None
        self.conv1 = _conv(in_channels, out_channels, 3, stride, norm, padding=1)
        self.conv2 = _conv(out_channels, out_channels, 3, 1, norm, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.conv1(x)))
        residual = self.shortcut(x) if self.shortcut is not None else x
        return F.relu(out + residual)


class BottleneckBlock(_Block):
    """1×1 → 3×3 (grouped, dilated) → 1×1 with a residual connection (ResNet-50/101/152).

    ``stride_in_1x1`` puts the block's stride in the first 1×1 conv (MSRA models) instead of the 3×3.
    """

    def __init__(self, in_channels: int, out_channels: int, *, bottleneck_channels: int, stride: int = 1,
                 num_groups: int = 1, norm: str = "FrozenBN", stride_in_1x1: bool = False, dilation: int = 1):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.shortcut = _conv(in_channels, out_channels, 1, stride, norm) if in_channels != out_channels else None
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = _conv(in_channels, bottleneck_channels, 1, stride_1x1, norm)
        self.conv2 = _conv(bottleneck_channels, bottleneck_channels, 3, stride_3x3, norm, padding=dilation,
                           dilation=dilation, groups=num_groups)
        self.conv3 = _conv(bottleneck_channels, out_channels, 1, 1, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv1(x))
        out = F.relu(self.conv2(out))
        out = self.conv3(out)
        residual = self.shortcut(x) if self.shortcut is not None else x
        return F.relu(out + residual)


def _positive_int(value: Any, key: str, section: str = "RESNETS") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"MODEL.{section}.{key}={value!r} must be a positive integer")
    return value


class ResNet(nn.Module):
    """Stem + stages ``res2``..``res5``; ``forward`` returns {name: feature} for ``out_features``.

    Stages after the last requested feature are not built (as detectron2), so their keys do not exist.
    """

    def __init__(self, *, depth: int = 50, in_channels: int = 3, stem_out_channels: int = 64,
                 res2_out_channels: int = 256, num_groups: int = 1, width_per_group: int = 64,
                 stride_in_1x1: bool = True, res5_dilation: int = 1, norm: str = "FrozenBN",
                 out_features: Sequence[str] = ("res2", "res3", "res4", "res5")):
        super().__init__()
        if depth not in BLOCKS_PER_STAGE:
            raise ValueError(f"MODEL.RESNETS.DEPTH={depth!r} is not supported; use one of {sorted(BLOCKS_PER_STAGE)}")
        for key, value in (("STEM_OUT_CHANNELS", stem_out_channels), ("RES2_OUT_CHANNELS", res2_out_channels),
                           ("NUM_GROUPS", num_groups), ("WIDTH_PER_GROUP", width_per_group)):
            _positive_int(value, key)
        _positive_int(in_channels, "in_channels (input image channels)")
        if res5_dilation not in (1, 2):
            raise ValueError(f"MODEL.RESNETS.RES5_DILATION={res5_dilation!r} must be 1 or 2")
        if norm not in NORMS and norm is not None:
            raise ValueError(f"MODEL.RESNETS.NORM={norm!r} is not supported; use one of {list(NORMS)}")
        basic = depth < 50
        if basic and res5_dilation != 1:
            raise ValueError(f"MODEL.RESNETS.RES5_DILATION={res5_dilation} is not supported for depth {depth}; use 1")
        if basic and num_groups != 1:
            raise ValueError(f"MODEL.RESNETS.NUM_GROUPS={num_groups} is not supported for depth {depth}; use 1")
        if isinstance(out_features, str):
            out_features = [out_features]
        out_features = list(out_features)
        if not out_features:
            raise ValueError("MODEL.RESNETS.OUT_FEATURES is empty; name at least one of stem, res2..res5")
        for f in out_features:
            if f not in ("stem", *STAGE_INDEX):
                raise ValueError(f"MODEL.RESNETS.OUT_FEATURES has unsupported feature {f!r}; use stem or res2..res5")

        self.depth = depth
        self.stem = BasicStem(in_channels, stem_out_channels, norm)
        self._out_features = out_features
        self._shapes: dict[str, ShapeSpec] = {"stem": ShapeSpec(stem_out_channels, self.stem.stride)}
        num_stages = max(STAGE_INDEX.get(f, 0) for f in out_features)
        cin, cout, bottleneck = stem_out_channels, res2_out_channels, num_groups * width_per_group
        stride = self.stem.stride
        self.stage_names: list[str] = []
        for idx in range(num_stages):
            stage = idx + 2
            dilation = res5_dilation if stage == 5 else 1
            first_stride = 1 if idx == 0 or (stage == 5 and dilation == 2) else 2
            blocks: list[nn.Module] = []
            for b in range(BLOCKS_PER_STAGE[depth][idx]):
                s = first_stride if b == 0 else 1
                if basic:
                    blocks.append(BasicBlock(cin, cout, stride=s, norm=norm))
                else:
                    blocks.append(BottleneckBlock(cin, cout, bottleneck_channels=bottleneck, stride=s,
                                                  num_groups=num_groups, norm=norm, stride_in_1x1=stride_in_1x1,
                                                  dilation=dilation))
                cin = cout
            stride *= first_stride
            name = f"res{stage}"
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
            self._shapes[name] = ShapeSpec(cout, stride)
            cout *= 2
            bottleneck *= 2

    def output_shape(self) -> dict[str, ShapeSpec]:
        """{feature name: (channels, stride)} for the features ``forward`` returns."""
        return {name: self._shapes[name] for name in self._out_features}

    @property
    def size_divisibility(self) -> int:
        return 0

    def freeze(self, freeze_at: int = 0) -> "ResNet":
        """detectron2's freezing: ``freeze_at`` 1 freezes the stem, 2 also res2, … (no gradients for their
        parameters; their BatchNorms become FrozenBatchNorm2d)."""
        if freeze_at >= 1:
            self.stem.freeze()
        for idx, name in enumerate(self.stage_names, start=2):
            if freeze_at >= idx:
                for block in getattr(self, name).children():
                    block.freeze()
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.dim() != 4:
            raise ValueError(f"ResNet takes (B, C, H, W) input, got shape {tuple(x.shape)}")
        outputs = {}
        x = self.stem(x)
        if "stem" in self._out_features:
            outputs["stem"] = x
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs


# detectron2's defaults (config/defaults.py) for keys a partial config leaves out.
_DEFAULTS = {
    "DEPTH": 50, "OUT_FEATURES": ["res4"], "NUM_GROUPS": 1, "NORM": "FrozenBN", "WIDTH_PER_GROUP": 64,
    "STRIDE_IN_1X1": True, "RES5_DILATION": 1, "RES2_OUT_CHANNELS": 256, "STEM_OUT_CHANNELS": 64,
    "DEFORM_ON_PER_STAGE": [False, False, False, False],
}


def build_resnet_backbone(cfg: Mapping[str, Any], in_channels: int = 3) -> ResNet:
    """A ResNet from official config keys, ``cfg["MODEL"]["RESNETS"][...]`` (missing keys take detectron2's
    defaults). MODEL.BACKBONE.FREEZE_AT is not applied; see :meth:`ResNet.freeze`."""
    try:
        r = dict(cfg["MODEL"]["RESNETS"])
    except (KeyError, TypeError) as e:
        raise ValueError("config has no MODEL.RESNETS section (a nested dict of official keys is expected)") from e
    r = {**_DEFAULTS, **r}
    deform = r["DEFORM_ON_PER_STAGE"]
    if any(deform):
        raise ValueError(f"MODEL.RESNETS.DEFORM_ON_PER_STAGE={list(deform)}: deformable convolutions are not "
                         "supported; set all to False")
    stride_in_1x1 = r["STRIDE_IN_1X1"]
    if not isinstance(stride_in_1x1, bool):
        raise ValueError(f"MODEL.RESNETS.STRIDE_IN_1X1={stride_in_1x1!r} must be true or false")
    return ResNet(depth=r["DEPTH"], in_channels=in_channels, stem_out_channels=r["STEM_OUT_CHANNELS"],
                  res2_out_channels=r["RES2_OUT_CHANNELS"], num_groups=r["NUM_GROUPS"],
                  width_per_group=r["WIDTH_PER_GROUP"], stride_in_1x1=stride_in_1x1,
                  res5_dilation=r["RES5_DILATION"], norm=r["NORM"], out_features=r["OUT_FEATURES"])


def build_backbone(cfg: Mapping[str, Any], in_channels: int = 3) -> nn.Module:
    """The backbone MODEL.BACKBONE.NAME names: ``build_resnet_backbone`` (the default) or ``D2SwinTransformer``."""
    name = cfg.get("MODEL", {}).get("BACKBONE", {}).get("NAME", "build_resnet_backbone")
    if name == "build_resnet_backbone":
        return build_resnet_backbone(cfg, in_channels)
    if name == "D2SwinTransformer":
        from .swin import build_swin_backbone  # swin.py imports this module

        return build_swin_backbone(cfg, in_channels)
    raise ValueError(f"MODEL.BACKBONE.NAME={name!r} is not supported; use build_resnet_backbone or D2SwinTransformer")
