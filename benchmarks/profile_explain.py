"""Where one explained detection spends its time, next to a plain autograd gradient of the same logit.

    python benchmarks/profile_explain.py --config maskdino_r50_3s_coco --size 800 --threads 1

Random weights (the cost does not depend on them), one image of uniform noise, the top query's class
logit. Prints, for each case, its wall time (also as a multiple of the forward's) and the torch
profiler's operators by self CPU time (top ``--rows``).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="maskdino_r50_3s_coco")
    p.add_argument("--size", type=int, default=800)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", type=int, default=18)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from maskdino_lrp import build_model
    from maskdino_lrp.lrp.explainer import LRP

    torch.manual_seed(0)
    model = build_model(args.config).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    image = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    x = model.prepare(image).tensor

    def gradient() -> None:
        inp = x.clone().requires_grad_(True)
        logits = model(inp)["pred_logits"][0]
        torch.autograd.grad(logits[0, int(logits[0].argmax())], inp)

    lrp = LRP(model)

    def explain() -> None:
        lrp.explain(image, queries="topk:1", stops=("pixels",))

    with torch.no_grad():
        t = time.perf_counter()
        model(x)
        forward_s = time.perf_counter() - t
    print(f"{args.config} at {args.size}², {args.threads} thread(s); forward (no graph) {forward_s:.2f} s")
    for name, fn in (("plain gradient", gradient), ("LRP, 1 query to the pixels", explain)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            fn()
            wall = time.perf_counter() - t
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        print(f"\n## {name}: {wall:.2f} s wall ({wall / forward_s:.2f}× the forward)\n")
        print("| operator | self CPU s | share | calls |\n|---|---|---|---|")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.rows]:
            print(f"| {e.key} | {e.self_cpu_time_total / 1e6:.2f} | {e.self_cpu_time_total / total:.1%} | {e.count} |")


if __name__ == "__main__":
    main()
