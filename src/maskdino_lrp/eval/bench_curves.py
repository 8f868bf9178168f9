"""Benchmark: the batched curves of :mod:`.curves` against one curve per (order, mode), on one demo pair.

    python -m maskdino_lrp.eval.bench_curves --steps 20 --orders 13 --rounds 1

Both paths compute MIF deletion, insertion and LIF deletion for ``orders`` random removal orders, in
pixels and in encoder tokens. ``one-by-one``: :func:`~.metrics.perturbation_curve` per (order, mode)
in batches of 8, LIF as its own deletion curve of the reversed order, a :class:`~.metrics.TokenScore`
built for the pair (backbone + head); ``batched``: :class:`~.curves.CurveProbe` (every distinct image
once, LIF on insertion's images, batches of 16) on the image's shared :class:`~.metrics.TokenFeatures`.
The rounds alternate, so load from other processes hits both alike; the curves must agree.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Sequence

import numpy as np
import torch

from . import metrics as M
from .curves import CurveProbe, curve_counts
from .matching import match_detections


def main(argv: Sequence[str] | None = None) -> int:
    """Print forwards and seconds per round of both paths."""
    from .. import build_model
    from ..data.shapes import ShapesConfig, generate_sample
    from .run import _resolve_checkpoint

    p = argparse.ArgumentParser(prog="python -m maskdino_lrp.eval.bench_curves", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--orders", type=int, default=13, help="removal orders (methods + the random baseline)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build_model("demo", checkpoint=_resolve_checkpoint("demo", None)).eval()
    sample = generate_sample(2026, 0, ShapesConfig(image_size=160))
    prepared = model.prepare(sample.image)
    with torch.no_grad():
        outputs = model(prepared.tensor)
    pair = match_detections(model.postprocess(outputs, prepared), sample.boxes, sample.classes)[0]
    box = outputs["pred_boxes"][0, pair.query]
    image = (prepared.tensor[0] * model.pixel_std + model.pixel_mean).detach()
    neutral = M.mean_replacement(image)
    rng = np.random.default_rng(0)
    pixel_orders = {f"o{i}": M.relevance_order(rng.random(image.shape[-2:])) for i in range(args.orders)}
    shared = M.TokenFeatures(model, prepared.tensor)
    token_orders = {k: M.level_balanced_order(rng.random(shared.num_tokens), shared.shapes) for k in pixel_orders}

    def one_by_one() -> tuple[dict, int]:
        forwards, out = 0, {}
        for unit in ("pixels", "tokens"):
            if unit == "pixels":
                scorer, start, blank, orders = M.DetectorScore(model, pair.query, pair.label, box), image, neutral, pixel_orders
            else:
                scorer = M.TokenScore(model, prepared.tensor, pair.query, pair.label, box)
                start = torch.ones(1, 1, scorer.num_tokens)
                blank, orders = torch.zeros_like(start), token_orders
            ends = scorer(torch.stack([start, blank])).numpy()
            forwards += 2
            for key, order in orders.items():
                for mode, o, kind in (("deletion", order, "deletion"), ("insertion", order, "insertion"),
                                      ("lif", order[::-1].copy(), "deletion")):
                    out[(unit, key, mode)] = M.perturbation_curve(scorer, start, blank, None, args.steps, kind, 8,
                                                                  endpoints=(ends[0], ends[1]), order=o)
                    forwards += args.steps - 1
        return out, forwards

    def batched() -> tuple[dict, int]:
        forwards, out = 0, {}
        for unit in ("pixels", "tokens"):
            if unit == "pixels":
                probe = CurveProbe(unit, "mean", M.DetectorScore(model, pair.query, pair.label, box), image, neutral)
                orders = pixel_orders
            else:
                keep = torch.ones(1, 1, shared.num_tokens)
                probe = CurveProbe(unit, "mean", M.TokenScore(model, shared, pair.query, pair.label, box), keep,
                                   torch.zeros_like(keep), shared.shapes)
                orders = token_orders
            curves = probe.curves(orders, curve_counts(probe.size, args.steps, 1.0), batch_size=16)
            out.update({(unit, key, mode): c for key, by_mode in curves.items() for mode, c in by_mode.items()})
            forwards += probe.forwards
        return out, forwards

    times: dict[str, list[float]] = {"one-by-one": [], "batched": []}
    reference = None
    for _ in range(args.rounds):
        for name, run in (("one-by-one", one_by_one), ("batched", batched)):
            start = time.perf_counter()
            curves, forwards = run()
            times[name].append(time.perf_counter() - start)
            if reference is None:
                reference = curves
            else:  # the tokens' middle count may differ by one token (mirror-symmetric counts): compare pixels
                for key, c in reference.items():
                    if key[0] == "pixels":
                        np.testing.assert_allclose(curves[key], c, rtol=1e-4, atol=1e-5, err_msg=str(key))
            print(f"{name}: {forwards} forwards, {times[name][-1]:.1f} s", flush=True)
    for name, values in times.items():
        print(f"{name}: median {statistics.median(values):.1f} s per round over {len(values)} round(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
