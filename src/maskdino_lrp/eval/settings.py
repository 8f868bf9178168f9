"""What an evaluation measures and with which settings: the metric registry and :class:`EvalSettings`.

Faithfulness metrics depend on the replacement of removed pixels / tokens; their columns are named
``<metric>@<replacement>`` (e.g. ``srg@blur``), so that every table and CSV says which replacement
it holds. The other metrics have one column each.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .methods import DEFAULT_METHODS

__all__ = ["METRICS", "REPLACED", "EvalSettings", "UNITS", "UNIT_PREFIX", "UNIT_TEXT", "unit_of", "MODES",
           "RANDOM_ORDER", "column", "split_column", "metric_info", "columns_of"]

# metric key → (group, label, direction: +1 higher is better, -1 lower is better, 0 neither)
METRICS: dict[str, tuple[str, str, int]] = {
    "mass_accuracy": ("localisation", "relevance mass acc.", +1),
    "mass_accuracy_tol": ("localisation", "relevance mass acc. (tol)", +1),
    "rank_accuracy": ("localisation", "relevance rank acc.", +1),
    "pointing_game": ("localisation", "pointing game", +1),
    "pointing_game_tol": ("localisation", "pointing game (tol)", +1),
    "energy_pointing_game": ("localisation", "energy pointing game", +1),
    "leak": ("localisation", "leak to other objects", -1),
    "deletion_auc": ("faithfulness", "deletion (MIF) AUC", -1),
    "deletion_gap": ("faithfulness", "deletion gap vs random", +1),
    "insertion_auc": ("faithfulness", "insertion AUC", +1),
    "insertion_gap": ("faithfulness", "insertion gap vs random", +1),
    "lif_auc": ("faithfulness", "LIF deletion AUC", +1),
    "srg": ("faithfulness", "SRG = LIF − MIF", +1),
    "aopc": ("faithfulness", "AOPC (deletion)", +1),
    "deletion_auc_fixed_query": ("faithfulness", "deletion AUC (fixed query)", -1),
}
_SANITY: dict[str, tuple[str, str, int]] = {
    "conservation_error": ("sanity and cost", "conservation error", -1),
    "bias_share": ("sanity and cost", "bias share", 0),
    "positional_share": ("sanity and cost", "positional share", 0),
    "residual_share": ("sanity and cost", "residual share", 0),
    "randomisation_spearman": ("sanity and cost", "randomisation rank corr.", -1),
    "seconds": ("sanity and cost", "seconds / explanation", -1),
    "peak_memory_mib": ("sanity and cost", "peak memory MiB", -1),
}
UNITS = ("pixels", "patches", "tokens")
# what a unit's faithfulness metrics are called (pixels: the plain names) and what its tables say it removes
UNIT_PREFIX = {"pixels": "", "patches": "patch_", "tokens": "token_"}
UNIT_TEXT = {"pixels": "pixels", "patches": "image patches", "tokens": "encoder tokens"}
_UNIT_METRICS = ("deletion_auc", "deletion_gap", "insertion_auc", "insertion_gap", "lif_auc", "srg", "aopc")
for _unit in UNITS[1:]:  # the same curve metrics over patches and tokens, grouped per unit
    for _key in _UNIT_METRICS:
        _, _label, _direction = METRICS[_key]
        METRICS[UNIT_PREFIX[_unit] + _key] = (f"faithfulness: {UNIT_TEXT[_unit]}",
                                              f"{UNIT_PREFIX[_unit].rstrip('_')} {_label}", _direction)
METRICS.update(_SANITY)  # after the units' groups, as the tables show them
# the metrics whose value depends on what replaces removed pixels / tokens
REPLACED = frozenset(k for k, (group, _, _) in METRICS.items() if group.startswith("faithfulness"))


def unit_of(metric: str) -> tuple[str, str]:
    """A faithfulness metric key → (unit, the key without its unit prefix): ``patch_srg`` → (patches, srg)."""
    for unit in UNITS[1:]:
        if metric.startswith(UNIT_PREFIX[unit]):
            return unit, metric.removeprefix(UNIT_PREFIX[unit])
    return "pixels", metric


MODES = ("deletion", "insertion", "lif")  # MIF deletion, insertion, LIF deletion
RANDOM_ORDER = "random order (baseline)"


def column(metric: str, replacement: str | None = None) -> str:
    """The column name of a metric: ``metric@replacement`` for the replacement-dependent ones."""
    return f"{metric}@{replacement}" if metric in REPLACED else metric


def split_column(name: str) -> tuple[str, str]:
    """``metric@replacement`` → (metric, replacement); other columns → (metric, "")."""
    metric, _, replacement = name.partition("@")
    return metric, replacement


def metric_info(name: str) -> tuple[str, str, int]:
    """(group, label, direction) of a column."""
    return METRICS[split_column(name)[0]]


def columns_of(replacements: list[str]) -> list[str]:
    """Every column of a run: the replacement-independent metrics once, the others per replacement."""
    out = []
    for key in METRICS:
        out += [column(key, r) for r in replacements] if key in REPLACED else [key]
    return out


@dataclass
class EvalSettings:
    """Everything that decides the numbers; written to settings.json and summary.md."""

    config: str = "demo"
    checkpoint: str | None = None
    n_images: int = 20
    seed: int = 1  # the shipped demo model was trained on seed 0's images
    image_size: int = 160
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    steps: int = 20  # deletion / insertion steps from 0 % to 100 % (20 → 5 % each)
    units: list[str] = field(default_factory=lambda: ["pixels"])  # what deletion / insertion removes
    patch_size: int = 8  # side in pixels of the patches unit's squares
    max_fraction: float = 1.0  # the curves stop there: steps of max_fraction / steps
    replacements: list[str] = field(default_factory=lambda: ["mean", "blur", "noise", "zero"])
    blur_sigma: float = 5.0
    aopc_steps: int = 10  # AOPC over the first k steps (with steps=20: the first 50 %)
    pointing_tolerance: float = 2.0  # px: the tolerant pointing game's and mass accuracy's margin around the mask
    score_threshold: float = 0.3
    iou_threshold: float = 0.5
    require_class: bool = True
    max_pairs_per_image: int | None = None
    randomisation: bool = True
    measure_memory: bool = True  # a second call of each method per image under the memory sampler
    batch_size: int = 16  # perturbed images per forward (all curves of a pair share the batches)
    device: str = "cpu"
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
