"""The composite study: which LRP composite explains a model best, selected on one seed, confirmed on another.

Candidates change one choice of the ``default`` composite at a time (a *dimension*: the backbone's
gamma, epsilon in the transformer's linear layers, the self-attention rule, the first-layer rule,
the deformable query path, the LayerNorm rule). Phases, each an :func:`~maskdino_lrp.eval.run.evaluate`
run that can be sharded over processes (``--shard I/N``) and resumed:

1. ``select``: every candidate and the default on the selection seed (pixel curves, all replacements);
2. ``combine``: the composite made of each dimension's winner, against the default on the same seed;
3. ``confirm``: the chosen composite (best of the candidates and the combination) against the default
   on a held-out seed;
4. ``report``: the tables and the verdict as Markdown.

Selection score of a method: its pixel SRG (AUC(LIF) − AUC(MIF)) averaged over the replacements, mean over
pairs. A method is eligible when its relevance mass accuracy is at most :data:`MASS_TOLERANCE` below the
default's. The default changes only when the chosen composite's per-pair advantage in that score on the
held-out seed has a 95 % paired CI above zero.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..lrp.composites import Composite, get_composite
from ..lrp.rules import Rule
from . import metrics as M
from .args import parse_shard
from .methods import DEFAULT_METHODS, LRP_METHODS, LRPMethod, register_method

__all__ = ["DIMENSIONS", "MASS_TOLERANCE", "candidate", "combined", "method_scores", "choose", "paired_advantage",
           "main"]

MASS_TOLERANCE = 0.02
DEFAULT = "default"

Transform = Callable[[Composite], Composite]


def _gamma(g: float) -> Transform:
    return lambda c: replace(c, by_name=[("@backbone", Rule("gamma", gamma=g))])


def _gamma_by_stage(c: Composite) -> Composite:
    # more gamma near the pixels, less near the transformer (Montavon et al. 2019's layer-type advice)
    stages = [("backbone.stem.*", 0.5), ("backbone.res2.*", 0.5), ("backbone.res3.*", 0.25),
              ("backbone.res4.*", 0.1), ("backbone.res5.*", 0.1)]
    rules = [(p, Rule("gamma", gamma=g)) for p, g in stages]
    return replace(c, by_name=rules + [("@backbone", Rule("gamma", gamma=0.25))])


def _linear_epsilon(e: float) -> Transform:
    return lambda c: c.with_rules(linear=Rule("epsilon", epsilon=e))


# dimension → option → how it changes the default (the default's own option is "default")
DIMENSIONS: dict[str, dict[str, Transform]] = {
    "backbone gamma": {"gamma-0": lambda c: replace(c, by_name=[]), "gamma-0.1": _gamma(0.1),
                       "gamma-0.25": _gamma(0.25), "gamma-0.5": _gamma(0.5), "gamma-1": _gamma(1.0),
                       "gamma-2": _gamma(2.0),
                       "backbone-zplus": lambda c: replace(c, by_name=[("@backbone", Rule("zplus"))]),
                       "gamma-by-stage": _gamma_by_stage},
    "linear epsilon": {"linear-eps-0.01": _linear_epsilon(0.01), "linear-eps-0.1": _linear_epsilon(0.1)},
    "self-attention": {"mha-ah": lambda c: c.with_rules(mha="ah")},
    "first layer": {"first-flat": lambda c: c.with_rules(first_layer="flat"),
                    "first-epsilon": lambda c: replace(c, first_layer=None)},
    "deformable query path": {"deform-query": lambda c: c.with_rules(deform_attn="value+query")},
    "LayerNorm": {"norm-gradient": lambda c: c.with_rules(norm="gradient")},
}


def candidate(option: str) -> Composite:
    """The default composite with one option applied (``option`` from :data:`DIMENSIONS`, or "default")."""
    base = get_composite(DEFAULT)
    if option == DEFAULT:
        return base
    for options in DIMENSIONS.values():
        if option in options:
            return replace(options[option](base), name=f"study-{option}")
    raise ValueError(f"unknown study option {option!r}; options: {', '.join(_all_options())}")


def combined(options: Sequence[str]) -> Composite:
    """The default with every option of ``options`` applied (one per dimension), named ``study-tuned``."""
    composite = get_composite(DEFAULT)
    for option in options:
        if option == DEFAULT:
            continue
        composite = next(d[option] for d in DIMENSIONS.values() if option in d)(composite)
    return replace(composite, name="study-tuned")


def _all_options() -> list[str]:
    return [o for options in DIMENSIONS.values() for o in options]


def _method(composite: Composite) -> str:
    name = f"lrp-{composite.name}" if composite.name != DEFAULT else "lrp-default"
    if composite.name != DEFAULT:
        register_method(name, lambda c=composite, **kw: LRPMethod(c, **kw))
    return name


# ----------------------------------------------------------------------------- reading results
def _records(run_dir: Path) -> list[dict[str, float | str]]:
    path = run_dir / "pairs.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the phase that writes {run_dir} first")
    out = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            rec: dict[str, float | str] = {"method": row["method"]}
            for key, value in row.items():
                if key != "method":
                    try:
                        rec[key] = float(value)
                    except (TypeError, ValueError):
                        rec[key] = math.nan
            out.append(rec)
    return out


def pair_score(record: dict, replacements: Sequence[str], metric: str = "srg") -> float:
    """A pair's selection score: ``metric`` averaged over the replacements (NaN when one is missing)."""
    values = [float(record.get(f"{metric}@{r}", math.nan)) for r in replacements]
    return float(np.mean(values)) if all(math.isfinite(v) for v in values) else math.nan


