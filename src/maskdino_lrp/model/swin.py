"""The Swin Transformer backbone of the official Swin MaskDINO models (``D2SwinTransformer``).

Same computation and module tree as ``maskdino/modeling/backbone/swin.py`` of IDEA-Research/MaskDINO
(itself Mask2Former's), so official ``backbone.*`` keys load unchanged: ``patch_embed.proj`` (+ ``.norm``),
``absolute_pos_embed`` (APE only), ``layers.{i}.blocks.{j}.{norm1,attn,norm2,mlp}``,
``layers.{i}.downsample.{norm,reduction}`` and the output norms ``norm0``…``norm3``.

What the official code does and this port keeps (each changes the numbers):

* every block pads its (LayerNorm-ed) map with zeros to a multiple of the window — even a map smaller than
  the window — and the padded tokens take part in attention unmasked; the output is cropped back;
* odd blocks roll the map by ``window_size // 2`` and add a 0 / −100 mask (:func:`shift_attention_mask`,
  computed per stage from the padded size) to the attention logits;
* ``PatchMerging`` pads odd sizes with zeros; ``PatchEmbed`` pads the image to a multiple of the patch;
* the stage outputs are ``norm{i}`` of the stage's last block, before patch merging.

Differences (none changes the numbers): features travel channel-last, (B, H, W, C), between modules
instead of flattened (B, H·W, C) with H and W set as block attributes; dropout and stochastic depth
(inference no-ops) are not built; stages after the last requested feature, and that stage's patch merging,
are not run.

Structure for relevance propagation (the model stays LRP-agnostic): window attention is written as
separate steps, each a module or an explicit input — ``attn.qkv`` (nn.Linear), ``attn.scores``
(q·kᵀ, an :class:`AttentionProduct` with an einsum ``equation``), the relative-position bias and the
shift mask (constant tensors added to the logits), ``attn.softmax`` (nn.Softmax), ``attn.mix``
(attention·v, an :class:`AttentionProduct`) and ``attn.proj`` (nn.Linear). :func:`window_attention`
runs the steps and takes replacements for each, as the engine's ``multihead_attention`` does for
``nn.MultiheadAttention``. The MLP's activation is an ``nn.GELU`` module; every norm is an ``nn.LayerNorm``.
The MaskDINO adapter gives ``WindowAttention`` the attention kind and computes it through
:func:`window_attention` under the attention rules (AttnLRP, AH), booking the bias and the mask.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import ShapeSpec, _positive_int
from .decoder import MaskProduct

__all__ = [
    "AttentionProduct",
    "Mlp",
    "window_partition",
    "window_reverse",
    "relative_position_index",
    "shift_attention_mask",
    "window_attention",
    "WindowAttention",
    "SwinTransformerBlock",
    "PatchMerging",
    "BasicLayer",
    "PatchEmbed",
    "SwinTransformer",
    "build_swin_backbone",
]

FEATURE_NAMES = ("res2", "res3", "res4", "res5")  # the official wrapper names the four stages' outputs
SHIFT_MASK_VALUE = -100.0  # the official mask's value between tokens of different regions (not −inf)


class AttentionProduct(MaskProduct):
    """One of window attention's two bilinear products of variable tensors (q·kᵀ, attention·v)."""


class Mlp(nn.Module):
    """fc1 → GELU → fc2."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


# ----------------------------------------------------------------------------- windows
def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of the window → (B·nW, ws, ws, C), windows in row-major order per image."""
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c)


