"""LRP for DETR-family detectors: rules, composites, canonizers, the engine and the explainer.

Everything model-specific lives in the model's adapter (``maskdino_lrp.adapters``).
"""
from .canonizers import BatchNormFold
from .composites import Composite, Rule, composite_names, get_composite
from .engine import Ledger, LedgerEntry, lrp_mode
from .explainer import DEFAULT_STOPS, LRP, STOPS, Session
from .explanation import Explanation, Level

__all__ = ["BatchNormFold", "Composite", "DEFAULT_STOPS", "Explanation", "LRP", "Ledger", "LedgerEntry", "Level",
           "Rule", "STOPS", "Session", "composite_names", "get_composite", "lrp_mode"]
