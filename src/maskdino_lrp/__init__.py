"""maskdino-lrp: Layer-wise Relevance Propagation for MaskDINO, in pure PyTorch."""
from __future__ import annotations

import os

from .model.config import ConfigError, load_config, preset_names
from .model.maskdino import Detections, ImageError, MaskDINO, build_model, load_weights
from .lrp import LRP, Explanation, get_composite

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "Detections", "Explanation", "ImageError", "LRP", "MaskDINO", "build_model", "get_composite",
    "load_config", "load_weights", "preset_names",
]

if os.environ.get("LOGLEVEL"):  # this package's loggers only; a bad value is a one-line warning
    from .logsetup import configure_from_environment

    configure_from_environment(os.environ["LOGLEVEL"])
