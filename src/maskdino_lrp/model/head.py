"""MaskDINO's ``sem_seg_head``: pixel decoder + transformer decoder, built from official config keys."""
from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
from torch import nn

from .config import DEFAULTS, get
from .decoder import MaskDINODecoder
from .pixel_decoder import MaskDINOEncoder, normalize_input_shape

log = logging.getLogger(__name__)

__all__ = ["MaskDINOHead", "build_sem_seg_head", "build_pixel_decoder", "build_transformer_decoder"]

# Official defaults (detectron2 + maskdino/config.py) of the keys the head reads; used for absent keys.
# detectron2's SEM_SEG_HEAD.NAME / IN_FEATURES defaults (SemSegFPNHead, p2..p5) make no sense for
# MaskDINO, so the MaskDINO values are used for those two.
def _get(cfg: Mapping[str, Any], section: str, key: str) -> Any:
    """``cfg["MODEL"][section][key...]`` (key may be dotted, e.g. "TEST.SEMANTIC_ON"); also accepts the
    flat ``cfg["MODEL.<section>"]`` layout of the fixtures' config.json; official default if absent."""
    parts = key.split(".")
    for root in ((cfg.get("MODEL") or {}).get(section), cfg.get(f"MODEL.{section}")):
        node = root
        for part in parts:
            if not isinstance(node, Mapping) or part not in node:
                node = None
                break
            node = node[part]
        if node is not None:
            return node
    return get(DEFAULTS, f"MODEL.{section}.{key}")


def _require(value: Any, allowed: tuple, key: str) -> Any:
    if value not in allowed:
        raise ValueError(f"unsupported value {value!r} for {key}: supported {list(allowed)}")
    return value


class MaskDINOHead(nn.Module):
    """``sem_seg_head``: ``pixel_decoder`` (MaskDINOEncoder) then ``predictor`` (MaskDINODecoder)."""

    def __init__(self, input_shape: Mapping[str, Any], *, num_classes: int, pixel_decoder: nn.Module,
                 loss_weight: float = 1.0, ignore_value: int = -1, transformer_predictor: nn.Module):
        super().__init__()
        shapes = sorted(normalize_input_shape(input_shape).items(), key=lambda kv: kv[1][1])
        self.in_features = [k for k, _ in shapes]
        self.ignore_value = ignore_value
        self.common_stride = 4
        self.loss_weight = loss_weight
        self.pixel_decoder = pixel_decoder
        self.predictor = transformer_predictor
        self.num_classes = num_classes

    def forward(self, features: Mapping[str, torch.Tensor], mask: Any = None, targets: Any = None) -> dict[str, Any]:
        """Backbone features (name → (B, C, H, W)) → outputs dict: pred_logits (B, Nq, K), pred_masks
        (B, Nq, H/4, W/4), pred_boxes (B, Nq, 4) cx cy w h in [0, 1], aux_outputs (list of dicts, one per
        earlier prediction), interm_outputs (two-stage proposals)."""
        mask_features, _, multi_scale_features = self.pixel_decoder.forward_features(features, mask)
        outputs, _mask_dict = self.predictor(multi_scale_features, mask_features, mask, targets=targets)
        return outputs


def build_pixel_decoder(cfg: Mapping[str, Any], input_shape: Mapping[str, Any]) -> MaskDINOEncoder:
    """The official ``MaskDINOEncoder.from_config`` mapping."""
    name = _get(cfg, "SEM_SEG_HEAD", "PIXEL_DECODER_NAME")
    _require(name, ("MaskDINOEncoder",), "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME")
    for key, used in (("DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS", 4),
                      ("DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS", _get(cfg, "MaskDINO", "NHEADS"))):
        if _get(cfg, "SEM_SEG_HEAD", key) != used:
            log.warning("MODEL.SEM_SEG_HEAD.%s=%s is ignored by the official MaskDINO code (it uses %s)",
                        key, _get(cfg, "SEM_SEG_HEAD", key), used)
    in_features = list(_get(cfg, "SEM_SEG_HEAD", "IN_FEATURES"))
    shapes = normalize_input_shape(input_shape)
    missing = [f for f in in_features if f not in shapes]
    if missing:
        raise ValueError(f"MODEL.SEM_SEG_HEAD.IN_FEATURES names {missing}, which the backbone does not produce "
                         f"(it has {sorted(shapes)})")
    return MaskDINOEncoder(
        {k: v for k, v in shapes.items() if k in in_features},
        conv_dim=int(_get(cfg, "SEM_SEG_HEAD", "CONVS_DIM")),
        mask_dim=int(_get(cfg, "SEM_SEG_HEAD", "MASK_DIM")),
        norm=_require(_get(cfg, "SEM_SEG_HEAD", "NORM"), ("GN", ""), "MODEL.SEM_SEG_HEAD.NORM"),
        transformer_dropout=float(_get(cfg, "MaskDINO", "DROPOUT")),
        transformer_nheads=int(_get(cfg, "MaskDINO", "NHEADS")),
        transformer_dim_feedforward=int(_get(cfg, "SEM_SEG_HEAD", "DIM_FEEDFORWARD")),  # encoder FFN
        transformer_enc_layers=int(_get(cfg, "SEM_SEG_HEAD", "TRANSFORMER_ENC_LAYERS")),
        transformer_in_features=list(_get(cfg, "SEM_SEG_HEAD", "DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES")),
        common_stride=int(_get(cfg, "SEM_SEG_HEAD", "COMMON_STRIDE")),
        total_num_feature_levels=int(_get(cfg, "SEM_SEG_HEAD", "TOTAL_NUM_FEATURE_LEVELS")),
        num_feature_levels=int(_get(cfg, "SEM_SEG_HEAD", "NUM_FEATURE_LEVELS")),
        feature_order=_require(_get(cfg, "SEM_SEG_HEAD", "FEATURE_ORDER"), ("high2low", "low2high"),
                               "MODEL.SEM_SEG_HEAD.FEATURE_ORDER"),
    )


