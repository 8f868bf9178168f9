"""Hugging Face DETR's adapter (``transformers.DetrForObjectDetection`` with a transformers ResNet backbone).

Structure read from transformers' ``modeling_detr.py``: the backbone's ``ResNetConvLayer``/``ResNetShortCut``
modules apply ``convolution`` → ``normalization`` (a frozen batch norm, folded) → activation; the encoder
and decoder attentions (``DetrSelfAttention``, ``DetrCrossAttention``) project with ``q_proj``/``k_proj``/
``v_proj``/``o_proj`` and add the position embeddings to queries and keys only; the sine position
embedding of the feature map and the learned query position embeddings are constants the ledger books;
the decoder's queries start at zero. transformers is imported only when a DETR is explained.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..lrp.engine import EngineError, Ledger, LedgerEntry
from ..lrp.rules import AttentionSteps
from .base import Adapter, Cut, Records, StopTensor, hooks

# DETR's image processor normalises with the ImageNet statistics
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_DETR_MODULE = "transformers.models.detr.modeling_detr"
# ledger entries downstream of the memory: the decoder, its query embeddings, the class and box heads
_AFTER_MEMORY = ("model.decoder.", "model.query_position_embeddings.", "class_labels_classifier.", "bbox_predictor.")


def _is_detr(module: nn.Module, *names: str) -> bool:
    """Whether ``module`` is one of transformers' DETR classes (by name: transformers stays unimported)."""
    cls = type(module)
    return cls.__module__ == _DETR_MODULE and (not names or cls.__name__ in names)


