"""Benchmark: an image's curves with shared forwards against the unshared reference path, in one run.

    python -m maskdino_lrp.eval.bench_curves --images 2 --pairs 1 --steps 20 --replacements mean

Both paths run :func:`~.per_image.evaluate_image` on the demo model with the same settings and the
same maps (every method's maps are computed once, before the rounds, and replayed to both paths, so
only the curves differ in cost): MIF deletion, insertion and LIF deletion for every method's order and
the random one, in pixels and in encoder tokens. ``unshared`` (``reuse_forwards=False``): each pair
runs its start and neutral inputs, each order its own inputs, the token head on B copies of the
features. ``shared``: the start from the image's clean forward, each neutral input once per image,
inputs equal across orders once, the token head's pre-encoder part at batch 1. The maps are
computed in the first path's run and replayed afterwards (curve seconds do not include them). The
rounds alternate, so load from other processes hits both alike. Prints forwards and curve seconds
per pair of each round, the ratios, and the largest difference of any faithfulness value between
the paths (float32 forwards at other batch compositions: about 1e-7; more than 1e-4 is an error).
"""
from __future__ import annotations

import argparse
import statistics
from typing import Any, Sequence

import torch

from .methods import DEFAULT_METHODS, AttributionMaps, Method, available_methods, get_method
from .per_image import ImageContext, evaluate_image
from .settings import EvalSettings


class _Replay(Method):
    """A method whose maps are computed once per (image, queries, labels) and then returned again."""

    needs_warm_up = False

    def __init__(self, method: Method):
        self.method, self.name = method, method.name
        self.cache: dict[tuple, AttributionMaps] = {}

    def attribute_batch(self, model: Any, prepared: Any, queries: Sequence[int], labels: Sequence[int]) -> AttributionMaps:
        key = (prepared.rgb.tobytes(), tuple(int(q) for q in queries), tuple(int(l) for l in labels))
        if key not in self.cache:
            self.cache[key] = self.method.attribute_batch(model, prepared, queries, labels)
        return self.cache[key]

    def _maps(self, model, prepared, queries, labels):
        return self.method._maps(model, prepared, queries, labels)  # uncached: attribute_batch replays


def _faithfulness(part: dict[str, Any]) -> dict[tuple, float]:
    return {(row["method"], row["query"], key): value for row in part["records"] for key, value in row.items()
            if "@" in key}


def main(argv: Sequence[str] | None = None) -> int:
    """Print forwards and curve seconds per pair of both paths, per round, and their ratios."""
    from .. import build_model
    from ..data.shapes import ShapesConfig
    from ..model.checkpoint import shipped_weights

    p = argparse.ArgumentParser(prog="python -m maskdino_lrp.eval.bench_curves", description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--pairs", type=int, default=1, help="pairs per image at most")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--replacements", default="mean")
    p.add_argument("--units", default="pixels,tokens")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--drise-masks", type=int, default=100, help="D-RISE masks (its map only sets its order here)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build_model("demo", checkpoint=shipped_weights("demo")).eval()
    names = [m for m in args.methods.split(",") if m in available_methods()]
    options = {"d-rise": {"n_masks": args.drise_masks}}
    methods = {name: _Replay(get_method(name, **options.get(name, {}))) for name in names}
    settings = EvalSettings(config="demo", n_images=args.images, seed=args.seed, steps=args.steps, methods=names,
                            units=args.units.split(","), replacements=args.replacements.split(","),
                            max_pairs_per_image=args.pairs, randomisation=False)
    print(f"{len(names)} methods + random order, {args.steps} steps, units {settings.units}, "
          f"replacements {settings.replacements}, {args.images} images, <= {args.pairs} pair(s) each", flush=True)
    per_pair: dict[str, list[float]] = {"unshared": [], "shared": []}
    forwards: dict[str, float] = {}
    reference: dict[tuple, float] | None = None
    for _ in range(args.rounds):
        for name, reuse in (("unshared", False), ("shared", True)):
            ctx = ImageContext(settings, model, None, methods, ShapesConfig(image_size=160), warmed_up=True,
                               reuse_forwards=reuse)
            parts = [evaluate_image(index, ctx) for index in range(args.images)]
            pairs = sum(part["n_pairs"] for part in parts)
            seconds = sum(part["curve_seconds"] for part in parts) / max(pairs, 1)
            forwards[name] = sum(part["forwards"] for part in parts) / max(pairs, 1)
            per_pair[name].append(seconds)
            values = {k: v for part in parts for k, v in _faithfulness(part).items()}
            if reference is None:
                reference = values
            else:
                worst = max((abs(values[k] - v), k) for k, v in reference.items() if v == v)
                auc = max(abs(values[k] - v) for k, v in reference.items() if v == v and k[2].split("@")[0].endswith(
                    ("auc", "srg")))
                print(f"  largest difference to the first path: {worst[0]:.2e} ({worst[1][0]}, {worst[1][2]}); "
                      f"over the AUCs and SRGs {auc:.2e}", flush=True)
                if worst[0] > 1e-4:
                    raise AssertionError(f"the paths' faithfulness values differ by {worst[0]:.2e}: {worst[1]}")
            print(f"{name}: {pairs} pairs, {forwards[name]:.1f} forwards / pair, {seconds:.1f} s / pair "
                  f"({seconds / forwards[name] * 1000:.1f} ms / forward)", flush=True)
    a, b = (statistics.median(per_pair[k]) for k in ("unshared", "shared"))
    print(f"median s / pair: unshared {a:.1f}, shared {b:.1f} (x{a / b:.2f}); forwards / pair "
          f"{forwards['unshared']:.1f} -> {forwards['shared']:.1f} (x{forwards['unshared'] / forwards['shared']:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
