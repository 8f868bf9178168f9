"""Hugging Face Deformable DETR's adapter (``transformers.DeformableDetrForObjectDetection``: single-stage,
iterative box refinement, two-stage; a transformers ResNet backbone).

Structure read from transformers' ``modeling_deformable_detr.py``: several backbone stages, each projected
(``input_proj``: conv + group norm) to one encoder level; the encoder and the decoder's cross-attention are
multi-scale deformable attention (:mod:`.hf_deformable`, under the deformable rule), the decoder's
self-attention is DETR-style (``DeformableDetrSelfAttention``); position embeddings (sine + level embedding,
the query position embeddings) are booked where each attention adds them. The query content is a learned
embedding (single-stage) or, two-stage, a projection of the sine embedding of detached proposal boxes: that
embedding is booked at ``pos_trans``. Reference points never carry relevance (the kernels detach the sampling
locations; transformers detaches the refined boxes). Scores are sigmoids.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

from torch import nn

from ..lrp.engine import Ledger
from .base import Cut, Records, StopTensor, hooks
from .hf_common import HFDetectionAdapter, append_output, book_input

_UPSTREAM_OF_ENCODER = ("model.backbone.", "model.input_proj.")
_UPSTREAM_OF_MEMORY = _UPSTREAM_OF_ENCODER + ("model.encoder.", "model.level_embed")


def _stage_prefixes(model: nn.Module, feature: int) -> tuple[str, ...] | None:
    """Name prefixes of the transformers ResNet modules up to backbone output ``feature`` (None: not a ResNet)."""
    body = getattr(model.model.backbone, "model", None)
    stages = getattr(getattr(body, "encoder", None), "stages", None)
    if stages is None or not hasattr(body, "out_features") or not hasattr(body, "stage_names"):
        return None
    last = body.stage_names.index(body.out_features[feature])  # "stem" is 0, "stage1" is encoder.stages[0]
    return ("model.backbone.model.embedder.",) + tuple(f"model.backbone.model.encoder.stages.{i}." for i in range(last))


class DeformableDetrAdapter(HFDetectionAdapter):
    """``transformers.DeformableDetrForObjectDetection`` (and its parts) with a transformers ResNet backbone."""

    name = "deformable_detr"
    modeling = "transformers.models.deformable_detr.modeling_deformable_detr"
    model_classes = ("DeformableDetrForObjectDetection",)
    attention_classes = ("DeformableDetrSelfAttention",)
    stops = ("pixels", "backbone", "encoder_input", "encoder_layers", "memory", "decoder_layers")
    default_stops = ("pixels", "encoder_input", "memory")
    encoder_stops = ("pixels", "backbone", "encoder_input", "encoder_layers")

    @contextlib.contextmanager
    def record(self, model: nn.Module, ledger: Ledger) -> Iterator[Records]:
        """Hooks recording the stops; two-stage, the proposals' sine embedding is booked as positional."""
        records = Records()
        rec = records.tensors
        rec.update(encoder_layers=[], decoder_layers=[], stage_prefixes=_stage_prefixes(model, 0))
        inner = model.model

        def on_backbone(_m, _args, out):  # [(feature map, mask)] per backbone output
            rec["backbone"] = [f for f, _ in out]

        def on_encoder(_m, _args, kwargs):
            rec["encoder_input"] = kwargs["inputs_embeds"]
            records.spatial_shapes = [tuple(int(v) for v in s) for s in kwargs["spatial_shapes_list"]]

        def on_decoder(_m, _args, kwargs):
            rec["memory"] = kwargs["encoder_hidden_states"]

        handles = [inner.backbone.register_forward_hook(on_backbone),
                   inner.encoder.register_forward_pre_hook(on_encoder, with_kwargs=True),
                   inner.decoder.register_forward_pre_hook(on_decoder, with_kwargs=True)]
        handles += [layer.register_forward_hook(append_output(rec["encoder_layers"])) for layer in inner.encoder.layers]
        handles += [layer.register_forward_hook(append_output(rec["decoder_layers"])) for layer in inner.decoder.layers]
        if getattr(inner, "pos_trans", None) is not None:
            handles.append(inner.pos_trans.register_forward_pre_hook(book_input(ledger, "model.pos_trans.input")))
        with hooks(handles):
            yield records

    def stop_tensors(self, records: Records, stop: str, levels: Sequence) -> list[StopTensor]:
        rec = records.tensors
        if stop == "backbone":
            return [StopTensor(stop, f"backbone.stage{i}", t, "map") for i, t in enumerate(rec["backbone"])]
        if stop in ("encoder_input", "memory"):
            return [StopTensor(stop, stop, rec[stop], "tokens")]
        if stop in ("encoder_layers", "decoder_layers"):
            return [StopTensor(stop, f"{stop[:-1]}{i}", t, "tokens") for i, t in enumerate(rec[stop])]
        return []

    def ledger_scope(self, stops: Sequence[str]):
        if "pixels" in stops:
            return lambda entry: True
        if "backbone" in stops:
            return lambda entry: not entry.name.startswith("model.backbone.")
        return lambda entry: not entry.name.startswith(_UPSTREAM_OF_ENCODER)

    def cuts(self, records: Records) -> list[Cut]:
        cuts = []
        upstream = records.tensors.get("stage_prefixes")
        if upstream is not None:  # every level reads the first output or a later stage, which reads it
            cuts.append(Cut("backbone", ("backbone",), ("backbone.stage0",),
                            lambda entry: not entry.name.startswith(upstream)))
        return cuts + [
            Cut("encoder_input", ("encoder_input",), ("encoder_input",),
                lambda entry: not entry.name.startswith(_UPSTREAM_OF_ENCODER)),
            Cut("memory", ("memory",), ("memory",), lambda entry: not entry.name.startswith(_UPSTREAM_OF_MEMORY)),
        ]
