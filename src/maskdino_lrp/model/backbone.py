"""A detectron2-style ResNet (the module tree of ``detectron2/modeling/backbone/resnet.py``).

Official checkpoints' ``backbone.*`` keys load unchanged: ``stem.conv1`` (+ ``.norm``),
``res2``…``res5`` blocks with ``conv1``/``conv2``/``conv3``/``shortcut``, each conv carrying its norm.
One extension: depth 18/34 accepts RES2_OUT_CHANNELS other than 64 (detectron2 asserts 64), which
the narrow demo backbone uses.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

BLOCKS_PER_STAGE = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters (all buffers): y = (x − μ)/√(σ² + ε)·γ + β."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def get_norm(norm: str, channels: int) -> nn.Module | None:
    """detectron2's norm by name: FrozenBN, BN / SyncBN (eval: running statistics), GN (32 groups), or none."""
    if not norm:
        return None
    if norm == "FrozenBN":
        return FrozenBatchNorm2d(channels)
    if norm in ("BN", "SyncBN"):
        return nn.BatchNorm2d(channels)
    if norm == "GN":
        return nn.GroupNorm(32, channels)
    raise ValueError(f"MODEL.RESNETS.NORM={norm!r} is not supported; use FrozenBN, BN, SyncBN or GN")


class Conv2d(nn.Conv2d):
    """A conv that applies its own ``norm`` (and optional ``activation``), as detectron2's wrapper."""

    def __init__(self, *args: Any, norm: nn.Module | None = None, activation: nn.Module | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def _conv(cin: int, cout: int, k: int, stride: int, norm: str, padding: int = 0, dilation: int = 1,
          groups: int = 1) -> Conv2d:
    conv = Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=False,
                  norm=get_norm(norm, cout))
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # c2_msra_fill
    return conv


class BasicStem(nn.Module):
    """7×7 stride-2 conv + norm + ReLU, then 3×3 stride-2 max-pool: stride 4."""

    def __init__(self, in_channels: int = 3, out_channels: int = 64, norm: str = "FrozenBN"):
        super().__init__()
        self.out_channels = out_channels
        self.stride = 4
        self.conv1 = _conv(in_channels, out_channels, 7, 2, norm, padding=3)
        self.relu = nn.ReLU()
        self.max_pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.max_pool(self.relu(self.conv1(x)))


