"""The result of explaining detections: relevance at every stop, the target values, and the ledger."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class Level:
    """One feature level of the encoder's token sequence."""

    name: str  # e.g. "stride8"
    stride: int
    height: int
    width: int
    start: int  # index of the level's first token in the flattened sequence

    @property
    def size(self) -> int:
        return self.height * self.width


@dataclass
class Explanation:
    """LRP relevance for K explained queries of one image.

    ``relevance[stop]`` holds token relevance summed over channels, first axis K (one row per query):
    ``pixels`` (K, H, W) at the model input (resized, padding cropped), ``backbone.res*`` (K, h, w),
    ``encoder_input`` / ``encoder_layer{i}`` / ``memory`` (K, T) tokens in :attr:`levels` order,
    ``lateral{i}`` (K, h, w) the FPN's lateral features (with ``memory``, a complete cut),
    ``mask_features`` (K, h, w), ``query_init`` / ``decoder_layer{i}`` (K, Q) per query state.
    ``conservation`` maps each complete cut of the graph to per-query sums (see :meth:`conservation_table`).
    """

    queries: torch.Tensor  # (K,)
    labels: torch.Tensor  # (K,)
    target: str
    target_values: torch.Tensor  # (K,)
    relevance: dict[str, torch.Tensor]
    levels: list[Level]
    conservation: dict[str, dict[str, torch.Tensor]]
    detections: list[dict]
    image: np.ndarray  # the input image, RGB uint8 (H, W, 3)
    input_size: tuple[int, int]  # (h, w) of the resized model input
    composite: str
    channel_relevance: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.queries.numel())

    @property
    def stops(self) -> list[str]:
        return list(self.relevance)

    def token_maps(self, stop: str, k: int = 0) -> dict[str, torch.Tensor]:
        """Token relevance of query row ``k`` at a token stop, as one (h, w) map per level."""
        tokens = self.relevance[stop][k]
        return {lv.name: tokens[lv.start: lv.start + lv.size].view(lv.height, lv.width) for lv in self.levels}

    def pixel_map(self, k: int = 0, size: str = "image") -> torch.Tensor:
        """Pixel relevance of row ``k``; ``size="image"`` resamples to the input image, keeping the sum."""
        rel = self.relevance["pixels"][k]
        if size != "image" or tuple(rel.shape) == tuple(self.image.shape[:2]):
            return rel
        h, w = self.image.shape[:2]
        scale = rel.shape[0] * rel.shape[1] / float(h * w)
        return torch.nn.functional.interpolate(rel[None, None], size=(h, w), mode="bilinear",
                                               align_corners=False)[0, 0] * scale

    def conservation_table(self) -> str:
        """Per query and complete cut: target, relevance at the cut, ledger shares, residual."""
        lines = [f"{'query':>6} {'cut':<14} {'target':>11} {'at cut':>11} {'bias':>10} {'embed':>10} {'position':>10} {'residual':>10} {'rel.err':>9}"]
        for i, q in enumerate(self.queries.tolist()):
            for cut, row in self.conservation.items():
                t = float(row["target"][i])
                lines.append(
                    f"{q:>6} {cut:<14} {t:>11.4g} {float(row['total'][i]):>11.4g} {float(row['bias'][i]):>10.3g} "
                    f"{float(row['embeddings'][i]):>10.3g} {float(row['positional'][i]):>10.3g} "
                    f"{float(row['residual'][i]):>10.3g} {float(row['residual'][i]) / (abs(t) + 1e-12):>9.2e}"
                )
        return "\n".join(lines)

    def save(self, out_dir, image_name: str | None = None, **kwargs) -> dict:
        """Write CSVs, raw arrays, overlays and summary.json for every query (see analysis.export)."""
        from ..analysis.export import save_explanation

        return save_explanation(self, out_dir, image_name, **kwargs)

    def to_csv(self, path, stops=None) -> None:
        """One CSV of token relevance for every query and token stop."""
        from ..analysis.export import explanation_to_csv

        explanation_to_csv(self, path, stops)

    def plot(self, path, k: int = 0, stop: str | None = None) -> None:
        """A PNG overlay of query row ``k``'s relevance at ``stop`` (pixels by default)."""
        from ..analysis.export import plot_explanation

        plot_explanation(self, path, k, stop)

    def __repr__(self) -> str:
        return (f"Explanation({len(self)} queries {self.queries.tolist()}, target={self.target!r}, "
                f"composite={self.composite!r}, stops={self.stops})")