def method_scores(records: list[dict], replacements: Sequence[str]) -> dict[str, dict[str, M.Estimate]]:
    """method → {"score": mean pixel SRG over replacements, "mass_accuracy", "srg@<r>" for each r}."""
    out: dict[str, dict[str, M.Estimate]] = {}
    for name in dict.fromkeys(r["method"] for r in records):
        rows = [r for r in records if r["method"] == name]
        entry = {"score": M.mean_ci([pair_score(r, replacements) for r in rows]),
                 "mass_accuracy": M.mean_ci([r.get("mass_accuracy", math.nan) for r in rows])}
        for rep in replacements:
            entry[f"srg@{rep}"] = M.mean_ci([r.get(f"srg@{rep}", math.nan) for r in rows])
        out[name] = entry
    return out


def choose(scores: dict[str, dict[str, M.Estimate]], candidates: Sequence[str], reference: str = "lrp-default",
           tolerance: float = MASS_TOLERANCE) -> str:
    """The eligible method with the highest score (the reference when none beats it); eligible = mass
    accuracy not more than ``tolerance`` below the reference's."""
    floor = scores[reference]["mass_accuracy"].mean - tolerance
    best = reference
    for name in candidates:
        if name in scores and scores[name]["mass_accuracy"].mean >= floor \
                and scores[name]["score"].mean > scores[best]["score"].mean:
            best = name
    return best


def paired_advantage(records: list[dict], method: str, reference: str, replacements: Sequence[str],
                     key: str | None = None) -> M.Estimate:
    """Per-pair ``method − reference`` of the selection score (or of column ``key``), mean and paired t 95 % CI."""
    def value(r: dict) -> float:
        return pair_score(r, replacements) if key is None else float(r.get(key, math.nan))

    by = {name: {(int(r["image"]), int(r["query"])): value(r) for r in records if r["method"] == name}
          for name in (method, reference)}
    common = sorted(set(by[method]) & set(by[reference]))
    return M.mean_ci(M.paired_difference([by[method][c] for c in common], [by[reference][c] for c in common]))


def _select_folders(root: Path) -> list[Path]:
    return [p for p in root.glob("select*") if p.is_dir()]


def _combine_folder(root: Path, winners: dict[str, str]) -> Path:
    """One folder per combination, so that a combination changed by later options is evaluated afresh."""
    return root / ("combine-" + "+".join(sorted(o for o in winners.values() if o != DEFAULT) or ["default"]))


def _select_records(root: Path) -> list[dict[str, float | str]]:
    """The selection seed's records from ``select`` and any later ``select-K`` folders (the default, in each,
    is the same computation on the same pairs; its first records are kept)."""
    folders = sorted(_select_folders(root), key=lambda p: (len(p.name), p.name))
    if not folders:
        raise FileNotFoundError(f"{root / 'select'} is missing: run the select phase first")
    out, seen = [], set()
    for folder in folders:
        records = _records(folder)
        methods = {r["method"] for r in records} - seen
        out += [r for r in records if r["method"] in methods]
        seen |= methods
    return out


# ----------------------------------------------------------------------------- phases
def _evaluate(out: Path, methods: list[str], seed: int, images: int, args: argparse.Namespace, units: str) -> None:
    from .run import evaluate

    evaluate("demo", None, images, seed, out, methods=methods, steps=args.steps, progress=not args.quiet,
             shard=args.shard, threads=args.threads, units=units.split(","), replacements=args.replacements,
             randomisation=False, max_pairs_per_image=1,
             method_options={"d-rise": {"n_masks": args.drise_masks}})


