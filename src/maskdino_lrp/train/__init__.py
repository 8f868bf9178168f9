"""Training a small MaskDINO on synthetic shapes: Hungarian matcher, set-criterion losses, loop."""
from .losses import SetCriterion, build_criterion, weight_dict_from_config
from .matcher import HungarianMatcher, generalized_box_iou

__all__ = ["HungarianMatcher", "SetCriterion", "TrainConfig", "build_criterion", "evaluate", "export_weights",
           "generalized_box_iou", "train", "weight_dict_from_config"]


def __getattr__(name):  # the loop imports the data and model packages; load it on first use
    if name in ("TrainConfig", "train", "evaluate", "export_weights"):
        from . import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
