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

from .config import get, load_config

log = logging.getLogger(__name__)


class ImageError(ValueError):
    """An input image the model cannot take, with what to do about it."""


def read_image(image: Any, channel_order: str = "RGB") -> np.ndarray:
    """Validate an image (H×W×3 uint8 array, PIL image, tensor or file path) and return it as RGB uint8."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ImageError(f"image file not found: {path}")
        try:
            with Image.open(path) as pil:
                # a file is decoded for the user: palette, grey and alpha images become RGB
                image = np.asarray(pil.convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise ImageError(f"cannot read image {path}: {exc}; give a PNG/JPEG file") from exc
    elif isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise ImageError(
                f"PIL image has mode {image.mode!r}; the model takes RGB: pass image.convert('RGB')"
            )
        image = np.asarray(image)
    elif isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise ImageError(f"unsupported image type {type(image).__name__}; give an H×W×3 uint8 array, a PIL image or a path")
    if image.ndim == 2:
        raise ImageError(
            f"image is grayscale with shape {image.shape}; the model takes RGB: "
            "np.stack([img] * 3, axis=-1) or PIL's .convert('RGB')"
        )
    if image.ndim != 3:
        raise ImageError(f"image must be H×W×3, got shape {image.shape}")
    if image.shape[-1] != 3:
        if image.shape[0] == 3:
            raise ImageError(
                f"image shape {image.shape} looks channel-first (3×H×W); give H×W×3: img.transpose(1, 2, 0)"
            )
        if image.shape[-1] == 4:
            raise ImageError("image has 4 channels (RGBA); drop alpha: img[..., :3] or PIL's .convert('RGB')")
        if image.shape[-1] == 1:
            raise ImageError("image has 1 channel (grayscale); repeat it: np.repeat(img, 3, axis=-1)")
        raise ImageError(f"image must have 3 channels (H×W×3 RGB), got shape {image.shape}")
    if image.dtype != np.uint8:
        if np.issubdtype(image.dtype, np.floating):
            if not np.isfinite(image).all():
                raise ImageError("image contains NaN or Inf pixels; clean it before explaining")
            lo, hi = float(image.min()), float(image.max())
            raise ImageError(
                f"image is {image.dtype} with values in [{lo:.3g}, {hi:.3g}]; the model takes uint8 0..255: "
                + ("(img * 255).round().astype(np.uint8)" if hi <= 1.0 else "img.clip(0, 255).astype(np.uint8)")
            )
        raise ImageError(f"image dtype {image.dtype} is not supported; give uint8 0..255")
    if channel_order.upper() == "BGR":
        image = image[..., ::-1]
    elif channel_order.upper() != "RGB":
        raise ImageError(f"channel_order must be 'RGB' or 'BGR', got {channel_order!r}")
    return np.ascontiguousarray(image)


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
    """Instance predictions for one image, in input-image pixels."""

    scores: torch.Tensor  # (K,) class score × mask score
    labels: torch.Tensor  # (K,) class index
    boxes: torch.Tensor  # (K, 4) x0 y0 x1 y1 in input pixels
    masks: torch.Tensor  # (K, H, W) bool at the input size
    query_indices: torch.Tensor  # (K,) decoder query each detection comes from
    class_scores: torch.Tensor  # (K,) sigmoid class score alone
    mask_scores: torch.Tensor  # (K,) mean mask probability inside the mask
    image_size: tuple[int, int]
    class_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.scores.numel())

    def name(self, label: int) -> str:
        """Class name of a label index (the index itself when the config has no names)."""
        return self.class_names[label] if 0 <= label < len(self.class_names) else str(label)

    def to_list(self) -> list[dict]:
        """Plain Python records, one per detection."""
        return [
            {
                "query": int(q), "label": int(l), "class": self.name(int(l)), "score": float(s),
                "box": [round(float(v), 2) for v in b], "mask_area": int(m.sum()),
            }
            for q, l, s, b, m in zip(self.query_indices, self.labels, self.scores, self.boxes, self.masks)
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
        self.class_names = list(get(cfg, "LRP_TOOL.CLASS_NAMES"))
        self.eval()

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
        mask_logits = outputs["pred_masks"][batch_index].detach()
        boxes = outputs["pred_boxes"][batch_index].detach()
        scores = logits.sigmoid()
        k = min(self.test_topk_per_image, scores.numel())
        top_scores, top_idx = scores.flatten().topk(k, sorted=True)
        labels = top_idx % self.num_classes
        queries = top_idx // self.num_classes
        # only the selected queries' masks are resized (300 full-size masks would take ~0.8 GB at 800²)
        unique, position = queries.unique(return_inverse=True)
        masks_sel = self.masks_to_image(mask_logits[unique], prepared)[position]
        binary = masks_sel > 0
        mask_scores = (masks_sel.sigmoid().flatten(1) * binary.flatten(1)).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
        final = top_scores * (1.0 if self.focus_on_box else mask_scores)
        order = final.argsort(descending=True)
        return Detections(
            scores=final[order], labels=labels[order], boxes=self.boxes_to_image(boxes[queries], prepared)[order],
            masks=binary[order], query_indices=queries[order], class_scores=top_scores[order],
            mask_scores=mask_scores[order], image_size=prepared.original_size, class_names=self.class_names,
        )

    def masks_to_image(self, mask_logits: torch.Tensor, prepared: PreparedImage) -> torch.Tensor:
        """(Q, h, w) mask logits → (Q, H, W) at the input size (upsample, crop padding, resize)."""
        padded = prepared.tensor.shape[-2:]
        up = F.interpolate(mask_logits[None], size=padded, mode="bilinear", align_corners=False)
        rh, rw = prepared.resized_size
        up = up[..., :rh, :rw]
        return F.interpolate(up, size=prepared.original_size, mode="bilinear", align_corners=False)[0]

    def boxes_to_image(self, boxes: torch.Tensor, prepared: PreparedImage) -> torch.Tensor:
        """(Q, 4) normalised cx cy w h (relative to the padded input) → x0 y0 x1 y1 input pixels.

        The official code scales by the input size and so ignores padding; we undo the padding so
        boxes are right for any aspect ratio (identical when the resized image needs no padding).
        """
        cx, cy, w, h = boxes.unbind(-1)
        xyxy = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)
        hp, wp = prepared.tensor.shape[-2:]
        rh, rw = prepared.resized_size
        oh, ow = prepared.original_size
        scale = torch.tensor([wp / rw * ow, hp / rh * oh, wp / rw * ow, hp / rh * oh], dtype=xyxy.dtype)
        return xyxy * scale.to(xyxy.device)


def build_model(
    config: str | Path | Mapping[str, Any],
    overrides: Mapping[str, Any] | None = None,
    checkpoint: str | Path | Mapping[str, torch.Tensor] | None = None,
    strict: bool = False,
) -> MaskDINO:
    """Build a MaskDINO from an official YAML, a preset name or a dict of official keys; optionally load weights.

    >>> model = build_model("tiny")
    """
    cfg = load_config(config, overrides)
    model = MaskDINO(cfg)
    if checkpoint is not None:
        load_weights(model, checkpoint, strict=strict)
    return model.eval()


def load_weights(model: MaskDINO, checkpoint: Any, strict: bool = False):
    """Load an official .pth/.pkl/safetensors checkpoint (or a state dict); print and return the key report."""
    from .checkpoint import load_checkpoint, read_state_dict

    state = read_state_dict(checkpoint) if not isinstance(checkpoint, Mapping) else dict(checkpoint)
    for name in ("pixel_mean", "pixel_std"):
        value = state.pop(name, None)
        if value is not None:
            value = torch.as_tensor(np.asarray(value), dtype=torch.float32).view(-1, 1, 1)
            if not torch.allclose(value, getattr(model, name), atol=1e-3):
                log.warning("checkpoint %s %s differs from the config's %s; using the checkpoint's",
                            name, value.flatten().tolist(), getattr(model, name).flatten().tolist())
                getattr(model, name).copy_(value)
    report = load_checkpoint(model, state, strict=strict)
    log.info("%s", report)
    if not report.ok:
        print(report)
    return report
