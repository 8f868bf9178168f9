"""Synthetic shapes data with exact ground truth, and COCO-style export and evaluation."""
from .shapes import CLASSES, Sample, ShapesConfig, ShapesDataset, generate_sample, iter_samples

__all__ = ["CLASSES", "Sample", "ShapesConfig", "ShapesDataset", "generate_sample", "iter_samples"]
