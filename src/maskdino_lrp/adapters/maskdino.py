"""MaskDINO's adapter: where its stops are, what its hooks book, how its modules compute under a rule.

Its own attention modules: MSDeformAttn (``deform_attn``) and, in Swin models, the backbone's WindowAttention,
which is of the ``mha`` kind (the rules and options of nn.MultiheadAttention) with additive constants.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from ..lrp.engine import EngineError, Ledger, LedgerEntry
from ..lrp.rules import AttentionSteps, DeformSteps
from ..model.backbone import BasicBlock, BottleneckBlock
from ..model.decoder import InverseSigmoid, MaskDINODecoder, TransformerDecoder
from ..model.deform_attn import MSDeformAttn
from ..model.layers import Conv2d
from ..model.maskdino import MaskDINO
from ..model.pixel_decoder import MSDeformAttnTransformerEncoderLayer, encoder_call_inputs
from ..model.swin import PatchMerging, SwinTransformerBlock, WindowAttention, window_attention
from .base import Adapter, Cut, Records, StopTensor, hooks, pixel_decoder_stop_tensors
from .hf_deformable import deform_under_steps

_PREDICTOR = "sem_seg_head.predictor"
_SEGMENTS = (BasicBlock, BottleneckBlock, SwinTransformerBlock, PatchMerging, MSDeformAttnTransformerEncoderLayer)
# ledger entries downstream of the memory cut: the decoder, and the FPN convs after the lateral ones
_AFTER_MEMORY = (_PREDICTOR, "sem_seg_head.pixel_decoder.layer_", "sem_seg_head.pixel_decoder.mask_features")


def _is_frozen_norm(norm: nn.Module | None) -> bool:
    return norm is not None and hasattr(norm, "running_mean") and hasattr(norm, "running_var") \
        and not isinstance(norm, (nn.GroupNorm, nn.LayerNorm))


def _deform_kernel(module: MSDeformAttn, steps: DeformSteps) -> Callable:
    """MSDeformAttn's forward from its public steps, under a rule's :class:`DeformSteps`."""

    def forward(query, reference_points, input_flatten, input_spatial_shapes, input_level_start_index,
                input_padding_mask=None):
        value = module.project_values(input_flatten, input_padding_mask)
        out, _ = deform_under_steps(module, steps, query, reference_points, value, input_spatial_shapes,
                                    input_level_start_index)
        return module.output_proj(out)

    return forward


def _window_kernel(module: WindowAttention, steps: AttentionSteps,
                   track: Callable[..., torch.Tensor | None]) -> Callable:
    """Swin's window attention through :func:`window_attention` under a rule's :class:`AttentionSteps`.

    The projections stay the ``qkv`` / ``proj`` modules (each under its own rule, biases booked there); q·kᵀ,
    the softmax and attention·v take the rule's steps. The relative-position bias and the shift mask are
    constant inputs to the logits: both are booked (``positional``) so the ledger shows what they absorb.
    """

    def scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:  # (B·nW, nH, N, d) pairs; the steps take 3-D
        return steps.scores(q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2)).view(*q.shape[:3], k.shape[2])

    def mix(attention: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return steps.mix(attention.flatten(0, 1), v.flatten(0, 1)).view(*v.shape[:2], attention.shape[2], v.shape[3])

    def forward(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        bias = track("relative_position_bias", module.relative_position_bias(), "positional")
        mask = track("shift_mask", mask, "positional")
        return window_attention(module, x, bias, mask, scores=scores, probabilities=steps.probabilities, mix=mix)

    return forward


class MaskDINOAdapter(Adapter):
    """MaskDINO (and its parts): ResNet/FPN backbone, deformable encoder, two-stage query decoder."""

    name = "maskdino"
    stops = ("pixels", "backbone", "encoder_input", "encoder_layers", "memory", "mask_features", "query_init",
             "decoder_layers")
    default_stops = ("pixels", "encoder_input", "memory")
    encoder_stops = ("pixels", "backbone", "encoder_input", "encoder_layers")
    _parts = (MaskDINO, MaskDINODecoder, MSDeformAttn, Conv2d, WindowAttention)

    # ------------------------------------------------------------------ detection
    def __init__(self, box_chain: bool = True):
        self.box_chain = box_chain

    def matches(self, model: nn.Module) -> bool:
        return any(isinstance(m, self._parts) for m in model.modules())

    def check(self, model: nn.Module) -> None:
        needed = ("backbone", "sem_seg_head", "prepare")
        missing = [n for n in needed if not hasattr(model, n)]
        if missing or not hasattr(model.sem_seg_head, "predictor") or not hasattr(model.sem_seg_head, "pixel_decoder"):
            raise EngineError(
                f"{type(model).__name__} is not a model the engine recognises: it needs a MaskDINO layout "
                "(backbone, sem_seg_head.pixel_decoder, sem_seg_head.predictor, prepare()); "
                "build one with maskdino_lrp.build_model"
            )

    # ------------------------------------------------------------------ modules
    def module_kind(self, name, module):
        # Swin's window attention is dot-product attention with additive constants (bias, shift mask): the
        # rules and options of nn.MultiheadAttention apply, computed by _window_kernel
        if isinstance(module, InverseSigmoid):  # the box chain's round trip: elementwise, like its sigmoid
            return "elementwise"
        return "mha" if isinstance(module, WindowAttention) else None

    def kernel(self, module, kind, steps, track):
        if kind == "deform_attn" and isinstance(module, MSDeformAttn):
            return _deform_kernel(module, steps)
        if kind == "mha" and isinstance(module, WindowAttention):
            return _window_kernel(module, steps, track)
        return None  # nn.MultiheadAttention: the engine's own

    def segments(self, model):
        # the repeated blocks that hold most of the forward graph: backbone blocks (ResNet, Swin and its patch
        # merging) and encoder layers; a block's input is all it keeps, one block is recomputed at a time
        return [name for name, m in model.named_modules() if isinstance(m, _SEGMENTS)]

    def conv_epilogue(self, module):
        if not isinstance(module, Conv2d):
            return None

        def epilogue(y: torch.Tensor) -> torch.Tensor:  # detectron2's Conv2d: norm (folded: identity), activation
            if module.norm is not None:
                y = module.norm(y)
            return module.activation(y) if module.activation is not None else y

        return epilogue

    def batchnorm_pairs(self, model):
        return [(m, m.norm) for m in model.modules() if isinstance(m, Conv2d) and _is_frozen_norm(m.norm)]

    def pixel_layer(self, model):
        return super().pixel_layer(getattr(model, "backbone", model))

    @contextlib.contextmanager
    def connect(self, model: nn.Module) -> Iterator[None]:
        """The two-stage query content is gathered from the memory and detached officially: connect it. With
        ``box_chain``, also the reference boxes: the initial boxes and each layer's box the next one refines."""
        saved = [(m, m.detach_query_content) for m in model.modules() if isinstance(m, MaskDINODecoder)]
        chain = [(m, m.detach_reference) for m in model.modules()
                 if isinstance(m, (MaskDINODecoder, TransformerDecoder))] if self.box_chain else []
        try:
            for m, _ in saved:
                m.detach_query_content = False  # the selected query content is part of the decision
            for m, _ in chain:
                m.detach_reference = False
            yield
        finally:
            for m, value in saved:
                m.detach_query_content = value
            for m, value in chain:
                m.detach_reference = value

    # ------------------------------------------------------------------ pixels and outputs
    def prepare(self, model, image, channel_order="RGB"):
        return model.prepare(image, channel_order)

    def input_bounds(self, model, x):
        mean, std = model.pixel_mean, model.pixel_std
        low = ((0.0 - mean) / std).expand_as(x[0])[None].expand_as(x)
        high = ((255.0 - mean) / std).expand_as(x[0])[None].expand_as(x)
        return low.contiguous(), high.contiguous()

    def forward(self, model, x, records):
        outputs = model(x)
        outputs["decoder_embedding"] = records.tensors.get("decoder_embedding")
        outputs["box_anchor"] = records.tensors.get("box_anchor")
        outputs["box_refinements"] = self._box_refinements(model, records.tensors)
        return outputs

    @staticmethod
    def _box_refinements(model: nn.Module, rec: dict) -> dict[str, torch.Tensor]:
        """The deltas (B, Q, 4) that add up, on the anchor, to the final box's inverse sigmoid: the proposal's
        box head (two-stage proposal boxes), each layer's delta on the box the next layer reads, and the last
        layer's delta in its own prediction (the heads read the normed output there)."""
        predictor = model.sem_seg_head.predictor
        chain, own = rec.get("box_chain_deltas", []), rec.get("box_deltas", [])
        if not own:
            return {}
        steps = {}
        if predictor.two_stage and predictor.initialize_box_type == "no" and "proposal_delta" in rec:
            steps["proposal"] = rec["proposal_delta"]
        for i, delta in enumerate(chain[: len(own) - 1]):
            steps[str(i)] = delta.transpose(0, 1)
        steps[str(len(own) - 1)] = own[-1]
        return steps

    def postprocess(self, model, outputs, prepared):
        return model.postprocess(outputs, prepared)

    def describe(self, model, outputs, prepared, queries, labels):
        # compact (COCO RLE) masks, resized a few at a time: bounded memory for any photo size
        masks, mask_score = model.instance_masks(outputs["pred_masks"][0, queries].detach(), prepared)
        boxes = model.boxes_to_image(outputs["pred_boxes"][0, queries].detach(), prepared)
        cls = outputs["pred_logits"][0, queries, labels].detach().sigmoid()
        names = getattr(model, "class_names", [])
        info = []
        for i, (q, label) in enumerate(zip(queries.tolist(), labels.tolist())):
            info.append({
                "query": q, "label": label, "class": names[label] if label < len(names) else str(label),
                "class_score": float(cls[i]), "score": float(cls[i] * mask_score[i]),
                "box": [float(v) for v in boxes[i]], "mask": masks[i],
            })
        return info

    # ------------------------------------------------------------------ stops
    @contextlib.contextmanager
    def record(self, model: nn.Module, ledger: Ledger) -> Iterator[Records]:
        """Forward hooks that record the tensors at every stop and book positional inputs in the ledger."""
        records = Records()
        rec = records.tensors
        rec.update(encoder_layers=[], decoder_layers=[], lateral=[],
                   backbone_stages=[n for n, _ in model.backbone.named_children()])
        head = model.sem_seg_head
        encoder = head.pixel_decoder.transformer.encoder
        decoder = head.predictor.decoder

        def on_backbone(_m, _args, out):
            rec["backbone"] = dict(out)

        def on_pos(_m, _args, out):  # sine position encoding of the encoder: a constant input
            return ledger.track("positional", "sem_seg_head.pixel_decoder.pe_layer", out)

        def on_encoder(_m, args, kwargs):
            rec["encoder_input"], shapes = encoder_call_inputs(args, kwargs)
            records.spatial_shapes = [tuple(int(v) for v in s) for s in shapes]

        def on_predictor(_m, args, kwargs):
            rec["memory"] = list(args[0] if args else kwargs["x"])
            rec["mask_features"] = args[1] if len(args) > 1 else kwargs["mask_features"]

        def on_decoder(_m, args, kwargs):
            rec["query_init"] = args[0] if args else kwargs["tgt"]

        def on_ref_head(_m, args):  # sine embedding of (detached) reference boxes: positional
            return (ledger.track("positional", f"{_PREDICTOR}.decoder.ref_point_head.input", args[0]),) + args[1:]

        def on_box_reference(_m, _args, out):  # the box a layer refines: positional when the chain is cut
            if not decoder.detach_reference:
                return None  # connected: relevance flows on to the layer before, down to the anchor
            return ledger.track("positional", f"{_PREDICTOR}.box_reference", out)

        def on_box_anchor(_m, _args, out):  # the initial boxes' constant part: grid anchor or interim mask box
            finite = torch.isfinite(out)  # invalid proposals are inf: book the finite part, keep the values exact
            leaf = ledger.track("positional", f"{_PREDICTOR}.box_anchor", torch.where(finite, out, 0.0))
            rec["box_anchor"] = leaf + torch.where(finite, 0.0, out)
            return rec["box_anchor"]

        def on_proposal_delta(_m, _args, out):
            rec["proposal_delta"] = out

        def on_box_delta(name):
            return lambda _m, _args, out: rec[name].append(out)

        def on_decoder_norm(_m, _args, out):  # (Q, B, C); the last call is the final prediction head's
            rec["decoder_embedding"] = out.transpose(0, 1)

        handles = [model.backbone.register_forward_hook(on_backbone),
                   head.pixel_decoder.pe_layer.register_forward_hook(on_pos),
                   encoder.register_forward_pre_hook(on_encoder, with_kwargs=True)]
        for layer in encoder.layers:
            handles.append(layer.register_forward_hook(lambda _m, _a, out: rec["encoder_layers"].append(out)))
        handles.append(head.predictor.register_forward_pre_hook(on_predictor, with_kwargs=True))
        handles.append(decoder.register_forward_pre_hook(on_decoder, with_kwargs=True))
        for layer in decoder.layers:
            handles.append(layer.register_forward_hook(
                lambda _m, _a, out: rec["decoder_layers"].append(out[0] if isinstance(out, tuple) else out)))
        if getattr(decoder, "ref_point_head", None) is not None:
            handles.append(decoder.ref_point_head.register_forward_pre_hook(on_ref_head))
        handles.append(head.predictor.decoder_norm.register_forward_hook(on_decoder_norm))
        if hasattr(head.predictor, "box_reference"):
            handles.append(head.predictor.box_reference.register_forward_hook(on_box_reference))
        rec.update(box_chain_deltas=[], box_deltas=[])
        handles += [head.predictor.box_anchor.register_forward_hook(on_box_anchor),
                    head.predictor.proposal_delta.register_forward_hook(on_proposal_delta),
                    decoder.box_delta.register_forward_hook(on_box_delta("box_chain_deltas")),
                    head.predictor.box_delta.register_forward_hook(on_box_delta("box_deltas"))]
        for name, module in head.pixel_decoder.named_children():
            if name.startswith("adapter_"):  # the FPN's lateral convs (with the memory, a complete cut)
                handles.append(module.register_forward_hook(lambda _m, _a, out: rec["lateral"].append(out)))
        with hooks(handles):
            yield records

    def stop_tensors(self, records: Records, stop: str, levels: Sequence) -> list[StopTensor]:
        rec = records.tensors
        if stop == "memory":
            return self._memory(rec["memory"], levels) + [
                StopTensor(stop, f"lateral{i}", t, "map") for i, t in enumerate(rec["lateral"])]
        if stop == "query_init":
            return [StopTensor(stop, "query_init", rec["query_init"], "sequence_first")]
        return pixel_decoder_stop_tensors(records, stop) or []

    @staticmethod
    def _memory(maps: list[torch.Tensor], levels: Sequence) -> list[StopTensor]:
        """Decoder memory maps matched to encoder levels by size (the decoder reverses level order)."""
        out = []
        for i, lv in enumerate(levels):
            match = [t for t in maps if tuple(t.shape[-2:]) == (lv.height, lv.width)]
            if match:
                out.append(StopTensor("memory", "memory", match[0], "map", level=i))
        return out

    def ledger_scope(self, stops: Sequence[str]) -> Callable[[LedgerEntry], bool]:
        if "pixels" in stops:
            return lambda entry: True
        if any(s in stops for s in ("backbone", "encoder_input", "encoder_layers")):
            return lambda entry: not entry.name.startswith("backbone.")
        return lambda entry: entry.name.startswith(_AFTER_MEMORY)

    def cuts(self, records: Records) -> list[Cut]:
        rec = records.tensors
        cuts = []
        features = rec.get("backbone") or {}
        stages = rec["backbone_stages"]
        first = max(features, key=lambda n: features[n].shape[-2] * features[n].shape[-1], default=None)
        if first in stages:
            # ResNet: the features are the stages' outputs and the next stage reads them, so the shallowest
            # feature already carries everything above it
            upstream = tuple(f"backbone.{n}." for n in stages[: stages.index(first) + 1])
            cuts.append(Cut("backbone", ("backbone",), (f"backbone.{first}",),
                            lambda entry: not entry.name.startswith(upstream)))
        elif features:
            # side outputs (Swin: an output norm per stage, the next stage reads the tensor before it): all of
            # them together are the cut, and everything in the backbone lies upstream
            cuts.append(Cut("backbone", ("backbone",), tuple(f"backbone.{n}" for n in features),
                            lambda entry: not entry.name.startswith("backbone.")))
        laterals = tuple(f"lateral{i}" for i in range(len(rec.get("lateral", []))))
        cuts.append(Cut("memory", ("memory",), ("memory",) + laterals,
                        lambda entry: entry.name.startswith(_AFTER_MEMORY)))
        return cuts

    def encoder_output(self, records: Records) -> torch.Tensor:
        return records.tensors["encoder_layers"][-1]
