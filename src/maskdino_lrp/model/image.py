"""Reading input images the way image viewers show them, or refusing them with a one-line reason.

:func:`read_image` takes a file path, a PIL image, an array or a tensor and returns an H×W×3 RGB uint8
array. Files and PIL images are read as a viewer displays them:

- the EXIF orientation tag is applied (a phone photo stored sideways is explained upright);
- 16-bit images (``I;16*``, 16-bit PNG / PGM / TIFF read as ``I``) are scaled to 8 bits
  (``round(v * 255 / 65535)``), never clipped (clipping turns them all white);
- 32-bit integer images (``I``) of unknown depth are read as 8-bit when their values fit 0..255, as
  16-bit when they fit 0..65535, and refused otherwise; float images (``F``) in 0..1 are scaled by 255,
  in 0..255 taken as they are, and refused otherwise (or with NaN / Inf);
- palette, grey, bilevel, CMYK (through its ICC profile when it has one), YCbCr, LAB and HSV images
  become RGB; images with transparency (``RGBA``, ``LA``, ``PA``, palette or colour-key transparency)
  are composited over white, as a viewer shows them on a white page;
- an animated or multi-page file (GIF, APNG, WebP, TIFF) gives its first frame, said at debug level.

Arrays and tensors are taken as given (no conversion is guessed): they must be H×W×3 uint8, and any
other shape or dtype is refused with the one-line fix.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["ImageError", "read_image", "read_image_file", "pil_to_rgb", "apply_orientation", "EXIF_ORIENTATION"]

EXIF_ORIENTATION = 0x0112
# 16-bit integer modes: Pillow's names (little / big / native endian, signed)
_MODES_16 = ("I;16", "I;16L", "I;16B", "I;16N", "I;16S", "I;16LS", "I;16BS")
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


class ImageError(ValueError):
    """An input image the model cannot take, with what to do about it."""


# ----------------------------------------------------------------------------- orientation
def apply_orientation(array: np.ndarray, orientation: int) -> np.ndarray:
    """``array`` (H×W×C) as shown for an EXIF orientation value 1–8 (the same as Pillow's ``exif_transpose``)."""
    if orientation == 2:
        return array[:, ::-1]
    if orientation == 3:
        return array[::-1, ::-1]
    if orientation == 4:
        return array[::-1]
    if orientation == 5:
        return array.swapaxes(0, 1)
    if orientation == 6:
        return np.rot90(array, k=-1)
    if orientation == 7:
        return array[::-1, ::-1].swapaxes(0, 1)
    if orientation == 8:
        return np.rot90(array, k=1)
    return array


def _orientation(pil: Any, name: str) -> int:
    try:
        value = pil.getexif().get(EXIF_ORIENTATION, 1)
    except Exception as exc:  # a damaged EXIF block: Pillow raises many types
        log.warning("%s: cannot read its EXIF orientation (%s); using the pixels as stored", name, exc)
        return 1
    try:
        value = int(value)
    except (TypeError, ValueError):
        value = 0
    if value not in range(1, 9):
        log.warning("%s: EXIF orientation %r is not a valid value (1-8); using the pixels as stored", name, value)
        return 1
    return value


# ----------------------------------------------------------------------------- modes
def _declared_bits(pil: Any) -> int | None:
    """Bits per sample the file declares for an ``I`` image, where the format says."""
    fmt = (getattr(pil, "format", None) or "").upper()
    if fmt in ("PNG", "PPM"):  # Pillow reads 16-bit grey PNG / PGM (maxval > 255, rescaled to 65535) as I
        return 16
    tags = getattr(pil, "tag_v2", None)
    if fmt == "TIFF" and tags is not None:
        bits = tags.get(258)
        bits = bits[0] if isinstance(bits, (tuple, list)) and bits else bits
        if isinstance(bits, int):
            return bits
    return None


def _scale_16(values: np.ndarray, name: str) -> np.ndarray:
    values = values.astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ImageError(f"{name}: 16-bit image with values in [{values.min()}, {values.max()}] outside 0..65535; "
                         "save it as an unsigned 8- or 16-bit PNG")
    return ((values * 255 + 32767) // 65535).astype(np.uint8)


def _grey_to_uint8(pil: Any, name: str) -> np.ndarray:
    """Single-band 16/32-bit integer or float image → H×W uint8 at the depth the file has."""
    mode = pil.mode
    values = np.asarray(pil)
    if mode in _MODES_16:
        return _scale_16(values, name)
    if mode == "I":
        bits = _declared_bits(pil)
        if bits == 16:
            return _scale_16(values, name)
        if bits == 8:
            return np.clip(values, 0, 255).astype(np.uint8)
        lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if lo >= 0 and hi <= 255:
            log.debug("%s: 32-bit integer image with values in [%d, %d]; read as 8-bit", name, lo, hi)
            return values.astype(np.uint8)
        if lo >= 0 and hi <= 65535:
            log.debug("%s: 32-bit integer image with values in [%d, %d]; read as 16-bit", name, lo, hi)
            return _scale_16(values, name)
        raise ImageError(f"{name}: 32-bit integer image with values in [{lo}, {hi}] has no faithful 8-bit reading; "
                         "save it as an 8- or 16-bit PNG")
    # mode F: 32-bit float
    if not np.isfinite(values).all():
        raise ImageError(f"{name}: float image contains NaN or Inf pixels; clean it before explaining")
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if lo >= 0.0 and hi <= 1.0:
        log.debug("%s: float image with values in [%.3g, %.3g]; scaled from 0..1 to 0..255", name, lo, hi)
        return np.round(values * 255.0).astype(np.uint8)
    if lo >= 0.0 and hi <= 255.0:
        log.debug("%s: float image with values in [%.3g, %.3g]; read as 0..255", name, lo, hi)
        return np.round(values).astype(np.uint8)
    raise ImageError(f"{name}: float image with values in [{lo:.3g}, {hi:.3g}] has no faithful 8-bit reading "
                     "(expected 0..1 or 0..255); save it as an 8- or 16-bit PNG")


def _has_transparency(pil: Any) -> bool:
    return pil.mode in _ALPHA_MODES or "transparency" in getattr(pil, "info", {})


def _over_white(rgba: np.ndarray, name: str) -> np.ndarray:
    """H×W×4 uint8 → H×W×3 composited over white (what a viewer shows on a white page)."""
    alpha = rgba[..., 3:4]
    if alpha.min(initial=255) == 255:
        return np.ascontiguousarray(rgba[..., :3])
    log.debug("%s has transparent pixels; composited over white", name)
    a = alpha.astype(np.uint32)
    rgb = rgba[..., :3].astype(np.uint32)
    return ((rgb * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def _cmyk_to_rgb(pil: Any, name: str) -> Any:
    icc = pil.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            return ImageCms.profileToProfile(pil, io.BytesIO(icc), ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception as exc:  # no littlecms, or a profile it cannot use
            log.debug("%s: CMYK ICC profile not applied (%s); plain CMYK conversion", name, exc)
    return pil.convert("RGB")


def pil_to_rgb(pil: Any, name: str = "image") -> np.ndarray:
    """A PIL image → H×W×3 uint8 RGB as a viewer shows it (first frame, EXIF orientation, 8-bit, over white)."""
    frames = getattr(pil, "n_frames", 1) or 1
    if frames > 1:
        log.debug("%s has %d frames; using the first", name, frames)
        pil.seek(0)
    orientation = _orientation(pil, name)
    mode = pil.mode
    try:
        if mode == "RGB":
            array = np.asarray(pil)
        elif mode in _MODES_16 or mode in ("I", "F"):
            grey = _grey_to_uint8(pil, name)
            array = np.repeat(grey[..., None], 3, axis=-1)
        elif _has_transparency(pil):
            array = _over_white(np.asarray(pil.convert("RGBA")), name)
        elif mode == "CMYK":
            array = np.asarray(_cmyk_to_rgb(pil, name))
        else:  # 1, L, P, YCbCr, LAB, HSV, RGBX, …
            array = np.asarray(pil.convert("RGB"))
    except ImageError:
        raise
    except ValueError as exc:  # Pillow: "conversion from X to RGB not supported"
        raise ImageError(f"{name}: image mode {mode!r} cannot be converted to RGB ({exc}); "
                         "save it as an RGB PNG or JPEG") from exc
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ImageError(f"{name}: image mode {mode!r} did not convert to 8-bit RGB; save it as an RGB PNG or JPEG")
    if orientation != 1:
        log.debug("%s: EXIF orientation %d applied", name, orientation)
        array = apply_orientation(array, orientation)
    return np.ascontiguousarray(array)


def read_image_file(path: str | Path) -> np.ndarray:
    """An image file → H×W×3 RGB uint8 as a viewer shows it; :class:`ImageError` with the reason otherwise."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image file not found: {path}")
    try:
        with Image.open(path) as pil:
            pil.load()
            return pil_to_rgb(pil, str(path))
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"cannot read image {path}: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ImageError(f"cannot read image {path}: {reason}; give a PNG/JPEG file") from exc


def read_image(image: Any, channel_order: str = "RGB") -> np.ndarray:
    """An image (file path, PIL image, H×W×3 uint8 array or tensor) as an H×W×3 RGB uint8 array.

    Files and PIL images are read as viewers show them (see the module docstring); arrays and tensors
    must already be H×W×3 uint8 (``channel_order`` says whether they are RGB or BGR).
    """
    from PIL import Image

    if channel_order.upper() not in ("RGB", "BGR"):
        raise ImageError(f"channel_order must be 'RGB' or 'BGR', got {channel_order!r}")
    if isinstance(image, (str, Path)):
        return read_image_file(image)
    if isinstance(image, Image.Image):
        return pil_to_rgb(image, "PIL image")
    try:
        import torch

        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
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
        if image.dtype == np.uint16:
            raise ImageError("image is uint16 (16-bit); the model takes uint8 0..255: "
                             "(img.astype(np.uint32) * 255 + 32767) // 65535, then .astype(np.uint8)")
        raise ImageError(f"image dtype {image.dtype} is not supported; give uint8 0..255")
    if channel_order.upper() == "BGR":
        image = image[..., ::-1]
    return np.ascontiguousarray(image)
