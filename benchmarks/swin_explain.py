"""One explained detection with a Swin MaskDINO: seconds and peak memory, with and without recomputation,
against ``maskdino-lrp estimate``.

Each case runs in its own fresh process (its ``ru_maxrss`` is its own): the model is built (random weights,
seeded), a random image of the case's size is explained through ``LRP(model, recompute=...).explain`` —
the best-scoring query, class target, relevance at the pixels — and the process reports the LRP forward's
and the backward's seconds (wall and process CPU) and its peak resident memory. The estimate is
``estimate(config, size, 1, stops="pixels", formats=("npz",), recompute=...)``; the ratio printed is
measured / estimated (±25 % is the estimate's target). The forward alone: ``benchmarks/swin_forward.py``.

    python benchmarks/swin_explain.py --config maskdino_swint_coco --size 320 --size 512
    python benchmarks/swin_explain.py --config maskdino_swint_coco --size 800 --recompute on

A case whose estimate exceeds ``--max-gb`` (default 20) is skipped and listed as such. Run big cases one
at a time on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_CHILD = r"""
import json, resource, sys, time
args = json.loads(sys.argv[1])
import numpy as np, torch
torch.set_num_threads(args["threads"])
torch.manual_seed(0)
from maskdino_lrp.lrp import LRP
from maskdino_lrp.model.maskdino import build_model
model = build_model(args["config"], overrides=args["overrides"])
image = np.random.default_rng(0).integers(0, 256, (args["size"], args["size"], 3), dtype=np.uint8)
lrp = LRP(model, chunk_size=1, recompute=args["recompute"])
wall, cpu = time.perf_counter(), time.process_time()
expl = lrp.explain(image, queries="topk:1", target="class", stops=("pixels",))
out = {"input": list(expl.input_size), "seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu,
       "forward_seconds": expl.meta["forward_seconds"], "backward_seconds": expl.meta["backward_seconds"],
       "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
       "pixel_sum": float(expl.relevance["pixels"].sum()), "target": float(expl.target_values[0])}
print("RESULT " + json.dumps(out))
"""


def overrides_for(size: int) -> dict:
    """The test-time resize that makes a square image of ``size`` the model's input unchanged."""
    return {"INPUT.MIN_SIZE_TEST": size, "INPUT.MAX_SIZE_TEST": max(size, 1333)}


def measure(config: str, size: int, recompute: bool, threads: int) -> dict:
    """One explained detection in a fresh process: seconds, CPU seconds, peak bytes."""
    args = {"config": config, "overrides": overrides_for(size), "size": size, "recompute": recompute,
            "threads": threads}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"case {args} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", help="preset or YAML (repeatable; default maskdino_swint_coco)")
    parser.add_argument("--size", type=int, action="append", help="square image size (repeatable; default 320)")
    parser.add_argument("--recompute", choices=("both", "on", "off"), default="both")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-gb", type=float, default=20.0, help="skip cases estimated above this")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    from maskdino_lrp.analysis.estimate import estimate

    flags = {"both": (False, True), "on": (True,), "off": (False,)}[args.recompute]
    rows = []
    print("| config | input | recompute | estimate GB | measured GB | ratio | LRP forward s | backward s | total s | "
          "CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for config in args.config or ["maskdino_swint_coco"]:
        for size in args.size or [320]:
            for flag in flags:
                est = estimate(config, size, 1, stops="pixels", overrides=overrides_for(size), formats=("npz",),
                               gflops=1.0, recompute=flag)
                gb = est.total_bytes / 2 ** 30
                if gb > args.max_gb:
                    print(f"| {config} | {size}² | {flag} | {gb:.2f} | skipped (> {args.max_gb:g} GB) | | | | | |",
                          flush=True)
                    continue
                got = measure(config, size, flag, args.threads)
                ratio = got["peak_bytes"] / est.total_bytes
                rows.append({"config": config, "size": size, "recompute": flag, "estimate_gb": gb,
                             "measured_gb": got["peak_bytes"] / 2 ** 30, "ratio": ratio, **got})
                print(f"| {config} | {got['input'][0]}×{got['input'][1]} | {flag} | {gb:.2f} | "
                      f"{got['peak_bytes'] / 2 ** 30:.2f} | {ratio:.2f} | {got['forward_seconds']:.1f} | "
                      f"{got['backward_seconds']:.1f} | {got['seconds']:.1f} | {got['cpu_seconds']:.1f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
