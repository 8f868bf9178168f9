"""``python -m maskdino_lrp.train``: train a MaskDINO on synthetic shapes, evaluate, export.

The shipped demo weights (see ``weights/demo_training.json`` for the measured AP)::

    OMP_WAIT_POLICY=PASSIVE python -m maskdino_lrp.train --preset demo --out runs/demo --seed 0 \
        --steps 4000 --batch-size 8 --lr 3e-4 --warmup-steps 200 --schedule cosine --ckpt-every 100 \
        --val-every 500 --val-images 30 --log-every 20 --export src/maskdino_lrp/weights/demo.safetensors \
        --record runs/demo/training.json --eval-seed 12345 --eval-images 100

Rerunning the same command after an interruption resumes from ``OUT/last.pt``. On a CPU shared with
other jobs, ``OMP_WAIT_POLICY=PASSIVE`` (set before Python starts) keeps idle OpenMP threads from
spinning, which makes a step several times faster there; it does not change the results.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

import yaml

from .loop import TrainConfig, count_parameters, evaluate, train


def parse_args(argv=None) -> argparse.Namespace:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m maskdino_lrp.train", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default=d.preset, help="model preset name or YAML path (default: %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override an official config key, e.g. MODEL.MaskDINO.DEC_LAYERS=3 (repeatable)")
    p.add_argument("--out", dest="out_dir", default=d.out_dir, help="run folder for checkpoints and logs")
    p.add_argument("--seed", type=int, default=d.seed, help="training data seed and torch seed")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--backbone-lr-mult", type=float, default=d.backbone_lr_mult)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--schedule", choices=("cosine", "step", "constant"), default=d.schedule)
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    p.add_argument("--clip-grad-norm", type=float, default=d.clip_grad_norm)
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--train-images", type=int, default=d.train_images,
                   help="0: fresh images every step; N: cycle over a fixed set of N images")
    p.add_argument("--num-points", type=int, default=d.num_points,
                   help="mask points for matching and loss; 0 = dense at the mask-prediction resolution")
    p.add_argument("--class-prior", type=float, default=d.class_prior,
                   help="initial class probability of the classifier bias (0 keeps the default init)")
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--val-every", type=int, default=d.val_every)
    p.add_argument("--val-seed", type=int, default=d.val_seed)
    p.add_argument("--val-images", type=int, default=d.val_images)
    p.add_argument("--export", default=d.export, help="fp16 safetensors path (default: OUT/model.safetensors)")
    p.add_argument("--eval-seed", type=int, default=12345, help="held-out seed of the final evaluation")
    p.add_argument("--eval-images", type=int, default=100, help="0 skips the final evaluation")
    p.add_argument("--record", default="", help="write the training record (command, AP, ...) to this JSON")
    p.add_argument("--stop-at", type=int, default=0,
                   help="stop after this many steps in all (checkpoint, no export); rerun to continue")
    p.add_argument("--no-resume", action="store_true", help="start from scratch even if OUT/last.pt exists")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    overrides = {}
    for item in args.overrides:
        if "=" not in item:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(value)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields and k != "overrides"}, overrides=overrides)
    env = "".join(f"{k}={os.environ[k]} " for k in ("OMP_WAIT_POLICY",) if os.environ.get(k))
    command = env + "python -m maskdino_lrp.train " + " ".join(sys.argv[1:] if argv is None else argv)
    result = train(cfg, resume=not args.no_resume, progress=not args.no_progress, stop_at=args.stop_at)
    if result["export"] is None:
        print(f"stopped at step {result['steps']} of {cfg.steps}; rerun the same command to continue")
        return 0
    model = result["model"]
    summary = {
        "command": command, "preset": cfg.preset, "overrides": overrides, "seed": cfg.seed, "steps": cfg.steps,
        "batch_size": cfg.batch_size, "image_size": cfg.image_size, "wall_time_s": round(result["wall_time_s"], 1),
        "parameters": count_parameters(model), "weights": result["export"],
        "weights_bytes": Path(result["export"]).stat().st_size, "train_config": dataclasses.asdict(cfg),
    }
    if args.eval_images > 0:
        t = time.time()
        ap = evaluate(model, args.eval_seed, args.eval_images, cfg.shapes_config())
        summary.update({"eval_seed": args.eval_seed, "eval_images": args.eval_images,
                        "eval_time_s": round(time.time() - t, 1), **{k: round(v, 4) for k, v in ap.items()}})
    text = json.dumps(summary, indent=2)
    print(text)
    out = Path(args.record) if args.record else Path(cfg.out_dir) / "training.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
