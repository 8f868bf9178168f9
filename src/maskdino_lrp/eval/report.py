"""Writing a run's results: markdown tables, CSVs, curve plots, rank stability and the summary."""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from . import metrics as M
from .methods import LRP_METHODS
from .parts import write_text
from .settings import (METRICS, MODES, REPLACED, UNIT_PREFIX, UNIT_TEXT, EvalSettings, column, metric_info,
                       split_column, unit_of)
from .stats import paired_comparison, paired_keys, rank_stability

__all__ = ["write_outputs", "replacement_text"]

_ARROWS = {+1: " ↑", -1: " ↓", 0: ""}
_GROUPS = ("localisation", "faithfulness", *(f"faithfulness: {UNIT_TEXT[u]}" for u in ("patches", "tokens")),
           "sanity and cost")
_MODE_TITLES = {"deletion": "MIF deletion (lower is better)", "insertion": "insertion (higher is better)",
                "lif": "LIF deletion (higher is better)"}


def replacement_text(name: str, settings: EvalSettings) -> str:
    """A replacement's name with what it means, e.g. ``blur (Gaussian blur, σ = 5 px)``."""
    text = M.REPLACEMENTS[name] + (f", σ = {settings.blur_sigma:g} px" if name == "blur" else "")
    return f"{name} ({text})"


def _csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if (isinstance(v, float) and math.isnan(v)) else v for v in row])
    return buf.getvalue()


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return "–"
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 1e-3:
        return f"{value:.2e}"
    return f"{value:.3f}"


def _cell(est: M.Estimate, n_row: int) -> str:
    if est.n == 0:
        return "–"
    text = _fmt(est.mean) if not math.isfinite(est.low) else f"{_fmt(est.mean)} [{_fmt(est.low)}, {_fmt(est.high)}]"
    return text if est.n == n_row else f"{text} (n={est.n})"


def _markdown_tables(table: dict[str, dict[str, M.Estimate]], n_rows: dict[str, int], settings: EvalSettings) -> str:
    lines = []
    for group in _GROUPS:
        keys = [k for k, (g, _, _) in METRICS.items() if g == group]
        for replacement in (settings.replacements if keys and keys[0] in REPLACED else [None]):
            cols = [column(k, replacement) for k in keys if any(table[m][column(k, replacement)].n for m in table)]
            if not cols:
                continue
            title = group.capitalize() + (f" — replacement: {replacement_text(replacement, settings)}"
                                          if replacement else "")
            lines.append(f"### {title}\n")
            lines.append("| method | N | " + " | ".join(metric_info(c)[1] + _ARROWS[metric_info(c)[2]] for c in cols) + " |")
            lines.append("|---|---|" + "---|" * len(cols))
            for name, row in table.items():
                lines.append(f"| {name} | {n_rows[name]} | " + " | ".join(_cell(row[c], n_rows[name]) for c in cols) + " |")
            lines.append("")
    return "\n".join(lines)


