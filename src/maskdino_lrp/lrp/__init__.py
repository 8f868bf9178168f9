"""LRP for MaskDINO: rules, composites, the engine and the explainer."""
from .composites import Composite, Rule, composite_names, get_composite
from .engine import lrp_mode
from .explainer import DEFAULT_STOPS, LRP, STOPS, Session
from .explanation import Explanation, Level

__all__ = ["Composite", "DEFAULT_STOPS", "Explanation", "LRP", "Level", "Rule", "STOPS", "Session",
           "composite_names", "get_composite", "lrp_mode"]