def _dimension_winners(scores: dict[str, dict[str, M.Estimate]]) -> dict[str, str]:
    winners = {}
    for dimension, options in DIMENSIONS.items():
        names = {f"lrp-study-{o}": o for o in options}
        best = choose(scores, list(names))
        winners[dimension] = names.get(best, DEFAULT)
    return winners


def run_phase(args: argparse.Namespace) -> None:
    """One phase of the study (see the module docstring)."""
    root = Path(args.out)
    reps = args.replacements
    if args.phase == "select":
        # options added to DIMENSIONS after a selection run are evaluated in a further folder (same seed)
        done = {r["method"] for r in _select_records(root)} if (root / "select").exists() else set()
        todo = [o for o in _all_options() if f"lrp-study-{o}" not in done]
        if not todo:
            print("every option has been evaluated on the selection seed")
            return
        folder = "select" if not (root / "select").exists() else f"select-{len(_select_folders(root)) + 1}"
        _evaluate(root / folder, ["lrp-default"] + [_method(candidate(o)) for o in todo], args.seed, args.images,
                  args, "pixels")
        return
    select = method_scores(_select_records(root), reps)
    winners = _dimension_winners(select)
    tuned = combined(list(winners.values()))
    if args.phase == "combine":
        _evaluate(_combine_folder(root, winners), ["lrp-default", _method(tuned)], args.seed, args.images, args,
                  "pixels")
        return
    combine_records = _records(_combine_folder(root, winners))
    combine = method_scores(combine_records, reps)
    pool = {**select, "lrp-study-tuned": combine["lrp-study-tuned"]}
    chosen = choose(pool, [m for m in pool if m != "lrp-default"])
    choice = {"winners": winners, "chosen": chosen, "selection_seed": args.seed}
    if args.phase == "confirm":
        from ..fileio import atomic_write_text

        atomic_write_text(root / "choice.json", json.dumps(choice, indent=1))
        methods = ["lrp-default"]
        if chosen != "lrp-default":
            composite = tuned if chosen == "lrp-study-tuned" else candidate(chosen.removeprefix("lrp-study-"))
            if composite == replace(get_composite(DEFAULT), name=composite.name):
                raise ValueError(f"the chosen composite ({chosen}) is the default now: there is nothing to confirm; "
                                 f"compare the methods with `maskdino-lrp evaluate` instead")
            methods.append(_method(composite))
        if args.baselines:  # the held-out run is also the comparison with every method that is not LRP
            methods += [m for m in DEFAULT_METHODS if m not in LRP_METHODS]
        _evaluate(root / ("confirm-all" if args.baselines else "confirm"), methods, args.heldout_seed,
                  args.heldout_images, args, args.heldout_units)
        return
    report = write_report(root, select, combine, combine_records, choice, reps, args)
    print(report)


def change_of(option: str) -> str:
    """What an option changes in the default composite, as rules (for the report)."""
    base, c = get_composite(DEFAULT), candidate(option)
    parts = [f"{kind}: {c.by_kind[kind]!r}" for kind in c.by_kind if c.by_kind[kind] != base.by_kind.get(kind)]
    if c.by_name != base.by_name:
        parts.append("by name: " + (", ".join(f"{p} → {r!r}" for p, r in c.by_name) or "none (the kind's rule)"))
    if c.first_layer != base.first_layer:
        parts.append(f"first layer: {c.first_layer!r}" if c.first_layer is not None
                     else "first layer: no special rule (its group's / kind's rule)")
    return "; ".join(parts)


def _fmt(e: M.Estimate, digits: int = 3) -> str:
    return f"{e.mean:.{digits}f} [{e.low:.{digits}f}, {e.high:.{digits}f}]" if math.isfinite(e.mean) else "–"