class BasicBlock(nn.Module):
    """Two 3×3 convs with a residual connection (ResNet-18/34)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, norm: str = "FrozenBN"):
        super().__init__()
        self.shortcut = _conv(in_channels, out_channels, 1, stride, norm) if in_channels != out_channels else None
        self.conv1 = _conv(in_channels, out_channels, 3, stride, norm, padding=1)
        self.conv2 = _conv(out_channels, out_channels, 3, 1, norm, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.relu(self.conv1(x)))
        residual = self.shortcut(x) if self.shortcut is not None else x
        return self.relu(out + residual)


class BottleneckBlock(nn.Module):
    """1×1 → 3×3 (grouped, dilated) → 1×1 with a residual connection (ResNet-50/101)."""

    def __init__(self, in_channels: int, out_channels: int, *, bottleneck_channels: int, stride: int = 1,
                 num_groups: int = 1, norm: str = "FrozenBN", stride_in_1x1: bool = False, dilation: int = 1):
        super().__init__()
        self.shortcut = _conv(in_channels, out_channels, 1, stride, norm) if in_channels != out_channels else None
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = _conv(in_channels, bottleneck_channels, 1, stride_1x1, norm)
        self.conv2 = _conv(bottleneck_channels, bottleneck_channels, 3, stride_3x3, norm, padding=dilation,
                           dilation=dilation, groups=num_groups)
        self.conv3 = _conv(bottleneck_channels, out_channels, 1, 1, norm)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.conv1(x))
        out = self.relu(self.conv2(out))
        out = self.conv3(out)
        residual = self.shortcut(x) if self.shortcut is not None else x
        return self.relu(out + residual)


class ResNet(nn.Module):
    """Stem + stages ``res2``..``res5``; forward returns {name: feature} for ``out_features``."""

    def __init__(self, *, depth: int = 50, in_channels: int = 3, stem_out_channels: int = 64,
                 res2_out_channels: int = 256, num_groups: int = 1, width_per_group: int = 64,
                 stride_in_1x1: bool = True, res5_dilation: int = 1, norm: str = "FrozenBN",
                 out_features: Sequence[str] = ("res2", "res3", "res4", "res5")):
        super().__init__()
        if depth not in BLOCKS_PER_STAGE:
            raise ValueError(f"MODEL.RESNETS.DEPTH={depth} is not supported; use one of {sorted(BLOCKS_PER_STAGE)}")
        if res5_dilation not in (1, 2):
            raise ValueError(f"MODEL.RESNETS.RES5_DILATION={res5_dilation} must be 1 or 2")
        basic = depth in (18, 34)
        if basic and (res5_dilation != 1 or num_groups != 1):
            raise ValueError("MODEL.RESNETS: depth 18/34 needs RES5_DILATION 1 and NUM_GROUPS 1")
        unknown = [f for f in out_features if f not in ("stem", "res2", "res3", "res4", "res5")]
        if unknown:
            raise ValueError(f"MODEL.RESNETS.OUT_FEATURES has unknown feature {unknown[0]!r}; use res2..res5")
        self.stem = BasicStem(in_channels, stem_out_channels, norm)
        self._out_features = list(out_features)
        self._shapes: dict[str, tuple[int, int]] = {"stem": (stem_out_channels, 4)}
        max_stage = max(int(f[-1]) for f in out_features if f.startswith("res")) if any(
            f.startswith("res") for f in out_features) else 1
        cin, cout, bottleneck = stem_out_channels, res2_out_channels, num_groups * width_per_group
        stride = 4
        self.stage_names = []
        for idx, stage in enumerate(range(2, max_stage + 1)):
            dilation = res5_dilation if stage == 5 else 1
            first_stride = 1 if idx == 0 or (stage == 5 and dilation == 2) else 2
            blocks = []
            for b in range(BLOCKS_PER_STAGE[depth][idx]):
                s = first_stride if b == 0 else 1
                if basic:
                    blocks.append(BasicBlock(cin, cout, s, norm))
                else:
                    blocks.append(BottleneckBlock(cin, cout, bottleneck_channels=bottleneck, stride=s,
                                                  num_groups=num_groups, norm=norm, stride_in_1x1=stride_in_1x1,
                                                  dilation=dilation))
                cin = cout
            stride *= first_stride
            name = f"res{stage}"
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
            self._shapes[name] = (cout, stride)
            cout *= 2
            bottleneck *= 2

    def output_shape(self) -> dict[str, tuple[int, int]]:
        """{feature name: (channels, stride)} for the features this backbone returns."""
        return {name: self._shapes[name] for name in self._out_features}

    @property
    def size_divisibility(self) -> int:
        return 0

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


def build_resnet_backbone(cfg: Mapping[str, Any], in_channels: int = 3) -> ResNet:
    """A ResNet from official keys ``cfg["MODEL"]["RESNETS"][...]``."""
    r = cfg["MODEL"]["RESNETS"]
    if any(r.get("DEFORM_ON_PER_STAGE", [False] * 4)):
        raise ValueError("MODEL.RESNETS.DEFORM_ON_PER_STAGE: deformable convolutions are not supported")
    return ResNet(depth=int(r["DEPTH"]), in_channels=in_channels, stem_out_channels=int(r["STEM_OUT_CHANNELS"]),
                  res2_out_channels=int(r["RES2_OUT_CHANNELS"]), num_groups=int(r["NUM_GROUPS"]),
                  width_per_group=int(r["WIDTH_PER_GROUP"]), stride_in_1x1=bool(r["STRIDE_IN_1X1"]),
                  res5_dilation=int(r["RES5_DILATION"]), norm=str(r["NORM"]), out_features=list(r["OUT_FEATURES"]))
