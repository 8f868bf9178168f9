"""MaskDINO's transformer decoder (``MaskDINODecoder``), inference path.

Official module names, so official ``sem_seg_head.predictor.*`` keys load unchanged. As in the official
code some modules are shared: ``decoder.norm`` *is* ``decoder_norm``, and ``_bbox_embed``,
``bbox_embed.{i}`` and ``decoder.bbox_embed.{i}`` are one MLP (the same tensors under several keys).

Hooks for relevance propagation (the model stays otherwise LRP-agnostic):

- ``MaskDINODecoder.detach_query_content`` (default True = official): the two-stage query content is
  the selected encoder memory, detached; False keeps it connected.
- ``MaskDINODecoder.mask_product`` (:class:`MaskProduct`, ``equation`` "bqc,bchw->bqhw"): mask logits.
- ``MaskDINODecoder.box_sigmoid`` (``nn.Sigmoid``): the sigmoid of each layer's refined box in
  :meth:`MaskDINODecoder.pred_box`.
- The reference-box chain: ``detach_reference`` on :class:`MaskDINODecoder` and :class:`TransformerDecoder`
  (default True = official) detaches the initial boxes and each layer's refined box before the next layer
  reads it; False keeps the chain connected. Its round trip between box and inverse-sigmoid space runs through
  modules (``nn.Sigmoid``, :class:`InverseSigmoid`), so a rule can be attached to each. Named points
  (``nn.Identity``): ``MaskDINODecoder.box_anchor`` (the constant part of the initial boxes: the proposal
  token's grid anchor, or the box of the thresholded interim mask), ``MaskDINODecoder.proposal_delta`` (the
  box head's delta on the selected encoder tokens), ``TransformerDecoder.box_delta`` (each layer's delta on
  the box the next layer reads) and ``MaskDINODecoder.box_delta`` (each layer's delta in its predicted box).
- Activations are modules (``nn.ReLU``) in decoder layers and MLPs.

Denoising queries (training only) are not implemented; ``targets`` is accepted and unused.
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import nn

from .deform_attn import MSDeformAttn
from .layers import Conv2d, post_norm_ffn, with_pos_embed
from .pixel_decoder import activation_module, c2_xavier_fill, get_valid_ratio
from .position_encoding import gen_sineembed_for_position

__all__ = [
    "MLP",
    "MaskProduct",
    "inverse_sigmoid",
    "InverseSigmoid",
    "gen_encoder_output_proposals",
    "masks_to_boxes",
    "bitmasks_to_boxes",
    "box_xyxy_to_cxcywh",
    "DeformableTransformerDecoderLayer",
    "TransformerDecoder",
    "MaskDINODecoder",
]


# ----------------------------------------------------------------------------- small pieces
class MLP(nn.Module):
    """Linear layers with ReLU between them (none after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        self.num_layers = num_layers
        hidden = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + hidden, hidden + [output_dim]))
        self.activation = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = self.activation(x)
        return x


class MaskProduct(nn.Module):
    """Parameterless bilinear product of two variable tensors: ``einsum(equation, a, b)``."""

    def __init__(self, equation: str = "bqc,bchw->bqhw"):
        super().__init__()
        self.equation = equation

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.einsum(self.equation, a, b)

    def extra_repr(self) -> str:
        return repr(self.equation)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """log(x / (1 - x)) with x clamped into [0, 1] and both terms at least ``eps``."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class InverseSigmoid(nn.Module):
    """:func:`inverse_sigmoid` as a parameterless module (an elementwise map a rule can be attached to)."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return inverse_sigmoid(x, self.eps)


