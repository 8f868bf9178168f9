"""Synthetic shapes: a small detection / instance-segmentation task with exact ground truth.

Each image shows 1–5 filled shapes (circle, square, triangle, star) of random size, colour, rotation
and position on a textured, noisy background, plus distractors that are not objects (thin lines and
arcs, small blobs, soft colour patches). Shapes may overlap: a later shape is drawn on top, every
object's mask is its *visible* part, and a placement that would leave an earlier object with too
little visible area is rejected, so every painted shape is labelled and every label is visible.

Masks are rendered without antialiasing and are exact; the image gets a slight blur and pixel noise
on top. Everything is drawn from ``numpy.random.default_rng((seed, index))``, so a sample depends on
``(seed, index, config)`` only: bit-identical across calls, processes and call order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Iterator, NoReturn, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star")

_MAX_PLACEMENT_TRIES = 40
_MAX_COLOUR_TRIES = 40
_MIN_CONTRAST = 70.0  # Euclidean RGB distance between an object and what lies under / beside it


@dataclass(frozen=True)
class ShapesConfig:
    """Parameters of the synthetic shapes generator; sizes are fractions of ``image_size``."""

    image_size: int = 160  # square images; a multiple of 32 (the backbone's largest stride)
    min_objects: int = 1
    max_objects: int = 5
    size_range: tuple[float, float] = (0.14, 0.36)  # circumscribed-circle diameter / image_size
    min_visible_fraction: float = 0.5  # an occluded object keeps at least this share of its area
    min_visible_pixels: int = 40  # ... and at least this many pixels
    noise_std: float = 6.0  # Gaussian pixel noise, in uint8 units
    blur_radius: float = 0.6  # Gaussian blur of the rendered image (masks stay exact); 0 = off
    textured_background: bool = True  # colour gradient + noise / stripe texture; False = flat colour
    distractors: bool = True
    max_distractors: int = 6

    def __post_init__(self) -> None:
        _check_config(self)


def _fail(name: str, allowed: str, value: Any) -> NoReturn:
    raise ValueError(f"ShapesConfig.{name} must be {allowed}, got {value!r}")


def _check_config(c: ShapesConfig) -> None:
    """Raise ValueError naming the first field of ``c`` that is out of range."""
    for f in fields(c):
        value = getattr(c, f.name)
        if f.type in ("int", int) and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
            _fail(f.name, "an integer", value)
        if f.type in ("float", float) and (isinstance(value, bool) or not isinstance(value, (int, float, np.number))):
            _fail(f.name, "a number", value)
        if f.type in ("bool", bool) and not isinstance(value, (bool, np.bool_)):
            _fail(f.name, "True or False", value)
    if not (64 <= c.image_size <= 1024 and c.image_size % 32 == 0):
        _fail("image_size", "a multiple of 32 in [64, 1024]", c.image_size)
    if not 0 <= c.min_objects <= 20:
        _fail("min_objects", "in [0, 20]", c.min_objects)
    if not c.min_objects <= c.max_objects <= 20:
        _fail("max_objects", f"in [min_objects={c.min_objects}, 20]", c.max_objects)
    sr = c.size_range
    if (
        not isinstance(sr, (tuple, list))
        or len(sr) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in sr)
        or not 0.05 <= sr[0] <= sr[1] <= 0.8
    ):
        _fail("size_range", "a pair (lo, hi) with 0.05 <= lo <= hi <= 0.8", sr)
    if not 0.0 < c.min_visible_fraction <= 1.0:
        _fail("min_visible_fraction", "in (0, 1]", c.min_visible_fraction)
    if not 1 <= c.min_visible_pixels <= c.image_size**2:
        _fail("min_visible_pixels", f"in [1, image_size**2={c.image_size**2}]", c.min_visible_pixels)
    if not 0.0 <= c.noise_std <= 64.0:
        _fail("noise_std", "in [0, 64]", c.noise_std)
    if not 0.0 <= c.blur_radius <= 3.0:
        _fail("blur_radius", "in [0, 3]", c.blur_radius)
    if not 0 <= c.max_distractors <= 50:
        _fail("max_distractors", "in [0, 50]", c.max_distractors)


@dataclass
class Sample:
    """One generated image with its instance ground truth (N objects, visible masks)."""

    image: np.ndarray  # (H, W, 3) uint8, RGB
    classes: np.ndarray  # (N,) int64, indices into class_names
    boxes: np.ndarray  # (N, 4) float32, xyxy in pixels, tight around the visible mask (x1 = last col + 1)
    masks: np.ndarray  # (N, H, W) bool, visible part of each object, pairwise disjoint
    visible_fraction: np.ndarray  # (N,) float32, visible area / full shape area (1 = unoccluded)
    seed: int = 0
    index: int = 0
    class_names: tuple[str, ...] = field(default=CLASSES)


# ----------------------------------------------------------------------------------------------
# Drawing helpers
# ----------------------------------------------------------------------------------------------


def _polygon_mask(size: int, points: Sequence[tuple[float, float]]) -> np.ndarray:
    """Exact (non-antialiased) filled polygon as an (size, size) bool mask."""
    img = Image.new("1", (size, size), 0)
    ImageDraw.Draw(img).polygon([(float(x), float(y)) for x, y in points], fill=1, outline=1)
    return np.array(img, dtype=bool)


def _circle_mask(size: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Exact filled disc as an (size, size) bool mask (pixel centres within radius r)."""
    yy, xx = np.mgrid[0:size, 0:size]
    return (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r


def _regular_points(cx: float, cy: float, radii: Sequence[float], angles: Sequence[float]) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for r, a in zip(radii, angles)]


