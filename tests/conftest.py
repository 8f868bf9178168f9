"""Shared test helpers: the official fixtures live in ../shared relative to the project root."""
from __future__ import annotations

from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED = PROJECT_ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures" / "maskdino"


def fixture_dir(name: str) -> Path:
    """Path of one official fixture folder; skips the test cleanly if the shared folder is absent."""
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"shared fixture {path} not present")
    return path


def zero_additive_constants(model) -> None:
    """Set every additive constant that could absorb relevance to zero: biases, batch-norm shifts and
    relative-position bias tables. Deformable attention's sampling-offset and attention-weight biases keep
    theirs: they choose where to look (positional), they add nothing to the value path."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if (name.endswith("bias") and "sampling_offsets" not in name and "attention_weights" not in name) \
                    or name.endswith("relative_position_bias_table"):
                p.zero_()
        for m in model.modules():
            if hasattr(m, "running_mean"):
                m.running_mean.zero_()
                m.bias.zero_()


def randomise_deformable_heads(model, std: float = 0.05) -> int:
    """Draw the weights of every deformable attention's sampling-offset and attention-weight heads (initialised
    to zero, so that the samples do not depend on the image), so that they move with the input; returns how many."""
    import torch

    heads = [p for name, p in model.named_parameters()
             if name.endswith(("sampling_offsets.weight", "attention_weights.weight"))]
    with torch.no_grad():
        for p in heads:
            p.normal_(0.0, std)
    return len(heads)


def pytest_configure(config):
    # One intra-op thread: on a 2-core machine shared with other work, OpenMP threads that
    # oversubscribe the cores make small ops orders of magnitude slower.
    import torch

    torch.set_num_threads(1)
