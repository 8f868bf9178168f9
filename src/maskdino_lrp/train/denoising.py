"""Denoising training (DN-DETR / DINO; MaskDINO's ``DN: "seg"``) for the MaskDINO decoder.

For training, :func:`training_forward` runs the same computation as ``MaskDINO.forward`` (backbone →
pixel decoder → ``MaskDINODecoder.forward``) and optionally prepends denoising queries: ``groups`` noised
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

from ..model.decoder import MaskDINODecoder, inverse_sigmoid


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
    out, dn_out = dec(multi_scale, mask_features, None, dn=dn)
    if dn_out is not None:
        out["dn_outputs"] = dn_out
        out["dn_indices"] = dn_indices(targets, dn)
        out["dn_groups"] = dn.groups
    return out
