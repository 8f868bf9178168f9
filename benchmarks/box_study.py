"""Box explanations on the shipped demo model: how much reaches the pixels, and whether an edge points at its edge.

For the detections of ``--images`` synthetic shapes scenes (``data/shapes.py``, dataset seed ``--seed``, not one
used in training, validation or evaluation: weights/demo_training.json) matched one-to-one to ground-truth
objects (box IoU ≥ 0.5, same class, score ≥ 0.3: ``eval.matching``), each box target is explained with the
default composite, the reference-box chain connected (``MaskDINOAdapter(box_chain=True)``, the default) and,
for comparison, cut (``box_chain=False``: every layer's input box booked as positional, as before).

(a) pixel share: Σ|R(pixels)| / (Σ|R(pixels)| + |bias| + |embeddings| + |positional| + |residual|), the
    ledger terms being the conservation row's per-category sums; also the signed pixel total / target. For the
    box coordinates and edges, and for the summed refinements (refine:cx …: everything beyond the anchor).
(b) edge band: for an edge target (box:x1 …), the share of the positive pixel relevance inside a band of
    ±``--band`` px around that edge of the ground-truth box (along the edge's extent, ± the band), against
    (i) a random map (i.i.d. uniform, seeded per detection; same band) and (ii) the same explanation's share
    in the band of the opposite edge; paired differences with Student-t and bootstrap 95 % CIs over detections.

    OMP_NUM_THREADS=1 python benchmarks/box_study.py --images 50 --out docs/results/box_study.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

COORDS = ("box:cx", "box:cy", "box:w", "box:h")
EDGES = ("box:x1", "box:y1", "box:x2", "box:y2")
REFINES = ("refine:cx", "refine:cy", "refine:w", "refine:h")
OPPOSITE = {"box:x1": "box:x2", "box:x2": "box:x1", "box:y1": "box:y2", "box:y2": "box:y1"}


def band_mask(edge: str, box: np.ndarray, size: tuple[int, int], half: float) -> np.ndarray:
    """Pixels whose centre lies within ``half`` px of one edge of an xyxy box (pixel-edge coordinates), along
    the edge's extent widened by ``half`` at both ends."""
    h, w = size
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    x0, y0, x1, y1 = box
    if edge in ("box:x1", "box:x2"):
        at = x0 if edge == "box:x1" else x1
        return (np.abs(xs - at) <= half) & (ys >= y0 - half) & (ys <= y1 + half)
    at = y0 if edge == "box:y1" else y1
    return (np.abs(ys - at) <= half) & (xs >= x0 - half) & (xs <= x1 + half)


def positive_share(values: np.ndarray, mask: np.ndarray) -> float:
    positive = np.clip(values, 0.0, None)
    total = positive.sum()
    return float(positive[mask].sum() / total) if total > 0 else float("nan")


def pixel_share(expl, k: int) -> tuple[float, float]:
    """(|pixels| share of all absolute relevance, signed pixel total / target) of row k."""
    row = expl.conservation["pixels"]
    pixels = float(expl.relevance["pixels"][k].abs().sum())
    ledger = sum(abs(float(row[c][k])) for c in ("bias", "embeddings", "positional", "residual"))
    return pixels / (pixels + ledger), float(row["total"][k]) / float(row["target"][k])