def window_reverse(windows: torch.Tensor, window_size: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B·nW, ws, ws, C) → (B, H, W, C)."""
    nh, nw = height // window_size, width // window_size
    x = windows.view(-1, nh, nw, window_size, window_size, windows.shape[-1])
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, windows.shape[-1])


def relative_position_index(window_size: tuple[int, int]) -> torch.Tensor:
    """(N, N) index into the bias table for each pair of tokens of a window (N = Wh·Ww), official formula:
    (Δrow + Wh − 1)·(2·Ww − 1) + (Δcol + Ww − 1) with Δ = position of the query − position of the key."""
    wh, ww = window_size
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)  # (2, N)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2)
    return (relative[..., 0] + wh - 1) * (2 * ww - 1) + (relative[..., 1] + ww - 1)


def shift_attention_mask(height: int, width: int, window_size: int, shift_size: int, *,
                         dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """(nW, N, N) additive mask of the shifted windows of a ``height`` × ``width`` map (padded to the window).

    After the cyclic shift, a window at the bottom or right edge holds tokens from up to four regions of
    the padded map that are not neighbours; pairs from different regions get −100 (as the official code,
    not −inf), pairs from the same region 0.
    """
    hp = -(-height // window_size) * window_size
    wp = -(-width // window_size) * window_size
    regions = torch.zeros(1, hp, wp, 1, device=device)
    bands = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    label = 0
    for rows in bands:
        for cols in bands:
            regions[:, rows, cols, :] = label
            label += 1
    regions = window_partition(regions, window_size).reshape(-1, window_size * window_size)  # (nW, N)
    different = regions[:, None, :] != regions[:, :, None]
    return torch.zeros(different.shape, dtype=dtype, device=device).masked_fill(different, SHIFT_MASK_VALUE)


# ----------------------------------------------------------------------------- attention
def window_attention(module: "WindowAttention", x: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor | None = None,
                     *, qkv: Callable | None = None, scores: Callable | None = None,
                     probabilities: Callable | None = None, mix: Callable | None = None,
                     proj: Callable | None = None, record: Callable | None = None) -> torch.Tensor:
    """(Shifted-)window multi-head self-attention of ``x`` (B·nW, N, C), each step replaceable.

    ``softmax(scale·q·kᵀ + bias + mask)·v``, projected. ``bias`` (nH, N, N) is the relative-position bias,
    ``mask`` (nW, N, N) the shift mask or None; both are added to the logits. The steps default to the
    module's own: ``qkv(x)``, ``scores(q, k)`` (q·kᵀ), ``probabilities(logits)``, ``mix(attention, v)``,
    ``proj(x)``; ``record(attention)`` sees the (B·nW, nH, N, N) probabilities.
    """
    qkv = qkv or module.qkv
    scores = scores or module.scores
    probabilities = probabilities or module.softmax
    mix = mix or module.mix
    proj = proj or module.proj
    b, n, c = x.shape
    heads = module.num_heads
    q, k, v = qkv(x).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)  # 3 × (B·nW, nH, N, d)
    logits = scores(q * module.scale, k) + bias  # (B·nW, nH, N, N)
    if mask is not None:
        windows = mask.shape[0]
        logits = (logits.view(b // windows, windows, heads, n, n) + mask[None, :, None]).view(b, heads, n, n)
    attention = probabilities(logits)
    if record is not None:
        record(attention)
    return proj(mix(attention, v).transpose(1, 2).reshape(b, n, c))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative-position bias (W-MSA / SW-MSA)."""

    def __init__(self, dim: int, window_size: tuple[int, int], num_heads: int, qkv_bias: bool = True,
                 qk_scale: float | None = None):
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5  # official: a qk_scale of 0 also means the default
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size[0] - 1) * (2 * window_size[1] - 1), num_heads))  # (table, nH)
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.scores = AttentionProduct("bhnd,bhmd->bhnm")  # q·kᵀ
        self.softmax = nn.Softmax(dim=-1)
        self.mix = AttentionProduct("bhnm,bhmd->bhnd")  # attention·v
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self) -> torch.Tensor:
        """(nH, N, N): the bias table looked up for every pair of tokens of a window."""
        n = self.window_size[0] * self.window_size[1]
        return self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return window_attention(self, x, self.relative_position_bias(), mask)