def box_xyxy_to_cxcywh(x: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = x.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0), (y1 - y0)], dim=-1)


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Official ``box_ops.masks_to_boxes``: inclusive pixel-index xyxy boxes of (N, H, W) masks.

    An empty mask gives (1e8, 1e8, 0, 0), as official.
    """
    if masks.numel() == 0:
        return torch.zeros((0, 4), device=masks.device)
    h, w = masks.shape[-2:]
    y = torch.arange(0, h, dtype=torch.float, device=masks.device)
    x = torch.arange(0, w, dtype=torch.float, device=masks.device)
    y, x = torch.meshgrid(y, x, indexing="ij")
    x_mask = masks * x.unsqueeze(0)
    x_max = x_mask.flatten(1).max(-1)[0]
    x_min = x_mask.masked_fill(~masks.bool(), 1e8).flatten(1).min(-1)[0]
    y_mask = masks * y.unsqueeze(0)
    y_max = y_mask.flatten(1).max(-1)[0]
    y_min = y_mask.masked_fill(~masks.bool(), 1e8).flatten(1).min(-1)[0]
    return torch.stack([x_min, y_min, x_max, y_max], 1)


def bitmasks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """detectron2 ``BitMasks.get_bounding_boxes``: tight xyxy boxes, right/bottom exclusive; empty → zeros."""
    n, h, w = masks.shape
    x_any = masks.any(dim=1)  # (N, W)
    y_any = masks.any(dim=2)  # (N, H)
    nonempty = x_any.any(dim=1) & y_any.any(dim=1)
    cols = torch.arange(w, device=masks.device)
    rows = torch.arange(h, device=masks.device)
    x0 = torch.where(x_any, cols, w).min(dim=1)[0]
    x1 = torch.where(x_any, cols, -1).max(dim=1)[0] + 1
    y0 = torch.where(y_any, rows, h).min(dim=1)[0]
    y1 = torch.where(y_any, rows, -1).max(dim=1)[0] + 1
    boxes = torch.stack([x0, y0, x1, y1], dim=1).to(torch.float32)
    return torch.where(nonempty[:, None], boxes, torch.zeros_like(boxes))


def gen_encoder_output_proposals(memory: torch.Tensor, memory_padding_mask: torch.Tensor,
                                 spatial_shapes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One proposal box per memory token: its pixel centre, size 0.05·2^level (inverse-sigmoid space).

    Returns (memory with invalid / padded tokens zeroed, proposals (B, ΣHW, 4) unsigmoided, inf where
    invalid — centre or size outside (0.01, 0.99) — or padded).
    """
    n = memory.shape[0]
    proposals = []
    cur = 0
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        mask_l = memory_padding_mask[:, cur:cur + h * w].view(n, h, w, 1)
        valid_h = torch.sum(~mask_l[:, :, 0, 0], 1)
        valid_w = torch.sum(~mask_l[:, 0, :, 0], 1)
        grid_y, grid_x = torch.meshgrid(
            torch.linspace(0, h - 1, h, dtype=torch.float32, device=memory.device),
            torch.linspace(0, w - 1, w, dtype=torch.float32, device=memory.device), indexing="ij")
        grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
        scale = torch.cat([valid_w.unsqueeze(-1), valid_h.unsqueeze(-1)], 1).view(n, 1, 1, 2)
        grid = (grid.unsqueeze(0).expand(n, -1, -1, -1) + 0.5) / scale
        wh = torch.ones_like(grid) * 0.05 * (2.0 ** lvl)
        proposals.append(torch.cat((grid, wh), -1).view(n, -1, 4))
        cur += h * w
    output_proposals = torch.cat(proposals, 1)
    valid = ((output_proposals > 0.01) & (output_proposals < 0.99)).all(-1, keepdim=True)
    output_proposals = torch.log(output_proposals / (1 - output_proposals))
    output_proposals = output_proposals.masked_fill(memory_padding_mask.unsqueeze(-1), float("inf"))
    output_proposals = output_proposals.masked_fill(~valid, float("inf"))
    output_memory = memory.masked_fill(memory_padding_mask.unsqueeze(-1), 0.0)
    output_memory = output_memory.masked_fill(~valid, 0.0)
    return output_memory, output_proposals