def write_report(root: Path, select: dict, combine: dict, combine_records: list[dict], choice: dict,
                 reps: Sequence[str], args: argparse.Namespace) -> str:
    """The study's Markdown (selection table, dimension winners, held-out comparison, verdict); also
    written to ``args.md`` when given."""
    confirm_records = _records(root / "confirm" if (root / "confirm").exists() else root / "confirm-all")
    chosen = choice["chosen"]
    lines = ["# Composite study (demo model)", "",
             f"Selection seed {args.seed} ({args.images} images, the highest-scoring matched detection each), "
             f"held-out seed {args.heldout_seed} ({args.heldout_images} images); pixel curves in {args.steps} steps, "
             f"replacements {', '.join(reps)}; score = pixel SRG (AUC(LIF) − AUC(MIF)) averaged over the "
             f"replacements; eligible = mass accuracy ≥ the default's − {MASS_TOLERANCE}.", "",
             f"Reference: the `default` composite — {get_composite(DEFAULT).describe()}".replace("\n", "; "), "",
             "| option | change |", "|---|---|"]
    lines += [f"| {o} | {change_of(o)} |" for o in _all_options()]
    lines += ["", "## Selection seed: one change at a time", "",
             "| method | change | score | " + " | ".join(f"SRG @{r}" for r in reps) + " | mass acc. | eligible |",
             "|---|---|---|" + "---|" * len(reps) + "---|---|"]
    floor = select["lrp-default"]["mass_accuracy"].mean - MASS_TOLERANCE
    dims = {f"lrp-study-{o}": d for d, options in DIMENSIONS.items() for o in options}
    pool = {**select, "lrp-study-tuned": combine["lrp-study-tuned"]}
    for name, entry in sorted(pool.items(), key=lambda kv: -kv[1]["score"].mean):
        change = dims.get(name, "combination" if name == "lrp-study-tuned" else "—")
        eligible = "yes" if entry["mass_accuracy"].mean >= floor else "no"
        lines.append(f"| {name} | {change} | {_fmt(entry['score'])} | "
                     + " | ".join(_fmt(entry[f'srg@{r}']) for r in reps)
                     + f" | {_fmt(entry['mass_accuracy'])} | {eligible} |")
    lines += ["", "Winner per dimension (default kept where no option is eligible and better): "
              + "; ".join(f"{d}: {o}" for d, o in choice["winners"].items()),
              f"The combination (`lrp-study-tuned`) against the default on the selection seed: "
              f"{_fmt(paired_advantage(combine_records, 'lrp-study-tuned', 'lrp-default', reps))} "
              "(paired, score).", "", f"**Chosen on the selection seed: `{chosen}`.**", ""]
    if chosen == "lrp-default":
        lines.append("No candidate beat the default on the selection seed; the held-out run only re-measures it.")
        verdict = False
    else:
        adv = paired_advantage(confirm_records, chosen, "lrp-default", reps)
        lines += ["## Held-out seed: chosen − default, paired over the same pairs", "",
                  "| measure | chosen − default (mean [95 % CI]) |", "|---|---|",
                  f"| score (pixel SRG, mean over replacements) | {_fmt(adv)} |"]
        keys = [f"{m}@{r}" for m in ("srg", "token_srg", "deletion_auc", "insertion_auc") for r in reps]
        for key in keys + ["mass_accuracy", "conservation_error"]:
            est = paired_advantage(confirm_records, chosen, "lrp-default", reps, key)
            if est.n:  # token rows only when the held-out run had token curves
                lines.append(f"| {key} | {_fmt(est)} |")
        verdict = adv.low > 0
        lines += ["", "**Verdict:** " + ("the chosen composite beats the default on the held-out seed (CI above "
                                         "zero): it becomes the default." if verdict else
                                         "the held-out CI does not exclude zero: the default stays.")]
    text = "\n".join(lines) + "\n"
    if args.md:
        from ..fileio import atomic_write_text

        atomic_write_text(Path(args.md), text)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m maskdino_lrp.eval.composite_study {select,combine,confirm,report} --out DIR ...``."""
    p = argparse.ArgumentParser(prog="python -m maskdino_lrp.eval.composite_study", description=__doc__.splitlines()[0])
    p.add_argument("phase", choices=("select", "combine", "confirm", "report"))
    p.add_argument("--out", required=True, help="the study's folder (one sub-folder per phase)")
    p.add_argument("--seed", type=int, default=11, help="selection seed (default 11)")
    p.add_argument("--images", type=int, default=40, help="selection images (default 40)")
    p.add_argument("--heldout-seed", type=int, default=12, help="held-out seed (default 12)")
    p.add_argument("--heldout-images", type=int, default=200, help="held-out images (default 200)")
    p.add_argument("--heldout-units", default="pixels,tokens", help="confirm: pixels, tokens or both (default both)")
    p.add_argument("--baselines", action="store_true",
                   help="confirm: also every method that is not LRP (gradients, IG, SmoothGrad, rollout, Chefer, "
                        "D-RISE, random)")
    p.add_argument("--drise-masks", type=int, default=500, help="D-RISE masks per image (with --baselines)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--replacements", default="mean,blur,noise,zero")
    p.add_argument("--shard", default=None, metavar="I/N")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--md", default=None, help="report: also write the Markdown here")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.replacements = [r.strip() for r in args.replacements.split(",") if r.strip()]
    try:
        args.shard = parse_shard(args.shard)
        run_phase(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
