"""Statistics over pairs: per-method means with CIs, paired comparisons, rank stability across replacements."""
from __future__ import annotations

import math
from typing import Any, Sequence

from . import metrics as M
from .settings import UNIT_PREFIX, UNITS, column, metric_info

__all__ = ["aggregate", "paired_comparison", "paired_keys", "rank_stability", "PAIRED_METRICS", "STABILITY_METRICS"]

PAIRED_METRICS = (*(UNIT_PREFIX[u] + k for u in UNITS for k in ("deletion_auc", "insertion_auc", "srg", "aopc")),
                  "mass_accuracy", "mass_accuracy_tol", "rank_accuracy", "leak")
STABILITY_METRICS = tuple(UNIT_PREFIX[u] + k for u in UNITS for k in ("srg", "deletion_auc", "insertion_auc"))


def paired_keys(replacements: Sequence[str], metrics: Sequence[str] = PAIRED_METRICS) -> list[str]:
    """The columns compared pairwise: each metric, per replacement where it depends on one."""
    return list(dict.fromkeys(column(m, r) for m in metrics for r in replacements))


def aggregate(records: list[dict[str, Any]], methods: Sequence[str], columns: Sequence[str]
              ) -> dict[str, dict[str, M.Estimate]]:
    """method → column → Estimate (mean, t 95 % CI, N over pairs with a finite value)."""
    table: dict[str, dict[str, M.Estimate]] = {}
    for name in methods:
        rows = [r for r in records if r["method"] == name]
        table[name] = {key: M.mean_ci([r.get(key, math.nan) for r in rows]) for key in columns}
    return table


def paired_comparison(records: list[dict[str, Any]], reference: str, methods: Sequence[str],
                      keys: Sequence[str] = PAIRED_METRICS) -> dict[str, dict[str, M.Estimate]]:
    """method → column → advantage of ``reference`` over the method on the same pairs: the per-pair
    difference signed so that > 0 means ``reference`` is better (lower for ↓ metrics), mean and t 95 % CI.

    Paired intervals are much tighter than comparing two methods' separate intervals, because the
    images' difficulty cancels."""
    by_pair: dict[str, dict[tuple[int, int], dict[str, Any]]] = {}
    for r in records:
        by_pair.setdefault(r["method"], {})[(int(r["image"]), int(r["query"]))] = r
    ours = by_pair.get(reference, {})
    out: dict[str, dict[str, M.Estimate]] = {}
    for name in methods:
        if name == reference or name not in by_pair:
            continue
        common = sorted(set(ours) & set(by_pair[name]))
        row = {}
        for key in keys:
            direction = metric_info(key)[2]
            a = [ours[c].get(key, math.nan) for c in common]
            b = [by_pair[name][c].get(key, math.nan) for c in common]
            row[key] = M.mean_ci(direction * M.paired_difference(a, b))
        out[name] = row
    return out


def _ranks(values: dict[str, float], direction: int) -> dict[str, float]:
    """Rank 1 = best; ties share their mean rank; methods without a value are left out."""
    finite = {m: v for m, v in values.items() if math.isfinite(v)}
    if not finite:
        return {}
    from scipy.stats import rankdata

    names = list(finite)
    ranks = rankdata([-direction * finite[m] for m in names], method="average")
    return dict(zip(names, (float(r) for r in ranks)))


def rank_stability(table: dict[str, dict[str, M.Estimate]], replacements: Sequence[str],
                   metrics: Sequence[str] = STABILITY_METRICS) -> dict[str, dict[str, Any]]:
    """metric → {"ranks": method → replacement → rank (1 = best by the mean), "spread": method → max − min
    rank, "kendall": (r1, r2) → Kendall's τ between the two replacements' orderings of the methods}.
    A method's rank is stable when its spread is 0; metrics no method has a value for are left out."""
    from scipy.stats import kendalltau

    out: dict[str, dict[str, Any]] = {}
    for metric in metrics:
        direction = metric_info(column(metric, replacements[0]))[2]
        ranks = {r: _ranks({m: row[column(metric, r)].mean for m, row in table.items()
                            if row[column(metric, r)].n}, direction) for r in replacements}
        ranks = {r: v for r, v in ranks.items() if v}
        if not ranks:
            continue
        methods = [m for m in table if all(m in v for v in ranks.values())]
        per_method = {m: {r: ranks[r][m] for r in ranks} for m in methods}
        spread = {m: max(v.values()) - min(v.values()) for m, v in per_method.items()}
        kendall = {}
        names = list(ranks)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                x, y = [ranks[a][m] for m in methods], [ranks[b][m] for m in methods]
                kendall[(a, b)] = float(kendalltau(x, y).statistic) if len(methods) > 1 else math.nan
        out[metric] = {"ranks": per_method, "spread": spread, "kendall": kendall}
    return out