# ----------------------------------------------------------------------------- blocks and stages
class SwinTransformerBlock(nn.Module):
    """x + W-MSA(norm1(x)) (windows shifted by ``shift_size`` when > 0), then x + MLP(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, shift_size: int = 0, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_scale: float | None = None):
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size {shift_size} must be in [0, window_size {window_size})")
        self.dim, self.num_heads, self.window_size, self.shift_size = dim, num_heads, window_size, shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, (window_size, window_size), num_heads, qkv_bias, qk_scale)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """``x`` (B, H, W, C); ``attn_mask`` the stage's shift mask (used when this block shifts)."""
        _, h, w, c = x.shape
        ws, shift = self.window_size, self.shift_size
        y = F.pad(self.norm1(x), (0, 0, 0, (-w) % ws, 0, (-h) % ws))  # zeros right and bottom: (B, Hp, Wp, C)
        hp, wp = y.shape[1:3]
        if shift:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
        windows = window_partition(y, ws).reshape(-1, ws * ws, c)  # (B·nW, N, C)
        windows = self.attn(windows, mask=attn_mask if shift else None)
        y = window_reverse(windows.view(-1, ws, ws, c), ws, hp, wp)
        if shift:
            y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
        x = x + y[:, :h, :w]
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2×2 neighbourhoods concatenated (odd sizes zero-padded), LayerNorm, linear 4C → 2C: (B, H, W, C) →
    (B, ⌈H/2⌉, ⌈W/2⌉, 2C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1:3]
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class BasicLayer(nn.Module):
    """One stage: ``depth`` blocks, odd ones shifted by ``window_size // 2``, then (optionally) patch merging."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int = 7, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_scale: float | None = None, downsample: bool = False):
        super().__init__()
        self.window_size, self.shift_size, self.depth = window_size, window_size // 2, depth
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2, mlp_ratio,
                                 qkv_bias, qk_scale)
            for i in range(depth))
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor, merge: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, W, C) → (the stage's output, the next stage's input: merged, or the output itself when there
        is no patch merging or ``merge`` is False, for a stage no later stage reads)."""
        mask = None
        if self.shift_size:
            mask = shift_attention_mask(x.shape[1], x.shape[2], self.window_size, self.shift_size,
                                        dtype=x.dtype, device=x.device)
        for block in self.blocks:
            x = block(x, mask)
        return x, (self.downsample(x) if self.downsample is not None and merge else x)


