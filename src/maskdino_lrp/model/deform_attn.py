"""Multi-scale deformable attention (Deformable DETR / MaskDINO), pure PyTorch.

The module keeps the official parameter names (``sampling_offsets``, ``attention_weights``,
``value_proj``, ``output_proj``) so official checkpoints load unchanged. Its forward is composed of
small public functions, so that other code (the LRP engine) can re-compose the same computation with
different backward rules:

1. :func:`sampling_offsets_and_logits` — the query's linear heads: offsets and pre-softmax logits;
   :func:`sampling_locations` — reference points + scaled offsets, normalised to [0, 1];
   :func:`attention_softmax` — softmax over levels × points per head;
   :func:`sampling_locations_and_weights` — all three at once.
2. :func:`sample_values` — bilinear sampling of the per-head values at the locations
   (linear in ``value``; our own gather-based sampler, equal to
   ``F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)``).
3. :func:`weighted_sum` — Σ over levels and points of attention weight × sampled value.

``ms_deform_attn_core`` = 2 + 3, the equivalent of the official ``ms_deform_attn_core_pytorch``, fused:
per level, the bilinear corner weights are multiplied into the attention weights and one gather of
all corners × points is reduced in one weighted sum (no (…, L, P, D) intermediate is summed in
several passes). With autograd off, or when the locations and weights are constants (the LRP value
path), it builds the same sum as one sparse (queries × tokens) matrix times the values — several
times faster; that matrix's product has a vmap rule, so batched backwards (``is_grads_batched``) work.
With differentiable locations or weights it is indexing / gather / elementwise only, no Python loop
over queries, so it also works under ``torch.func.vmap``.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MSDeformAttn",
    "sampling_offsets_and_logits",
    "sampling_locations",
    "attention_softmax",
    "sampling_locations_and_weights",
    "bilinear_corners",
    "sample_values",
    "weighted_sum",
    "ms_deform_attn_core",
]


def _shape_list(spatial_shapes: torch.Tensor | Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """(L, 2) tensor or sequence of (H, W) → list of Python int pairs (shapes are never on the relevance path)."""
    if isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def _shape_tensor(spatial_shapes: torch.Tensor | Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    if isinstance(spatial_shapes, torch.Tensor):
        return spatial_shapes.to(device)
    return torch.as_tensor([list(s) for s in spatial_shapes], dtype=torch.long, device=device)


# ----------------------------------------------------------------------------- step 1: where and how much
def sampling_offsets_and_logits(module: "MSDeformAttn", query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw offsets (N, Lq, H, L, P, 2) in pixels of each level, and attention logits (N, Lq, H, L*P)."""
    n, len_q, _ = query.shape
    h, l, p = module.n_heads, module.n_levels, module.n_points
    offsets = module.sampling_offsets(query).view(n, len_q, h, l, p, 2)
    logits = module.attention_weights(query).view(n, len_q, h, l * p)
    return offsets, logits


