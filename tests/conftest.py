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


def pytest_configure(config):
    # One intra-op thread: on a 2-core machine shared with other work, OpenMP threads that
    # oversubscribe the cores make small ops orders of magnitude slower.
    import torch

    torch.set_num_threads(1)