def rounded(value, digits: int = 5):
    """Floats to ``digits`` significant digits, inside lists and dicts (a compact JSON record)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--seed", type=int, default=31337, help="dataset seed (training 0, validation 777, "
                        "evaluation 12345 and 424242 are taken)")
    parser.add_argument("--band", type=float, default=4.0, help="half-width of the edge band in pixels")
    parser.add_argument("--composite", default="default")
    parser.add_argument("--out", type=Path, help="write the per-detection records and the summary as JSON")
    args = parser.parse_args()

    from maskdino_lrp.adapters.maskdino import MaskDINOAdapter
    from maskdino_lrp.data.shapes import ShapesConfig, generate_sample
    from maskdino_lrp.demo import load_demo_model
    from maskdino_lrp.eval.matching import match_detections
    from maskdino_lrp.eval.metrics import bootstrap_ci, mean_ci
    from maskdino_lrp.lrp.explainer import LRP

    torch.manual_seed(0)
    model, trained = load_demo_model()
    if not trained:
        raise SystemExit("the shipped demo weights are missing: this study is about the trained model")
    connected = LRP(model, composite=args.composite, adapter=MaskDINOAdapter(box_chain=True))
    cut = LRP(model, composite=args.composite, adapter=MaskDINOAdapter(box_chain=False))
    config = ShapesConfig(image_size=model.min_size_test)
    records = []
    start = time.process_time()
    for index in range(args.images):
        sample = generate_sample(args.seed, index, config)
        session = connected.prepare(sample.image)
        pairs = match_detections(session.detections, sample.boxes, sample.classes, image=index)
        if not pairs:
            session.cleanup()
            continue
        queries = [p.query for p in pairs]
        found = {p.query: p for p in pairs}
        rows = {q: {"image": index, "query": q, "iou": found[q].iou, "score": found[q].score,
                    "gt_box": sample.boxes[found[q].gt].tolist()} for q in queries}
        rng = np.random.default_rng([args.seed, index])
        for target in COORDS + EDGES + REFINES:
            expl = session.backward(queries, target, ["pixels"])
            for k, q in enumerate(expl.queries.tolist()):
                share, signed = pixel_share(expl, k)
                rows[q][f"{target}:pixel_share"] = share
                rows[q][f"{target}:pixel_signed"] = signed
                if target in EDGES:
                    rel = expl.relevance["pixels"][k].double().numpy()
                    box = np.asarray(rows[q]["gt_box"])
                    own = band_mask(target, box, rel.shape, args.band)
                    rows[q][f"{target}:band"] = positive_share(rel, own)
                    rows[q][f"{target}:band_random"] = positive_share(rng.random(rel.shape), own)
                    rows[q][f"{target}:band_opposite"] = positive_share(
                        rel, band_mask(OPPOSITE[target], box, rel.shape, args.band))
        session.cleanup()
        session = cut.prepare(sample.image)
        for target in COORDS:
            expl = session.backward(queries, target, ["pixels"])
            for k, q in enumerate(expl.queries.tolist()):
                rows[q][f"{target}:pixel_share_cut"], rows[q][f"{target}:pixel_signed_cut"] = pixel_share(expl, k)
        session.cleanup()
        records.extend(rows.values())
        print(f"image {index + 1}/{args.images}: {len(queries)} detections, {time.process_time() - start:.0f} s CPU",
              flush=True)

    def column(name: str) -> np.ndarray:
        return np.asarray([r[name] for r in records], dtype=float)

    summary: dict = {"images": args.images, "seed": args.seed, "band_px": args.band, "composite": args.composite,
                     "detections": len(records), "cpu_seconds": round(time.process_time() - start, 1)}
    print(f"\n{len(records)} detections of {args.images} images (dataset seed {args.seed}), composite {args.composite}")
    print(f"{'target':<8} {'pixel share, chain connected':>32} {'chain cut (before)':>26} {'pixels/target':>16}")
    for target in COORDS + EDGES + REFINES:
        share = mean_ci(column(f"{target}:pixel_share"))
        signed = mean_ci(column(f"{target}:pixel_signed"))
        entry = {"pixel_share": share.__dict__, "pixel_signed": signed.__dict__}
        before = ""
        if target in COORDS:
            cut_share = mean_ci(column(f"{target}:pixel_share_cut"))
            entry["pixel_share_cut"] = cut_share.__dict__
            before = str(cut_share)
        summary[target] = entry
        print(f"{target:<8} {str(share):>32} {before:>26} {str(signed):>16}")
    print(f"\nedge band (±{args.band:g} px around the ground-truth edge): share of positive pixel relevance")
    print(f"{'target':<8} {'in band':>22} {'random map':>22} {'minus random, t CI':>26} {'bootstrap CI':>22} "
          f"{'minus opposite edge':>26}")
    pooled_random, pooled_opposite = [], []
    for target in EDGES:
        own, random = column(f"{target}:band"), column(f"{target}:band_random")
        opposite = column(f"{target}:band_opposite")
        d_random, d_opposite = own - random, own - opposite
        pooled_random.append(d_random)
        pooled_opposite.append(d_opposite)
        summary[target].update(band=mean_ci(own).__dict__, band_random=mean_ci(random).__dict__,
                               minus_random=mean_ci(d_random).__dict__,
                               minus_random_bootstrap=bootstrap_ci(d_random).__dict__,
                               minus_opposite=mean_ci(d_opposite).__dict__)
        print(f"{target:<8} {str(mean_ci(own)):>22} {str(mean_ci(random)):>22} {str(mean_ci(d_random)):>26} "
              f"{str(bootstrap_ci(d_random)):>22} {str(mean_ci(d_opposite)):>26}")
    all_random, all_opposite = np.concatenate(pooled_random), np.concatenate(pooled_opposite)
    summary["edges_pooled"] = {"minus_random": mean_ci(all_random).__dict__,
                               "minus_opposite": mean_ci(all_opposite).__dict__}
    print(f"{'pooled':<8} {'':>22} {'':>22} {str(mean_ci(all_random)):>26} {str(bootstrap_ci(all_random)):>22} "
          f"{str(mean_ci(all_opposite)):>26}")
    print(f"\n{summary['cpu_seconds']} s CPU")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"summary": summary, "records": rounded(records)}, separators=(",", ":")))


if __name__ == "__main__":
    main()
