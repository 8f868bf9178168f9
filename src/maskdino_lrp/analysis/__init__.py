"""Analysis of explanations: export (CSV / npz / JSON), rendering and report, validation, memory
estimates, and resumable batch runs."""
from .estimate import Estimate, EstimateError, estimate, model_shapes
from .export import ExportError, explanation_to_csv, plot_explanation, save_explanation
from .render import render_pixels, render_tokens, write_report
from .runner import BatchExplainer, ImageResult, LRPOptions, RunError
from .validate import ValidationResult, validate

__all__ = [
    "BatchExplainer", "Estimate", "EstimateError", "ExportError", "ImageResult", "LRPOptions", "RunError",
    "ValidationResult", "estimate", "explanation_to_csv", "model_shapes", "plot_explanation", "render_pixels",
    "render_tokens", "save_explanation", "validate", "write_report",
]
