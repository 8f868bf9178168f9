"""Hugging Face Conditional DETR's adapter (``transformers.ConditionalDetrForObjectDetection``, transformers
ResNet backbone).

The same layout as DETR (backbone's last stage, one encoder level, zero-initialised decoder queries; the
stops, cuts and hooks of :class:`~.detr.DetrAdapter`), with sigmoid scores and its own decoder attentions
(read from ``modeling_conditional_detr.py``): queries and keys are content projections plus position
projections (``q_content_proj`` + ``q_pos_proj`` …); the cross-attention concatenates, per head, a positional
half to queries (``q_pos_sine_proj`` of the conditional spatial query) and keys (``k_pos_proj`` of the sine
embedding). The position embeddings each attention reads are booked where they enter (``positional``), and
so are constants for every composite, the gradient included; that covers the conditional spatial query, which
from the second layer on is scaled by ``query_scale`` of the content.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..lrp.rules import AttentionSteps
from .detr import DetrAdapter
from .hf_common import attend


def _decoder_self_kernel(module: nn.Module, steps: AttentionSteps, track: Callable) -> Callable:
    def forward(hidden_states, query_position_embeddings=None, attention_mask=None, **_):
        pos = track("query_position_embeddings", query_position_embeddings, "positional")
        q = module.q_content_proj(hidden_states) + module.q_pos_proj(pos)
        k = module.k_content_proj(hidden_states) + module.k_pos_proj(pos)
        heads = module.hidden_size // module.head_dim
        out, attn = attend(steps, q, k, module.v_proj(hidden_states), heads, module.scaling, attention_mask)
        return module.o_proj(out), attn

    return forward


def _decoder_cross_kernel(module: nn.Module, steps: AttentionSteps, track: Callable) -> Callable:
    def forward(hidden_states, encoder_hidden_states, query_sine_embed, encoder_position_embeddings,
                query_position_embeddings=None, attention_mask=None, **_):
        sine = track("query_sine_embed", query_sine_embed, "positional")
        key_pos = module.k_pos_proj(track("encoder_position_embeddings", encoder_position_embeddings, "positional"))
        q = module.q_content_proj(hidden_states)
        k = module.k_content_proj(encoder_hidden_states)
        if query_position_embeddings is not None:  # the first layer adds the positions as well
            q = q + module.q_pos_proj(track("query_position_embeddings", query_position_embeddings, "positional"))
            k = k + key_pos
        h, d = module.num_attention_heads, module.head_dim
        b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
        q = torch.cat([q.view(b, lq, h, d), module.q_pos_sine_proj(sine).view(b, lq, h, d)], -1).view(b, lq, -1)
        k = torch.cat([k.view(b, lk, h, d), key_pos.view(b, lk, h, d)], -1).view(b, lk, -1)
        out, attn = attend(steps, q, k, module.v_proj(encoder_hidden_states), h, module.scaling, attention_mask)
        return module.o_proj(out), attn

    return forward


_DECODER_KERNELS = {"ConditionalDetrDecoderSelfAttention": _decoder_self_kernel,
                    "ConditionalDetrDecoderCrossAttention": _decoder_cross_kernel}


class ConditionalDetrAdapter(DetrAdapter):
    """``transformers.ConditionalDetrForObjectDetection`` (and its parts) with a transformers ResNet backbone."""

    name = "conditional_detr"
    modeling = "transformers.models.conditional_detr.modeling_conditional_detr"
    model_classes = ("ConditionalDetrForObjectDetection",)
    attention_classes = ("ConditionalDetrSelfAttention",)
    cross_attention_classes = ()
    attention_kernels = _DECODER_KERNELS
    score = "sigmoid"
