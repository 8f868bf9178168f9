"""Class names for models whose config names none (``LRP_TOOL.CLASS_NAMES`` empty).

Official MaskDINO configs take their class names from detectron2's dataset catalogue, which this
port does not have; a model with 80 classes is a COCO model (the ``maskdino_r50_3s_coco`` presets and
the official COCO checkpoints), so it gets :data:`COCO_CLASS_NAMES`, in the order of the contiguous
ids detectron2 (and so MaskDINO's class head) uses.
"""
from __future__ import annotations

COCO_CLASS_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)
assert len(COCO_CLASS_NAMES) == 80


def default_class_names(configured, num_classes: int) -> list[str]:
    """The configured names, or the COCO names for an 80-class model without names, else none."""
    names = [str(n) for n in (configured or [])]
    if not names and int(num_classes) == len(COCO_CLASS_NAMES):
        names = list(COCO_CLASS_NAMES)
    return names