def build_transformer_decoder(cfg: Mapping[str, Any], in_channels: int, mask_classification: bool = True
                              ) -> MaskDINODecoder:
    """The official ``MaskDINODecoder.from_config`` mapping (the decoder layers always get 8 heads and
    4 points: official passes NHEADS only to ``nheads``, which no layer uses; dropout stays 0.0)."""
    name = _get(cfg, "MaskDINO", "TRANSFORMER_DECODER_NAME")
    _require(name, ("MaskDINODecoder",), "MODEL.MaskDINO.TRANSFORMER_DECODER_NAME")
    # official: TEST.SEMANTIC_ON and SEMANTIC_CE_LOSS and ~TEST.PANOPTIC_ON, where ~bool is a nonzero
    # int, so PANOPTIC_ON never changes the result
    semantic_ce_loss = bool(_get(cfg, "MaskDINO", "TEST.SEMANTIC_ON") and _get(cfg, "MaskDINO", "SEMANTIC_CE_LOSS"))
    hidden_dim = int(_get(cfg, "MaskDINO", "HIDDEN_DIM"))
    if hidden_dim != 256:
        raise ValueError(f"unsupported value {hidden_dim} for MODEL.MaskDINO.HIDDEN_DIM: supported [256] "
                         "(the decoder's sine box embedding fixes it)")
    two_stage = bool(_get(cfg, "MaskDINO", "TWO_STAGE"))
    box_type = _require(_get(cfg, "MaskDINO", "INITIALIZE_BOX_TYPE"), ("no", "bitmask", "mask2box"),
                        "MODEL.MaskDINO.INITIALIZE_BOX_TYPE")
    if not two_stage and box_type != "no":
        raise ValueError(f"unsupported value {box_type!r} for MODEL.MaskDINO.INITIALIZE_BOX_TYPE with "
                         "MODEL.MaskDINO.TWO_STAGE False: supported ['no']")
    initial_pred = bool(_get(cfg, "MaskDINO", "INITIAL_PRED"))
    if two_stage and box_type != "no" and not initial_pred:
        raise ValueError("unsupported value False for MODEL.MaskDINO.INITIAL_PRED with INITIALIZE_BOX_TYPE "
                         f"{box_type!r}: supported [True]")
    return MaskDINODecoder(
        in_channels, mask_classification,
        num_classes=int(_get(cfg, "SEM_SEG_HEAD", "NUM_CLASSES")),
        hidden_dim=hidden_dim,
        num_queries=int(_get(cfg, "MaskDINO", "NUM_OBJECT_QUERIES")),
        nheads=int(_get(cfg, "MaskDINO", "NHEADS")),
        dim_feedforward=int(_get(cfg, "MaskDINO", "DIM_FEEDFORWARD")),  # decoder FFN
        dec_layers=int(_get(cfg, "MaskDINO", "DEC_LAYERS")),
        enforce_input_project=bool(_get(cfg, "MaskDINO", "ENFORCE_INPUT_PROJ")),
        mask_dim=int(_get(cfg, "SEM_SEG_HEAD", "MASK_DIM")),
        two_stage=two_stage,
        initialize_box_type=box_type,
        dn=_get(cfg, "MaskDINO", "DN"),
        noise_scale=float(_get(cfg, "MaskDINO", "DN_NOISE_SCALE")),
        dn_num=int(_get(cfg, "MaskDINO", "DN_NUM")),
        initial_pred=initial_pred,
        learn_tgt=bool(_get(cfg, "MaskDINO", "LEARN_TGT")),
        total_num_feature_levels=int(_get(cfg, "SEM_SEG_HEAD", "TOTAL_NUM_FEATURE_LEVELS")),
        semantic_ce_loss=semantic_ce_loss,
    )


def build_sem_seg_head(cfg: Mapping[str, Any], input_shape: Mapping[str, Any]) -> MaskDINOHead:
    """The official ``MaskDINOHead.from_config``: ``input_shape`` maps feature names to (channels, stride)
    (or ShapeSpec-like objects); ``cfg`` is a nested dict of official keys (``cfg["MODEL"]["SEM_SEG_HEAD"]``,
    ``cfg["MODEL"]["MaskDINO"]``)."""
    _require(_get(cfg, "SEM_SEG_HEAD", "NAME"), ("MaskDINOHead",), "MODEL.SEM_SEG_HEAD.NAME")
    in_features = list(_get(cfg, "SEM_SEG_HEAD", "IN_FEATURES"))
    shapes = normalize_input_shape(input_shape)
    return MaskDINOHead(
        {k: v for k, v in shapes.items() if k in in_features},
        ignore_value=int(_get(cfg, "SEM_SEG_HEAD", "IGNORE_VALUE")),
        num_classes=int(_get(cfg, "SEM_SEG_HEAD", "NUM_CLASSES")),
        pixel_decoder=build_pixel_decoder(cfg, shapes),
        loss_weight=float(_get(cfg, "SEM_SEG_HEAD", "LOSS_WEIGHT")),
        transformer_predictor=build_transformer_decoder(cfg, int(_get(cfg, "SEM_SEG_HEAD", "CONVS_DIM"))),
    )
