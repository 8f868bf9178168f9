"""The whole MaskDINO: image in, official pre-processing, backbone + head, official instance post-processing."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import check_instance_task, get, load_config
from .image import ImageError, read_image  # noqa: F401  (re-exported: maskdino_lrp.model.maskdino.read_image)

log = logging.getLogger(__name__)


def resize_shortest_edge(image: np.ndarray, short: int, max_size: int) -> np.ndarray:
    """detectron2's ResizeShortestEdge at test time (PIL bilinear on uint8)."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = short / min(h, w)
    if max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    new_h, new_w = int(h * scale + 0.5), int(w * scale + 0.5)
    if (new_h, new_w) == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))


@dataclass
class Detections:
    """Instance predictions for one image, in input-image pixels.

    Masks are kept compact (COCO RLE, :class:`~.masks.CompactMask`): ``compact_masks[i]`` (area, bbox,
    ``np.asarray`` for the dense array) costs a few KB however large the photo; :attr:`masks` decodes
    all of them into one (K, H, W) bool tensor (K × H × W bytes: 2.4 GB for 100 masks of a 24 MP photo).
    """

    scores: torch.Tensor  # (K,) class score × mask score
    labels: torch.Tensor  # (K,) class index
    boxes: torch.Tensor  # (K, 4) x0 y0 x1 y1 in input pixels
    compact_masks: list  # K CompactMask (COCO RLE) at the input size
    query_indices: torch.Tensor  # (K,) decoder query each detection comes from
    class_scores: torch.Tensor  # (K,) sigmoid class score alone
    mask_scores: torch.Tensor  # (K,) mean mask probability inside the mask
    image_size: tuple[int, int]
    class_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.scores.numel())

    @property
    def masks(self) -> torch.Tensor:
        """(K, H, W) bool masks at the input size, decoded from :attr:`compact_masks` on each access."""
        from .masks import decode_all

        return decode_all(self.compact_masks, self.image_size)

    def name(self, label: int) -> str:
        """Class name of a label index (the index itself when the config has no names)."""
        return self.class_names[label] if 0 <= label < len(self.class_names) else str(label)

    def to_list(self) -> list[dict]:
        """Plain Python records, one per detection."""
        return [
            {
                "query": int(q), "label": int(l), "class": self.name(int(l)), "score": float(s),
                "box": [round(float(v), 2) for v in b], "mask_area": int(m.area),
            }
            for q, l, s, b, m in zip(self.query_indices, self.labels, self.scores, self.boxes, self.compact_masks)
        ]

    def __str__(self) -> str:
        lines = [f"{len(self)} detections on a {self.image_size[1]}×{self.image_size[0]} image"]
        for d in self.to_list():
            lines.append(
                f"  query {d['query']:>4}  {d['class']:<12} score {d['score']:.3f}  box {d['box']}  mask {d['mask_area']} px"
            )
        return "\n".join(lines)


@dataclass
class PreparedImage:
    """A normalised, padded image batch of one and the sizes post-processing needs."""

    tensor: torch.Tensor  # (1, 3, Hp, Wp) normalised and padded
    resized_size: tuple[int, int]  # (h, w) after resizing, before padding
    original_size: tuple[int, int]  # (H, W) of the input image
    rgb: np.ndarray  # the input image, RGB uint8


