"""The evaluation's command line (``maskdino-lrp evaluate`` / ``python -m maskdino_lrp.eval``): parse, call, print."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch

from . import metrics as M
from .methods import DEFAULT_METHODS, MethodError

__all__ = ["main", "parse_shard", "parser"]


def parser() -> argparse.ArgumentParser:
    """The argument parser of the evaluation."""
    p = argparse.ArgumentParser(prog="python -m maskdino_lrp.eval",
                                description="Compare explanation methods (LRP and baselines) on synthetic shapes.")
    p.add_argument("--config", default="demo", help="preset name or YAML (default: demo)")
    p.add_argument("--checkpoint", default=None, help="weights (default for demo: the shipped demo.safetensors)")
    p.add_argument("--images", type=int, default=20, help="number of images (default 20)")
    p.add_argument("--seed", type=int, default=1,
                   help="data seed (default 1; the shipped demo model was trained on seed 0)")
    p.add_argument("--out", default="eval_out", help="output folder (default eval_out)")
    p.add_argument("--methods", default=None,
                   help=f"comma list (default: all available): {', '.join(DEFAULT_METHODS)}")
    p.add_argument("--steps", type=int, default=20, help="deletion/insertion steps over 0..100%% (default 20 = 5%%)")
    p.add_argument("--units", default="pixels",
                   help="comma list of what deletion / insertion removes, each reported separately: pixels, "
                        "patches (squares of --patch-size pixels) and tokens (the encoder's input tokens) "
                        "(default pixels)")
    p.add_argument("--patch-size", type=int, default=8, help="side in pixels of the patches unit (default 8)")
    p.add_argument("--max-fraction", type=float, default=1.0,
                   help="curves stop at this fraction (e.g. 0.2 with --steps 20: 1%% steps up to 20%%; default 1; "
                        "below 1 the LIF curve costs its own forwards)")
    p.add_argument("--replacement", "--replacements", dest="replacements", default="mean,blur,noise,zero",
                   help=f"comma list of what replaces removed pixels / tokens, each reported separately: "
                        f"{', '.join(M.REPLACEMENTS)} (default: all four)")
    p.add_argument("--blur-sigma", type=float, default=5.0, help="σ in pixels of the blur replacement (default 5)")
    p.add_argument("--batch-size", type=int, default=16, help="perturbed inputs per forward (default 16)")
    p.add_argument("--image-size", type=int, default=160, help="synthetic image size (default 160)")
    p.add_argument("--score-threshold", type=float, default=0.3)
    p.add_argument("--iou-threshold", type=float, default=0.5)
    p.add_argument("--any-class", action="store_true", help="match detections to objects regardless of class")
    p.add_argument("--max-pairs-per-image", type=int, default=None)
    p.add_argument("--no-randomisation", action="store_true", help="skip the model-randomisation test")
    p.add_argument("--no-memory", action="store_true",
                   help="do not measure each method's peak memory (a second call per image; with --no-randomisation "
                        "it is only for the memory column)")
    p.add_argument("--ig-steps", type=int, default=16, help="Integrated Gradients steps (default 16)")
    p.add_argument("--smoothgrad-samples", type=int, default=16, help="SmoothGrad samples (default 16)")
    p.add_argument("--drise-masks", type=int, default=500, help="D-RISE random masks per image (default 500)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 on a shared machine)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="do only images with index %% N == I (run N processes with the same --out; the last to "
                        "finish writes the complete table)")
    p.add_argument("--no-resume", action="store_true", help="redo images already done in --out/parts")
    p.add_argument("--aggregate-only", action="store_true",
                   help="evaluate nothing; write the tables of the images done so far (e.g. while shards run)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="evaluate on N Ray workers (Ray started here, or joined with --ray-address / RAY_ADDRESS) "
                        "into the same resumable store; needs pip install maskdino-lrp[ray]")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join this Ray cluster (workers default to its CPUs, its GPUs with --device cuda)")
    return p


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``I/N`` → (I, N) for ``--shard``; None stays None; a clear ValueError otherwise."""
    if text is None:
        return None
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard takes I/N with integers, e.g. 0/2, got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return i, n


def _split(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m maskdino_lrp.eval --config demo --images N --seed S --out DIR``."""
    from .run import evaluate

    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = None if args.methods is None else _split(args.methods)
    try:
        result = evaluate(
            args.config, args.checkpoint, args.images, args.seed, args.out, methods=methods, steps=args.steps,
            progress=not args.quiet, shard=parse_shard(args.shard), resume=not args.no_resume,
            workers=args.workers, ray_address=args.ray_address, threads=args.threads,
            units=_split(args.units), patch_size=args.patch_size, aggregate_only=args.aggregate_only,
            max_fraction=args.max_fraction, replacements=_split(args.replacements), blur_sigma=args.blur_sigma,
            batch_size=args.batch_size, image_size=args.image_size,
            score_threshold=args.score_threshold, iou_threshold=args.iou_threshold,
            require_class=not args.any_class, max_pairs_per_image=args.max_pairs_per_image,
            randomisation=not args.no_randomisation, measure_memory=not args.no_memory, device=args.device,
            method_options={"integrated-gradients": {"n_steps": args.ig_steps},
                            "smoothgrad": {"nt_samples": args.smoothgrad_samples},
                            "d-rise": {"n_masks": args.drise_masks}},
        )
    except (MethodError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    done = result["n_images_done"]
    print(f"{result['n_pairs']} pairs from {done} of {args.images} images; wrote {Path(args.out) / 'summary.md'}")
    return 0
