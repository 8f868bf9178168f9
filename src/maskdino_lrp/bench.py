"""Benchmarks: forward time and peak memory of the model, and the cost of LRP relative to a forward.

Every figure is measured in this run, each case in a fresh subprocess so that its peak resident
memory (``ru_maxrss``) is its own; ratios compare cases measured here, on this machine, now.
Run ``python -m maskdino_lrp.bench --help``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

_CHILD = r"""
import json, resource, sys, time, gc
import numpy as np, torch
torch.manual_seed(0)
from maskdino_lrp import build_model
from maskdino_lrp.lrp.explainer import LRP
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
model = build_model(args["config"], overrides=args.get("overrides"))
size = args["size"]
rng = np.random.default_rng(0)
image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = {}
def timed(fn, repeat):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter(); fn(); best = min(best, time.perf_counter() - t)
    return best
if args["case"] == "forward":
    prepared = model.prepare(image)
    with torch.no_grad():
        model(prepared.tensor)  # warm-up
        out["seconds"] = timed(lambda: model(prepared.tensor), args["repeat"])
    out["tokens"] = None
elif args["case"] == "lrp":
    lrp = LRP(model, composite=args.get("composite", "default"), chunk_size=args["chunk"],
              batch_mode=args.get("batch_mode", "auto"))
    k = min(args["k"], model.num_queries)
    out["k"] = k
    queries = list(range(k))
    def run():
        lrp.explain(image, queries=queries, target="class", stops=args["stops"])
    out["seconds"] = timed(run, args["repeat"])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out["peak_rss_mb"] = peak / 1024.0
out["model_rss_mb"] = base / 1024.0
print("RESULT " + json.dumps(out))
"""


THREADS = 2


def run_case(**kwargs: Any) -> dict:
    """Run one measurement in a fresh Python process; returns seconds and peak RSS (MB)."""
    kwargs.setdefault("threads", THREADS)
    kwargs.setdefault("repeat", 1)
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(kwargs)], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"benchmark case {kwargs} failed:\n{proc.stderr[-3000:]}")


def benchmark(config: str, size: int, ks: list[int], stops: list[str], chunk: int, repeat: int,
              batch_mode: str = "auto") -> list[dict]:
    """Forward, one-query LRP, and K-query LRP (one forward, batched backward) for one config and size.

    "K sequential single-query runs" are K independent runs of the measured one-query case, so their time
    is K × that measurement (reported as such, not re-run K times).
    """
    rows = []
    fwd = run_case(case="forward", config=config, size=size, repeat=repeat)
    rows.append({"config": config, "size": size, "case": "forward (no grad)", **fwd, "ratio": 1.0})
    one = run_case(case="lrp", config=config, size=size, k=1, chunk=chunk, stops=stops, repeat=repeat,
                   batch_mode=batch_mode)
    rows.append({"config": config, "size": size, "case": "LRP, 1 query", **one, "ratio": one["seconds"] / fwd["seconds"]})
    for k in ks:
        batched = run_case(case="lrp", config=config, size=size, k=k, chunk=chunk, stops=stops, repeat=1,
                           batch_mode=batch_mode)
        k_eff = batched.get("k", k)
        rows.append({"config": config, "size": size, "case": f"LRP, {k_eff} queries, one forward ({batch_mode})",
                     **batched, "ratio": batched["seconds"] / fwd["seconds"]})
        seq = k_eff * one["seconds"]
        rows.append({"config": config, "size": size, "case": f"{k_eff} sequential 1-query runs (= {k_eff} × row 2)",
                     "seconds": seq, "peak_rss_mb": one["peak_rss_mb"], "ratio": seq / fwd["seconds"],
                     "speedup_of_batched": seq / batched["seconds"]})
    return rows


def format_rows(rows: list[dict]) -> str:
    """A Markdown table of benchmark rows."""
    lines = ["| config | image | case | seconds | × forward | peak RSS (MB) | batched speed-up |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        speedup = f"{r['speedup_of_batched']:.2f}×" if "speedup_of_batched" in r else ""
        lines.append(f"| {r['config']} | {r['size']}² | {r['case']} | {r['seconds']:.3f} | {r['ratio']:.2f} "
                     f"| {r['peak_rss_mb']:.0f} | {speedup} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``maskdino-lrp bench`` / ``python -m maskdino_lrp.bench``."""
    parser = argparse.ArgumentParser(prog="maskdino-lrp bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", help="preset or YAML (repeatable); default: tiny and the full-size preset")
    parser.add_argument("--size", type=int, action="append", help="image size per config (default 128 for tiny, 800 otherwise)")
    parser.add_argument("--k", type=int, action="append", help="batched query counts (default 10 and 100)")
    parser.add_argument("--stops", default="pixels,encoder_input,memory")
    parser.add_argument("--chunk", type=int, default=10, help="targets per batched backward")
    parser.add_argument("--repeat", type=int, default=2, help="repeats for the forward and 1-query cases (best of)")
    parser.add_argument("--batch-mode", default="auto", choices=["auto", "vmap", "loop"])
    parser.add_argument("--threads", type=int, default=2,
                        help="torch intra-op threads (use 1 when other work shares the cores: oversubscribed "
                             "OpenMP threads make small ops orders of magnitude slower)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    global THREADS
    THREADS = args.threads
    configs = args.config or ["tiny", "maskdino_r50_3s_coco"]
    sizes = args.size or [128 if c == "tiny" else 800 for c in configs]
    ks = args.k or [10, 100]
    rows = []
    start = time.perf_counter()
    for config, size in zip(configs, sizes):
        print(f"benchmarking {config} at {size}×{size} …", file=sys.stderr, flush=True)
        rows += benchmark(config, size, ks, args.stops.split(","), args.chunk, args.repeat, args.batch_mode)
    print(format_rows(rows))
    print(f"\n(total benchmark time {time.perf_counter() - start:.0f} s; each case in its own process)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