def attention_softmax(module: "MSDeformAttn", logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the L*P samples of each head → (N, Lq, H, L, P)."""
    n, len_q = logits.shape[:2]
    return F.softmax(logits, -1).view(n, len_q, module.n_heads, module.n_levels, module.n_points)


def sampling_locations(module: "MSDeformAttn", reference_points: torch.Tensor, offsets: torch.Tensor,
                       spatial_shapes: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
    """Sampling locations (N, Lq, H, L, P, 2) as (x, y) in [0, 1] of each level.

    ``reference_points`` is (N, Lq, L, 2) — points, offsets scaled by 1/(W, H) of each level — or
    (N, Lq, L, 4) — boxes (cx, cy, w, h), offsets scaled by box size · 0.5 / n_points.
    """
    last = reference_points.shape[-1]
    if last == 2:
        shapes = _shape_tensor(spatial_shapes, reference_points.device)
        normalizer = torch.stack([shapes[..., 1], shapes[..., 0]], -1)  # (L, 2) as (W, H)
        return reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    if last == 4:
        return reference_points[:, :, None, :, None, :2] \
            + offsets / module.n_points * reference_points[:, :, None, :, None, 2:] * 0.5
    raise ValueError(f"reference_points must end in 2 (points) or 4 (boxes), got shape {tuple(reference_points.shape)}")


def sampling_locations_and_weights(module: "MSDeformAttn", query: torch.Tensor, reference_points: torch.Tensor,
                                   spatial_shapes: torch.Tensor | Sequence[Sequence[int]]
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sampling_locations (N, Lq, H, L, P, 2) in [0, 1], attention_weights (N, Lq, H, L, P) after softmax)."""
    offsets, logits = sampling_offsets_and_logits(module, query)
    return sampling_locations(module, reference_points, offsets, spatial_shapes), attention_softmax(module, logits)


# ----------------------------------------------------------------------------- step 2: bilinear sampling
def bilinear_corners(locations: torch.Tensor, height: int, width: int
                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The four bilinear corners of normalised (x, y) locations on an H×W map.

    Returns ``[(flat_index, weight), ...]`` for the corners (top-left, top-right, bottom-left,
    bottom-right); ``flat_index = y·W + x`` is clamped into the map and ``weight`` (the bilinear
    weight) is zero for a corner outside the map — zero padding, as ``grid_sample`` with
    ``align_corners=False``: pixel centres sit at (i + 0.5) / size.
    """
    grid = 2 * locations - 1  # grid_sample's [-1, 1] convention, as the official code builds it
    x = (grid[..., 0] + 1) * (width / 2) - 0.5
    y = (grid[..., 1] + 1) * (height / 2) - 0.5
    x0 = torch.floor(x)
    y0 = torch.floor(y)
    dx = x - x0  # weight of the right column
    dy = y - y0  # weight of the bottom row
    wx = (1 - dx, dx)
    wy = (1 - dy, dy)
    x0i = x0.long()
    y0i = y0.long()
    corners = []
    for oy in (0, 1):
        for ox in (0, 1):
            xi = x0i + ox
            yi = y0i + oy
            inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
            weight = wy[oy] * wx[ox] * inside.to(locations.dtype)
            index = yi.clamp(0, height - 1) * width + xi.clamp(0, width - 1)
            corners.append((index, weight))
    return corners


def _sample_level(value_l: torch.Tensor, locations_l: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """value_l (N, H*W, M, D), locations_l (N, Lq, M, P, 2) → (N, Lq, M, P, D)."""
    n, hw, m, d = value_l.shape
    _, len_q, _, p, _ = locations_l.shape
    # one flat table of rows per (batch, head): row (b·M + h)·HW + pixel
    table = value_l.transpose(1, 2).reshape(n * m * hw, d)
    base = (torch.arange(n, device=value_l.device).view(n, 1, 1, 1) * m
            + torch.arange(m, device=value_l.device).view(1, 1, m, 1)) * hw  # (N, 1, M, 1)
    out = None
    for index, weight in bilinear_corners(locations_l, height, width):
        rows = (index + base).reshape(-1)
        gathered = table.index_select(0, rows).view(n, len_q, m, p, d)
        term = gathered * weight[..., None]
        out = term if out is None else out + term
    return out


def sample_values(value: torch.Tensor, spatial_shapes: torch.Tensor | Sequence[Sequence[int]],
                  level_start_index: torch.Tensor | Sequence[int] | None,
                  sampling_locations: torch.Tensor) -> torch.Tensor:
    """Bilinearly sampled values (N, Lq, H, L, P, D) from ``value`` (N, Len_in, H, D); linear in ``value``.

    ``sampling_locations`` (N, Lq, H, L, P, 2) holds (x, y) in [0, 1] per level; a sample outside a map
    gets zero from the outside corners, exactly as ``grid_sample(..., padding_mode="zeros",
    align_corners=False)``. ``level_start_index`` may be None (then it follows from the shapes).
    """
    shapes = _shape_list(spatial_shapes)
    starts = _level_starts(shapes, level_start_index)
    per_level = []
    for lvl, (h, w) in enumerate(shapes):
        value_l = value[:, starts[lvl]:starts[lvl] + h * w]
        per_level.append(_sample_level(value_l, sampling_locations[:, :, :, lvl], h, w))
    return torch.stack(per_level, dim=3)


# ----------------------------------------------------------------------------- step 3: weighted sum
def weighted_sum(sampled: torch.Tensor, attention_weights: torch.Tensor,
                 product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Σ_{levels, points} attention_weights · sampled → (N, Lq, H*D), heads concatenated (head-major).

    ``product(a, b)``, if given, replaces the elementwise product; it receives two tensors of the same
    shape (N, Lq, H, L, P, D) (the weights broadcast by ``expand``).
    """
    n, len_q, m, l, p, d = sampled.shape
    weights = attention_weights[..., None].expand(n, len_q, m, l, p, d)
    prod = sampled * weights if product is None else product(sampled, weights)
    return prod.sum(dim=(3, 4)).reshape(n, len_q, m * d)


class _SparseRows:
    """A sparse matrix with the same number ``k`` of entries in every row (row r: columns ``rows[r]``,
    values ``weights[r]``), as CSR; its transpose is built once, on first use (the backward)."""

    def __init__(self, rows: torch.Tensor, weights: torch.Tensor, num_columns: int):
        num_rows, k = rows.shape
        # 32-bit indices where they fit: half the index memory, and a faster sort for the transpose
        index = torch.int32 if max(num_rows * k, num_columns) < 2**31 else torch.int64
        rows = rows.to(index)
        crow = torch.arange(0, num_rows * k + 1, k, device=rows.device, dtype=index)
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            self.csr = torch.sparse_csr_tensor(crow, rows.reshape(-1), weights.reshape(-1),
                                               size=(num_rows, num_columns))
        self._rows, self._weights, self._transpose = rows, weights, None

    def matmul(self, dense: torch.Tensor) -> torch.Tensor:
        return _sparse_mm(self.csr, dense)

    def transpose_matmul(self, dense: torch.Tensor) -> torch.Tensor:
        if self._transpose is None:
            columns = self._rows.reshape(-1)
            order = torch.argsort(columns, stable=True)
            counts = torch.bincount(columns, minlength=self.csr.shape[1])
            crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(columns.dtype)
            row_of = torch.arange(self._rows.shape[0], device=columns.device,
                                  dtype=columns.dtype).repeat_interleave(self._rows.shape[1])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                self._transpose = torch.sparse_csr_tensor(crow, row_of[order], self._weights.reshape(-1)[order],
                                                          size=(self.csr.shape[1], self.csr.shape[0]))
        return _sparse_mm(self._transpose, dense)


def _sparse_mm(matrix: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """``matrix @ dense`` in the matrix's dtype (float32 for half-precision values: CPU sparse kernels have no
    bfloat16 / float16), returned in ``dense``'s dtype."""
    with torch.autocast(dense.device.type, enabled=False):  # autocast would cast the sparse matrix down
        if dense.dtype == matrix.dtype:
            return matrix @ dense
        return (matrix @ dense.to(matrix.dtype)).to(dense.dtype)


def _sparse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


class _SparseMatmul(torch.autograd.Function):
    """``matrix @ dense`` (or ``matrixᵀ @ dense`` with ``transpose``), differentiable in ``dense`` only
    (the matrix is constant): the gradient is the other product. A vmap rule folds the batch into the
    columns, so ``is_grads_batched`` backwards work."""

    @staticmethod
    def forward(matrix: _SparseRows, dense: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        return matrix.transpose_matmul(dense) if transpose else matrix.matmul(dense)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.matrix, ctx.transpose = inputs[0], inputs[2]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, _SparseMatmul.apply(ctx.matrix, grad, not ctx.transpose), None

    @staticmethod
    def vmap(info, in_dims, matrix, dense, transpose):
        d = dense.movedim(in_dims[1], -1)  # (rows, columns, batch)
        r, c, b = d.shape
        return _SparseMatmul.apply(matrix, d.reshape(r, c * b), transpose).view(-1, c, b), 2


def _level_starts(shapes: list[tuple[int, int]], level_start_index: torch.Tensor | Sequence[int] | None) -> list[int]:
    if level_start_index is None:
        starts = [0]
        for h, w in shapes[:-1]:
            starts.append(starts[-1] + h * w)
        return starts
    return [int(s) for s in (level_start_index.tolist() if isinstance(level_start_index, torch.Tensor)
                             else level_start_index)]


def _weighted_corners(value: torch.Tensor, shapes: list[tuple[int, int]], starts: list[int],
                      sampling_locations: torch.Tensor, attention_weights: torch.Tensor
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per level: rows (N, Lq, H, P·4) into the (N·H·Len_in, D) value table and their weights
    (attention weight × bilinear weight; zero for corners outside the map)."""
    n, len_in, m, _ = value.shape
    base = (torch.arange(n, device=value.device).view(n, 1, 1, 1) * m
            + torch.arange(m, device=value.device).view(1, 1, m, 1)) * len_in  # (N, 1, H, 1)
    out = []
    for lvl, (h, w) in enumerate(shapes):
        corners = bilinear_corners(sampling_locations[:, :, :, lvl], h, w)  # each (N, Lq, H, P)
        rows = torch.stack([index for index, _ in corners], -1).flatten(-2) + (base + starts[lvl])
        weights = (torch.stack([weight for _, weight in corners], -1)
                   * attention_weights[:, :, :, lvl, :, None]).flatten(-2)
        out.append((rows, weights))
    return out


def _constant_corners(value: torch.Tensor, shapes: list[tuple[int, int]], starts: list[int],
                      sampling_locations: torch.Tensor, attention_weights: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_weighted_corners` for constant locations and weights, as one (N·Lq·H, L·P·4) table of rows
    and one of weights (level, point, corner within a row): bit-identical values, built without autograd.

    Per level, the arithmetic of :func:`bilinear_corners` on contiguous tensors with the level's size
    as a Python number, each axis's two neighbours clamped and tested once, every corner written
    straight into its place — no concatenation along a short last dimension (slow on CPU).
    """
    n, len_in, m, _ = value.shape
    _, len_q, _, levels, points, _ = sampling_locations.shape
    device = sampling_locations.device
    index = torch.int32 if n * m * len_in < 2**31 else torch.int64
    with torch.no_grad():
        loc = sampling_locations.permute(5, 3, 0, 1, 2, 4).contiguous()  # (2, L, N, Lq, H, P)
        att = attention_weights.permute(3, 0, 1, 2, 4).contiguous()  # (L, N, Lq, H, P)
        rows = torch.empty((n, len_q, m, levels, points, 4), dtype=index, device=device)
        weights = torch.empty((n, len_q, m, levels, points, 4), dtype=loc.dtype, device=device)
        base = ((torch.arange(n, device=device).view(n, 1, 1, 1) * m
                 + torch.arange(m, device=device).view(1, 1, m, 1)) * len_in).to(index)  # (N, 1, H, 1)
        for lvl, (h, w) in enumerate(shapes):
            x = (2 * loc[0, lvl] - 1 + 1) * (w / 2) - 0.5
            y = (2 * loc[1, lvl] - 1 + 1) * (h / 2) - 0.5
            x0 = torch.floor(x)
            y0 = torch.floor(y)
            dx = x - x0
            dy = y - y0
            x0i = x0.to(index)
            y0i = y0.to(index)
            xs = (x0i, x0i + 1)
            ys = (y0i, y0i + 1)
            wx = [(1 - dx) * ((xs[0] >= 0) & (xs[0] < w)), dx * ((xs[1] >= 0) & (xs[1] < w))]
            wy = [(1 - dy) * ((ys[0] >= 0) & (ys[0] < h)), dy * ((ys[1] >= 0) & (ys[1] < h))]
            cols = [xi.clamp(0, w - 1) for xi in xs]
            offset = base + starts[lvl]
            lines = [torch.add(yi.clamp(0, h - 1) * w, offset) for yi in ys]
            corner = 0
            for oy in (0, 1):
                for ox in (0, 1):  # bilinear_corners' order: top-left, top-right, bottom-left, bottom-right
                    torch.add(lines[oy], cols[ox], out=rows[:, :, :, lvl, :, corner])
                    torch.mul(wy[oy] * wx[ox], att[lvl], out=weights[:, :, :, lvl, :, corner])
                    corner += 1
    return rows.view(n * len_q * m, -1), weights.view(n * len_q * m, -1)


def ms_deform_attn_core(value: torch.Tensor, spatial_shapes: torch.Tensor | Sequence[Sequence[int]],
                        level_start_index: torch.Tensor | Sequence[int] | None, sampling_locations: torch.Tensor,
                        attention_weights: torch.Tensor) -> torch.Tensor:
    """Deformable attention core: value (N, Len_in, H, D) → (N, Lq, H*D) (before ``output_proj``).

    Equal to ``weighted_sum(sample_values(...), attention_weights)`` up to float rounding.
    """
    shapes = _shape_list(spatial_shapes)
    starts = _level_starts(shapes, level_start_index)
    n, len_in, m, d = value.shape
    len_q = sampling_locations.shape[1]
    table = value.transpose(1, 2).reshape(n * m * len_in, d)
    constant_weights = not (sampling_locations.requires_grad or attention_weights.requires_grad)
    if not torch.is_grad_enabled() or constant_weights:
        # inference, or the LRP value path (locations and weights constant): one sparse
        # (N·Lq·H) × (N·H·Len_in) matrix; its backward multiplies by the transpose
        rows, weights = _constant_corners(value, shapes, starts, sampling_locations, attention_weights)
        matrix = _SparseRows(rows, weights.to(_sparse_dtype(table.dtype)), n * m * len_in)
        if not torch.is_grad_enabled() or not table.requires_grad:
            return matrix.matmul(table).view(n, len_q, m * d)
        return _SparseMatmul.apply(matrix, table, False).view(n, len_q, m * d)
    out = None
    for rows, weights in _weighted_corners(value, shapes, starts, sampling_locations, attention_weights):
        gathered = table.index_select(0, rows.reshape(-1)).view(n * len_q * m, rows.shape[-1], d)
        # a multiply-and-sum, not bmm: bmm's backward for these tiny matrices is 2x slower on CPU, and the
        # LRP runs one backward per explained query
        term = (gathered * weights.reshape(n * len_q * m, -1, 1).to(table.dtype)).sum(1)
        out = term if out is None else out + term
    return out.view(n, len_q, m * d)


# ----------------------------------------------------------------------------- the module
class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention, batch-first, with the official parameter names."""

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        per_head = d_model // n_heads
        if per_head & (per_head - 1):
            warnings.warn("MSDeformAttn: a per-head dimension that is a power of 2 is usual (CUDA kernel efficiency)")
        self.im2col_step = 128  # kept for parity with the official attribute set; unused here
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Official initialisation: offsets start on a ring of directions, one per head, scaled by point index."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        scale = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        grid = directions.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1) * scale
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def project_values(self, input_flatten: torch.Tensor, input_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """value_proj, zero at padding, split into heads → (N, Len_in, H, D)."""
        n, len_in, _ = input_flatten.shape
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        return value.view(n, len_in, self.n_heads, self.d_model // self.n_heads)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, input_flatten: torch.Tensor,
                input_spatial_shapes: torch.Tensor, input_level_start_index: torch.Tensor,
                input_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """query (N, Lq, C), reference_points (N, Lq, L, 2|4), input_flatten (N, ΣHW, C) → (N, Lq, C)."""
        shapes = _shape_list(input_spatial_shapes)
        if sum(h * w for h, w in shapes) != input_flatten.shape[1]:
            raise ValueError(f"spatial shapes {shapes} do not cover {input_flatten.shape[1]} input tokens")
        value = self.project_values(input_flatten, input_padding_mask)
        locations, weights = sampling_locations_and_weights(self, query, reference_points, input_spatial_shapes)
        out = ms_deform_attn_core(value, input_spatial_shapes, input_level_start_index, locations, weights)
        return self.output_proj(out)
