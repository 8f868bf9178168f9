"""Hugging Face multi-scale deformable attention computed under the engine's deformable rule.

transformers' deformable attention modules — ``DeformableDetrMultiscaleDeformableAttention``,
``RTDetrMultiscaleDeformableAttention``, ``RTDetrV2MultiscaleDeformableAttention`` and Mask2Former's
``Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention`` — keep Deformable DETR's attribute names
(``sampling_offsets``, ``attention_weights``, ``value_proj``, ``output_proj``, ``n_heads``, ``n_levels``,
``n_points``, ``d_model``), so the engine already classes them as ``deform_attn`` modules. They compute with
their own sampling code, which the engine cannot put a rule on; :func:`deformable_kernel` computes the same
values through :mod:`maskdino_lrp.model.deform_attn`'s steps (the sampling maths MaskDINO's ``MSDeformAttn``
uses), under the rule's :class:`~maskdino_lrp.lrp.rules.DeformSteps`: sampling locations carry no relevance
and the attention weights are constants unless the rule says otherwise (the ``gradient`` rule keeps the offsets
and weights connected to the query: its backward is autograd's for the models' constant reference points).

How an adapter uses it (its ``kernel`` hook)::

    from .hf_deformable import deformable_kernel, is_deformable

    def kernel(self, module, kind, steps, track):
        if kind == "deform_attn" and is_deformable(module):
            return deformable_kernel(module, steps, track)
        ...

Options for modules that differ from Deformable DETR's:

- ``mask_marks="padding"`` when a True in the module's ``attention_mask`` marks a padded token (Mask2Former's
  pixel decoder); the default ``"valid"`` is Deformable DETR's and RT-DETR's (True marks a real token);
- ``locations=fn(module, reference_points, offsets, spatial_shapes)`` when the samples are placed differently
  (RT-DETR v2 scales box offsets by ``n_points_scale`` and ``offset_scale``); ``offsets`` arrive as
  (N, Lq, H, L, P, 2) and ``fn`` returns (x, y) locations in [0, 1] of that shape. The default is
  :func:`maskdino_lrp.model.deform_attn.sampling_locations` (2-d points or 4-d boxes, as Deformable DETR).

The query's position embeddings (added to the query before the offset and weight heads) are booked as a
``positional`` constant of the module, so whatever relevance reaches them is accounted for in the ledger.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..lrp.rules import DeformSteps
from ..model import deform_attn as da

__all__ = ["DEFORMABLE_ATTRIBUTES", "is_deformable", "deformable_kernel", "deform_under_steps"]

DEFORMABLE_ATTRIBUTES = ("sampling_offsets", "attention_weights", "value_proj", "output_proj",
                         "n_heads", "n_levels", "n_points", "d_model")
_MASK_MARKS = ("valid", "padding")


def is_deformable(module: nn.Module) -> bool:
    """Whether ``module`` has the attributes :func:`deformable_kernel` computes with (and is not our own
    ``MSDeformAttn``, whose forward takes other arguments)."""
    return all(hasattr(module, a) for a in DEFORMABLE_ATTRIBUTES) and not isinstance(module, da.MSDeformAttn)


def deformable_kernel(module: nn.Module, steps: DeformSteps, track: Callable[..., torch.Tensor | None],
                      mask_marks: str = "valid", locations: Callable | None = None) -> Callable:
    """A forward computing a transformers multi-scale deformable attention under the rule's ``steps``.

    Same arguments and outputs as the module's own forward (keywords, as transformers calls it):
    ``(output (N, Lq, C), attention weights (N, Lq, H, L, P))``. ``track`` is the engine's booking function
    the ``kernel`` hook receives. See the module docstring for ``mask_marks`` and ``locations``.
    """
    if mask_marks not in _MASK_MARKS:
        raise ValueError(f"mask_marks must be one of {_MASK_MARKS}, got {mask_marks!r}")
    place = locations or da.sampling_locations

    def forward(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, encoder_attention_mask: torch.Tensor | None = None,
                position_embeddings: torch.Tensor | None = None, reference_points: torch.Tensor | None = None,
                spatial_shapes: torch.Tensor | None = None, spatial_shapes_list=None, level_start_index=None,
                **_: object) -> tuple[torch.Tensor, torch.Tensor]:
        shapes = spatial_shapes_list if spatial_shapes_list is not None else spatial_shapes
        position_embeddings = track("position_embeddings", position_embeddings, "positional")
        query = hidden_states if position_embeddings is None else hidden_states + position_embeddings
        source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        n, len_in, _ = source.shape
        value = module.value_proj(source)
        if attention_mask is not None:
            padded = ~attention_mask.bool() if mask_marks == "valid" else attention_mask.bool()
            value = value.masked_fill(padded[..., None], 0.0)
        value = value.view(n, len_in, module.n_heads, module.d_model // module.n_heads)
        out, weights = deform_under_steps(module, steps, query, reference_points, value, shapes, level_start_index,
                                          place)
        return module.output_proj(out), weights.detach()

    return forward


def deform_under_steps(module: nn.Module, steps: DeformSteps, query: torch.Tensor, reference_points: torch.Tensor,
                       value: torch.Tensor, spatial_shapes, level_start_index,
                       locations: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The deformable attention's output before ``output_proj`` (N, Lq, C) and its attention weights, under the
    rule's ``steps``, from the query and the projected per-head values (N, Len_in, H, D).

    The one composition of :mod:`maskdino_lrp.model.deform_attn`'s steps under a rule, shared by
    :func:`deformable_kernel` and MaskDINO's ``MSDeformAttn`` kernel.
    """
    place = locations or da.sampling_locations
    # the offset and weight heads read the query; under the value rules they see a constant copy
    offsets, logits = da.sampling_offsets_and_logits(module, query if steps.query_relevance else query.detach())
    # the reference points are positional (the models detach them; a connected box chain serves box targets)
    where = place(module, reference_points.detach(), offsets, spatial_shapes)
    if not steps.plain:  # under the LRP rules the offsets are positional too: no relevance through the locations
        where = where.detach()
    weights = da.attention_softmax(module, logits)
    if steps.constant_weights:
        weights = weights.detach()
    if steps.product is not None:
        sampled = da.sample_values(value, spatial_shapes, level_start_index, where)
        return da.weighted_sum(sampled, weights, product=steps.product), weights
    # linear in the value once the weights are fixed: the plain core propagates it
    return da.ms_deform_attn_core(value, spatial_shapes, level_start_index, where, weights), weights
