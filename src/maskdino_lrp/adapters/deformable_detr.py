"""Hugging Face Deformable DETR's adapter (``transformers.DeformableDetrForObjectDetection``: single-stage,
iterative box refinement, two-stage; a transformers ResNet backbone).

Structure read from transformers' ``modeling_deformable_detr.py``: several backbone stages, each projected
(``input_proj``: conv + group norm) to one encoder level; the encoder and the decoder's cross-attention are
multi-scale deformable attention (:mod:`.hf_deformable`, under the deformable rule), the decoder's
self-attention is DETR-style (``DeformableDetrSelfAttention``); position embeddings (sine + level embedding,
the query position embeddings) are booked where each attention adds them. The query content is a learned
embedding (single-stage) or, two-stage, a projection of the sine embedding of detached proposal boxes: that
embedding is booked at ``pos_trans``. Scores are sigmoids.

Boxes: the final box is the last layer's box head on the inverse sigmoid of the reference it refines
(``box_logits``). With box refinement, transformers detaches each layer's refined box, and two-stage the top-k
proposal boxes; ``connect`` keeps that chain connected (:func:`~.hf_common.chain_detaches`), so a box's relevance
reaches every layer's box head and, two-stage, the proposal's box head on its encoder token; the proposals' grid
anchors (``gen_encoder_output_proposals``) are booked as positional. Reference points reach the decoder only as
sampling locations (detached by the kernel) and, two-stage, through the booked sine embedding: class
explanations do not depend on the chain. Two-stage, ``box_anchor`` and ``box_refinements`` (``proposal``,
``0`` … per layer) serve the ``refine:*`` targets.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from torch import nn

from ..lrp.engine import Ledger
from .base import Cut, Records, hooks
from .hf_common import HFDetectionAdapter, book_finite, book_input, last_output, memory_and_layer_hooks


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
    upstream_of_encoder = ("model.backbone.", "model.input_proj.")
    upstream_of_memory = upstream_of_encoder + ("model.encoder.", "model.level_embed")
    reference_chain = True

    @contextlib.contextmanager
    def record(self, model: nn.Module, ledger: Ledger) -> Iterator[Records]:
        """Hooks recording the stops; two-stage, the proposals' sine embedding is booked as positional."""
        records = Records()
        rec = records.tensors
        rec["stage_prefixes"] = _stage_prefixes(model, 0)
        inner = model.model

        def on_backbone(_m, _args, out):  # [(feature map, mask)] per backbone output
            rec["backbone"] = [f for f, _ in out]

        def on_encoder(_m, _args, kwargs):
            rec["encoder_input"] = kwargs["inputs_embeds"]
            records.spatial_shapes = [tuple(int(v) for v in s) for s in kwargs["spatial_shapes_list"]]

        handles = [inner.backbone.register_forward_hook(on_backbone),
                   inner.encoder.register_forward_pre_hook(on_encoder, with_kwargs=True),
                   *memory_and_layer_hooks(rec, inner.decoder, inner.encoder.layers)]
        if getattr(inner, "pos_trans", None) is not None:
            handles.append(inner.pos_trans.register_forward_pre_hook(book_input(ledger, "model.pos_trans.input")))
        decoder = inner.decoder
        rec["box_deltas"] = {}
        if decoder.bbox_embed is not None:
            handles += [head.register_forward_hook(last_output(rec["box_deltas"], str(i)))
                        for i, head in enumerate(decoder.bbox_embed[:len(decoder.layers) - 1])]
        if model.config.two_stage:  # the proposal heads: the last of the decoder's heads
            handles += [decoder.class_embed[-1].register_forward_hook(last_output(rec, "proposal_scores")),
                        decoder.bbox_embed[-1].register_forward_hook(last_output(rec, "proposal_deltas"))]

        def proposals(*args, **kwargs):  # the grid anchors of the encoder tokens: constant, booked
            tokens, anchors = generate(*args, **kwargs)
            rec["anchors"] = book_finite(ledger, "model.box_anchor", anchors)
            return tokens, rec["anchors"]

        generate = inner.gen_encoder_output_proposals
        inner.gen_encoder_output_proposals = proposals
        try:
            with hooks(handles), self.cut_chain(ledger):
                yield records
        finally:
            del inner.gen_encoder_output_proposals

    def box_head(self, model):
        return model.bbox_embed[model.config.decoder_layers - 1]

    def final_box_logits(self, model, out, head, records):
        layers = model.config.decoder_layers
        reference = out.init_reference_points if layers == 1 else out.intermediate_reference_points[:, layers - 2]
        if reference.shape[-1] == 2:  # the head's output got the centre's reference added in place
            return head
        return head + sys.modules[type(model).__module__].inverse_sigmoid(reference)

    def box_stages(self, model, records, head):
        rec = records.tensors
        if not model.config.two_stage or "proposal_scores" not in rec or head is None:
            return None  # single-stage: the first reference is learned, there is no constant anchor
        index = rec["proposal_scores"][..., 0].topk(model.config.two_stage_num_proposals, dim=1).indices
        index = index[..., None].expand(-1, -1, 4)  # the model's top-k, gathered as it gathers them
        steps = {"proposal": rec["proposal_deltas"].gather(1, index), **rec["box_deltas"],
                 str(model.config.decoder_layers - 1): head}
        return rec["anchors"].gather(1, index), steps

    def cuts(self, records: Records) -> list[Cut]:
        cuts = []
        upstream = records.tensors.get("stage_prefixes")
        if upstream is not None:  # every level reads the first output or a later stage, which reads it
            cuts.append(Cut("backbone", ("backbone",), ("backbone.stage0",),
                            lambda entry: not entry.name.startswith(upstream)))
        return cuts + self.token_cuts()
