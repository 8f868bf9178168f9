"""Deletion / insertion / LIF curves of one (pair, unit, replacement), every order's curves batched together.

A :class:`CurveProbe` holds what the curves of one explained detection need in one unit (``pixels``:
the image and its neutral image; ``tokens``: keep-all and keep-none masks over the encoder tokens)
and one replacement. :meth:`CurveProbe.curves` takes the removal orders of all methods (and the
random baseline) at once, lists the perturbed inputs every curve needs, keeps each distinct one once
(the start and the neutral input are shared by all orders; over the whole range LIF deletion at
fraction f is insertion at 1 − f of the same order) and scores them in batches of ``batch_size``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from . import metrics as M
from .settings import MODES

__all__ = ["CurveProbe", "curve_counts"]

Key = tuple  # ("start",) | ("neutral",) | (order name, "del" | "ins", count)


def curve_counts(n: int, steps: int, max_fraction: float) -> np.ndarray:
    """Removed (or inserted) element counts at the curve's fractions 0, m/steps, …, m of ``n`` elements.

    Over the whole range the counts are mirror-symmetric (count at 1 − f = n − count at f; rounding
    alone would break that where f·n ends in .5, e.g. 525 tokens × 10 %), so that LIF deletion at f and
    insertion at 1 − f are the same images and are scored once."""
    counts = np.round(M.perturbation_fractions(steps, max_fraction) * n).astype(int)
    if max_fraction == 1.0:
        half = (steps + 1) // 2
        counts[steps - half + 1:] = n - counts[:half][::-1]
    return counts


@dataclass
class CurveProbe:
    """One pair's perturbation set-up in one unit and replacement; ``scorer`` maps a batch of inputs shaped
    like ``start`` (B, …) to (B, S) scores (column 0: the re-matched query's score)."""

    unit: str
    replacement: str
    scorer: Callable[[torch.Tensor], torch.Tensor]
    start: torch.Tensor  # (C, h, w): the image, or (1, 1, T) keep-all
    neutral: torch.Tensor  # same shape: the replacement, or keep-none
    shapes: list[tuple[int, int]] | None = None  # token levels, for the token unit
    forwards: int = field(default=0, init=False)  # inputs scored so far (distinct perturbed inputs)

    @property
    def size(self) -> int:
        """Number of removable elements (pixels or tokens)."""
        return int(self.start.shape[-2] * self.start.shape[-1])

    def _key(self, name: str, mode: str, count: int) -> Key:
        n = self.size
        if mode == "deletion":
            kind, k = "del", count
        elif mode == "insertion":
            kind, k = "ins", count
        elif mode == "lif":  # the last `count` of the order removed = its first n − count kept
            kind, k = "ins", n - count
        else:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if (kind, k) in (("del", 0), ("ins", n)):
            return ("start",)
        if (kind, k) in (("del", n), ("ins", 0)):
            return ("neutral",)
        return (name, kind, int(k))

    def _compose(self, key: Key, ranks: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if key == ("start",):
            return self.start
        if key == ("neutral",):
            return self.neutral
        name, kind, k = key
        chosen = (ranks[name] < k).view(1, *self.start.shape[-2:])
        first, second = (self.neutral, self.start) if kind == "del" else (self.start, self.neutral)
        return torch.where(chosen, first, second)

    def curves(self, orders: Mapping[str, np.ndarray], counts: np.ndarray, modes: Sequence[str] = MODES,
               batch_size: int = 16) -> dict[str, dict[str, np.ndarray]]:
        """order name → mode → scores (len(counts), S): each order's curves, the inputs scored once each
        (a scorer returning (B,) gives S = 1)."""
        n = self.size
        ranks = {}
        for name, order in orders.items():
            order = np.ascontiguousarray(order)  # reversed views have negative strides torch cannot take
            if order.size != n:
                raise ValueError(f"order {name!r} has {order.size} elements, the {self.unit} are {n}")
            rank = torch.empty(n, dtype=torch.long)
            rank[torch.as_tensor(order, dtype=torch.long)] = torch.arange(n)
            ranks[name] = rank
        plan = {(name, mode): [self._key(name, mode, int(c)) for c in counts] for name in orders for mode in modes}
        unique = list(dict.fromkeys(key for keys in plan.values() for key in keys))
        scores: dict[Key, np.ndarray] = {}
        for begin in range(0, len(unique), batch_size):
            chunk = unique[begin: begin + batch_size]
            batch = torch.stack([self._compose(key, ranks) for key in chunk])
            with torch.no_grad():
                out = np.asarray(self.scorer(batch), dtype=np.float64)
            out = out.reshape(len(chunk), -1)  # (B,) scores as one column
            scores.update(zip(chunk, out))
        self.forwards += len(unique)
        result: dict[str, dict[str, np.ndarray]] = {name: {} for name in orders}
        for (name, mode), keys in plan.items():
            result[name][mode] = np.stack([scores[key] for key in keys])
        return result

    def metrics(self, curve: Mapping[str, np.ndarray], fractions: np.ndarray, aopc_steps: int,
                baseline: Mapping[str, float] | None) -> dict[str, float]:
        """The faithfulness metrics of one order's curves, keyed ``[token_]metric`` (no replacement suffix);
        ``baseline`` = the random order's AUCs (None for the random order itself: no gaps)."""
        p = "" if self.unit == "pixels" else "token_"
        row: dict[str, float] = {}
        if "deletion" in curve:
            row[p + "deletion_auc"] = M.area_under_curve(curve["deletion"][:, 0], fractions)
            row[p + "aopc"] = M.aopc(curve["deletion"][:, 0], aopc_steps)
            if self.unit == "pixels" and curve["deletion"].shape[1] > 1:
                row["deletion_auc_fixed_query"] = M.area_under_curve(curve["deletion"][:, 1], fractions)
        if "insertion" in curve:
            row[p + "insertion_auc"] = M.area_under_curve(curve["insertion"][:, 0], fractions)
        if "lif" in curve:
            row[p + "lif_auc"] = M.area_under_curve(curve["lif"][:, 0], fractions)
            if "deletion" in curve:
                row[p + "srg"] = M.symmetric_relevance_gain(row[p + "lif_auc"], row[p + "deletion_auc"])
        if baseline is not None:
            if p + "deletion_auc" in row:
                row[p + "deletion_gap"] = baseline["deletion"] - row[p + "deletion_auc"]
            if p + "insertion_auc" in row:
                row[p + "insertion_gap"] = row[p + "insertion_auc"] - baseline["insertion"]
        return row

    def order(self, pixel_map: torch.Tensor, token_map: torch.Tensor | None, seed: int,
              padded_size: tuple[int, int] | None = None) -> np.ndarray:
        """Removal order: pixels by relevance; tokens level-balanced, from the method's own token map
        where it has one, else from its pixel map summed over each token's footprint."""
        if self.unit == "pixels":
            return M.relevance_order(pixel_map, seed)
        if token_map is None:
            token_map = M.pool_to_tokens(pixel_map, self.shapes, padded_size)
        return M.level_balanced_order(token_map, self.shapes, seed)