def read_preprocessor(folder: str) -> dict | None:
    """The resize and normalisation of a ``save_pretrained`` folder's ``preprocessor_config.json`` (None if absent),
    as :meth:`DetrAdapter.prepare` reads them from a model's ``lrp_preprocess`` attribute."""
    import json
    import os

    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    size = config.get("size") or {}
    out: dict[str, Any] = {}
    if config.get("do_resize", True) and "shortest_edge" in size:
        out["shortest_edge"] = int(size["shortest_edge"])
        out["longest_edge"] = int(size.get("longest_edge") or 10 ** 9)
    if config.get("do_normalize", True):
        out["image_mean"] = tuple(float(v) for v in config.get("image_mean", IMAGENET_MEAN))
        out["image_std"] = tuple(float(v) for v in config.get("image_std", IMAGENET_STD))
    else:
        out["image_mean"], out["image_std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return out


def _is_frozen_norm(norm: Any) -> bool:
    return isinstance(norm, nn.Module) and hasattr(norm, "running_mean") and hasattr(norm, "running_var")


@dataclass
class DetrInput:
    """An image prepared for DETR: the normalised tensor (1, 3, H, W) and the RGB image it came from."""

    tensor: torch.Tensor
    rgb: np.ndarray
    resized_size: tuple[int, int]  # (h, w) of the tensor: the image's own unless the processor resizes
    original_size: tuple[int, int]


@dataclass
class DetrDetections:
    """Queries sorted by their best object-class probability (DETR's softmax, the no-object class left out)."""

    query_indices: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor

    def __len__(self) -> int:
        return int(self.query_indices.numel())


def _attention_kernel(module: nn.Module, steps: AttentionSteps, cross: bool, track: Callable) -> Callable:
    """DETR's self- or cross-attention under a rule's steps (projections are the patched q/k/v/o_proj).

    The position embeddings are booked per call, so each one's relevance is counted where it enters (the
    encoder's share and the decoder's share of the one sine embedding stay apart, and so the cuts).
    """

    def forward(hidden_states, key_value_states=None, attention_mask=None, position_embeddings=None,
                encoder_position_embeddings=None, **_):
        position_embeddings = track("position_embeddings", position_embeddings, "positional")
        if not cross:  # self-attention: (hidden_states, attention_mask, position_embeddings)
            key_value_states, key_pos = hidden_states, position_embeddings
        else:
            key_pos = track("encoder_position_embeddings", encoder_position_embeddings, "positional")
        b, lq, _ = hidden_states.shape
        lk = key_value_states.shape[1]
        d = module.head_dim
        query_in = hidden_states + position_embeddings if position_embeddings is not None else hidden_states
        key_in = key_value_states + key_pos if key_pos is not None else key_value_states
        # (B, L, C) -> (B·H, L, d)
        q = module.q_proj(query_in).view(b, lq, -1, d).transpose(1, 2).reshape(-1, lq, d)
        k = module.k_proj(key_in).view(b, lk, -1, d).transpose(1, 2).reshape(-1, lk, d)
        v = module.v_proj(key_value_states).view(b, lk, -1, d).transpose(1, 2).reshape(-1, lk, d)
        heads = q.shape[0] // b
        logits = steps.scores(q, k.transpose(1, 2)) * module.scaling
        if attention_mask is not None:  # additive (B, 1, Lq, Lk)
            logits = logits + attention_mask.expand(b, heads, lq, lk).reshape(-1, lq, lk)
        attn = steps.probabilities(logits)
        out = steps.mix(attn, v).view(b, heads, lq, d).transpose(1, 2).reshape(b, lq, heads * d)
        return module.o_proj(out), attn.detach().view(b, heads, lq, lk)

    return forward


class DetrAdapter(Adapter):
    """``transformers.DetrForObjectDetection`` (and its parts) with a transformers ResNet backbone."""

    name = "detr"
    stops = ("pixels", "backbone", "encoder_input", "encoder_layers", "memory", "decoder_layers")
    default_stops = ("pixels", "encoder_input", "memory")
    encoder_stops = ("pixels", "backbone", "encoder_input", "encoder_layers")
    groups = {"backbone": ("model.backbone.*", "backbone.*")}

    # ------------------------------------------------------------------ detection
    def matches(self, model: nn.Module) -> bool:
        return any(_is_detr(m) for m in model.modules())

    def check(self, model: nn.Module) -> None:
        if not _is_detr(model, "DetrForObjectDetection"):
            raise EngineError(f"{type(model).__name__} is not a model the DETR adapter explains: give a "
                              "transformers.DetrForObjectDetection")
        # a config loaded by from_pretrained may lack the flag (transformers 5 consumes it): look at the modules too
        backbone = model.model.backbone if hasattr(model, "model") else model
        if getattr(model.config, "use_timm_backbone", False) or any(
                type(m).__module__.startswith("timm.") for m in backbone.modules()):
            raise EngineError("DETR with a timm backbone is not supported: build it with use_timm_backbone=False "
                              "and a transformers ResNetConfig backbone")

    # ------------------------------------------------------------------ modules
    def module_kind(self, name, module):
        return "mha" if _is_detr(module, "DetrSelfAttention", "DetrCrossAttention") else None

    def kernel(self, module, kind, steps, track):
        if kind == "mha" and _is_detr(module, "DetrSelfAttention", "DetrCrossAttention"):
            return _attention_kernel(module, steps, type(module).__name__ == "DetrCrossAttention", track)
        return None

    def batchnorm_pairs(self, model):
        return [(m.convolution, m.normalization) for m in model.modules()
                if isinstance(getattr(m, "convolution", None), nn.Conv2d) and _is_frozen_norm(getattr(m, "normalization", None))]

    def pixel_layer(self, model):
        return super().pixel_layer(model.model.backbone if hasattr(model, "model") else model)

    # ------------------------------------------------------------------ pixels and outputs
    def prepare(self, model, image, channel_order="RGB"):
        from ..model.maskdino import read_image, resize_shortest_edge

        rgb = read_image(image, channel_order)
        settings = getattr(model, "lrp_preprocess", None) or {}  # set from a preprocessor config (read_preprocessor)
        resized = rgb
        if "shortest_edge" in settings:  # the processor's resize, so the model sees what it was trained on
            resized = resize_shortest_edge(rgb, settings["shortest_edge"], settings["longest_edge"])
        param = next(model.parameters())
        x = torch.from_numpy(resized.copy()).permute(2, 0, 1).to(param) / 255.0
        mean, std = self._stats(model, param)
        return DetrInput(((x - mean) / std)[None], rgb, tuple(resized.shape[:2]), tuple(rgb.shape[:2]))

    @staticmethod
    def _stats(model: nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        settings = getattr(model, "lrp_preprocess", None) or {}
        mean = torch.tensor(settings.get("image_mean", IMAGENET_MEAN), dtype=like.dtype, device=like.device)
        std = torch.tensor(settings.get("image_std", IMAGENET_STD), dtype=like.dtype, device=like.device)
        return mean.view(3, 1, 1), std.view(3, 1, 1)

    def input_bounds(self, model, x):
        mean, std = self._stats(model, x)
        return ((0.0 - mean) / std).expand_as(x).contiguous(), ((1.0 - mean) / std).expand_as(x).contiguous()

    def forward(self, model, x, records):
        out = model(pixel_values=x)
        return {"pred_logits": out.logits, "pred_boxes": out.pred_boxes, "decoder_embedding": out.last_hidden_state}

    def postprocess(self, model, outputs, prepared):
        probs = outputs["pred_logits"][0].detach().softmax(-1)[:, :-1]  # the last class is "no object"
        scores, labels = probs.max(-1)
        order = scores.argsort(descending=True)
        return DetrDetections(order, labels[order], scores[order])

    def describe(self, model, outputs, prepared, queries, labels):
        probs = outputs["pred_logits"][0, queries].detach().softmax(-1)
        boxes = outputs["pred_boxes"][0, queries].detach()
        h, w = prepared.original_size
        info = []
        for i, (q, label) in enumerate(zip(queries.tolist(), labels.tolist())):
            cx, cy, bw, bh = boxes[i].tolist()
            info.append({"query": q, "label": label, "class": model.config.id2label.get(label, str(label)),
                         "class_score": float(probs[i, label]), "score": float(probs[i, label]),
                         "box": [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]})
        return info

    # ------------------------------------------------------------------ stops
    @contextlib.contextmanager
    def record(self, model: nn.Module, ledger: Ledger) -> Iterator[Records]:
        """Hooks recording the stops (the attention kernels book the position embeddings they use)."""
        records = Records()
        rec = records.tensors
        rec.update(encoder_layers=[], decoder_layers=[])
        detr = model.model

        def on_backbone(_m, _args, out):  # [(feature map, mask)] per backbone stage
            rec["backbone"] = [f for f, _ in out]
            records.spatial_shapes = [tuple(int(v) for v in out[-1][0].shape[-2:])]

        def on_encoder(_m, args, kwargs):
            rec["encoder_input"] = kwargs["inputs_embeds"] if "inputs_embeds" in kwargs else args[0]

        def on_decoder(_m, args, kwargs):
            rec["memory"] = kwargs["encoder_hidden_states"]

        handles = [detr.backbone.register_forward_hook(on_backbone),
                   detr.encoder.register_forward_pre_hook(on_encoder, with_kwargs=True),
                   detr.decoder.register_forward_pre_hook(on_decoder, with_kwargs=True)]
        for layer in detr.encoder.layers:
            handles.append(layer.register_forward_hook(lambda _m, _a, out: rec["encoder_layers"].append(out)))
        for layer in detr.decoder.layers:
            handles.append(layer.register_forward_hook(lambda _m, _a, out: rec["decoder_layers"].append(out)))
        with hooks(handles):
            yield records

    def stop_tensors(self, records: Records, stop: str, levels: Sequence) -> list[StopTensor]:
        rec = records.tensors
        if stop == "backbone":
            return [StopTensor(stop, f"backbone.stage{i}", t, "map") for i, t in enumerate(rec["backbone"])]
        if stop in ("encoder_input", "memory"):
            return [StopTensor(stop, stop, rec[stop], "tokens")]
        if stop == "encoder_layers":
            return [StopTensor(stop, f"encoder_layer{i}", t, "tokens") for i, t in enumerate(rec["encoder_layers"])]
        if stop == "decoder_layers":
            return [StopTensor(stop, f"decoder_layer{i}", t, "tokens") for i, t in enumerate(rec["decoder_layers"])]
        return []

    def ledger_scope(self, stops: Sequence[str]) -> Callable[[LedgerEntry], bool]:
        if "pixels" in stops:
            return lambda entry: True
        if "backbone" in stops:
            return lambda entry: not entry.name.startswith("model.backbone.")
        return lambda entry: not entry.name.startswith(("model.backbone.", "model.input_projection."))

    def cuts(self, records: Records) -> list[Cut]:
        # DETR reads only the last backbone feature; the encoder reads only its input tokens (and constant
        # positions); the decoder only the memory (its queries start at zero)
        last = f"backbone.stage{len(records.tensors.get('backbone', [])) - 1}"
        return [
            Cut("backbone", ("backbone",), (last,), lambda entry: not entry.name.startswith("model.backbone.")),
            Cut("encoder_input", ("encoder_input",), ("encoder_input",),
                lambda entry: not entry.name.startswith(("model.backbone.", "model.input_projection."))),
            Cut("memory", ("memory",), ("memory",), lambda entry: entry.name.startswith(_AFTER_MEMORY)),
        ]

    def encoder_output(self, records: Records) -> torch.Tensor:
        return records.tensors["encoder_layers"][-1]
