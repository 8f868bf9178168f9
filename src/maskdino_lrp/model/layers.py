"""detectron2's small layer wrappers that both the backbone and the pixel decoder use."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that applies its own ``norm`` and then, if set, ``activation`` (detectron2's wrapper)."""

    def __init__(self, *args: Any, norm: nn.Module | None = None, activation: nn.Module | None = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def with_pos_embed(tensor: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    """``tensor + pos`` (or ``tensor`` without a position embedding), as the official layers."""
    return tensor if pos is None else tensor + pos


def post_norm_ffn(x: torch.Tensor, linear1: nn.Module, activation: nn.Module, dropout_hidden: nn.Module,
                  linear2: nn.Module, dropout_out: nn.Module, norm: nn.Module) -> torch.Tensor:
    """The transformer layers' feed-forward block: ``norm(x + dropout(linear2(dropout(act(linear1(x))))))``.

    The encoder and decoder layers name their modules differently (official state-dict keys), so they
    pass them in.
    """
    return norm(x + dropout_out(linear2(dropout_hidden(activation(linear1(x))))))
