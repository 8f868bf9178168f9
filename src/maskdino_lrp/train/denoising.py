"""Denoising training (DN-DETR / DINO; MaskDINO's ``DN: "seg"``) for the MaskDINO decoder.

The model's decoder implements inference only. For training, :func:`training_forward` runs the same
computation as ``MaskDINO.forward`` (backbone → pixel decoder → ``MaskDINODecoder.forward``, step by
step with the decoder's own modules), and optionally prepends denoising queries: ``groups`` noised
copies of the ground-truth objects (labels flipped with probability ``noise_scale / 2``, box centres
and sizes jittered by up to ``noise_scale`` × half size / size), which the decoder has to reconstruct.
An attention mask keeps the matching queries from seeing them and the groups from seeing each other.
The denoising outputs have a fixed assignment (query ``g·pad + k`` ↔ object ``k``), so they train the
decoder without Hungarian matching; they are cut off before the matching outputs, which are exactly
what the decoder itself returns.

Without denoising queries, :func:`training_forward` equals ``model(images)`` (tested).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from ..model.decoder import MaskDINODecoder, gen_encoder_output_proposals, inverse_sigmoid
from ..model.pixel_decoder import get_valid_ratio


@dataclass
class DNQueries:
    """Denoising queries of one batch."""

    label: torch.Tensor  # (B, pad, C) content: label embeddings of the noised labels (zeros where padding)
    bbox: torch.Tensor  # (B, pad, 4) noised boxes, inverse-sigmoid
    attn_mask: torch.Tensor  # (pad + Q, pad + Q) bool, True = may not attend
    pad_size: int  # groups × single_pad
    single_pad: int  # queries per group (the most objects in an image of the batch)
    groups: int


def make_dn_queries(targets: Sequence[Mapping[str, torch.Tensor]], decoder: MaskDINODecoder, dn_num: int,
                    noise_scale: float) -> DNQueries | None:
    """Noised ground-truth queries as in the official ``prepare_for_dn``; None when there is nothing to denoise."""
    counts = [int(len(t["labels"])) for t in targets]
    most = max(counts, default=0)
    groups = dn_num // most if most else 0
    if groups == 0:
        return None
    device = decoder.label_enc.weight.device
    labels = torch.cat([t["labels"] for t in targets]).to(device).long().repeat(groups)
    boxes = torch.cat([t["boxes"] for t in targets]).to(device).float().repeat(groups, 1)
    batch = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(counts)]).to(device).repeat(groups)
    if noise_scale > 0:
        flip = torch.rand(labels.shape, device=device) < noise_scale * 0.5
        labels = torch.where(flip, torch.randint_like(labels, 0, decoder.num_classes), labels)
        span = torch.cat([boxes[:, 2:] / 2, boxes[:, 2:]], dim=1)  # centre ± w/2, size ± w (× noise_scale)
        boxes = (boxes + (torch.rand_like(boxes) * 2 - 1) * span * noise_scale).clamp(0.0, 1.0)
    single_pad = most
    pad = single_pad * groups
    bsz = len(targets)
    slot = torch.cat([torch.arange(n) for n in counts]).to(device)
    slot = torch.cat([slot + g * single_pad for g in range(groups)])
    label = torch.zeros(bsz, pad, decoder.hidden_dim, device=device)
    bbox = torch.zeros(bsz, pad, 4, device=device)
    label = label.index_put((batch, slot), decoder.label_enc(labels))
    bbox = bbox.index_put((batch, slot), inverse_sigmoid(boxes))
    total = pad + decoder.num_queries
    attn_mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    attn_mask[pad:, :pad] = True  # matching queries never see the ground truth
    for g in range(groups):  # a group sees itself (and the matching queries) only
        start, end = g * single_pad, (g + 1) * single_pad
        attn_mask[start:end, :start] = True
        attn_mask[start:end, end:pad] = True
    return DNQueries(label, bbox, attn_mask, pad, single_pad, groups)


def dn_indices(targets: Sequence[Mapping[str, torch.Tensor]], dn: DNQueries) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed assignment of denoising queries to objects: (query indices, object indices) per image."""
    out = []
    for t in targets:
        n = int(len(t["labels"]))
        k = torch.arange(n, dtype=torch.long)
        src = (torch.arange(dn.groups, dtype=torch.long)[:, None] * dn.single_pad + k[None]).flatten()
        out.append((src, k.repeat(dn.groups)))
    return out


