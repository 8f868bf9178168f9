"""Hugging Face Mask2Former's adapter (``transformers.Mask2FormerForUniversalSegmentation``, ResNet or Swin).

Structure read from transformers' ``modeling_mask2former.py`` and ``modeling_swin.py``:

- backbone: a ResNet's conv layers fold their batch norms; Swin's window attention is a DETR-style attention
  whose relative position bias and shift mask are constants added to the logits (booked, positional), its GELU
  takes the elementwise rule, and its input is padded to the patch size here, as Swin would pad it;
- pixel decoder: a multi-scale deformable attention encoder (:mod:`.hf_deformable`, True marks padding), and
  an FPN that adds a lateral conv of the finest backbone feature;
- transformer decoder: the masked cross-attention is an ``nn.MultiheadAttention`` whose boolean mask,
  thresholded from the previous layer's detached mask prediction, only selects (it carries no relevance); the
  self-attention (``Mask2FormerAttention``) takes sequence-first inputs; the mask predictor's einsum of mask
  embeddings and pixel embeddings is a bilinear product of two variable tensors (the ``product`` kind);
- constants: the sine position embeddings of the decoder's keys, and the query positions where the
  self-attention adds them, are booked (positional); the initial query features (and the query positions
  the cross-attention adds) are learned parameters (``embeddings``).

Semantic and panoptic targets: :mod:`maskdino_lrp.lrp.targets` (``outputs["class_activation"]`` says the
classes are a softmax with a last no-object class).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..lrp.engine import EngineError, Ledger, LedgerEntry
from ..lrp.rules import AttentionSteps
from .base import Cut, Records, StopTensor, hooks, pixel_decoder_stop_tensors
from .hf_common import HFDetectionAdapter, HFDetections, append_output, book_output, is_hf_class, qkv_attention_kernel
from .hf_deformable import deformable_kernel, is_deformable

_SWIN = "transformers.models.swin.modeling_swin"
_BACKBONES = ("ResNetBackbone", "SwinBackbone")
# the repeated blocks that hold most of the forward graph (LRP(recompute=True) recomputes them one at a time):
# backbone blocks and the pixel decoder's encoder layers
_SEGMENTS = ("ResNetBasicLayer", "ResNetBottleNeckLayer", "SwinLayer", "SwinPatchMerging",
             "Mask2FormerPixelDecoderEncoderLayer")
_BACKBONE = "model.pixel_level_module.encoder."
_PIXEL_DECODER = "model.pixel_level_module.decoder."
_MASK_EQUATION = "bqc,bchw->bqhw"  # the mask predictor's product: mask embeddings × pixel embeddings
# ledger entries downstream of the memory + the FPN's lateral convs, and of the encoder input + laterals
_AFTER_MEMORY = (_PIXEL_DECODER + "layer_", _PIXEL_DECODER + "mask_projection.", "model.transformer_module.",
                 "class_predictor.")
_AFTER_ENCODER_INPUT = (_PIXEL_DECODER + "encoder.",) + _AFTER_MEMORY


def _attention_kernel(module: nn.Module, steps: AttentionSteps, track: Callable) -> Callable:
    """``Mask2FormerAttention``: the DETR-style kernel on sequence-first tensors (the decoder's self-attention;
    its additive mask, if any, is (B·H, Lq, Lk))."""
    inner = qkv_attention_kernel(module, steps, track, output="out_proj")

    def forward(hidden_states, attention_mask=None, position_embeddings=None, **_):
        x = hidden_states.transpose(0, 1)
        pos = None if position_embeddings is None else position_embeddings.transpose(0, 1)
        mask = None if attention_mask is None else attention_mask.view(x.shape[0], -1, *attention_mask.shape[1:])
        out, weights = inner(x, attention_mask=mask, position_embeddings=pos)
        return out.transpose(0, 1), weights

    return forward


def _swin_kernel(module: nn.Module, steps: AttentionSteps, track: Callable) -> Callable:
    """``SwinAttention`` (windows as the batch): the DETR-style kernel, its logits plus the relative position
    bias and, in shifted blocks, the shift mask (nW, N, N), the same for every image."""
    inner = qkv_attention_kernel(module, steps, track)

    def forward(hidden_states, attention_mask=None, **_):
        bias = track("relative_position_bias", module.relative_position_bias(), "positional")  # (1, H, N, N)
        if attention_mask is not None:
            shift = track("shift_mask", attention_mask, "positional")
            bias = bias + shift.unsqueeze(1).repeat(hidden_states.shape[0] // shift.shape[0], 1, 1, 1)
        return inner(hidden_states, attention_mask=bias)

    return forward


def _mask_predictor_forward(module: nn.Module, product: Callable) -> Callable:
    """The mask predictor's forward with its einsum taken by ``product`` (the engine's rule forward for it).

    The attention mask for the next layer is thresholded from detached logits: a constant selection.
    """

    def forward(outputs, pixel_embeddings, attention_mask_target_size=None):
        mask_embeddings = module.mask_embedder(outputs.transpose(0, 1))
        mask_logits = product(mask_embeddings, pixel_embeddings)
        small = F.interpolate(mask_logits.detach(), size=attention_mask_target_size, mode="bilinear",
                              align_corners=False)
        keep = small.sigmoid().flatten(2).unsqueeze(1).repeat(1, module.num_heads, 1, 1)
        return mask_logits, (keep.flatten(0, 1) < 0.5).bool()

    return forward


class Mask2FormerAdapter(HFDetectionAdapter):
    """``transformers.Mask2FormerForUniversalSegmentation`` (and its parts) with a transformers ResNet or Swin."""

    name = "mask2former"
    modeling = "transformers.models.mask2former.modeling_mask2former"
    model_classes = ("Mask2FormerForUniversalSegmentation",)
    score = "softmax"
    stops = ("pixels", "backbone", "encoder_input", "encoder_layers", "memory", "mask_features", "decoder_layers")
    default_stops = ("pixels", "encoder_input", "memory")
    encoder_stops = ("pixels", "backbone", "encoder_input", "encoder_layers")
    groups = {"backbone": (_BACKBONE + "*",)}

    @staticmethod
    def backbone(model: nn.Module) -> nn.Module:
        inner = getattr(model, "model", None)
        return inner.pixel_level_module.encoder if isinstance(inner, nn.Module) else model

    def check(self, model: nn.Module) -> None:
        super().check(model)
        if type(self.backbone(model)).__name__ not in _BACKBONES:
            raise EngineError(f"Mask2Former with a {type(self.backbone(model)).__name__} is not supported: build it "
                              "with a transformers ResNetConfig or SwinConfig backbone")

    def module_kind(self, name, module):
        if self._ours(module, ("Mask2FormerAttention",)) or is_hf_class(module, _SWIN, ("SwinAttention",)):
            return "mha"
        if is_hf_class(module, "transformers.activations", ("GELUActivation",)):  # Swin's MLP
            return "elementwise"
        # its einsum (mask embeddings × pixel embeddings) takes the product rule: see connect()
        return "product" if self._ours(module, ("Mask2FormerMaskPredictor",)) else None

    def kernel(self, module, kind, steps, track):
        if kind == "mha" and self._ours(module, ("Mask2FormerAttention",)):
            return _attention_kernel(module, steps, track)
        if kind == "mha" and is_hf_class(module, _SWIN, ("SwinAttention",)):
            return _swin_kernel(module, steps, track)
        if kind == "deform_attn" and is_deformable(module):
            return deformable_kernel(module, steps, track, mask_marks="padding")
        return None

    def segments(self, model):
        return [name for name, m in model.named_modules() if type(m).__name__ in _SEGMENTS
                and type(m).__module__.startswith("transformers.models.")]

    @contextlib.contextmanager
    def connect(self, model: nn.Module) -> Iterator[None]:
        """The mask predictor's einsum under the engine's product rule: the engine gave the predictor (of kind
        ``product``) a forward ``(a, b) -> rule.product(module.equation, a, b)``; it runs inside the
        predictor's own steps for the forwards inside."""
        saved = [(m, m.__dict__["forward"]) for m in model.modules()
                 if self._ours(m, ("Mask2FormerMaskPredictor",)) and "forward" in m.__dict__]
        try:
            for m, product in saved:
                m.equation = _MASK_EQUATION
                m.forward = _mask_predictor_forward(m, product)
            yield
        finally:
            for m, product in saved:
                m.forward = product
                m.__dict__.pop("equation", None)

    # ------------------------------------------------------------------ pixels and outputs
    def prepare(self, model, image, channel_order="RGB"):
        prepared = super().prepare(model, image, channel_order)
        # Swin pads its input to the patch size with zeros: done here, the pixel rules see the tensor the first
        # conv sees, and the explanation crops the padding as it does MaskDINO's
        patch = getattr(getattr(self.backbone(model), "config", None), "patch_size", 1)
        h, w = prepared.tensor.shape[-2:]
        if isinstance(patch, int) and (h % patch or w % patch):
            prepared.tensor = F.pad(prepared.tensor, (0, -w % patch, 0, -h % patch))
        return prepared

    def forward(self, model, x, records):
        out = model(pixel_values=x)
        return {"pred_logits": out.class_queries_logits, "pred_masks": out.masks_queries_logits,
                "decoder_embedding": records.tensors.get("decoder_embedding") if records is not None else None,
                "class_activation": "softmax"}

    def postprocess(self, model, outputs, prepared):
        class_scores, labels = self.class_scores(outputs["pred_logits"][0].detach()).max(-1)
        masks = outputs["pred_masks"][0].detach()
        inside = (masks > 0).to(masks.dtype)
        mask_scores = (masks.sigmoid() * inside).flatten(1).sum(1) / (inside.flatten(1).sum(1) + 1e-6)
        scores = class_scores * mask_scores
        order = scores.argsort(descending=True)
        return HFDetections(order, labels[order], scores[order])

    def describe(self, model, outputs, prepared, queries, labels):
        from ..model.masks import resize_and_encode

        probs = self.class_scores(outputs["pred_logits"][0, queries].detach())
        masks, mask_scores = resize_and_encode(outputs["pred_masks"][0, queries].detach(),
                                               tuple(prepared.tensor.shape[-2:]), tuple(prepared.resized_size),
                                               tuple(prepared.original_size))
        info = []
        for i, (q, label) in enumerate(zip(queries.tolist(), labels.tolist())):
            p = float(probs[i, label]) if label < probs.shape[-1] else 0.0  # an explicit query may be no-object
            info.append({"query": q, "label": label, "class": model.config.id2label.get(label, str(label)),
                         "class_score": p, "score": p * float(mask_scores[i]), "box": None, "mask": masks[i]})
        return info

    # ------------------------------------------------------------------ stops
    @contextlib.contextmanager
    def record(self, model: nn.Module, ledger: Ledger) -> Iterator[Records]:
        """Hooks recording the stops and booking the decoder's sine position embeddings (the deformable
        kernel books the encoder's)."""
        records = Records()
        rec = records.tensors
        rec.update(encoder_layers=[], decoder_layers=[], lateral=[])
        pixel_decoder = model.model.pixel_level_module.decoder
        transformer = model.model.transformer_module

        def on_backbone(module, _args, out):  # by stage name; which features make the cut, what lies upstream
            rec["backbone"] = dict(zip(module.out_features, out.feature_maps))
            if type(module).__name__ == "SwinBackbone":  # side outputs (a norm each): all of them, the whole body
                rec["backbone_cut"], rec["backbone_upstream"] = tuple(module.out_features), (_BACKBONE,)
            else:  # ResNet stages read each other's outputs: the first feature carries everything above it
                first = module.stage_names.index(module.out_features[0])
                rec["backbone_cut"] = module.out_features[:1]
                rec["backbone_upstream"] = (_BACKBONE + "embedder.",) + tuple(
                    f"{_BACKBONE}encoder.stages.{i}." for i in range(first))

        def on_encoder(_m, args, kwargs):
            rec["encoder_input"] = kwargs["inputs_embeds"] if "inputs_embeds" in kwargs else args[0]
            records.spatial_shapes = [tuple(int(v) for v in s) for s in kwargs["spatial_shapes_list"]]

        def on_memory(_m, _args, out):
            rec["memory"] = out.last_hidden_state

        def on_decoder_norm(_m, _args, out):  # (Q, B, C); the last call feeds the final class and mask heads
            rec["decoder_embedding"] = out.transpose(0, 1)

        handles = [model.model.pixel_level_module.encoder.register_forward_hook(on_backbone),
                   pixel_decoder.encoder.register_forward_pre_hook(on_encoder, with_kwargs=True),
                   pixel_decoder.encoder.register_forward_hook(on_memory),
                   pixel_decoder.mask_projection.register_forward_hook(
                       lambda _m, _a, out: rec.__setitem__("mask_features", out)),
                   # the sine embedding of each level's keys (one entry per call)
                   transformer.position_embedder.register_forward_hook(
                       book_output(ledger, "model.transformer_module.position_embedder")),
                   transformer.decoder.layernorm.register_forward_hook(on_decoder_norm)]
        for key, layers in (("encoder_layers", pixel_decoder.encoder.layers),
                            ("decoder_layers", transformer.decoder.layers)):  # layers return tuples
            handles += [m.register_forward_hook(append_output(rec[key], lambda out: out[0])) for m in layers]
        handles += [m.register_forward_hook(append_output(rec["lateral"])) for m in pixel_decoder.lateral_convolutions]
        with hooks(handles):
            yield records

    def stop_tensors(self, records: Records, stop: str, levels: Sequence) -> list[StopTensor]:
        rec = records.tensors
        if stop == "memory":  # the FPN's lateral convs with it: the cuts at the encoder input and at the memory
            return [StopTensor(stop, stop, rec[stop], "tokens")] + [
                StopTensor(stop, f"lateral{i}", t, "map") for i, t in enumerate(rec["lateral"])]
        return pixel_decoder_stop_tensors(records, stop) or []

    def ledger_scope(self, stops: Sequence[str]) -> Callable[[LedgerEntry], bool]:
        if "pixels" in stops or "backbone" in stops:  # the backbone cut keeps the stages after its first feature
            return lambda entry: True
        if "encoder_input" in stops or "encoder_layers" in stops:
            return lambda entry: entry.name.startswith(_AFTER_ENCODER_INPUT)
        return lambda entry: entry.name.startswith(_AFTER_MEMORY)

    def cuts(self, records: Records) -> list[Cut]:
        rec = records.tensors
        laterals = tuple(f"lateral{i}" for i in range(len(rec.get("lateral", []))))
        upstream = rec.get("backbone_upstream", ())
        return [
            Cut("backbone", ("backbone",), tuple(f"backbone.{n}" for n in rec.get("backbone_cut", ())),
                lambda entry: not entry.name.startswith(upstream)),
            Cut("encoder_input", ("encoder_input", "memory"), ("encoder_input",) + laterals,
                lambda entry: entry.name.startswith(_AFTER_ENCODER_INPUT)),
            Cut("memory", ("memory",), ("memory",) + laterals, lambda entry: entry.name.startswith(_AFTER_MEMORY)),
        ]
