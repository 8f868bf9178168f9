"""Where each method's pixel relevance lies relative to the explained object: a probe behind the README's
reading of the faithfulness curves.

    python benchmarks/where_relevance_lies.py --images 30 --seed 2027

On the shipped demo model and the evaluation's pairs (the highest-scoring matched detection per image),
prints per method the mean over pairs of
- the share of positive relevance on the object's mask grown by 0, 1, 2, 4 and 8 px (relevance mass
  accuracy and its tolerant versions), and
- where its least relevant 10 % of pixels (the first step of least-relevant-first deletion) lie: their
  median distance to the mask and the share of them within 8 px of it, beside the same for all pixels.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy import ndimage

import maskdino_lrp
from maskdino_lrp.data.shapes import ShapesConfig, generate_sample
from maskdino_lrp.eval import metrics as M
from maskdino_lrp.eval.matching import match_detections
from maskdino_lrp.eval.methods import get_method
from maskdino_lrp.eval.per_image import _gt_at_input
from maskdino_lrp.model.checkpoint import shipped_weights

GROWN = (0, 1, 2, 4, 8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=30)
    p.add_argument("--seed", type=int, default=2027)
    p.add_argument("--methods", default="lrp-default,chefer,gradient,attention-rollout")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = maskdino_lrp.build_model("demo", checkpoint=str(shipped_weights("demo"))).eval()
    methods = {name: get_method(name) for name in args.methods.split(",")}
    rows: dict[str, list[list[float]]] = {name: [] for name in [*methods, "all pixels"]}
    for index in range(args.images):
        sample = generate_sample(args.seed, index, ShapesConfig(image_size=160))
        prepared = model.prepare(sample.image)
        with torch.no_grad():
            outputs = model(prepared.tensor)
        pairs = match_detections(model.postprocess(outputs, prepared), sample.boxes, sample.classes, index,
                                 0.3, 0.5, True)[:1]
        if not pairs:
            continue
        masks, _ = _gt_at_input(sample, prepared)
        mask = masks[pairs[0].gt]
        distance = ndimage.distance_transform_edt(~mask).ravel()
        for name, method in methods.items():
            e = method.attribute_batch(model, prepared, [pairs[0].query], [pairs[0].label]).maps[0].numpy()
            least = M.relevance_order(-e, seed=index)[: e.size // 10]
            rows[name].append([M.relevance_mass_accuracy(e, mask, d) for d in GROWN]
                              + [float(np.median(distance[least])), float((distance[least] <= 8).mean())])
        rows["all pixels"].append([np.nan] * len(GROWN) + [float(np.median(distance)), float((distance <= 8).mean())])
    n = len(rows["all pixels"])
    print(f"{n} pairs (seed {args.seed}, first {args.images} images); means over pairs")
    print("| method | " + " | ".join(f"mass acc. +{d} px" for d in GROWN)
          + " | least relevant 10 %: median distance (px) | within 8 px |")
    print("|---|" + "---|" * (len(GROWN) + 2))
    for name, values in rows.items():
        mean = np.nanmean(np.asarray(values, dtype=float), axis=0) if name != "all pixels" else \
            np.asarray(values, dtype=float).mean(axis=0)
        cells = ["–" if np.isnan(v) else f"{v:.3f}" for v in mean[:len(GROWN)]]
        print(f"| {name} | " + " | ".join(cells) + f" | {mean[-2]:.1f} | {mean[-1]:.3f} |")


if __name__ == "__main__":
    main()
