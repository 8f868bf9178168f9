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
    """Merge each frozen batch norm into the conv (or linear) before it; the norm becomes the identity.

    LRP rules see one affine layer ``W'x + b'`` with ``W' = W·s`` and ``b' = β − μ·s (+ b·s)``, ``s = γ/√(σ²+ε)``,
    so the rule's denominators include the norm's shift and the ledger books ``b'`` as the conv's bias. The
    norm keeps running but computes ``x·1 + 0`` exactly (statistics 0 / 1, ε = 0, affine 1 / 0).
    """

    _NORM_FIELDS = ("weight", "bias", "running_mean", "running_var")

    def __init__(self, pairs: Sequence[tuple[nn.Module, nn.Module]]):
        for conv, norm in pairs:
            missing = [f for f in self._NORM_FIELDS if getattr(norm, f, None) is None]
            if missing or not hasattr(conv, "weight"):
                raise ValueError(f"cannot fold {type(norm).__name__} into {type(conv).__name__}: "
                                 f"the norm lacks {missing or 'nothing'}; fold only frozen affine batch norms")
        self.pairs = list(pairs)
        self._saved: list[tuple[nn.Module, nn.Module, nn.Parameter, nn.Parameter | None, dict, float]] = []

    @property
    def norms(self) -> list[nn.Module]:
        """The batch norms this canonizer makes the identity (they carry no relevance of their own)."""
        return [norm for _, norm in self.pairs]

    def apply(self) -> None:
        """Fold every pair (idempotent: a second call does nothing until :meth:`restore`)."""
        if self._saved:
            return
        with torch.no_grad():
            for conv, norm in self.pairs:
                saved_norm = {f: _value(norm, f) for f in self._NORM_FIELDS}
                eps = getattr(norm, "eps", 1e-5)
                weight, bias = fold_batchnorm(conv.weight, conv.bias, *saved_norm.values(), eps)
                self._saved.append((conv, norm, conv.weight, conv.bias, saved_norm, eps))
                conv.weight = nn.Parameter(weight, requires_grad=False)
                conv.bias = nn.Parameter(bias, requires_grad=False)
                for f, value in zip(self._NORM_FIELDS, (1.0, 0.0, 0.0, 1.0)):
                    _swap(norm, f, torch.full_like(saved_norm[f], value))
                norm.eps = 0.0

    def restore(self) -> None:
        """Put the original tensors back."""
        while self._saved:
            conv, norm, weight, bias, saved_norm, eps = self._saved.pop()
            conv.weight = weight
            conv.bias = bias
            for f, value in saved_norm.items():
                _swap(norm, f, value)
            norm.eps = eps

    def __enter__(self) -> "BatchNormFold":
        self.apply()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def _value(module: nn.Module, name: str) -> torch.Tensor:
    """A buffer itself, or a parameter's data (the parameter object stays in place)."""
    param = module._parameters.get(name)
    return param.data if param is not None else getattr(module, name)


def _swap(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace a buffer, or a parameter's data, by ``value``."""
    param = module._parameters.get(name)
    if param is not None:
        param.data = value
    else:
        setattr(module, name, value)