def decoder_forward(dec: MaskDINODecoder, x: Sequence[torch.Tensor], mask_features: torch.Tensor,
                    masks: Sequence[torch.Tensor] | None = None, dn: DNQueries | None = None
                    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``MaskDINODecoder.forward`` with optional denoising queries; returns (outputs, denoising outputs)."""
    if len(x) != dec.num_feature_levels:
        raise ValueError(f"decoder expects {dec.num_feature_levels} feature levels, got {len(x)}")
    use_masks = masks is not None and any(s.size(2) % 32 or s.size(3) % 32 for s in x)
    if not use_masks:
        masks = [torch.zeros((s.size(0), s.size(2), s.size(3)), device=s.device, dtype=torch.bool) for s in x]
    src_flatten, mask_flatten, shapes = [], [], []
    for i in range(dec.num_feature_levels):
        idx = dec.num_feature_levels - 1 - i
        bs, _, h, w = x[idx].shape
        shapes.append((h, w))
        src_flatten.append(dec.input_proj[idx](x[idx]).flatten(2).transpose(1, 2))
        mask_flatten.append(masks[i].flatten(1))
    src_flatten = torch.cat(src_flatten, 1)
    mask_flatten = torch.cat(mask_flatten, 1)
    spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=src_flatten.device)
    level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
    valid_ratios = torch.stack([get_valid_ratio(m) for m in masks], 1)

    predictions_class, predictions_mask = [], []
    interm_outputs = None
    if dec.two_stage:
        output_memory, output_proposals = gen_encoder_output_proposals(src_flatten, mask_flatten, spatial_shapes)
        output_memory = dec.enc_output_norm(dec.enc_output(output_memory))
        enc_class = dec.class_embed(output_memory)
        enc_coord = dec._bbox_embed(output_memory) + output_proposals
        topk_proposals = torch.topk(enc_class.max(-1)[0], dec.num_queries, dim=1)[1]
        refpoint_embed_undetach = torch.gather(enc_coord, 1, topk_proposals.unsqueeze(-1).repeat(1, 1, 4))
        refpoint_embed = refpoint_embed_undetach.detach()
        tgt_undetach = torch.gather(output_memory, 1, topk_proposals.unsqueeze(-1).repeat(1, 1, dec.hidden_dim))
        outputs_class, outputs_mask = dec.forward_prediction_heads(tgt_undetach.transpose(0, 1), mask_features)
        tgt = tgt_undetach.detach() if dec.detach_query_content else tgt_undetach
        if dec.learn_tgt:
            tgt = dec.query_feat.weight[None].repeat(bs, 1, 1)
        interm_outputs = {"pred_logits": outputs_class, "pred_boxes": refpoint_embed_undetach.sigmoid(),
                          "pred_masks": outputs_mask}
        if dec.initialize_box_type != "no":
            refpoint_embed = dec._boxes_from_masks(outputs_mask)
    else:
        tgt = dec.query_feat.weight[None].repeat(bs, 1, 1)
        refpoint_embed = dec.query_embed.weight[None].repeat(bs, 1, 1)

    tgt_mask = None
    if dn is not None:
        tgt = torch.cat([dn.label, tgt], dim=1)
        tgt_mask = dn.attn_mask
    if dec.initial_pred:
        outputs_class, outputs_mask = dec.forward_prediction_heads(tgt.transpose(0, 1), mask_features, dec.training)
        predictions_class.append(outputs_class)
        predictions_mask.append(outputs_mask)
    if dn is not None:
        refpoint_embed = torch.cat([dn.bbox, refpoint_embed], dim=1)

    hs, references = dec.decoder(
        tgt=tgt.transpose(0, 1), memory=src_flatten.transpose(0, 1), memory_key_padding_mask=mask_flatten,
        pos=None, refpoints_unsigmoid=refpoint_embed.transpose(0, 1), level_start_index=level_start_index,
        spatial_shapes=spatial_shapes, valid_ratios=valid_ratios, tgt_mask=tgt_mask)
    for i, output in enumerate(hs):
        outputs_class, outputs_mask = dec.forward_prediction_heads(
            output.transpose(0, 1), mask_features, dec.training or i == len(hs) - 1)
        predictions_class.append(outputs_class)
        predictions_mask.append(outputs_mask)
    if dec.initial_pred:
        out_boxes = dec.pred_box(references, hs, refpoint_embed.sigmoid())
    else:
        out_boxes = dec.pred_box(references, hs)

    dn_out = None
    if dn is not None:
        p = dn.pad_size
        dn_class = [c[:, :p] for c in predictions_class]
        dn_mask = [m[:, :p] if m is not None else None for m in predictions_mask]
        dn_boxes = out_boxes[:, :, :p]
        predictions_class = [c[:, p:] for c in predictions_class]
        predictions_mask = [m[:, p:] if m is not None else None for m in predictions_mask]
        out_boxes = out_boxes[:, :, p:]
        dn_out = {"pred_logits": dn_class[-1], "pred_masks": dn_mask[-1], "pred_boxes": dn_boxes[-1],
                  "aux_outputs": dec._set_aux_loss(dn_class, dn_mask, dn_boxes)}
    out = {
        "pred_logits": predictions_class[-1],
        "pred_masks": predictions_mask[-1],
        "pred_boxes": out_boxes[-1],
        "aux_outputs": dec._set_aux_loss(predictions_class, predictions_mask, out_boxes),
    }
    if dec.two_stage:
        out["interm_outputs"] = interm_outputs
    return out, dn_out


def training_forward(model: torch.nn.Module, images: torch.Tensor,
                     targets: Sequence[Mapping[str, torch.Tensor]] | None = None, dn_num: int = 0,
                     noise_scale: float = 0.4) -> dict[str, Any]:
    """``model(images)`` plus, when ``dn_num > 0`` and targets are given, denoising outputs under
    ``"dn_outputs"`` (with ``"dn_indices"`` and ``"dn_groups"`` for the criterion)."""
    features = model.backbone(images)
    head = model.sem_seg_head
    mask_features, _, multi_scale = head.pixel_decoder.forward_features(features, None)
    dec = head.predictor
    dn = make_dn_queries(targets, dec, dn_num, noise_scale) if (dn_num > 0 and targets is not None) else None
    out, dn_out = decoder_forward(dec, multi_scale, mask_features, None, dn)
    if dn_out is not None:
        out["dn_outputs"] = dn_out
        out["dn_indices"] = dn_indices(targets, dn)
        out["dn_groups"] = dn.groups
    return out
