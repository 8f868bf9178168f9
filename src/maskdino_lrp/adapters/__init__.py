"""Adapters: everything the LRP engine must know about one model family, one small class per family.

``find_adapter(model)`` returns the registered adapter that matches a model (or one of its parts);
:class:`~.base.Adapter` lists what an adapter declares. MaskDINO's is the first (:mod:`.maskdino`).
"""
from __future__ import annotations

import importlib

from torch import nn

from .base import Adapter, Cut, Records, StopTensor

__all__ = ["ADAPTERS", "Adapter", "Cut", "Records", "StopTensor", "find_adapter", "get_adapter", "register_adapter"]

# name → "module:Class", imported when first needed (an adapter imports its model package and the engine)
ADAPTERS: dict[str, str] = {
    "maskdino": "maskdino_lrp.adapters.maskdino:MaskDINOAdapter",
    "detr": "maskdino_lrp.adapters.detr:DetrAdapter",  # transformers' DetrForObjectDetection (extra "hf")
    "deformable_detr": "maskdino_lrp.adapters.deformable_detr:DeformableDetrAdapter",  # (extra "hf")
    "conditional_detr": "maskdino_lrp.adapters.conditional_detr:ConditionalDetrAdapter",  # (extra "hf")
    "dab_detr": "maskdino_lrp.adapters.dab_detr:DabDetrAdapter",  # (extra "hf")
    "yolos": "maskdino_lrp.adapters.yolos:YolosAdapter",  # YolosForObjectDetection (extra "hf")
    "rt_detr": "maskdino_lrp.adapters.rtdetr:RTDetrAdapter",  # RTDetrForObjectDetection (extra "hf")
    "rt_detr_v2": "maskdino_lrp.adapters.rtdetr:RTDetrV2Adapter",  # RTDetrV2ForObjectDetection (extra "hf")
    "mask2former": "maskdino_lrp.adapters.mask2former:Mask2FormerAdapter",  # (extra "hf")
}


def register_adapter(name: str, target: str) -> None:
    """Make an adapter (``"package.module:Class"``) known to :func:`find_adapter` and :func:`get_adapter`."""
    ADAPTERS[name] = target


def get_adapter(name: str) -> Adapter:
    """A registered adapter by name."""
    if name not in ADAPTERS:
        raise ValueError(f"unknown adapter {name!r}; adapters: {', '.join(ADAPTERS)}")
    module_name, _, cls_name = ADAPTERS[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # an optional dependency (e.g. transformers) is missing
        raise ValueError(f"adapter {name!r} cannot be loaded: {exc}") from exc
    return getattr(module, cls_name)()


def find_adapter(model: nn.Module) -> Adapter | None:
    """The first registered adapter whose ``matches(model)`` is true, or None."""
    for name in ADAPTERS:
        try:
            adapter = get_adapter(name)
        except ValueError:
            continue  # an adapter whose library is not installed matches no model
        if adapter.matches(model):
            return adapter
    return None
