"""Canonizers: rewrite a model so that the rules apply, and restore it exactly afterwards.

A canonizer changes parameters in place for the forwards run while it is applied (zennit's pattern) and
puts the original tensors back on :meth:`restore` — the very tensor objects, so the model is
bit-identical afterwards, also after an error.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .rules import fold_batchnorm

__all__ = ["BatchNormFold"]


class BatchNormFold:
    """Merge each frozen batch norm into the conv (or linear) before it; the norm is bypassed meanwhile.

    LRP rules see one affine layer ``W'x + b'`` with ``W' = W·s`` and ``b' = β − μ·s (+ b·s)``, ``s = γ/√(σ²+ε)``,
    so the rule's denominators include the norm's shift and the ledger books ``b'`` as the conv's bias. The
    norm gets an instance-level identity ``forward`` (exact whatever its own arithmetic, e.g. a hard-coded ε).
    """

    def __init__(self, pairs: Sequence[tuple[nn.Module, nn.Module]]):
        for conv, norm in pairs:
            missing = [f for f in ("weight", "bias", "running_mean", "running_var") if getattr(norm, f, None) is None]
            if missing or not hasattr(conv, "weight"):
                raise ValueError(f"cannot fold {type(norm).__name__} into {type(conv).__name__}: "
                                 f"the norm lacks {missing or 'nothing'}; fold only frozen affine batch norms")
        self.pairs = list(pairs)
        self._saved: list[tuple[nn.Module, nn.Module, nn.Parameter, nn.Parameter | None]] = []

    @property
    def norms(self) -> list[nn.Module]:
        """The batch norms this canonizer bypasses (they carry no relevance of their own)."""
        return [norm for _, norm in self.pairs]

    def apply(self) -> None:
        """Fold every pair (idempotent: a second call does nothing until :meth:`restore`)."""
        if self._saved:
            return
        with torch.no_grad():
            for conv, norm in self.pairs:
                weight, bias = fold_batchnorm(conv.weight, conv.bias, norm.weight, norm.bias, norm.running_mean,
                                              norm.running_var, getattr(norm, "eps", 1e-5))
                self._saved.append((conv, norm, conv.weight, conv.bias))
                # new parameter objects (not .data swaps): the originals come back untouched
                conv.weight = nn.Parameter(weight, requires_grad=False)
                conv.bias = nn.Parameter(bias, requires_grad=False)
                norm.forward = _identity

    def restore(self) -> None:
        """Put the original parameters back and remove the bypass."""
        while self._saved:
            conv, norm, weight, bias = self._saved.pop()
            conv.weight = weight
            conv.bias = bias
            norm.__dict__.pop("forward", None)

    def __enter__(self) -> "BatchNormFold":
        self.apply()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x
