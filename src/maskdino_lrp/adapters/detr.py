"""Hugging Face DETR's adapter (``transformers.DetrForObjectDetection`` with a transformers ResNet backbone).

Structure read from transformers' ``modeling_detr.py``: the backbone's conv layers apply ``convolution`` →
``normalization`` (a frozen batch norm, folded) → activation; ``DetrSelfAttention`` and ``DetrCrossAttention``
project with ``q_proj``/``k_proj``/``v_proj``/``o_proj`` and add the position embeddings to queries and keys
only (their kernels book them); the decoder's queries start at zero; the last class is "no object".
Everything else (pixels, outputs, kernels) is :class:`~.hf_common.HFDetectionAdapter`'s.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from ..lrp.engine import Ledger
from .base import Cut, Records, hooks
from .hf_common import IMAGENET_MEAN, IMAGENET_STD, HFDetectionAdapter, memory_and_layer_hooks, read_preprocessor

__all__ = ["DetrAdapter", "IMAGENET_MEAN", "IMAGENET_STD", "read_preprocessor"]

class DetrAdapter(HFDetectionAdapter):
    """``transformers.DetrForObjectDetection`` (and its parts) with a transformers ResNet backbone."""

    name = "detr"
    modeling = "transformers.models.detr.modeling_detr"
    model_classes = ("DetrForObjectDetection",)
    attention_classes = ("DetrSelfAttention",)
    cross_attention_classes = ("DetrCrossAttention",)
    score = "softmax"
    stops = ("pixels", "backbone", "encoder_input", "encoder_layers", "memory", "decoder_layers")
    default_stops = ("pixels", "encoder_input", "memory")
    encoder_stops = ("pixels", "backbone", "encoder_input", "encoder_layers")
    upstream_of_encoder = ("model.backbone.", "model.input_projection.")
    upstream_of_memory = upstream_of_encoder + ("model.encoder.",)

    @contextlib.contextmanager
    def record(self, model: nn.Module, ledger: Ledger) -> Iterator[Records]:
        """Hooks recording the stops (the attention kernels book the position embeddings they use)."""
        records = Records()
        rec = records.tensors
        detr = model.model

        def on_backbone(_m, _args, out):  # [(feature map, mask)] per backbone stage; DETR reads the last
            rec["backbone"] = [f for f, _ in out]
            records.spatial_shapes = [tuple(int(v) for v in out[-1][0].shape[-2:])]

        def on_encoder(_m, args, kwargs):
            rec["encoder_input"] = kwargs["inputs_embeds"] if "inputs_embeds" in kwargs else args[0]

        handles = [detr.backbone.register_forward_hook(on_backbone),
                   detr.encoder.register_forward_pre_hook(on_encoder, with_kwargs=True),
                   *memory_and_layer_hooks(rec, detr.decoder, detr.encoder.layers)]
        with hooks(handles):
            yield records

    def cuts(self, records: Records) -> list[Cut]:
        # DETR reads only the last backbone feature; the encoder reads only its input tokens (and constant
        # positions); the decoder only the memory (its queries start at zero)
        last = f"backbone.stage{len(records.tensors.get('backbone', [])) - 1}"
        return [Cut("backbone", ("backbone",), (last,), lambda entry: not entry.name.startswith("model.backbone.")),
                *self.token_cuts()]