class MaskDINO(nn.Module):
    """Backbone + MaskDINO head with official test-time pre- and post-processing."""

    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__()
        from .backbone import build_backbone
        from .head import build_sem_seg_head

        self.cfg = cfg
        self.backbone = build_backbone(cfg)
        self.sem_seg_head = build_sem_seg_head(cfg, self.backbone.output_shape())
        self.register_buffer("pixel_mean", torch.tensor(get(cfg, "MODEL.PIXEL_MEAN"), dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(get(cfg, "MODEL.PIXEL_STD"), dtype=torch.float32).view(-1, 1, 1), False)
        divisibility = int(get(cfg, "MODEL.MaskDINO.SIZE_DIVISIBILITY"))  # official: negative → the backbone's
        self.size_divisibility = divisibility if divisibility >= 0 else self.backbone.size_divisibility
        self.input_format = get(cfg, "INPUT.FORMAT")
        self.min_size_test = int(get(cfg, "INPUT.MIN_SIZE_TEST"))
        self.max_size_test = int(get(cfg, "INPUT.MAX_SIZE_TEST"))
        self.num_classes = int(get(cfg, "MODEL.SEM_SEG_HEAD.NUM_CLASSES"))
        self.num_queries = int(get(cfg, "MODEL.MaskDINO.NUM_OBJECT_QUERIES"))
        self.test_topk_per_image = int(get(cfg, "TEST.DETECTIONS_PER_IMAGE"))
        self.focus_on_box = bool(get(cfg, "MODEL.MaskDINO.TEST.TEST_FOUCUS_ON_BOX"))
        from .class_names import default_class_names  # COCO's 80 names for an 80-class model without names

        self.class_names = default_class_names(get(cfg, "LRP_TOOL.CLASS_NAMES"), self.num_classes)
        self.weights_source: str | None = None  # set by load_weights; None: random initialisation
        self.load_report = None  # the checkpoint's LoadReport, once weights are loaded
        self.eval()

    @property
    def random_weights(self) -> bool:
        """True while no checkpoint has been loaded (the weights are a random initialisation)."""
        return self.weights_source is None

    def weights_info(self) -> dict:
        """Where the weights come from, for outputs: ``{"weights": source, "random_weights": bool}``, plus
        ``"partial_load"`` (the one-line key summary) when the checkpoint did not fit and was loaded partially."""
        info: dict[str, Any] = {"weights": self.weights_source or "random initialisation",
                                "random_weights": self.random_weights}
        if self.load_report is not None and not self.load_report.ok:
            info["partial_load"] = self.load_report.summary()
        return info

    # ----------------------------------------------------------------- pre-processing
    @property
    def largest_stride(self) -> int:
        return max(stride for _, stride in self.backbone.output_shape().values())

    def prepare(self, image: Any, channel_order: str = "RGB") -> PreparedImage:
        """Official test-time input: resize shortest edge, normalise, pad to SIZE_DIVISIBILITY."""
        rgb = read_image(image, channel_order)
        h, w = rgb.shape[:2]
        if min(h, w) < self.largest_stride:
            raise ImageError(
                f"image is {w}×{h} px; it must be at least {self.largest_stride} px on each side "
                "(the backbone's largest stride)"
            )
        resized = resize_shortest_edge(rgb, self.min_size_test, self.max_size_test)
        tokens = self.encoder_tokens(*resized.shape[:2])
        if tokens < self.num_queries:
            raise ImageError(
                f"image is {w}×{h} px (resized to {resized.shape[1]}×{resized.shape[0]}): its {tokens} encoder tokens "
                f"are fewer than the model's {self.num_queries} queries; give a larger image or raise INPUT.MIN_SIZE_TEST"
            )
        x = torch.from_numpy(resized.copy()).permute(2, 0, 1).float()
        if self.input_format == "BGR":
            x = x.flip(0)
        x = x.to(self.pixel_mean)  # device and dtype (float64 models work too)
        return PreparedImage(self.normalize_and_pad(x[None]), resized.shape[:2], (h, w), rgb)

    def encoder_tokens(self, height: int, width: int) -> int:
        """Number of encoder tokens for an input of ``height`` × ``width`` (before padding)."""
        d = max(self.size_divisibility, 1)
        hp, wp = -(-height // d) * d, -(-width // d) * d
        decoder = self.sem_seg_head.pixel_decoder
        strides = {name: s for name, (_, s) in self.backbone.output_shape().items()}
        sizes = [(-(-hp // strides[f]), -(-wp // strides[f])) for f in decoder.transformer_in_features]
        h, w = min(sizes)
        for _ in range(decoder.total_num_feature_levels - len(sizes)):  # extra stride-2 levels
            h, w = -(-h // 2), -(-w // 2)
            sizes.append((h, w))
        return sum(a * b for a, b in sizes)

    def normalize_and_pad(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) pixel values → normalised, zero-padded to a multiple of SIZE_DIVISIBILITY."""
        x = (images - self.pixel_mean) / self.pixel_std
        d = self.size_divisibility
        if d > 1:
            h, w = x.shape[-2:]
            x = F.pad(x, (0, (-w) % d, 0, (-h) % d))
        return x

    # ----------------------------------------------------------------- forward
    def forward(self, images: torch.Tensor) -> dict:
        """Raw head outputs for a normalised, padded batch (B, 3, Hp, Wp)."""
        features = self.backbone(images)
        return self.sem_seg_head(features)

    @torch.no_grad()
    def predict(self, image: Any, channel_order: str = "RGB") -> Detections:
        """Detect instances in one image (array, PIL image or path); official instance post-processing."""
        prepared = self.prepare(image, channel_order)
        outputs = self(prepared.tensor)
        return self.postprocess(outputs, prepared)

    # ----------------------------------------------------------------- post-processing
    def postprocess(self, outputs: Mapping[str, Any], prepared: PreparedImage, batch_index: int = 0) -> Detections:
        """Official instance inference: top-k over queries × classes, score = class × mask score."""
        logits = outputs["pred_logits"][batch_index].detach()
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"the class head has {logits.shape[-1]} outputs, not NUM_CLASSES={self.num_classes}: "
                             "instance post-processing needs one sigmoid logit per class (see check_instance_task)")
        mask_logits = outputs["pred_masks"][batch_index].detach()
        boxes = outputs["pred_boxes"][batch_index].detach()
        scores = logits.sigmoid()
        k = min(self.test_topk_per_image, scores.numel())
        top_scores, top_idx = scores.flatten().topk(k, sorted=True)
        labels = top_idx % self.num_classes
        queries = top_idx // self.num_classes
        # only the selected queries' masks are resized, a few at a time, and kept as RLE: full-size float
        # masks of every candidate would take 96 × 24M × 4 B = 9 GB for a 24 MP photo
        unique, position = queries.unique(return_inverse=True)
        compact, unique_scores = self.instance_masks(mask_logits[unique], prepared)
        mask_scores = unique_scores[position]
        final = top_scores * (1.0 if self.focus_on_box else mask_scores)
        order = final.argsort(descending=True)
        kept = position[order].tolist()
        return Detections(
            scores=final[order], labels=labels[order], boxes=self.boxes_to_image(boxes[queries], prepared)[order],
            compact_masks=[compact[i] for i in kept], query_indices=queries[order], class_scores=top_scores[order],
            mask_scores=mask_scores[order], image_size=prepared.original_size, class_names=self.class_names,
        )

    def instance_masks(self, mask_logits: torch.Tensor, prepared: PreparedImage) -> tuple[list, torch.Tensor]:
        """(Q, h, w) mask logits → Q compact masks (``logits > 0`` at the input size, COCO RLE) and the (Q,)
        mask scores, with only a bounded number of full-size floats in memory at a time (see
        :func:`~.masks.resize_and_encode`); the same values as :meth:`masks_to_image`."""
        from .masks import resize_and_encode

        return resize_and_encode(mask_logits, tuple(prepared.tensor.shape[-2:]), tuple(prepared.resized_size),
                                 tuple(prepared.original_size))

    def masks_to_image(self, mask_logits: torch.Tensor, prepared: PreparedImage) -> torch.Tensor:
        """(Q, h, w) mask logits → (Q, H, W) at the input size (upsample, crop padding, resize).

        Dense: Q × H × W floats. For many masks or large photos use :meth:`instance_masks`.
        """
        padded = prepared.tensor.shape[-2:]
        up = F.interpolate(mask_logits[None], size=padded, mode="bilinear", align_corners=False)
        rh, rw = prepared.resized_size
        up = up[..., :rh, :rw]
        return F.interpolate(up, size=prepared.original_size, mode="bilinear", align_corners=False)[0]

    def boxes_to_image(self, boxes: torch.Tensor, prepared: PreparedImage) -> torch.Tensor:
        """(Q, 4) normalised cx cy w h (relative to the padded input) → x0 y0 x1 y1 input pixels.

        The official code scales by the input size and so ignores padding; we undo the padding so
        boxes are right for any aspect ratio (identical when the resized image needs no padding).
        Boxes are clipped to the image (0..W, 0..H), as detectron2's ``Boxes.clip``.
        """
        cx, cy, w, h = boxes.unbind(-1)
        xyxy = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)
        hp, wp = prepared.tensor.shape[-2:]
        rh, rw = prepared.resized_size
        oh, ow = prepared.original_size
        scale = torch.tensor([wp / rw * ow, hp / rh * oh, wp / rw * ow, hp / rh * oh], dtype=xyxy.dtype)
        xyxy = xyxy * scale.to(xyxy.device)
        upper = torch.tensor([ow, oh, ow, oh], dtype=xyxy.dtype, device=xyxy.device)
        return torch.minimum(xyxy.clamp(min=0), upper)


def build_model(
    config: str | Path | Mapping[str, Any],
    overrides: Mapping[str, Any] | None = None,
    checkpoint: str | Path | Mapping[str, torch.Tensor] | None = None,
    strict: bool = True,
) -> MaskDINO:
    """Build a MaskDINO from an official YAML, a preset name or a dict of official keys; optionally load weights.

    Without ``checkpoint`` the weights are random (``model.random_weights``; a preset's shipped weights are
    found by :func:`~maskdino_lrp.model.checkpoint.shipped_weights`). A checkpoint that does not fit the
    model raises :class:`~maskdino_lrp.model.checkpoint.CheckpointError` unless ``strict=False`` asks for a
    partial load.

    >>> model = build_model("tiny")
    """
    cfg = load_config(config, overrides)
    check_instance_task(cfg, source=config)
    model = MaskDINO(cfg)
    if checkpoint is not None:
        load_weights(model, checkpoint, strict=strict)
    return model.eval()


def load_weights(model: MaskDINO, checkpoint: Any, strict: bool = True):
    """Load an official .pth/.pkl/safetensors checkpoint (or a state dict); log and return the key report.

    A checkpoint with missing, unexpected or wrongly shaped keys raises ``CheckpointError`` (one line, before
    the model changes) unless ``strict=False``: then what fits is loaded and the one-line summary is logged
    as a warning. Training-only entries (the criterion's, the optimizer's, …) are only reported.
    """
    from .checkpoint import load_checkpoint, read_state_dict

    is_state = isinstance(checkpoint, Mapping)
    state = dict(checkpoint) if is_state else read_state_dict(checkpoint)
    stats = {name: state.pop(name, None) for name in ("pixel_mean", "pixel_std")}
    report = load_checkpoint(model, state, strict=strict,  # raises before anything changes
                             name="<state dict>" if is_state else str(checkpoint))
    for name, value in stats.items():
        if value is not None:
            value = torch.as_tensor(np.asarray(value), dtype=torch.float32).view(-1, 1, 1)
            if not torch.allclose(value, getattr(model, name), atol=1e-3):
                log.warning("checkpoint %s %s differs from the config's %s; using the checkpoint's",
                            name, value.flatten().tolist(), getattr(model, name).flatten().tolist())
                getattr(model, name).copy_(value)
    model.weights_source = report.source
    model.load_report = report
    if report.ok:
        log.info("%s", report)
    else:
        log.warning("partial load (the rest keeps its random initialisation): %s", report.summary())
        log.info("%s", report)
    return report