def _shape_mask(rng: np.random.Generator, cls: int, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Full (unoccluded) mask of a shape of class ``cls`` with circumradius ``r`` at (cx, cy)."""
    theta = rng.uniform(0.0, 2.0 * math.pi)
    name = CLASSES[cls]
    if name == "circle":
        return _circle_mask(size, cx, cy, r)
    if name == "square":
        angles = [theta + k * math.pi / 2 for k in range(4)]
        return _polygon_mask(size, _regular_points(cx, cy, [r] * 4, angles))
    if name == "triangle":
        jitter = rng.uniform(-0.25, 0.25, size=3)  # vertex angles deviate a little from equilateral
        angles = [theta + k * 2.0 * math.pi / 3 + j for k, j in enumerate(jitter)]
        return _polygon_mask(size, _regular_points(cx, cy, [r] * 3, angles))
    if name == "star":
        inner = r * rng.uniform(0.38, 0.5)
        angles = [theta + k * math.pi / 5 for k in range(10)]
        return _polygon_mask(size, _regular_points(cx, cy, [r, inner] * 5, angles))
    raise AssertionError(name)


def _background(rng: np.random.Generator, c: ShapesConfig) -> np.ndarray:
    """(S, S, 3) float32 background: base colour, low-frequency colour drift, fine texture."""
    s = c.image_size
    base = rng.uniform(40.0, 215.0, size=3)
    canvas = np.broadcast_to(base, (s, s, 3)).astype(np.float32)
    if not c.textured_background:
        return canvas
    coarse = rng.normal(0.0, 22.0, size=(3, 4, 4)).astype(np.float32)
    drift = np.stack([np.array(Image.fromarray(ch).resize((s, s), Image.BICUBIC)) for ch in coarse], axis=-1)
    canvas = canvas + drift
    kind = rng.integers(0, 3)  # 0: smooth only, 1: blotchy noise, 2: stripes
    if kind == 1:
        n = max(4, s // 6)
        fine = rng.normal(0.0, 12.0, size=(n, n)).astype(np.float32)
        fine = np.array(Image.fromarray(fine).resize((s, s), Image.BILINEAR))
        canvas = canvas + fine[..., None]
    elif kind == 2:
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
        phi = rng.uniform(0.0, math.pi)
        period = rng.uniform(5.0, 14.0)
        stripes = np.sin((xx * math.cos(phi) + yy * math.sin(phi)) * 2.0 * math.pi / period)
        canvas = canvas + (rng.uniform(6.0, 14.0) * stripes)[..., None]
    return canvas


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 255.0, size=3)


def _draw_distractors(rng: np.random.Generator, canvas: np.ndarray, c: ShapesConfig) -> np.ndarray:
    """Paint non-object clutter onto the background: thin lines/arcs, small blobs, soft patches."""
    s = c.image_size
    n = int(rng.integers(0, c.max_distractors + 1))
    for _ in range(n):
        kind = rng.integers(0, 4)
        colour = _random_colour(rng)
        if kind == 3:  # soft colour patch: a Gaussian-weighted blend, no edges
            cx, cy = rng.uniform(0, s, size=2)
            sigma = rng.uniform(0.06, 0.18) * s
            yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
            alpha = rng.uniform(0.3, 0.6) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
            canvas = canvas * (1 - alpha[..., None]) + colour * alpha[..., None]
            continue
        layer = Image.new("1", (s, s), 0)
        draw = ImageDraw.Draw(layer)
        if kind == 0:  # thin straight line
            x0, y0, x1, y1 = rng.uniform(0, s, size=4)
            draw.line([(x0, y0), (x1, y1)], fill=1, width=int(rng.integers(1, 3)))
        elif kind == 1:  # thin arc (an open curve, never a filled shape)
            cx, cy = rng.uniform(0, s, size=2)
            r = rng.uniform(0.05, 0.2) * s
            start = rng.uniform(0, 360)
            draw.arc([cx - r, cy - r, cx + r, cy + r], start, start + rng.uniform(60, 240), fill=1, width=1)
        else:  # small blob, well below the smallest object
            cx, cy = rng.uniform(0, s, size=2)
            r = rng.uniform(0.008, 0.022) * s
            rx, ry = r * rng.uniform(0.7, 1.3), r * rng.uniform(0.7, 1.3)
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=1)
        m = np.array(layer, dtype=bool)
        canvas[m] = colour
    return canvas


def _pick_colour(rng: np.random.Generator, refs: list[np.ndarray]) -> np.ndarray:
    """A colour at least _MIN_CONTRAST from every reference colour (best of a few tries otherwise)."""
    best, best_d = None, -1.0
    for _ in range(_MAX_COLOUR_TRIES):
        colour = _random_colour(rng)
        d = min((float(np.linalg.norm(colour - ref)) for ref in refs), default=math.inf)
        if d >= _MIN_CONTRAST:
            return colour
        if d > best_d:
            best, best_d = colour, d
    assert best is not None
    return best


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def generate_sample(seed: int, index: int, config: ShapesConfig | None = None) -> Sample:
    """Render sample ``index`` of the dataset ``seed``; a pure function of (seed, index, config)."""
    c = ShapesConfig() if config is None else config
    if not isinstance(c, ShapesConfig):
        raise TypeError(f"config must be a ShapesConfig, got {type(c).__name__}")
    for name, v in (("seed", seed), ("index", index)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    rng = np.random.default_rng([int(seed), int(index)])
    s = c.image_size

    canvas = _background(rng, c)
    if c.distractors:
        canvas = _draw_distractors(rng, canvas, c)

    n_target = int(rng.integers(c.min_objects, c.max_objects + 1))
    classes: list[int] = []
    full: list[np.ndarray] = []  # full shape masks
    visible: list[np.ndarray] = []  # visible masks, updated as shapes are drawn on top
    colours: list[np.ndarray] = []
    lo, hi = c.size_range
    for _ in range(n_target):
        for _try in range(_MAX_PLACEMENT_TRIES):
            cls = int(rng.integers(0, len(CLASSES)))
            r = 0.5 * s * rng.uniform(lo, hi)
            cx, cy = rng.uniform(r, s - r, size=2)  # the whole shape lies inside the image
            mask = _shape_mask(rng, cls, s, cx, cy, r)
            area = int(mask.sum())
            if area < c.min_visible_pixels:
                continue
            ok = all(
                (v & ~mask).sum() >= max(c.min_visible_pixels, c.min_visible_fraction * f.sum())
                for f, v in zip(full, visible)
            )
            if ok:
                break
        else:
            continue  # too crowded: this image gets fewer objects
        refs = [canvas[mask].mean(axis=0)] + [col for col, v in zip(colours, visible) if (v & mask).any()]
        colour = _pick_colour(rng, refs)
        # gentle linear shading across the shape, so objects are not perfectly flat
        yy, xx = np.nonzero(mask)
        phi = rng.uniform(0.0, 2.0 * math.pi)
        ramp = ((xx - cx) * math.cos(phi) + (yy - cy) * math.sin(phi)) / max(r, 1.0)
        shade = 1.0 + rng.uniform(0.0, 0.15) * ramp
        canvas[yy, xx] = np.clip(colour[None, :] * shade[:, None], 0.0, 255.0)
        visible = [v & ~mask for v in visible]
        classes.append(cls)
        full.append(mask)
        visible.append(mask.copy())
        colours.append(colour)

    # Safety net (placement already guarantees it): drop objects whose visible area is too small.
    keep = [
        i for i, (f, v) in enumerate(zip(full, visible))
        if v.sum() >= max(c.min_visible_pixels, c.min_visible_fraction * f.sum())
    ]
    assert len(keep) == len(full), "placement check let an over-occluded object through"

    image = np.clip(canvas, 0.0, 255.0).astype(np.uint8)
    if c.blur_radius > 0:
        image = np.array(Image.fromarray(image).filter(ImageFilter.GaussianBlur(c.blur_radius)))
    if c.noise_std > 0:
        noise = rng.normal(0.0, c.noise_std, size=image.shape)
        image = np.clip(image.astype(np.float64) + noise, 0.0, 255.0).round().astype(np.uint8)

    masks = np.stack(visible) if visible else np.zeros((0, s, s), dtype=bool)
    boxes = np.stack([_mask_box(m) for m in visible]) if visible else np.zeros((0, 4), dtype=np.float32)
    frac = np.array([v.sum() / f.sum() for f, v in zip(full, visible)], dtype=np.float32).reshape(-1)
    return Sample(
        image=image,
        classes=np.array(classes, dtype=np.int64),
        boxes=boxes.astype(np.float32),
        masks=masks,
        visible_fraction=frac,
        seed=int(seed),
        index=int(index),
        class_names=CLASSES,
    )


def _mask_box(mask: np.ndarray) -> np.ndarray:
    """Tight xyxy box of a non-empty bool mask, pixel-edge convention (x1 = last column + 1)."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    return np.array([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], dtype=np.float32)


def iter_samples(seed: int, count: int, config: ShapesConfig | None = None, start: int = 0) -> Iterator[Sample]:
    """Yield samples ``start, …, start + count - 1`` of dataset ``seed``."""
    for index in range(start, start + count):
        yield generate_sample(seed, index, config)


def sample_to_target(sample: Sample) -> dict[str, torch.Tensor]:
    """Tensors for training/eval: image (3,H,W) uint8 RGB, labels, boxes (cxcywh in [0,1]), masks, boxes_xyxy."""
    h, w = sample.image.shape[:2]
    xyxy = torch.from_numpy(sample.boxes.astype(np.float32)).reshape(-1, 4)
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    x0, y0, x1, y1 = xyxy.unbind(-1)
    cxcywh = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1) / scale
    return {
        "image": torch.from_numpy(np.ascontiguousarray(sample.image.transpose(2, 0, 1))),  # (3, H, W)
        "labels": torch.from_numpy(sample.classes.astype(np.int64)),  # (N,)
        "boxes": cxcywh,  # (N, 4) normalised cxcywh
        "masks": torch.from_numpy(sample.masks).float(),  # (N, H, W)
        "boxes_xyxy": xyxy,  # (N, 4) pixels
        "image_id": torch.tensor(sample.index, dtype=torch.int64),
    }


class ShapesDataset(torch.utils.data.Dataset):
    """Map-style dataset: item i is ``sample_to_target(generate_sample(seed, i, config))``."""

    def __init__(self, seed: int, length: int, config: ShapesConfig | None = None) -> None:
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
            raise ValueError(f"length must be a non-negative integer, got {length!r}")
        self.seed = int(seed)
        self.length = int(length)
        self.config = ShapesConfig() if config is None else config
        self.class_names = CLASSES

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int) -> Sample:
        """The raw numpy Sample behind item ``index``."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for ShapesDataset of length {self.length}")
        return generate_sample(self.seed, index, self.config)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return sample_to_target(self.sample(index))


def collate(batch: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """DataLoader collate_fn: stacked images (B,3,H,W) and the per-image target dicts (without image)."""
    images = torch.stack([item["image"] for item in batch])
    targets = [{k: v for k, v in item.items() if k != "image"} for item in batch]
    return images, targets