class PatchEmbed(nn.Module):
    """Image → patch tokens: zero-pad to a multiple of the patch, conv (kernel = stride = patch), optional
    LayerNorm; (B, 3, H, W) → (B, ⌈H/p⌉, ⌈W/p⌉, C)."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96, patch_norm: bool = True):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.in_chans, self.embed_dim = in_chans, embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = self.patch_size
        if h % ph or w % pw:
            x = F.pad(x, (0, (-w) % pw, 0, (-h) % ph))
        x = self.proj(x).permute(0, 2, 3, 1)  # (B, Wh, Ww, C)
        return self.norm(x) if self.norm is not None else x


# ----------------------------------------------------------------------------- the backbone
def _positive_ints(value: Any, key: str) -> list[int]:
    """``value``, a list of one positive integer per stage, or ValueError naming MODEL.SWIN.``key``."""
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise ValueError(f"MODEL.SWIN.{key}={value!r} must be a list of 4 positive integers (one per stage)")
    return [_positive_int(v, f"{key}[{i}]", "SWIN") for i, v in enumerate(value)]


class SwinTransformer(nn.Module):
    """Patch embedding, optional absolute position embedding, four stages; ``forward`` returns
    {``res2``…``res5``: (B, C, H, W)} for ``out_features`` (strides 4, 8, 16, 32)."""

    def __init__(self, *, pretrain_img_size: int = 224, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96,
                 depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: float | None = None, ape: bool = False,
                 patch_norm: bool = True, out_features: Sequence[str] = FEATURE_NAMES):
        super().__init__()
        for key, value in (("EMBED_DIM", embed_dim), ("WINDOW_SIZE", window_size),
                           ("PRETRAIN_IMG_SIZE", pretrain_img_size)):
            _positive_int(value, key, "SWIN")
        depths, num_heads = _positive_ints(depths, "DEPTHS"), _positive_ints(num_heads, "NUM_HEADS")
        if patch_size != 4:  # the official wrapper declares strides 4…32 whatever the patch
            raise ValueError(f"MODEL.SWIN.PATCH_SIZE={patch_size!r} is not supported; the official backbone "
                             "declares strides 4, 8, 16, 32, which hold for patch size 4 only")
        self.num_features = [embed_dim * 2 ** i for i in range(4)]
        for i, (dim, heads) in enumerate(zip(self.num_features, num_heads)):
            if dim % heads:
                raise ValueError(f"MODEL.SWIN.NUM_HEADS[{i}]={heads} does not divide stage {i}'s {dim} channels "
                                 f"(EMBED_DIM {embed_dim} × {2 ** i})")
        if not isinstance(mlp_ratio, (int, float)) or isinstance(mlp_ratio, bool) or int(embed_dim * mlp_ratio) < 1:
            raise ValueError(f"MODEL.SWIN.MLP_RATIO={mlp_ratio!r} must be a positive number")
        if qk_scale is not None and (not isinstance(qk_scale, (int, float)) or isinstance(qk_scale, bool)):
            raise ValueError(f"MODEL.SWIN.QK_SCALE={qk_scale!r} must be a number or null (head_dim ** -0.5)")
        for key, flag in (("QKV_BIAS", qkv_bias), ("APE", ape), ("PATCH_NORM", patch_norm)):
            if not isinstance(flag, bool):
                raise ValueError(f"MODEL.SWIN.{key}={flag!r} must be true or false")
        out_features = [out_features] if isinstance(out_features, str) else list(out_features)
        unknown = [f for f in out_features if f not in FEATURE_NAMES]
        if not out_features or unknown:
            raise ValueError(f"MODEL.SWIN.OUT_FEATURES={out_features!r}: name one or more of {list(FEATURE_NAMES)}")

        self.pretrain_img_size, self.embed_dim, self.window_size = pretrain_img_size, embed_dim, window_size
        self.ape = ape
        self._out_features = out_features
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm)
        if ape:
            grid = pretrain_img_size // patch_size
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, embed_dim, grid, grid))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.layers = nn.ModuleList(
            BasicLayer(self.num_features[i], depths[i], num_heads[i], window_size, mlp_ratio, qkv_bias, qk_scale,
                       downsample=i < 3)
            for i in range(4))
        for i, channels in enumerate(self.num_features):  # the official model has all four, whatever is returned
            self.add_module(f"norm{i}", nn.LayerNorm(channels))
        self._shapes = {name: ShapeSpec(self.num_features[i], 4 * 2 ** i) for i, name in enumerate(FEATURE_NAMES)}

    def output_shape(self) -> dict[str, ShapeSpec]:
        """{feature name: (channels, stride)} for the features ``forward`` returns."""
        return {name: self._shapes[name] for name in FEATURE_NAMES if name in self._out_features}

    @property
    def size_divisibility(self) -> int:
        return 32

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.dim() != 4:
            raise ValueError(f"SwinTransformer takes (B, C, H, W) input, got shape {tuple(x.shape)}")
        x = self.patch_embed(x)  # (B, Wh, Ww, C)
        if self.ape:
            pos = F.interpolate(self.absolute_pos_embed, size=x.shape[1:3], mode="bicubic")  # (1, C, Wh, Ww)
            x = x + pos.permute(0, 2, 3, 1)
        outputs = {}
        last = max(FEATURE_NAMES.index(name) for name in self._out_features)
        for i, (name, layer) in enumerate(zip(FEATURE_NAMES[: last + 1], self.layers)):
            out, x = layer(x, merge=i < last)  # the last stage run feeds no other: no patch merging
            if name in self._out_features:
                outputs[name] = getattr(self, f"norm{i}")(out).permute(0, 3, 1, 2).contiguous()
        return outputs


# detectron2 / MaskDINO defaults (maskdino/config.py) for keys a partial config leaves out.
_DEFAULTS = {
    "PRETRAIN_IMG_SIZE": 224, "PATCH_SIZE": 4, "EMBED_DIM": 96, "DEPTHS": [2, 2, 6, 2], "NUM_HEADS": [3, 6, 12, 24],
    "WINDOW_SIZE": 7, "MLP_RATIO": 4.0, "QKV_BIAS": True, "QK_SCALE": None, "APE": False, "PATCH_NORM": True,
    "OUT_FEATURES": list(FEATURE_NAMES),
}


def build_swin_backbone(cfg: Mapping[str, Any], in_channels: int = 3) -> SwinTransformer:
    """A Swin backbone from official config keys, ``cfg["MODEL"]["SWIN"][...]`` (missing keys take MaskDINO's
    defaults). DROP_RATE, ATTN_DROP_RATE, DROP_PATH_RATE (training only) and USE_CHECKPOINT (memory only)
    do not change the eval-mode numbers and are ignored."""
    try:
        s = {**_DEFAULTS, **dict(cfg["MODEL"]["SWIN"])}
    except (KeyError, TypeError) as e:
        raise ValueError("config has no MODEL.SWIN section (a nested dict of official keys is expected)") from e
    return SwinTransformer(pretrain_img_size=s["PRETRAIN_IMG_SIZE"], patch_size=s["PATCH_SIZE"], in_chans=in_channels,
                           embed_dim=s["EMBED_DIM"], depths=s["DEPTHS"], num_heads=s["NUM_HEADS"],
                           window_size=s["WINDOW_SIZE"], mlp_ratio=s["MLP_RATIO"], qkv_bias=s["QKV_BIAS"],
                           qk_scale=s["QK_SCALE"], ape=s["APE"], patch_norm=s["PATCH_NORM"],
                           out_features=s["OUT_FEATURES"])
