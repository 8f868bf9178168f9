"""Hugging Face YOLOS's adapter (``transformers.YolosForObjectDetection``: a ViT encoder, no CNN, no decoder).

Read from ``modeling_yolos.py``: the image is cut into patches by one convolution (``patch_embeddings.projection``,
the layer that sees the pixels); a [CLS] token, the patch tokens and the detection tokens form one sequence, to
which learned position embeddings are added (interpolated to the image size, a linear map of the parameter: the
engine books the parameter, ``embeddings``), and again between layers (``mid_position_embeddings``). The
detection tokens' final states are the queries; the last class is "no object". Token stops hold the whole
sequence; the patch tokens are its one level, from index 1.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from ..lrp.engine import Ledger
from ..lrp.rules import AttentionSteps
from .base import Adapter, Cut, Records, StopTensor, hooks
from .hf_common import HFDetectionAdapter, append_output, attend


def _attention_kernel(module: nn.Module, steps: AttentionSteps, track: Callable) -> Callable:
    def forward(hidden_states, *_, **__):  # the output projection is the next module (YolosSelfOutput.dense)
        return attend(steps, module.query(hidden_states), module.key(hidden_states), module.value(hidden_states),
                      module.num_attention_heads, module.scaling)

    return forward


class YolosAdapter(HFDetectionAdapter):
    """``transformers.YolosForObjectDetection`` (and its parts)."""

    name = "yolos"
    modeling = "transformers.models.yolos.modeling_yolos"
    model_classes = ("YolosForObjectDetection",)
    attention_classes = ("YolosSelfAttention",)
    score = "softmax"
    stops = ("pixels", "patch_embeddings", "encoder_input", "encoder_layers")
    default_stops = ("pixels", "encoder_input")
    encoder_stops = stops
    groups = {"backbone": ()}  # no CNN body: the composites' backbone rules apply nowhere

    def kernel(self, module, kind, steps, track):
        if kind == "mha" and self._ours(module, self.attention_classes):
            return _attention_kernel(module, steps, track)
        return None

    def pixel_layer(self, model):
        return Adapter.pixel_layer(self, model)

    def forward(self, model, x, records):
        out, boxes = self.call(model, x, records)
        detection = out.last_hidden_state[:, -model.config.num_detection_tokens:]
        return {"pred_logits": out.logits, "pred_boxes": out.pred_boxes, "decoder_embedding": detection, **boxes}

    @contextlib.contextmanager
    def record(self, model: nn.Module, ledger: Ledger) -> Iterator[Records]:
        """Hooks recording the patch embedding map, the embedded sequence and each layer's output."""
        records = Records()
        rec = records.tensors
        rec.update(encoder_layers=[])
        vit = model.vit

        def on_patches(_m, _args, out):  # (B, C, h, w): the patch tokens as a map
            rec["patch_embeddings"] = out
            records.spatial_shapes = [tuple(int(v) for v in out.shape[-2:])]

        handles = [vit.embeddings.patch_embeddings.projection.register_forward_hook(on_patches),
                   vit.embeddings.register_forward_hook(lambda _m, _a, out: rec.__setitem__("encoder_input", out))]
        handles += [layer.register_forward_hook(append_output(rec["encoder_layers"])) for layer in vit.encoder.layer]
        with hooks(handles):
            yield records

    def levels(self, records, x):
        from ..lrp.explanation import Level

        (h, w), = records.spatial_shapes
        return [Level(f"stride{int(round(x.shape[-2] / h))}", int(round(x.shape[-2] / h)), h, w, 1)]

    def stop_tensors(self, records: Records, stop: str, levels: Sequence) -> list[StopTensor]:
        rec = records.tensors
        if stop == "patch_embeddings":
            return [StopTensor(stop, stop, rec[stop], "map")]
        if stop == "encoder_input":
            return [StopTensor(stop, stop, rec[stop], "tokens")]
        if stop == "encoder_layers":
            return [StopTensor(stop, f"encoder_layer{i}", t, "tokens") for i, t in enumerate(rec[stop])]
        return []

    def ledger_scope(self, stops: Sequence[str]):
        if "pixels" in stops:
            return lambda entry: True
        if "patch_embeddings" in stops:
            return lambda entry: not entry.name.startswith("vit.embeddings.patch_embeddings.")
        return lambda entry: not entry.name.startswith("vit.embeddings.")

    def cuts(self, records: Records) -> list[Cut]:
        # every token descends from the patch map or from a parameter (cls, detection tokens, positions)
        return [Cut("patch_embeddings", ("patch_embeddings",), ("patch_embeddings",),
                    lambda entry: not entry.name.startswith("vit.embeddings.patch_embeddings.")),
                Cut("encoder_input", ("encoder_input",), ("encoder_input",),
                    lambda entry: not entry.name.startswith("vit.embeddings."))]

    def encoder_output(self, records: Records) -> torch.Tensor:
        return records.tensors["encoder_layers"][-1]
