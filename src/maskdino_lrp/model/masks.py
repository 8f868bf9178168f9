"""Binary instance masks stored compactly: COCO run-length encoding (pycocotools).

A full-size bool mask of a 24-megapixel photo takes 24 MB; a hundred candidates, 2.4 GB. The
post-processing therefore resizes the candidates' mask logits to the photo one small group at a time
(:func:`resize_and_encode`), and what it keeps is a :class:`CompactMask`: the COCO RLE (a few
hundred bytes to a few KB per mask), its area and its bounding box. ``np.asarray(mask)`` decodes it
(only when a dense array is really wanted: one mask at a time is bounded, all of them at once is not).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

# the largest float buffer one resize step may take: candidates are resized this many bytes at a time
RESIZE_BUDGET_BYTES = 64 * 2 ** 20


class CompactMask:
    """One (H, W) binary mask as COCO RLE; ``np.asarray(mask)`` gives the dense bool array.

    ``size`` is (H, W); ``counts`` the compressed COCO counts string (bytes). ``area`` (pixels) and
    ``bbox`` (x0, y0, x1, y1 in pixel-edge convention: x1 = last column + 1; zeros for an empty mask)
    are computed from the RLE without decoding it.
    """

    __slots__ = ("size", "counts", "_area")

    def __init__(self, size: Sequence[int], counts: bytes | str, area: int | None = None):
        self.size = (int(size[0]), int(size[1]))
        self.counts = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
        self._area = None if area is None else int(area)

    # -------------------------------------------------------------- construction
    @classmethod
    def from_array(cls, mask: Any) -> "CompactMask":
        """Encode an (H, W) bool (or 0/1) array or tensor."""
        from pycocotools import mask as mask_utils

        t = mask.detach() if isinstance(mask, torch.Tensor) else torch.from_numpy(np.asarray(mask))
        if t.ndim != 2:
            raise ValueError(f"a mask must be (H, W), got shape {tuple(t.shape)}")
        rle = mask_utils.encode(_column_major(t != 0)[0].T)
        return cls(rle["size"], rle["counts"])

    @classmethod
    def from_coco(cls, rle: Mapping[str, Any]) -> "CompactMask":
        """From a COCO compressed RLE dict ``{"size": [H, W], "counts": str | bytes}``."""
        if not isinstance(rle, Mapping) or "size" not in rle or "counts" not in rle:
            raise ValueError("a COCO RLE needs 'size' and 'counts'")
        if not isinstance(rle["counts"], (str, bytes)):
            raise ValueError("only compressed COCO RLE (counts as a string) is supported")
        return cls(rle["size"], rle["counts"])

    @classmethod
    def coerce(cls, mask: Any) -> "CompactMask | None":
        """A CompactMask from a CompactMask, a COCO RLE dict or a dense (H, W) array; None stays None."""
        if mask is None or isinstance(mask, CompactMask):
            return mask
        if isinstance(mask, Mapping):
            return cls.from_coco(mask)
        return cls.from_array(mask)

    # -------------------------------------------------------------- views
    def _rle(self) -> dict:
        return {"size": list(self.size), "counts": self.counts}

    def to_coco(self) -> dict:
        """JSON-ready COCO compressed RLE: ``{"size": [H, W], "counts": str}``."""
        return {"size": list(self.size), "counts": self.counts.decode("ascii")}

    def decode(self) -> np.ndarray:
        """The dense (H, W) bool array (C order)."""
        import warnings

        from pycocotools import mask as mask_utils

        with warnings.catch_warnings():  # pycocotools' Masks.__array__ predates numpy 2's copy keyword
            warnings.simplefilter("ignore", DeprecationWarning)
            dense = mask_utils.decode(self._rle())  # (H, W) uint8 in Fortran order
        # to C order with torch's blocked transpose (numpy's copy is ~6× slower on 24 MP)
        return torch.from_numpy(dense.T).t().contiguous().view(torch.bool).numpy()

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        a = self.decode()
        return a if dtype is None else a.astype(dtype)

    @property
    def shape(self) -> tuple[int, int]:
        return self.size

    @property
    def area(self) -> int:
        if self._area is None:
            from pycocotools import mask as mask_utils

            self._area = int(mask_utils.area(self._rle()))
        return self._area

    def sum(self) -> int:
        """The number of mask pixels (as ``dense.sum()``)."""
        return self.area

    def any(self) -> bool:
        return self.area > 0

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """Tight box (x0, y0, x1, y1) of the mask pixels, x1/y1 exclusive; (0, 0, 0, 0) if empty."""
        from pycocotools import mask as mask_utils

        x, y, w, h = (int(round(v)) for v in mask_utils.toBbox(self._rle()))
        return (x, y, x + w, y + h) if self.area else (0, 0, 0, 0)

    def resized(self, size: tuple[int, int]) -> np.ndarray:
        """The mask at ``size`` (h, w) for display (nearest neighbour); decodes one mask, nothing more."""
        from PIL import Image

        dense = self.decode()
        if tuple(size) == self.size:
            return dense
        small = Image.fromarray(dense.view(np.uint8) * 255).resize((int(size[1]), int(size[0])), Image.NEAREST)
        return np.asarray(small) > 127

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CompactMask):
            return self.size == other.size and self.counts == other.counts
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.size, self.counts))

    def __repr__(self) -> str:
        return f"CompactMask({self.size[0]}×{self.size[1]}, area={self.area})"


def _column_major(binary: torch.Tensor) -> np.ndarray:
    """(…, H, W) bool tensor → (N, W, H) uint8 array whose ``[i].T`` is the (H, W) mask in Fortran order,
    the layout COCO RLE encodes (a torch transpose: numpy's ``asfortranarray`` is ~6× slower on 24 MP)."""
    b = binary.reshape(-1, *binary.shape[-2:])
    return b.transpose(1, 2).contiguous().view(torch.uint8).cpu().numpy()


def decode_all(masks: Sequence[CompactMask], size: tuple[int, int]) -> torch.Tensor:
    """(K, H, W) bool tensor of ``masks`` (dense: K × H × W bytes)."""
    out = torch.zeros((len(masks), *size), dtype=torch.bool)
    for i, m in enumerate(masks):
        out[i] = torch.from_numpy(m.decode())
    return out


def resize_and_encode(mask_logits: torch.Tensor, padded_size: tuple[int, int], resized_size: tuple[int, int],
                      original_size: tuple[int, int], budget_bytes: int = RESIZE_BUDGET_BYTES
                      ) -> tuple[list[CompactMask], torch.Tensor]:
    """Official mask post-processing, a few candidates at a time: (Q, h, w) logits → Q compact masks and
    the (Q,) mask scores (mean mask probability inside the mask, at the original size).

    Each candidate's logits are upsampled to the padded input, cropped to the resized image and resized
    to ``original_size`` exactly as one batched call would (bilinear interpolation treats channels
    independently: the values are bit-identical); only ``budget_bytes`` of full-size floats exist at a
    time, and what is kept is the RLE of ``logits > 0``.
    """
    from pycocotools import mask as mask_utils

    q = int(mask_logits.shape[0])
    oh, ow = original_size
    rh, rw = resized_size
    per = max(oh * ow, int(padded_size[0]) * int(padded_size[1])) * mask_logits.element_size()
    step = max(1, int(budget_bytes) // max(per, 1))
    masks: list[CompactMask] = []
    scores = []
    for begin in range(0, q, step):
        chunk = mask_logits[begin: begin + step]
        up = F.interpolate(chunk[None], size=tuple(padded_size), mode="bilinear", align_corners=False)
        up = up[..., :rh, :rw]
        full = F.interpolate(up, size=(oh, ow), mode="bilinear", align_corners=False)[0]
        del up
        binary = full > 0
        columns = _column_major(binary)
        areas = []
        for i in range(columns.shape[0]):
            rle = mask_utils.encode(columns[i].T)
            masks.append(CompactMask(rle["size"], rle["counts"]))
            areas.append(masks[-1].area)
        del columns
        prob = full.sigmoid_()  # in place: the logits are no longer needed
        prob.mul_(binary)  # = sigmoid × binary, the official mask score's numerator
        del binary
        # the pixel count from the RLE: the same integer as binary.sum() (which is slow on bool)
        count = torch.tensor(areas, dtype=torch.int64, device=prob.device)
        scores.append(prob.flatten(1).sum(1) / (count + 1e-6))
        del prob, full
    score = torch.cat(scores) if scores else mask_logits.new_zeros((0,))
    return masks, score


def as_compact_list(masks: Iterable[Any]) -> list[CompactMask]:
    return [CompactMask.coerce(m) for m in masks]