# ----------------------------------------------------------------------------- decoder layers
class DeformableTransformerDecoderLayer(nn.Module):
    """Post-norm decoder layer. Forward order: self-attn → add → norm2 → deformable cross-attn → add →
    norm1 → FFN → add → norm3 (definition order differs, as official, so keys match)."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, activation: str = "relu",
                 n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = activation_module(activation)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    with_pos_embed = staticmethod(with_pos_embed)

    def forward_ffn(self, tgt: torch.Tensor) -> torch.Tensor:
        return post_norm_ffn(tgt, self.linear1, self.activation, self.dropout3, self.linear2, self.dropout4, self.norm3)

    def forward(self, tgt: torch.Tensor, tgt_query_pos: torch.Tensor | None = None,
                tgt_query_sine_embed: torch.Tensor | None = None, tgt_key_padding_mask: torch.Tensor | None = None,
                tgt_reference_points: torch.Tensor | None = None, memory: torch.Tensor | None = None,
                memory_key_padding_mask: torch.Tensor | None = None,
                memory_level_start_index: torch.Tensor | None = None,
                memory_spatial_shapes: torch.Tensor | None = None, memory_pos: torch.Tensor | None = None,
                self_attn_mask: torch.Tensor | None = None, cross_attn_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """tgt / tgt_query_pos (Nq, B, C), tgt_reference_points (Nq, B, L, 4), memory (ΣHW, B, C) → (Nq, B, C)."""
        q = k = self.with_pos_embed(tgt, tgt_query_pos)
        attended = self.self_attn(q, k, tgt, attn_mask=self_attn_mask)[0]
        tgt = self.norm2(tgt + self.dropout2(attended))
        attended = self.cross_attn(self.with_pos_embed(tgt, tgt_query_pos).transpose(0, 1),
                                   tgt_reference_points.transpose(0, 1).contiguous(),
                                   memory.transpose(0, 1), memory_spatial_shapes, memory_level_start_index,
                                   memory_key_padding_mask).transpose(0, 1)
        tgt = self.norm1(tgt + self.dropout1(attended))
        return self.forward_ffn(tgt)


class TransformerDecoder(nn.Module):
    """DINO's deformable decoder with iterative box refinement (``bbox_embed`` set by the owner)."""

    def __init__(self, decoder_layer: nn.Module, num_layers: int, norm: nn.Module | None = None,
                 return_intermediate: bool = True, d_model: int = 256, query_dim: int = 4,
                 num_feature_levels: int = 1, dec_layer_share: bool = False):
        super().__init__()
        if not return_intermediate:
            raise ValueError("TransformerDecoder supports return_intermediate=True only (as official)")
        if query_dim not in (2, 4):
            raise ValueError(f"query_dim must be 2 or 4, got {query_dim}")
        if num_layers > 0:
            layers = [decoder_layer] * num_layers if dec_layer_share else \
                [copy.deepcopy(decoder_layer) for _ in range(num_layers)]
            self.layers = nn.ModuleList(layers)
        else:
            self.layers = nn.ModuleList()
        self.num_layers = num_layers
        self.norm = norm
        self.return_intermediate = return_intermediate
        self.query_dim = query_dim
        self.num_feature_levels = num_feature_levels
        self.ref_point_head = MLP(query_dim // 2 * d_model, d_model, d_model, 2)
        self.query_scale = None  # official rm_dec_query_scale=True
        self.bbox_embed: nn.ModuleList | None = None
        self.class_embed = None
        self.d_model = d_model
        # the box round trip as modules, and the hook that keeps the chain connected (see the module docstring)
        self.detach_reference = True
        self.ref_sigmoid = nn.Sigmoid()
        self.ref_logit = InverseSigmoid()
        self.box_delta = nn.Identity()
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, tgt_mask: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, tgt_key_padding_mask: torch.Tensor | None = None,
                memory_key_padding_mask: torch.Tensor | None = None, pos: torch.Tensor | None = None,
                refpoints_unsigmoid: torch.Tensor | None = None, level_start_index: torch.Tensor | None = None,
                spatial_shapes: torch.Tensor | None = None, valid_ratios: torch.Tensor | None = None
                ) -> list[list[torch.Tensor]]:
        """tgt (Nq, B, C), memory (ΣHW, B, C), refpoints_unsigmoid (Nq, B, 4).

        Returns [normed outputs per layer (B, Nq, C)], [reference boxes (B, Nq, 4): initial + one per layer].
        The new boxes are detached before the next layer (as official, unless ``detach_reference`` is False)
        but returned undetached.
        """
        output = tgt
        reference_points = self.ref_sigmoid(refpoints_unsigmoid)
        intermediate = []
        ref_points = [reference_points]
        for layer_id, layer in enumerate(self.layers):
            reference_points_input = reference_points[:, :, None] \
                * torch.cat([valid_ratios, valid_ratios], -1)[None, :]  # (Nq, B, L, 4)
            query_sine_embed = gen_sineembed_for_position(reference_points_input[:, :, 0, :])
            query_pos = self.ref_point_head(query_sine_embed)
            output = layer(
                tgt=output, tgt_query_pos=query_pos, tgt_query_sine_embed=query_sine_embed,
                tgt_key_padding_mask=tgt_key_padding_mask, tgt_reference_points=reference_points_input,
                memory=memory, memory_key_padding_mask=memory_key_padding_mask,
                memory_level_start_index=level_start_index, memory_spatial_shapes=spatial_shapes,
                memory_pos=pos, self_attn_mask=tgt_mask, cross_attn_mask=memory_mask)
            if self.bbox_embed is not None:
                delta_unsig = self.box_delta(self.bbox_embed[layer_id](output))
                new_reference_points = self.ref_sigmoid(delta_unsig + self.ref_logit(reference_points))
                reference_points = new_reference_points.detach() if self.detach_reference else new_reference_points
                ref_points.append(new_reference_points)
            intermediate.append(self.norm(output))
        return [[o.transpose(0, 1) for o in intermediate], [r.transpose(0, 1) for r in ref_points]]


