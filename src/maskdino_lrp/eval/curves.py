"""Deletion / insertion / LIF curves of one (pair, unit, replacement), every order's curves batched together.

A :class:`CurveProbe` holds what the curves of one explained detection need in one unit (``pixels``:
the image and its neutral image; ``patches``: the same, removed in squares of ``patch`` pixels;
``tokens``: keep-all and keep-none masks over the encoder tokens) and one replacement.
:meth:`CurveProbe.curves` takes the removal orders of all methods (and the random baseline) at once,
lists the perturbed inputs every curve needs, keeps each distinct one once (an input is identified by
the set of elements it replaces: the start and the neutral input are shared by all orders; over the
whole range LIF deletion at fraction f is insertion at 1 − f of the same order; two orders that agree
on a step's set, as methods with the same token ranking do, share that input) and scores them in
batches of ``batch_size``; inputs whose scores it is given (``known``: the start and neutral inputs,
which every pair of an image shares) are not run again.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from . import metrics as M
from .settings import MODES, UNIT_PREFIX

__all__ = ["CurveProbe", "curve_counts"]

Key = tuple  # ("start",) | ("neutral",) | ("replaced", packed bits of the replaced elements)


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
    patch: int = 1  # side of the squares the patches unit removes (1 for the other units)
    # scores already known, e.g. {("start",): …, ("neutral",): …} from forwards the image's pairs share
    known: Mapping[Key, np.ndarray] = field(default_factory=dict)
    # False: inputs keyed by (order, kind, count), so orders never share one (the reference path)
    by_content: bool = True
    forwards: int = field(default=0, init=False)  # inputs scored so far (distinct perturbed inputs)

    @property
    def grid(self) -> tuple[int, int]:
        """The removable elements' grid: pixels, patches (the last row and column cut by the image edge) or tokens."""
        h, w = self.start.shape[-2:]
        return -(-h // self.patch), -(-w // self.patch)

    @property
    def size(self) -> int:
        """Number of removable elements (pixels, patches or tokens)."""
        return self.grid[0] * self.grid[1]

    def _replaced(self, rank: torch.Tensor, mode: str, count: int) -> torch.Tensor:
        """(n,) bool: the elements that hold the neutral value at ``count`` on a curve of ``mode``."""
        if mode == "deletion":  # the first `count` of the order removed
            return rank < count
        if mode == "insertion":  # the first `count` inserted into the neutral input
            return rank >= count
        if mode == "lif":  # the last `count` removed = insertion of the first n − count
            return rank >= self.size - count
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

    def _key(self, replaced: torch.Tensor, name: str, mode: str, count: int) -> Key:
        """The input's identity is what it replaces: equal inputs of any orders and modes are scored once."""
        if not bool(replaced.any()):
            return ("start",)
        if bool(replaced.all()):
            return ("neutral",)
        if not self.by_content:  # LIF at count c is insertion at n − c
            return (name, "del", count) if mode == "deletion" else \
                (name, "ins", count if mode == "insertion" else self.size - count)
        return ("replaced", np.packbits(replaced.numpy()).tobytes())

    def _compose(self, replaced: torch.Tensor) -> torch.Tensor:
        where = replaced.view(*self.grid)
        if self.patch > 1:
            h, w = self.start.shape[-2:]
            where = where.repeat_interleave(self.patch, 0).repeat_interleave(self.patch, 1)[:h, :w]
        return torch.where(where[None], self.neutral, self.start)

    def curves(self, orders: Mapping[str, np.ndarray], counts: np.ndarray, modes: Sequence[str] = MODES,
               batch_size: int = 16) -> dict[str, dict[str, np.ndarray]]:
        """order name → mode → scores (len(counts), S): each order's curves, the inputs scored once each
        (a scorer returning (B,) gives S = 1)."""
        n = self.size
        plan: dict[tuple[str, str], list[Key]] = {}
        inputs: dict[Key, torch.Tensor] = {}  # each distinct input's replaced elements
        for name, order in orders.items():
            order = np.ascontiguousarray(order)  # reversed views have negative strides torch cannot take
            if order.size != n:
                raise ValueError(f"order {name!r} has {order.size} elements, the {self.unit} are {n}")
            rank = torch.empty(n, dtype=torch.long)
            rank[torch.as_tensor(order, dtype=torch.long)] = torch.arange(n)
            for mode in modes:
                keys = plan[name, mode] = []
                for c in counts:
                    replaced = self._replaced(rank, mode, int(c))
                    key = self._key(replaced, name, mode, int(c))
                    inputs.setdefault(key, replaced)
                    keys.append(key)
        unique = [key for key in inputs if key not in self.known]
        scores: dict[Key, np.ndarray] = {key: np.asarray(v, dtype=np.float64).reshape(-1)
                                         for key, v in self.known.items()}
        for begin in range(0, len(unique), batch_size):
            chunk = unique[begin: begin + batch_size]
            batch = torch.stack([self._compose(inputs[key]) for key in chunk])
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
        """The faithfulness metrics of one order's curves, keyed ``[patch_|token_]metric`` (no replacement suffix);
        ``baseline`` = the random order's AUCs (None for the random order itself: no gaps)."""
        p = UNIT_PREFIX[self.unit]
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
        """Removal order: pixels by relevance; patches by their pixels' summed relevance; tokens level-balanced,
        from the method's own token map where it has one, else from its pixel map summed over each token's footprint."""
        if self.unit == "pixels":
            return M.relevance_order(pixel_map, seed)
        if self.unit == "patches":
            return M.relevance_order(M.pool_to_patches(pixel_map, self.patch), seed)
        if token_map is None:
            token_map = M.pool_to_tokens(pixel_map, self.shapes, padded_size)
        return M.level_balanced_order(token_map, self.shapes, seed)
