"""Hugging Face RT-DETR's adapters (``transformers.RTDetrForObjectDetection`` and ``RTDetrV2ForObjectDetection``).

Structure read from transformers' ``modeling_rt_detr.py`` / ``modeling_rt_detr_v2.py``: a ResNet body (conv +
frozen batch norm), ``encoder_input_proj`` (conv + batch norm) per level, a hybrid encoder (a DETR-style
transformer layer on the top level with a sine position embedding, then FPN/PAN fusion of conv + batch norm +
SiLU layers), ``decoder_input_proj`` (conv + batch norm) giving the memory tokens, and a deformable decoder
whose queries start from the top-k memory tokens: their content (``enc_output`` of the tokens) is detached
by the model and reconnected here. Scores are sigmoids.

Boxes: each decoder layer refines the previous layer's box, starting from the top-k tokens' proposal boxes (the
box head ``enc_bbox_head`` on the token plus its grid anchor); transformers detaches the proposals and every
refined box, ``connect`` keeps that chain connected (:func:`~.hf_common.chain_detaches`), so a box's relevance
reaches each layer's box head and the proposal's; only the anchors (``generate_anchors``: the token's grid
position, the level's anchor size) are booked as positional. The boxes reach the queries only as sampling
locations (detached by the kernel) and through the query position head, whose output is booked where it is
used: class explanations do not depend on the chain. ``box_anchor`` and ``box_refinements`` (``proposal``,
``0`` … per layer) serve the ``refine:*`` targets; ``box_logits`` the box targets. Without a processor config
the image is prepared as ``RTDetrImageProcessor`` does by default. v2 places the decoder's samples with
per-point scales and an ``offset_scale``; its discrete (rounded) sampling is refused.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator, Sequence

import torch
from torch import nn

from ..lrp.engine import EngineError, Ledger
from ..model import deform_attn as da
from .base import Cut, Records, StopTensor, hooks
from .hf_common import HFDetectionAdapter, book_finite, is_hf_class, last_output, memory_and_layer_hooks
from .hf_deformable import deformable_kernel, is_deformable

_UPSTREAM_OF_ENCODER = ("model.backbone.", "model.encoder_input_proj.")
# ledger entries downstream of the memory: query selection and content, the decoder and its heads
_AFTER_MEMORY = ("model.enc_output.", "model.enc_score_head.", "model.enc_bbox_head.", "model.decoder.",
                 "model.box_anchor")
# transformers' own classes of RT-DETR's default encoder activations (GELU, SiLU): identity rule like nn.GELU
_ACTIVATIONS = ("GELUActivation", "SiLUActivation")
# RTDetrImageProcessor's defaults (640x640, pixels in [0, 1], no normalisation), for a model without its own
PROCESSOR_DEFAULTS = {"height": 640, "width": 640, "rescale_factor": 1 / 255,
                      "image_mean": (0.0, 0.0, 0.0), "image_std": (1.0, 1.0, 1.0)}


class RTDetrAdapter(HFDetectionAdapter):
    """``transformers.RTDetrForObjectDetection`` (and its parts) with a transformers ResNet backbone."""

    name = "rt_detr"
    modeling = "transformers.models.rt_detr.modeling_rt_detr"
    model_classes = ("RTDetrForObjectDetection",)
    attention_classes = ("RTDetrSelfAttention",)
    conv_norm_attributes = (("convolution", "normalization"), ("conv", "norm"), ("0", "1"))  # ("0", "1"): Sequential
    stops = ("pixels", "backbone", "encoder_input", "encoder_layers", "memory", "query_init", "decoder_layers")
    default_stops = ("pixels", "encoder_input", "memory")
    encoder_stops = ("pixels", "backbone", "encoder_input", "encoder_layers")
    reference_chain = True

    def prepare(self, model, image, channel_order="RGB"):
        with _processor_defaults(model):
            return super().prepare(model, image, channel_order)

    def input_bounds(self, model, x):
        with _processor_defaults(model):
            return super().input_bounds(model, x)

    def module_kind(self, name, module):
        if is_hf_class(module, "transformers.activations", _ACTIVATIONS):
            return "elementwise"
        return super().module_kind(name, module)

    @contextlib.contextmanager
    def connect(self, model: nn.Module) -> Iterator[None]:
        """The decoder starts from the top-k memory tokens' content, which the model detaches: feed it the same
        tokens gathered again, connected (the selection itself, a top-k, carries no relevance)."""
        inner, seen = model.model, {}

        def on_decoder(_m, args, kwargs):
            index = seen["scores"].max(-1).values.topk(model.config.num_queries, dim=1).indices  # the model's top-k
            memory = seen["memory"]
            content = memory.gather(1, index[..., None].expand(-1, -1, memory.shape[-1]))
            if not torch.equal(content, kwargs["inputs_embeds"]):
                raise EngineError("RT-DETR's decoder queries are not the top-k memory tokens' content this adapter "
                                  "reconnects (learn_initial_query, or denoising queries: call model.eval())")
            return args, {**kwargs, "inputs_embeds": content}

        handles = [inner.enc_output.register_forward_hook(lambda _m, _a, out: seen.update(memory=out)),
                   inner.enc_score_head.register_forward_hook(lambda _m, _a, out: seen.update(scores=out)),
                   inner.decoder.register_forward_pre_hook(on_decoder, with_kwargs=True)]
        with hooks(handles), super().connect(model):
            yield

    @contextlib.contextmanager
    def record(self, model: nn.Module, ledger: Ledger) -> Iterator[Records]:
        """Hooks recording the stops (the attention kernels book the position embeddings they use)."""
        records = Records()
        rec = records.tensors
        rec["upstream"] = _stage_prefixes(model)
        inner = model.model

        def on_backbone(_m, _args, out):  # [(feature map, mask)] per backbone stage
            rec["backbone"] = [f for f, _ in out]

        def on_encoder(_m, args, kwargs):  # a copy: the encoder writes its transformer's output into the list
            rec["encoder_input"] = list(kwargs["inputs_embeds"] if "inputs_embeds" in kwargs else args[0])

        def on_decoder(_m, _args, kwargs):
            rec["query_init"] = kwargs["inputs_embeds"]
            records.spatial_shapes = [(int(h), int(w)) for h, w in kwargs["spatial_shapes_list"]]

        handles = [inner.backbone.register_forward_hook(on_backbone),
                   inner.encoder.register_forward_pre_hook(on_encoder, with_kwargs=True),
                   inner.decoder.register_forward_pre_hook(on_decoder, with_kwargs=True),
                   *memory_and_layer_hooks(rec, inner.decoder,
                                           [layer for aifi in inner.encoder.aifi for layer in aifi.layers])]
        decoder, rec["box_deltas"] = inner.decoder, {}

        def on_last_layer(_m, _args, kwargs):  # the box the last layer refines (B, Q, 1, 4)
            rec["last_reference"] = kwargs["reference_points"]

        if decoder.bbox_embed is not None:
            handles += [head.register_forward_hook(last_output(rec["box_deltas"], str(i)))
                        for i, head in enumerate(decoder.bbox_embed[:len(decoder.layers) - 1])]
            handles.append(decoder.layers[-1].register_forward_pre_hook(on_last_layer, with_kwargs=True))
        handles += [inner.enc_score_head.register_forward_hook(last_output(rec, "proposal_scores")),
                    inner.enc_bbox_head.register_forward_hook(last_output(rec, "proposal_deltas"))]

        def anchors(*args, **kwargs):  # the encoder tokens' grid anchors: constant, booked
            values, valid = generate(*args, **kwargs)
            rec["anchors"] = book_finite(ledger, "model.box_anchor", values)
            return rec["anchors"], valid

        generate, fixed = inner.generate_anchors, inner.__dict__.get("anchors")
        inner.generate_anchors = anchors
        if isinstance(fixed, torch.Tensor):  # anchor_image_size: the anchors computed once, read in eval
            inner.anchors = rec["anchors"] = book_finite(ledger, "model.box_anchor", fixed)
        try:
            with hooks(handles), self.cut_chain(ledger):
                yield records
        finally:
            del inner.generate_anchors
            if isinstance(fixed, torch.Tensor):
                inner.anchors = fixed

    def box_head(self, model):
        heads = model.model.decoder.bbox_embed
        return None if heads is None else heads[len(model.model.decoder.layers) - 1]

    def final_box_logits(self, model, out, head, records):
        reference = records.tensors.get("last_reference")
        if reference is None:
            return None
        return head + sys.modules[type(model).__module__].inverse_sigmoid(reference.squeeze(2))

    def box_stages(self, model, records, head):
        rec = records.tensors
        if head is None or "proposal_scores" not in rec:
            return None
        index = rec["proposal_scores"].max(-1).values.topk(model.config.num_queries, dim=1).indices  # the model's
        index = index[..., None].expand(-1, -1, 4)
        steps = {"proposal": rec["proposal_deltas"].gather(1, index), **rec["box_deltas"],
                 str(len(model.model.decoder.layers) - 1): head}
        return rec["anchors"].to(head.dtype).gather(1, index), steps

    def stop_tensors(self, records: Records, stop: str, levels: Sequence) -> list[StopTensor]:
        rec = records.tensors
        if stop == "encoder_input":  # one map per level, concatenated into the memory's token order
            return [StopTensor(stop, stop, t, "map", level=i) for i, t in enumerate(rec[stop])]
        if stop == "query_init":
            return [StopTensor(stop, stop, rec[stop], "tokens")]
        return super().stop_tensors(records, stop, levels)

    def ledger_scope(self, stops: Sequence[str]):
        if "pixels" in stops or "backbone" in stops:  # the backbone cut sits inside the body: its cut filters
            return lambda entry: True
        if "encoder_input" in stops or "encoder_layers" in stops:
            return lambda entry: not entry.name.startswith(_UPSTREAM_OF_ENCODER)
        return lambda entry: entry.name.startswith(_AFTER_MEMORY)

    def cuts(self, records: Records) -> list[Cut]:
        # every later stage reads the shallowest feature, so it carries all relevance of the body's output;
        # the encoder reads only its input maps; the decoder and the query selection only the memory
        upstream = records.tensors.get("upstream")
        body = [Cut("backbone", ("backbone",), ("backbone.stage0",), lambda entry: not entry.name.startswith(upstream))]
        return (body if upstream else []) + [
            Cut("encoder_input", ("encoder_input",), ("encoder_input",),
                lambda entry: not entry.name.startswith(_UPSTREAM_OF_ENCODER)),
            Cut("memory", ("memory",), ("memory",), lambda entry: entry.name.startswith(_AFTER_MEMORY)),
        ]

    def encoder_output(self, records: Records) -> torch.Tensor:
        return records.tensors["memory"]


class RTDetrV2Adapter(RTDetrAdapter):
    """``transformers.RTDetrV2ForObjectDetection``: RT-DETR with v2's placement of the decoder's samples."""

    name = "rt_detr_v2"
    modeling = "transformers.models.rt_detr_v2.modeling_rt_detr_v2"
    model_classes = ("RTDetrV2ForObjectDetection",)
    attention_classes = ("RTDetrV2SelfAttention",)

    def check(self, model: nn.Module) -> None:
        super().check(model)
        if model.config.decoder_method != "default":
            raise EngineError(f"RT-DETR v2 with decoder_method={model.config.decoder_method!r} is not supported "
                              "(its rounded sampling has no deformable-rule kernel): use decoder_method='default'")

    def kernel(self, module, kind, steps, track):
        if kind == "deform_attn" and is_deformable(module):
            return deformable_kernel(module, steps, track, locations=_v2_locations)
        return super().kernel(module, kind, steps, track)


def _v2_locations(module: nn.Module, reference_points: torch.Tensor, offsets: torch.Tensor, shapes) -> torch.Tensor:
    """v2's sampling locations (N, Lq, H, L, P, 2): box offsets scaled per point and by ``offset_scale``."""
    if reference_points.shape[-1] != 4:
        return da.sampling_locations(module, reference_points, offsets, shapes)
    flat = offsets.flatten(3, 4)  # (N, Lq, H, L·P, 2), v2's own layout and order of operations
    scale = module.n_points_scale.to(dtype=flat.dtype).unsqueeze(-1)
    where = reference_points[:, :, None, :, :2] + flat * scale * reference_points[:, :, None, :, 2:] * module.offset_scale
    return where.view(offsets.shape)


@contextlib.contextmanager
def _processor_defaults(model: nn.Module) -> Iterator[None]:
    """RT-DETR's processor settings (``lrp_preprocess``) while the shared code reads them, if the model has none."""
    if getattr(model, "lrp_preprocess", None):
        yield
        return
    missing = object()
    before = model.__dict__.get("lrp_preprocess", missing)
    model.lrp_preprocess = PROCESSOR_DEFAULTS
    try:
        yield
    finally:
        if before is missing:
            del model.lrp_preprocess
        else:
            model.lrp_preprocess = before


def _stage_prefixes(model: nn.Module) -> tuple[str, ...] | None:
    """Name prefixes of the ResNet modules up to the shallowest backbone output (None: not a transformers ResNet)."""
    body = getattr(model.model.backbone, "model", None)
    if not hasattr(getattr(body, "encoder", None), "stages") or not hasattr(body, "stage_names"):
        return None
    last = body.stage_names.index(body.out_features[0])  # "stem" is 0, "stage1" is encoder.stages[0]
    return ("model.backbone.model.embedder.",) + tuple(f"model.backbone.model.encoder.stages.{i}." for i in range(last))
