"""MaskDINO's pixel decoder (``MaskDINOEncoder``): deformable transformer encoder + stride-4 mask features.

Module names follow the official code so official ``sem_seg_head.pixel_decoder.*`` keys load unchanged:
``input_proj.{i}.{0,1}`` (1×1 conv + GroupNorm, then 3×3/2 convs for extra levels),
``transformer.level_embed``, ``transformer.encoder.layers.{i}.{self_attn,norm1,linear1,linear2,norm2}``,
``mask_features``, ``adapter_{k}`` / ``layer_{k}`` (FPN lateral / output convs with ``.norm``).
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .deform_attn import MSDeformAttn
from .layers import Conv2d, post_norm_ffn, with_pos_embed
from .position_encoding import PositionEmbeddingSine

__all__ = [
    "Conv2d",
    "get_norm",
    "c2_xavier_fill",
    "activation_module",
    "normalize_input_shape",
    "MSDeformAttnTransformerEncoderLayer",
    "MSDeformAttnTransformerEncoder",
    "MSDeformAttnTransformerEncoderOnly",
    "MaskDINOEncoder",
]


# ----------------------------------------------------------------------------- detectron2 pieces, minimal
def _floating(x: torch.Tensor) -> torch.Tensor:
    """Half-precision features up-cast to float32 (as official, for AMP); float32/float64 kept as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def get_norm(norm: str | Callable[[int], nn.Module] | None, out_channels: int) -> nn.Module | None:
    """detectron2's get_norm for the values MaskDINO uses: "GN" (32 groups) or ""/None (no norm)."""
    if norm is None or norm == "":
        return None
    if callable(norm):
        return norm(out_channels)
    if norm == "GN":
        return nn.GroupNorm(32, out_channels)
    raise ValueError(f"unsupported norm {norm!r} (MODEL.SEM_SEG_HEAD.NORM): use 'GN' or ''")


def c2_xavier_fill(module: nn.Module) -> None:
    """Caffe2's XavierFill as in fvcore: kaiming-uniform with a=1, zero bias."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.constant_(module.bias, 0)


def activation_module(name: str) -> nn.Module:
    """The official activation names as parameterless modules (no state-dict keys)."""
    table = {"relu": nn.ReLU, "gelu": nn.GELU, "selu": nn.SELU}
    if name == "glu":
        return nn.GLU()
    if name not in table:
        raise ValueError(f"unsupported activation {name!r}; use relu/gelu/glu/selu")
    return table[name]()


def normalize_input_shape(input_shape: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """name → (channels, stride), from tuples, dicts or ShapeSpec-like objects."""
    out = {}
    for name, spec in input_shape.items():
        if isinstance(spec, Mapping):
            channels, stride = spec["channels"], spec["stride"]
        elif hasattr(spec, "channels") and hasattr(spec, "stride"):
            channels, stride = spec.channels, spec.stride
        else:
            channels, stride = spec
        out[name] = (int(channels), int(stride))
    return out


# ----------------------------------------------------------------------------- encoder
class MSDeformAttnTransformerEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention → add → norm1 → FFN → add → norm2."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, activation: str = "relu",
                 n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = activation_module(activation)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    with_pos_embed = staticmethod(with_pos_embed)

    def forward_ffn(self, src: torch.Tensor) -> torch.Tensor:
        return post_norm_ffn(src, self.linear1, self.activation, self.dropout2, self.linear2, self.dropout3, self.norm2)

    def forward(self, src: torch.Tensor, pos: torch.Tensor | None, reference_points: torch.Tensor,
                spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        attended = self.self_attn(self.with_pos_embed(src, pos), reference_points, src, spatial_shapes,
                                  level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(attended))
        return self.forward_ffn(src)


def encoder_call_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(src (B, ΣHW, C), spatial_shapes (L, 2)) of a call of :class:`MSDeformAttnTransformerEncoder`, as a
    forward (pre-)hook with ``with_kwargs=True`` sees it, whether passed by position or by name."""
    src = args[0] if args else kwargs["src"]
    shapes = args[1] if len(args) > 1 else kwargs["spatial_shapes"]
    return src, shapes


