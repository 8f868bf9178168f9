"""Sine position encodings of MaskDINO: the pixel decoder's 2-D map encoding and the decoder's box encoding."""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["PositionEmbeddingSine", "gen_sineembed_for_position"]


def _sine_cosine(embed: torch.Tensor, dim_t: torch.Tensor) -> torch.Tensor:
    """embed (..., ) → (..., F): sin on even frequencies, cos on odd ones, interleaved pairwise."""
    angles = embed[..., None] / dim_t
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """DETR's sine encoding of an image grid: (B, C, H, W) → (B, 2·num_pos_feats, H, W), y features first.

    With ``normalize`` the cumulative (unpadded) coordinates are scaled to (0, ``scale``] (default 2π).
    Only the shape (and the optional padding mask) of the input matters.
    """

    def __init__(self, num_pos_feats: int = 64, temperature: float = 10000, normalize: bool = False,
                 scale: float | None = None):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: a scale needs normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            mask = torch.zeros((x.size(0), x.size(2), x.size(3)), device=x.device, dtype=torch.bool)
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        pos_x = _sine_cosine(x_embed, dim_t)
        pos_y = _sine_cosine(y_embed, dim_t)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
                f"normalize={self.normalize}, scale={self.scale}")


def gen_sineembed_for_position(pos_tensor: torch.Tensor, num_feats: int = 128) -> torch.Tensor:
    """Sine encoding of points (…, 2) → (…, 2F) as (y, x) or boxes (…, 4) → (…, 4F) as (y, x, w, h).

    Coordinates in [0, 1] are scaled by 2π; F = ``num_feats`` (128 in MaskDINO, fixing d_model at 256).
    """
    scale = 2 * math.pi
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=pos_tensor.device)
    dim_t = (10000 ** (2 * (dim_t // 2) / num_feats)).to(pos_tensor.dtype)  # float32 as official; float64 models too
    pos_x = _sine_cosine(pos_tensor[..., 0] * scale, dim_t)
    pos_y = _sine_cosine(pos_tensor[..., 1] * scale, dim_t)
    last = pos_tensor.size(-1)
    if last == 2:
        return torch.cat((pos_y, pos_x), dim=-1)
    if last == 4:
        pos_w = _sine_cosine(pos_tensor[..., 2] * scale, dim_t)
        pos_h = _sine_cosine(pos_tensor[..., 3] * scale, dim_t)
        return torch.cat((pos_y, pos_x, pos_w, pos_h), dim=-1)
    raise ValueError(f"gen_sineembed_for_position: last dimension must be 2 or 4, got {last}")
