"""Hugging Face DAB-DETR's adapter (``transformers.DabDetrForObjectDetection``, transformers ResNet backbone).

Read from ``modeling_dab_detr.py``: DETR's layout (backbone's last stage, one encoder level, zero-initialised
decoder queries), with the backbone and its sine position embedding in one module (``DabDetrConvModel``,
output ``(features, positions)``), layers that return tuples, and attentions of two kinds: the encoder's
``DetrAttention`` (positions added to queries and keys) and the decoder's ``DabDetrAttention``, which receives
queries, keys and values already projected by linear layers of the decoder layer. Positional inputs are booked
(``positional``) where they enter, and so are constants for every composite, the gradient included: the
encoder's sine positions (scaled by ``query_scale`` of the content) where its attention adds them; the
decoder's anchor-box sine embeddings (scaled by the content: ``query_scale``, ``ref_anchor_head``), their
``ref_point_head`` projection and the spatial positions at the inputs of the ``*_pos_proj`` and
``*_pos_sine_proj`` linears.

Refused: the ``prelu`` activation (DAB-DETR's default). Its learned slope is a parameter the engine has no rule
for: booked as a free parameter, it takes the relevance that passes through the activation a second time.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from torch import nn

from ..lrp.engine import EngineError, Ledger
from ..lrp.rules import AttentionSteps
from .base import Records, hooks
from .detr import DetrAdapter
from .hf_common import attend, book_input, memory_and_layer_hooks

_POSITIONAL_INPUTS = ("self_attn_query_pos_proj", "self_attn_key_pos_proj", "cross_attn_query_pos_proj",
                      "cross_attn_key_pos_proj", "cross_attn_query_pos_sine_proj")


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _encoder_kernel(module: nn.Module, steps: AttentionSteps, track: Callable) -> Callable:
    def forward(hidden_states, attention_mask=None, object_queries=None, key_value_states=None, **_):
        pos = track("object_queries", object_queries, "positional")
        query_key = hidden_states if pos is None else hidden_states + pos
        out, attn = attend(steps, module.q_proj(query_key), module.k_proj(query_key), module.v_proj(hidden_states),
                           module.num_heads, module.scaling, attention_mask)
        return module.out_proj(out), attn

    return forward


def _projected_kernel(module: nn.Module, steps: AttentionSteps, track: Callable) -> Callable:
    def forward(hidden_states, attention_mask=None, key_states=None, value_states=None, **_):
        out, attn = attend(steps, hidden_states, key_states, value_states, module.attention_heads, module.scaling,
                           attention_mask)
        return module.output_proj(out), attn

    return forward


_KERNELS = {"DetrAttention": _encoder_kernel, "DabDetrAttention": _projected_kernel}


class DabDetrAdapter(DetrAdapter):
    """``transformers.DabDetrForObjectDetection`` (and its parts) with a transformers ResNet backbone."""

    name = "dab_detr"
    modeling = "transformers.models.dab_detr.modeling_dab_detr"
    model_classes = ("DabDetrForObjectDetection",)
    attention_classes = ()
    cross_attention_classes = ()
    attention_kernels = _KERNELS
    score = "sigmoid"

    def check(self, model: nn.Module) -> None:
        super().check(model)
        if any(isinstance(m, nn.PReLU) for m in model.modules()):
            raise EngineError("DAB-DETR with activation_function='prelu' is not supported (the engine has no rule "
                              "for a learned activation slope): build it with activation_function='relu'")

    @contextlib.contextmanager
    def record(self, model: nn.Module, ledger: Ledger) -> Iterator[Records]:
        """Hooks recording the stops and booking the decoder's positional inputs."""
        records = Records()
        rec = records.tensors
        inner = model.model

        def on_backbone(_m, _args, out):  # ([(feature map, mask)] per stage, positions); DAB-DETR reads the last
            rec["backbone"] = [f for f, _ in out[0]]
            records.spatial_shapes = [tuple(int(v) for v in rec["backbone"][-1].shape[-2:])]

        def on_encoder(_m, _args, kwargs):
            rec["encoder_input"] = kwargs["inputs_embeds"]

        handles = [inner.backbone.register_forward_hook(on_backbone),
                   inner.encoder.register_forward_pre_hook(on_encoder, with_kwargs=True),
                   *memory_and_layer_hooks(rec, inner.decoder, inner.encoder.layers, _first)]
        for name, module in inner.decoder.named_modules():
            if name.rsplit(".", 1)[-1] in _POSITIONAL_INPUTS and module is not None:
                handles.append(module.register_forward_pre_hook(book_input(ledger, f"model.decoder.{name}.input")))
        with hooks(handles):
            yield records