def _paired_markdown(paired: dict[str, dict[str, M.Estimate]], reference: str | None, settings: EvalSettings) -> str:
    if not paired:
        return ""
    lines = []
    for replacement in [None, *settings.replacements]:
        keys = [k for k in next(iter(paired.values()))
                if (split_column(k)[1] or None) == replacement and any(row[k].n for row in paired.values())]
        if not keys:
            continue
        where = f" — replacement: {replacement_text(replacement, settings)}" if replacement else ""
        lines += [f"\n### Paired: advantage of {reference} over each method{where}\n",
                  "Per-pair difference on the same (image, detection) pairs, signed so that > 0 means "
                  f"{reference} is better; mean [95 % CI, Student t]. An interval above 0 is a measured advantage.\n",
                  "| method | " + " | ".join(metric_info(k)[1] for k in keys) + " |",
                  "|---|" + "---|" * len(keys)]
        for name, row in paired.items():
            lines.append(f"| {name} | " + " | ".join(_cell(row[k], row[k].n) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def _stability_markdown(stability: dict[str, dict[str, Any]], settings: EvalSettings) -> str:
    lines = ["# Rank stability across replacements", "",
             "Rank of each method (1 = best, by the mean over pairs; ties share a mean rank) under each replacement "
             f"({', '.join(replacement_text(r, settings) for r in settings.replacements)}). "
             "Spread = highest − lowest rank: 0 means the method's place does not depend on the replacement. "
             "Kendall's τ compares two replacements' orderings of all methods (1 = the same order).", ""]
    if not stability:
        lines.append("Only one replacement in this run: nothing to compare (use e.g. --replacement mean,blur,noise,zero).")
    for metric, found in stability.items():
        reps = list(next(iter(found["ranks"].values()))) if found["ranks"] else []
        lines += [f"## {METRICS[metric][1]}", "",
                  "| method | " + " | ".join(f"rank @{r}" for r in reps) + " | spread |",
                  "|---|" + "---|" * (len(reps) + 1)]
        for name, ranks in sorted(found["ranks"].items(), key=lambda kv: np.mean(list(kv[1].values()))):
            lines.append(f"| {name} | " + " | ".join(f"{ranks[r]:g}" for r in reps) + f" | {found['spread'][name]:g} |")
        if found["kendall"]:
            lines += ["", "Kendall's τ: " + "; ".join(f"{a} vs {b} {_fmt(t)}" for (a, b), t in found["kendall"].items())]
        lines.append("")
    return "\n".join(lines)


def _stability_rows(stability: dict[str, dict[str, Any]]) -> list[tuple]:
    return [(metric, name, r, rank, found["spread"][name])
            for metric, found in stability.items() for name, ranks in found["ranks"].items() for r, rank in ranks.items()]


def _plot_curves(curves: dict[str, dict[str, list]], unit: str, replacement: str, x: np.ndarray,
                 path: Path, settings: EvalSettings) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit_prefix = UNIT_PREFIX[unit]
    modes = [m for m in MODES if any(by.get(f"{unit_prefix}{m}@{replacement}") for by in curves.values())]
    if not modes:
        return False
    fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 4.4), dpi=110, squeeze=False)
    colours = plt.get_cmap("tab20").colors
    for ax, mode in zip(axes[0], modes):
        key = f"{unit_prefix}{mode}@{replacement}"
        for i, (name, by_mode) in enumerate(curves.items()):
            if not by_mode.get(key):
                continue
            mean = np.mean(np.stack(by_mode[key]), 0)
            if name.startswith("random order"):
                style = {"color": "black", "linestyle": "--", "linewidth": 2}
            else:  # ours solid and thicker, baselines dash-dotted
                ours = name in LRP_METHODS
                style = {"color": colours[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20],
                         "linestyle": "-" if ours else "-.", "linewidth": 1.8 if ours else 1.2}
            ax.plot(x, mean, label=f"{name} ({M.area_under_curve(mean, x):.3f})", **style)
        ax.set_xlabel(f"fraction of {UNIT_TEXT[unit]} " + ("inserted" if mode == "insertion" else "removed"))
        ax.set_ylabel("class score of the matched query")
        ax.set_title(_MODE_TITLES[mode], fontsize=9)
        ax.set_xlim(0, float(x[-1]))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="lower right" if mode == "insertion" else "upper right")
    fig.suptitle(f"{UNIT_TEXT[unit].capitalize()}, replacement: {replacement_text(replacement, settings)}",
                 fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_text(path, buf.getvalue())
    return True


def _images_done(settings: EvalSettings, meta: dict) -> str:
    done = meta.get("n_images_done", settings.n_images)
    return str(done) if done == settings.n_images else f"{done} of {settings.n_images}"


def _overlaps(a: M.Estimate, b: M.Estimate) -> bool:
    if not (math.isfinite(a.low) and math.isfinite(b.low)):
        return True
    return a.low <= b.high and b.low <= a.high


def _summary(settings: EvalSettings, table: dict[str, dict[str, M.Estimate]], notes: list[str], meta: dict,
             paired: dict[str, dict[str, M.Estimate]], stability: dict[str, dict[str, Any]]) -> str:
    n_pairs = max(1, meta["n_pairs"])
    lines = [
        "# Explanation-method comparison", "",
        f"- model: `{settings.config}`, checkpoint: `{settings.checkpoint or 'none (random weights)'}`, "
        f"device {meta['device']}, torch {meta['torch']}",
        f"- data: synthetic shapes, seed {settings.seed}, {_images_done(settings, meta)} images of "
        f"{settings.image_size} px"
        + (f" (at most {settings.max_pairs_per_image} detection(s) per image, the highest-scoring)"
           if settings.max_pairs_per_image is not None else "") + "; "
        f"{meta['n_pairs']} (image, detection) pairs matched to ground truth (Hungarian on box IoU ≥ "
        f"{settings.iou_threshold}, score ≥ {settings.score_threshold}"
        f"{', same class' if settings.require_class else ''}); {meta['images_without_pairs']} images had none",
        "- target: class logit of the detection's query and label; maps at the model input size",
        f"- perturbation curves: {settings.steps} steps of {100 * settings.max_fraction / settings.steps:.3g} % "
        f"up to {100 * settings.max_fraction:.3g} % (AUC = mean score over that range); MIF deletion (most "
        "relevant removed first), insertion, and LIF deletion (least relevant first); SRG = AUC(LIF) − AUC(MIF) "
        "(Blücher et al. 2024); score = sigmoid class score of the query re-matched by box IoU; AOPC over the "
        f"first {min(settings.aopc_steps, settings.steps)} steps; gaps are paired against a random order on the "
        "same pairs",
        "- replacements (each reported separately; columns and CSV rows name theirs): "
        + "; ".join(f"**{replacement_text(r, settings)}**" for r in settings.replacements),
        *(["- encoder tokens: the deformable encoder's input tokens (before position encoding) are replaced by "
           "the replacement applied to their level's token grid (mean: the level's mean token; blur: σ / stride "
           "tokens; noise: over each channel's range; zero: the zero token), the same fraction of every level per "
           "step, each level's tokens by relevance; token maps are the method's own where it has them (LRP at the "
           "encoder input, rollout, Chefer), else its pixel map summed over each token's footprint; the stride-4 "
           "FPN lateral path is not perturbed"] if "tokens" in settings.units else []),
        *([f"- image patches: squares of {settings.patch_size} × {settings.patch_size} px (cut by the image edge) "
           "are replaced whole, each ranked by the sum of its pixels' relevance (the pixel unit's replacements)"]
          if "patches" in settings.units else []),
        f"- tolerance of the pointing game (tol) and relevance mass acc. (tol): {settings.pointing_tolerance} px around "
        "the mask; intervals: Student-t 95 % over pairs",
        "- cost: seconds / explanation = wall time of the evaluated call ÷ the image's K pairs (LRP explains "
        "the K queries in one batched backward, the others loop); "
        + ("peak memory not measured (--no-memory)" if not (settings.measure_memory or settings.randomisation) else
           "peak memory from a second call of the same size"
           + (" (on the randomised model)" if settings.randomisation else "")
           + (", CUDA allocator peak" if settings.device.startswith("cuda") else
              ", CPU resident-set growth sampled every 2 ms (approximate)")),
        "- conservation error: |ΣR(pixels + padding) − target| / |target| for LRP; for integrated-gradients "
        "its completeness error |Σ attributions − (f(x) − f(baseline))| / |f(x) − f(baseline)|",
        "- randomisation: Spearman correlation of each map with the same method's map on a freshly initialised "
        "model (Adebayo et al. 2018); `random` is 1 by construction (its map does not depend on the model)"
        if settings.randomisation else "- randomisation test: off",
        f"- run time {meta['elapsed_seconds']:.0f} s (sum over images; shards run side by side): "
        f"{meta['elapsed_seconds'] / n_pairs:.1f} s per pair, of which methods {meta['method_seconds'] / n_pairs:.1f} s "
        f"and curves {meta['curve_seconds'] / n_pairs:.1f} s ({meta['forwards'] / n_pairs:.0f} perturbed forwards "
        "per pair)", "",
    ]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## Findings", ""]
    headline = [column(UNIT_PREFIX[u] + k, r) for u in settings.units for k in ("srg", "deletion_gap", "insertion_gap")
                for r in settings.replacements]
    for key in [*headline, "mass_accuracy", "mass_accuracy_tol", "pointing_game", "leak"]:
        label, direction = metric_info(key)[1], metric_info(key)[2]
        replacement = split_column(key)[1]
        label += f" @{replacement}" if replacement else ""
        ranked = sorted(((est.mean, name) for name, row in table.items() if (est := row[key]).n),
                        reverse=direction > 0)
        if not ranked:
            continue
        if ranked[0][0] == ranked[-1][0]:
            lines.append(f"- **{label}**: all methods {ranked[0][0]:.3g}")
            continue
        best_name = ranked[0][1]
        best = table[best_name][key]
        ties = [n for _, n in ranked[1:] if _overlaps(table[n][key], best)]
        line = f"- **{label}**: best {best_name} ({best})"
        if ties:
            line += f"; CIs overlap with {', '.join(ties)}"
        if unit_of(split_column(key)[0])[1] == "srg" or "_gap" in key:
            above = [n for n, row in table.items() if row[key].n > 1 and row[key].low > 0]
            line += f". Above {'0' if 'srg' in key else 'random'} (CI > 0): {', '.join(above) if above else 'none'}"
        lines.append(line)
    for metric, found in stability.items():
        stable = [m for m, s in found["spread"].items() if s == 0]
        moved = sorted(((s, m) for m, s in found["spread"].items() if s > 0), reverse=True)
        taus = [t for t in found["kendall"].values() if math.isfinite(t)]
        lines.append(f"- **rank stability, {METRICS[metric][1]}** across {', '.join(settings.replacements)}: "
                     f"same rank under every replacement: {', '.join(stable) or 'none'}; rank moves: "
                     + (", ".join(f"{m} (by {s:g})" for s, m in moved) or "none")
                     + (f"; Kendall's τ between replacements {min(taus):.2f}–{max(taus):.2f}" if taus else ""))
    # the paired tables compare with lrp-default where the run has it, else with its first method
    others = [m for m in table if m not in LRP_METHODS and m != "random"] if "lrp-default" in table else []
    for key in paired_keys(settings.replacements, ("srg", "deletion_auc", "insertion_auc", "patch_srg", "token_srg",
                                                   "mass_accuracy", "mass_accuracy_tol")):
        rows = {m: paired[m][key] for m in others if m in paired and key in paired[m] and paired[m][key].n > 1}
        if not rows:
            continue
        better = [m for m, est in rows.items() if est.low > 0]
        worse = [m for m, est in rows.items() if est.high < 0]
        label = metric_info(key)[1] + (f" @{split_column(key)[1]}" if split_column(key)[1] else "")
        lines.append(f"- **lrp-default vs baselines, {label}** (paired 95 % CI of lrp-default's advantage on the "
                     f"same pairs): better than {', '.join(better) or 'none'}; worse than {', '.join(worse) or 'none'}"
                     f"; not separable from {', '.join(m for m in rows if m not in better + worse) or 'none'}")
    lrp = [m for m in table if m in LRP_METHODS]
    errs = ", ".join(f"{m} {table[m]['conservation_error']}" for m in lrp if table[m]["conservation_error"].n)
    if errs:
        lines.append(f"- conservation error |ΣR − target|/|target| (pixels + padding): {errs}; what biases, "
                     "position encodings and non-conservative rules take is in the shares of results.md")
    lines += ["", "Tables: results.md / results.csv; paired comparisons: paired.csv; rank stability: stability.md / "
              "stability.csv; raw per pair: pairs.csv; curves: curves.csv and curves_*.png (one per unit and "
              "replacement)."]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, settings: EvalSettings, table: dict[str, dict[str, M.Estimate]],
                  records: list[dict[str, Any]], curves: dict, notes: list[str], meta: dict,
                  columns: Sequence[str]) -> dict[str, Any]:
    """Write every output file of a run into ``out`` (atomically); returns the paired comparison and stability."""
    n_rows = {name: sum(1 for r in records if r["method"] == name) for name in table}
    header = (f"# Results: {settings.config}, {meta['n_pairs']} pairs from {_images_done(settings, meta)} images "
              f"(seed {settings.seed})\n\nmean [95 % CI, Student t] over (image, detection) pairs; N = pairs; "
              "(n=…) where a metric has fewer finite values. Faithfulness tables: one per replacement "
              f"({', '.join(settings.replacements)}); SRG = AUC(LIF) − AUC(MIF).\n\n")
    reference = "lrp-default" if "lrp-default" in table else next(iter(table), None)
    paired = paired_comparison(records, reference, list(table), paired_keys(settings.replacements)) if reference else {}
    # ranks can only move between replacements when there are two or more
    stability = rank_stability(table, settings.replacements) if table and len(settings.replacements) > 1 else {}
    write_text(out / "results.md", header + _markdown_tables(table, n_rows, settings)
               + _paired_markdown(paired, reference, settings))
    write_text(out / "paired.csv", _csv_text(
        ["reference", "method", "metric", "replacement", "advantage_mean", "ci_low", "ci_high", "n"],
        [(reference, name, *split_column(key), est.mean, est.low, est.high, est.n)
         for name, row in paired.items() for key, est in row.items() if est.n]))
    write_text(out / "results.csv", _csv_text(
        ["method", "metric", "replacement", "mean", "ci_low", "ci_high", "n", "higher_is_better"],
        [(name, *split_column(key), est.mean, est.low, est.high, est.n,
          {1: "yes", -1: "no", 0: ""}[metric_info(key)[2]])
         for name, row in table.items() for key, est in row.items()]))
    write_text(out / "stability.md", _stability_markdown(stability, settings))
    write_text(out / "stability.csv", _csv_text(["metric", "method", "replacement", "rank", "spread"],
                                                _stability_rows(stability)))
    fields = ["method", "image", "query", "label", "gt", "iou", "score", *columns]
    write_text(out / "pairs.csv", _csv_text(fields, ([r.get(f, math.nan) for f in fields] for r in records)))
    x = M.perturbation_fractions(settings.steps, settings.max_fraction)
    curve_rows = []
    for name, by_mode in curves.items():
        for key, values in by_mode.items():
            if values:
                mode, replacement = split_column(key)
                unit, mode = unit_of(mode)
                stacked = np.stack(values)
                for j, frac in enumerate(x):
                    est = M.mean_ci(stacked[:, j])
                    curve_rows.append((name, unit, mode, replacement, frac, est.mean, est.low, est.high, est.n))
    write_text(out / "curves.csv", _csv_text(
        ["method", "unit", "mode", "replacement", "fraction", "mean", "ci_low", "ci_high", "n"], curve_rows))
    for unit in settings.units:
        for replacement in settings.replacements:
            _plot_curves(curves, unit, replacement, x, out / f"curves_{UNIT_PREFIX[unit]}{replacement}.png", settings)
    write_text(out / "settings.json", json.dumps({**asdict(settings), **meta}, indent=2, default=str))
    write_text(out / "summary.md", _summary(settings, table, notes, meta, paired, stability))
    return {"paired": paired, "stability": stability}