class MSDeformAttnTransformerEncoder(nn.Module):
    """A stack of encoder layers over the flattened multi-scale tokens."""

    def __init__(self, encoder_layer: nn.Module, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers

    @staticmethod
    def get_reference_points(spatial_shapes: torch.Tensor, valid_ratios: torch.Tensor,
                             device: torch.device) -> torch.Tensor:
        """Pixel centres of every level, normalised to the valid area: (B, ΣHW, L, 2) as (x, y)."""
        refs = []
        for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
            ref_y, ref_x = torch.meshgrid(
                torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
                torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device), indexing="ij")
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            refs.append(torch.stack((ref_x, ref_y), -1))
        reference_points = torch.cat(refs, 1)
        return reference_points[:, :, None] * valid_ratios[:, None]

    def forward(self, src: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                valid_ratios: torch.Tensor, pos: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        output = src
        reference_points = self.get_reference_points(spatial_shapes, valid_ratios, device=src.device)
        for layer in self.layers:
            output = layer(output, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return output


def get_valid_ratio(mask: torch.Tensor) -> torch.Tensor:
    """Unpadded fraction of a (B, H, W) padding mask as (B, 2) = (w ratio, h ratio)."""
    _, h, w = mask.shape
    valid_h = torch.sum(~mask[:, :, 0], 1)
    valid_w = torch.sum(~mask[:, 0, :], 1)
    return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    """Flattens the levels, adds level embeddings to the position encodings, runs the encoder."""

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6, dim_feedforward: int = 1024,
                 dropout: float = 0.1, activation: str = "relu", num_feature_levels: int = 4, enc_n_points: int = 4):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        layer = MSDeformAttnTransformerEncoderLayer(d_model, dim_feedforward, dropout, activation,
                                                    num_feature_levels, nhead, enc_n_points)
        self.encoder = MSDeformAttnTransformerEncoder(layer, num_encoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)

    get_valid_ratio = staticmethod(get_valid_ratio)

    def forward(self, srcs: Sequence[torch.Tensor], masks: Sequence[torch.Tensor] | None,
                pos_embeds: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # as official: a given padding mask is only used when some level is not a multiple of 32
        use_masks = masks is not None and any(s.size(2) % 32 or s.size(3) % 32 for s in srcs)
        if not use_masks:
            masks = [torch.zeros((s.size(0), s.size(2), s.size(3)), device=s.device, dtype=torch.bool) for s in srcs]
        src_flatten, mask_flatten, pos_flatten, shapes = [], [], [], []
        for lvl, (src, mask, pos_embed) in enumerate(zip(srcs, masks, pos_embeds)):
            _, _, h, w = src.shape
            shapes.append((h, w))
            src_flatten.append(src.flatten(2).transpose(1, 2))
            mask_flatten.append(mask.flatten(1))
            pos_flatten.append(pos_embed.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        src_flatten = torch.cat(src_flatten, 1)
        mask_flatten = torch.cat(mask_flatten, 1)
        pos_flatten = torch.cat(pos_flatten, 1)
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=src_flatten.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([get_valid_ratio(m) for m in masks], 1)
        memory = self.encoder(src_flatten, spatial_shapes, level_start_index, valid_ratios, pos_flatten, mask_flatten)
        return memory, spatial_shapes, level_start_index


# ----------------------------------------------------------------------------- the pixel decoder
class MaskDINOEncoder(nn.Module):
    """Multi-scale deformable encoder ("pixel decoder") of MaskDINO.

    ``input_shape`` maps feature names to (channels, stride). ``feature_order`` "high2low" puts the
    lowest-resolution level first in the transformer (official naming); "low2high" the highest first.
    Extra levels (``total_num_feature_levels`` > number of transformer in-features) come from 3×3/2
    convs on the lowest-resolution feature.
    """

    def __init__(self, input_shape: Mapping[str, Any], *, transformer_dropout: float, transformer_nheads: int,
                 transformer_dim_feedforward: int, transformer_enc_layers: int, conv_dim: int, mask_dim: int,
                 norm: str | Callable | None = None, transformer_in_features: Sequence[str], common_stride: int,
                 num_feature_levels: int, total_num_feature_levels: int, feature_order: str,
                 transformer_n_points: int = 4):
        super().__init__()
        if feature_order not in ("high2low", "low2high"):
            raise ValueError(f"unsupported feature_order {feature_order!r} (MODEL.SEM_SEG_HEAD.FEATURE_ORDER): "
                             "use 'high2low' or 'low2high'")
        shapes = normalize_input_shape(input_shape)
        missing = [f for f in transformer_in_features if f not in shapes]
        if missing:
            raise ValueError(f"transformer in-features {missing} (MODEL.SEM_SEG_HEAD."
                             f"DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES) are not among the inputs {sorted(shapes)}")
        if total_num_feature_levels < len(transformer_in_features):
            raise ValueError(f"MODEL.SEM_SEG_HEAD.TOTAL_NUM_FEATURE_LEVELS ({total_num_feature_levels}) is smaller than "
                             f"the number of transformer in-features ({len(transformer_in_features)})")
        by_stride = sorted(shapes.items(), key=lambda kv: kv[1][1])
        self.in_features = [k for k, _ in by_stride]
        self.feature_strides = [v[1] for _, v in by_stride]
        self.feature_channels = [v[0] for _, v in by_stride]
        self.feature_order = feature_order

        t_shapes = [(k, v) for k, v in shapes.items() if k in transformer_in_features]
        sign = -1 if feature_order == "low2high" else 1
        t_shapes = sorted(t_shapes, key=lambda kv: sign * kv[1][1])
        self.transformer_in_features = [k for k, _ in t_shapes]
        t_channels = [v[0] for _, v in t_shapes]
        self.transformer_feature_strides = [v[1] for _, v in t_shapes]

        self.maskdino_num_feature_levels = num_feature_levels  # kept as official; does not change the model
        self.total_num_feature_levels = total_num_feature_levels
        self.common_stride = common_stride
        self.transformer_num_feature_levels = len(self.transformer_in_features)
        self.low_resolution_index = t_channels.index(max(t_channels))
        self.high_resolution_index = 0 if feature_order == "low2high" else -1

        if self.transformer_num_feature_levels > 1:
            projections = [nn.Sequential(nn.Conv2d(c, conv_dim, kernel_size=1), nn.GroupNorm(32, conv_dim))
                           for c in t_channels[::-1]]
            in_channels = max(t_channels)
            for _ in range(total_num_feature_levels - self.transformer_num_feature_levels):
                projections.append(nn.Sequential(nn.Conv2d(in_channels, conv_dim, kernel_size=3, stride=2, padding=1),
                                                 nn.GroupNorm(32, conv_dim)))
                in_channels = conv_dim
            self.input_proj = nn.ModuleList(projections)
        else:
            self.input_proj = nn.ModuleList([nn.Sequential(nn.Conv2d(t_channels[-1], conv_dim, kernel_size=1),
                                                           nn.GroupNorm(32, conv_dim))])
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)

        self.transformer = MSDeformAttnTransformerEncoderOnly(
            d_model=conv_dim, dropout=transformer_dropout, nhead=transformer_nheads,
            dim_feedforward=transformer_dim_feedforward, num_encoder_layers=transformer_enc_layers,
            num_feature_levels=total_num_feature_levels, enc_n_points=transformer_n_points)
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)

        self.mask_dim = mask_dim
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=1, stride=1, padding=0)
        c2_xavier_fill(self.mask_features)

        stride = min(self.transformer_feature_strides)
        self.num_fpn_levels = max(int(math.log2(stride) - math.log2(common_stride)), 1)
        use_bias = norm == ""
        lateral_convs, output_convs = [], []
        for idx, in_channels in enumerate(self.feature_channels[:self.num_fpn_levels]):
            lateral = Conv2d(in_channels, conv_dim, kernel_size=1, bias=use_bias, norm=get_norm(norm, conv_dim))
            output = Conv2d(conv_dim, conv_dim, kernel_size=3, stride=1, padding=1, bias=use_bias,
                            norm=get_norm(norm, conv_dim), activation=nn.ReLU())
            c2_xavier_fill(lateral)
            c2_xavier_fill(output)
            self.add_module(f"adapter_{idx + 1}", lateral)
            self.add_module(f"layer_{idx + 1}", output)
            lateral_convs.append(lateral)
            output_convs.append(output)
        # top-down order (low → high resolution); plain lists, so no duplicate state-dict keys
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]

    def forward_features(self, features: Mapping[str, torch.Tensor], masks: Sequence[torch.Tensor] | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(mask_features (B, mask_dim, H/4, W/4), first encoder output map, multi_scale_features list).

        ``multi_scale_features`` holds the ``total_num_feature_levels`` encoder output maps in the
        transformer's level order (lowest resolution first for "high2low").
        """
        extra_srcs, extra_pos = [], []
        n_t = self.transformer_num_feature_levels
        if self.total_num_feature_levels > n_t:
            smallest = _floating(features[self.transformer_in_features[self.low_resolution_index]])
            for lvl in range(n_t, self.total_num_feature_levels):
                src = self.input_proj[lvl](smallest if lvl == n_t else extra_srcs[-1])
                extra_srcs.append(src)
                extra_pos.append(self.pe_layer(src))
        # as official: only the extra *sources* are reversed (lowest resolution first), their position
        # encodings are not — this matters only with two or more extra levels
        extra_srcs = extra_srcs[::-1]
        srcs, pos = [], []
        for idx, name in enumerate(self.transformer_in_features[::-1]):
            x = _floating(features[name])
            srcs.append(self.input_proj[idx](x))
            pos.append(self.pe_layer(x))
        if self.feature_order == "low2high":
            srcs = srcs + extra_srcs
            pos = pos + extra_pos
        else:
            srcs = extra_srcs + srcs
            pos = extra_pos + pos
        y, spatial_shapes, level_start_index = self.transformer(srcs, masks, pos)
        bs = y.shape[0]
        sizes = [h * w for h, w in spatial_shapes.tolist()]
        out = [z.transpose(1, 2).reshape(bs, -1, h, w)
               for z, (h, w) in zip(torch.split(y, sizes, dim=1), spatial_shapes.tolist())]

        for idx, name in enumerate(self.in_features[:self.num_fpn_levels][::-1]):
            x = _floating(features[name])
            lateral = self.lateral_convs[idx](x)
            merged = lateral + F.interpolate(out[self.high_resolution_index], size=lateral.shape[-2:],
                                             mode="bilinear", align_corners=False)
            out.append(self.output_convs[idx](merged))
        multi_scale_features = out[:self.total_num_feature_levels]
        return self.mask_features(out[-1]), out[0], multi_scale_features

    def forward(self, features: Mapping[str, torch.Tensor], masks: Sequence[torch.Tensor] | None = None):
        return self.forward_features(features, masks)