# ----------------------------------------------------------------------------- the predictor
class MaskDINODecoder(nn.Module):
    """MaskDINO's query decoder: two-stage query selection, box refinement, class / mask / box heads."""

    def __init__(self, in_channels: int, mask_classification: bool = True, *, num_classes: int, hidden_dim: int,
                 num_queries: int, nheads: int, dim_feedforward: int, dec_layers: int, mask_dim: int,
                 enforce_input_project: bool, two_stage: bool, dn: str, noise_scale: float, dn_num: int,
                 initialize_box_type: str, initial_pred: bool, learn_tgt: bool, total_num_feature_levels: int = 4,
                 dropout: float = 0.0, activation: str = "relu", nhead: int = 8, dec_n_points: int = 4,
                 return_intermediate_dec: bool = True, query_dim: int = 4, dec_layer_share: bool = False,
                 semantic_ce_loss: bool = False):
        super().__init__()
        if not mask_classification:
            raise ValueError("MaskDINODecoder supports mask classification only (as official)")
        if initialize_box_type not in ("no", "bitmask", "mask2box"):
            raise ValueError(f"unsupported MODEL.MaskDINO.INITIALIZE_BOX_TYPE {initialize_box_type!r}: "
                             "use 'no', 'bitmask' or 'mask2box'")
        if not two_stage and initialize_box_type != "no":
            raise ValueError("MODEL.MaskDINO.INITIALIZE_BOX_TYPE must be 'no' when MODEL.MaskDINO.TWO_STAGE is False "
                             "(the official decoder has no query boxes otherwise)")
        if two_stage and initialize_box_type != "no" and not initial_pred:
            raise ValueError("MODEL.MaskDINO.INITIALIZE_BOX_TYPE other than 'no' needs MODEL.MaskDINO.INITIAL_PRED True")
        if hidden_dim != 256:
            raise ValueError(f"MODEL.MaskDINO.HIDDEN_DIM must be 256 (the decoder's sine box embedding fixes it), "
                             f"got {hidden_dim}")
        self.mask_classification = mask_classification
        self.num_feature_levels = total_num_feature_levels
        self.initial_pred = initial_pred
        self.dn = dn
        self.learn_tgt = learn_tgt
        self.noise_scale = noise_scale
        self.dn_num = dn_num
        self.num_heads = nheads
        self.num_layers = dec_layers
        self.two_stage = two_stage
        self.initialize_box_type = initialize_box_type
        self.total_num_feature_levels = total_num_feature_levels
        self.num_queries = num_queries
        self.semantic_ce_loss = semantic_ce_loss
        # LRP hook: False keeps the selected two-stage query content connected to the encoder memory
        self.detach_query_content = True
        # LRP hook: False keeps the initial query boxes connected to the box head and proposals
        self.detach_reference = True

        if not two_stage or learn_tgt:
            self.query_feat = nn.Embedding(num_queries, hidden_dim)
        if not two_stage and initialize_box_type == "no":
            self.query_embed = nn.Embedding(num_queries, 4)
        if two_stage:
            self.enc_output = nn.Linear(hidden_dim, hidden_dim)
            self.enc_output_norm = nn.LayerNorm(hidden_dim)

        self.input_proj = nn.ModuleList()
        for _ in range(self.num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                proj = Conv2d(in_channels, hidden_dim, kernel_size=1)
                c2_xavier_fill(proj)
                self.input_proj.append(proj)
            else:
                self.input_proj.append(nn.Sequential())
        self.num_classes = num_classes
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1 if semantic_ce_loss else num_classes)
        self.label_enc = nn.Embedding(num_classes, hidden_dim)  # denoising only; kept for key compatibility
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

        self.decoder_norm = decoder_norm = nn.LayerNorm(hidden_dim)
        layer = DeformableTransformerDecoderLayer(hidden_dim, dim_feedforward, dropout, activation,
                                                  self.num_feature_levels, nhead, dec_n_points)
        self.decoder = TransformerDecoder(layer, self.num_layers, decoder_norm,
                                          return_intermediate=return_intermediate_dec, d_model=hidden_dim,
                                          query_dim=query_dim, num_feature_levels=self.num_feature_levels,
                                          dec_layer_share=dec_layer_share)
        self.hidden_dim = hidden_dim
        self._bbox_embed = bbox_mlp = MLP(hidden_dim, hidden_dim, 4, 3)
        nn.init.constant_(bbox_mlp.layers[-1].weight, 0)
        nn.init.constant_(bbox_mlp.layers[-1].bias, 0)
        self.bbox_embed = nn.ModuleList([bbox_mlp for _ in range(self.num_layers)])  # one MLP, shared
        self.decoder.bbox_embed = self.bbox_embed

        self.mask_product = MaskProduct("bqc,bchw->bqhw")
        self.box_sigmoid = nn.Sigmoid()
        # the input box each layer refines, unsigmoided: a named point where LRP treats it as positional
        self.box_reference = nn.Identity()
        self.box_logit = InverseSigmoid()
        self.box_anchor = nn.Identity()
        self.proposal_delta = nn.Identity()
        self.box_delta = nn.Identity()

    get_valid_ratio = staticmethod(get_valid_ratio)

    # ------------------------------------------------------------------ heads
    def forward_prediction_heads(self, output: torch.Tensor, mask_features: torch.Tensor, pred_mask: bool = True
                                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """output (Nq, B, C) → class logits (B, Nq, K) and, if ``pred_mask``, mask logits (B, Nq, H, W)."""
        decoder_output = self.decoder_norm(output).transpose(0, 1)
        outputs_class = self.class_embed(decoder_output)
        outputs_mask = None
        if pred_mask:
            outputs_mask = self.mask_product(self.mask_embed(decoder_output), mask_features)
        return outputs_class, outputs_mask

    def pred_box(self, reference: Sequence[torch.Tensor], hs: Sequence[torch.Tensor],
                 ref0: torch.Tensor | None = None) -> torch.Tensor:
        """Boxes per layer (stacked): each layer's delta on the inverse sigmoid of its input box."""
        coords = [] if ref0 is None else [ref0]
        for layer_ref_sig, layer_bbox_embed, layer_hs in zip(reference[:-1], self.bbox_embed, hs):
            unsig = self.box_delta(layer_bbox_embed(layer_hs)) + self.box_reference(self.box_logit(layer_ref_sig))
            coords.append(self.box_sigmoid(unsig))
        return torch.stack(coords)

    @staticmethod
    def _set_aux_loss(outputs_class, outputs_seg_masks, out_boxes=None) -> list[dict[str, Any]]:
        if out_boxes is None:
            return [{"pred_logits": a, "pred_masks": b} for a, b in zip(outputs_class[:-1], outputs_seg_masks[:-1])]
        return [{"pred_logits": a, "pred_masks": b, "pred_boxes": c}
                for a, b, c in zip(outputs_class[:-1], outputs_seg_masks[:-1], out_boxes[:-1])]

    def _boxes_from_masks(self, outputs_mask: torch.Tensor) -> torch.Tensor:
        """Initial query boxes (B, Nq, 4), unsigmoided, from the (detached) interim mask logits."""
        flat = outputs_mask.detach().flatten(0, 1) > 0
        h, w = outputs_mask.shape[-2:]
        if self.initialize_box_type == "bitmask":
            boxes = bitmasks_to_boxes(flat)
        else:
            boxes = masks_to_boxes(flat)
        boxes = box_xyxy_to_cxcywh(boxes.to(outputs_mask)) \
            / torch.as_tensor([w, h, w, h], dtype=outputs_mask.dtype, device=outputs_mask.device)
        boxes = boxes.reshape(outputs_mask.shape[0], outputs_mask.shape[1], 4)
        return self.box_anchor(inverse_sigmoid(boxes))

    # ------------------------------------------------------------------ forward
    def forward(self, x: Sequence[torch.Tensor], mask_features: torch.Tensor,
                masks: Sequence[torch.Tensor] | None = None, targets: Any = None, dn: Any = None
                ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """x: the ``total_num_feature_levels`` maps of the pixel decoder (its level order);
        mask_features (B, mask_dim, H/4, W/4). Returns (outputs, denoising outputs) as official.

        ``dn`` (training only; :class:`maskdino_lrp.train.denoising.DNQueries`) prepends denoising
        queries (content ``dn.label``, boxes ``dn.bbox``, self-attention mask ``dn.attn_mask``); their
        outputs are cut off into the second return value, the first is then what it is without them.
        """
        if len(x) != self.num_feature_levels:
            raise ValueError(f"decoder expects {self.num_feature_levels} feature levels, got {len(x)}")
        use_masks = masks is not None and any(s.size(2) % 32 or s.size(3) % 32 for s in x)
        if not use_masks:
            masks = [torch.zeros((s.size(0), s.size(2), s.size(3)), device=s.device, dtype=torch.bool) for s in x]
        src_flatten, mask_flatten, shapes = [], [], []
        for i in range(self.num_feature_levels):
            idx = self.num_feature_levels - 1 - i  # the decoder reads the levels in reverse order
            bs, _, h, w = x[idx].shape
            shapes.append((h, w))
            src_flatten.append(self.input_proj[idx](x[idx]).flatten(2).transpose(1, 2))
            mask_flatten.append(masks[i].flatten(1))  # official indexing (i, not idx)
        src_flatten = torch.cat(src_flatten, 1)
        mask_flatten = torch.cat(mask_flatten, 1)
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=src_flatten.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([get_valid_ratio(m) for m in masks], 1)

        predictions_class, predictions_mask = [], []
        interm_outputs = None
        if self.two_stage:
            output_memory, output_proposals = gen_encoder_output_proposals(src_flatten, mask_flatten, spatial_shapes)
            output_memory = self.enc_output_norm(self.enc_output(output_memory))
            enc_class = self.class_embed(output_memory)
            topk_proposals = torch.topk(enc_class.max(-1)[0], self.num_queries, dim=1)[1]
            # unsigmoided boxes of the selected tokens: the box head's delta on the token's grid anchor (gathered
            # before the sum: the same values, and the anchors of unselected, invalid (inf) tokens stay out)
            index = topk_proposals.unsqueeze(-1).repeat(1, 1, 4)
            anchor = torch.gather(output_proposals, 1, index)
            if self.initialize_box_type == "no":  # else the interim mask's box is the anchor (below)
                anchor = self.box_anchor(anchor)
            refpoint_embed_undetach = self.proposal_delta(torch.gather(self._bbox_embed(output_memory), 1, index)) \
                + anchor
            refpoint_embed = refpoint_embed_undetach.detach() if self.detach_reference else refpoint_embed_undetach
            tgt_undetach = torch.gather(output_memory, 1,
                                        topk_proposals.unsqueeze(-1).repeat(1, 1, self.hidden_dim))
            outputs_class, outputs_mask = self.forward_prediction_heads(tgt_undetach.transpose(0, 1), mask_features)
            tgt = tgt_undetach.detach() if self.detach_query_content else tgt_undetach
            if self.learn_tgt:
                tgt = self.query_feat.weight[None].repeat(bs, 1, 1)
            interm_outputs = {"pred_logits": outputs_class, "pred_boxes": refpoint_embed_undetach.sigmoid(),
                              "pred_masks": outputs_mask}
            if self.initialize_box_type != "no":
                refpoint_embed = self._boxes_from_masks(outputs_mask)
        else:
            tgt = self.query_feat.weight[None].repeat(bs, 1, 1)
            refpoint_embed = self.box_anchor(self.query_embed.weight[None].repeat(bs, 1, 1))

        tgt_mask = None
        if dn is not None:
            tgt = torch.cat([dn.label, tgt], dim=1)
            tgt_mask = dn.attn_mask
        if self.initial_pred:
            outputs_class, outputs_mask = self.forward_prediction_heads(tgt.transpose(0, 1), mask_features,
                                                                        self.training)
            predictions_class.append(outputs_class)
            predictions_mask.append(outputs_mask)
        if dn is not None:
            refpoint_embed = torch.cat([dn.bbox, refpoint_embed], dim=1)

        hs, references = self.decoder(
            tgt=tgt.transpose(0, 1), memory=src_flatten.transpose(0, 1), memory_key_padding_mask=mask_flatten,
            pos=None, refpoints_unsigmoid=refpoint_embed.transpose(0, 1), level_start_index=level_start_index,
            spatial_shapes=spatial_shapes, valid_ratios=valid_ratios, tgt_mask=tgt_mask)
        for i, output in enumerate(hs):
            outputs_class, outputs_mask = self.forward_prediction_heads(
                output.transpose(0, 1), mask_features, self.training or i == len(hs) - 1)
            predictions_class.append(outputs_class)
            predictions_mask.append(outputs_mask)

        if self.initial_pred:
            out_boxes = self.pred_box(references, hs, refpoint_embed.sigmoid())
        else:
            out_boxes = self.pred_box(references, hs)

        dn_out = None
        if dn is not None:  # the first pad_size queries are the denoising ones: cut them off
            p = dn.pad_size
            dn_class = [c[:, :p] for c in predictions_class]
            dn_mask = [m[:, :p] if m is not None else None for m in predictions_mask]
            dn_boxes = out_boxes[:, :, :p]
            predictions_class = [c[:, p:] for c in predictions_class]
            predictions_mask = [m[:, p:] if m is not None else None for m in predictions_mask]
            out_boxes = out_boxes[:, :, p:]
            dn_out = {"pred_logits": dn_class[-1], "pred_masks": dn_mask[-1], "pred_boxes": dn_boxes[-1],
                      "aux_outputs": self._set_aux_loss(dn_class, dn_mask, dn_boxes)}
        out = {
            "pred_logits": predictions_class[-1],
            "pred_masks": predictions_mask[-1],
            "pred_boxes": out_boxes[-1],
            "aux_outputs": self._set_aux_loss(predictions_class, predictions_mask, out_boxes),
        }
        if self.two_stage:
            out["interm_outputs"] = interm_outputs
        return out, dn_out
