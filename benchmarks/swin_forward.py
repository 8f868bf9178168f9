"""Forward time and peak memory of the Swin backbone and of a whole Swin MaskDINO, against the R50 ones.

Each case runs in its own fresh process (its ``ru_maxrss`` is its own): the model is built (random
weights, seeded), an image of the size given is prepared as ``predict`` does (resize, normalise, pad to
32), one warm-up forward runs under ``torch.no_grad()``, then the best of ``--repeat`` forwards is
reported as wall-clock seconds and as CPU seconds of the process (``time.process_time``, which other
load on a shared machine inflates less than the wall clock).

    python benchmarks/swin_forward.py                    # Swin-T and R50-3s presets at 800x800, 2 threads
    python benchmarks/swin_forward.py --size 512 --config maskdino_swinl_coco
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

_CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
torch.manual_seed(0)
from maskdino_lrp.model.maskdino import build_model
model = build_model(args["config"])
image = np.random.default_rng(0).integers(0, 256, (args["size"], args["size"], 3), dtype=np.uint8)
x = model.prepare(image).tensor
part = model.backbone if args["part"] == "backbone" else model
built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
with torch.no_grad():
    part(x)
    wall, cpu = [], []
    for _ in range(args["repeat"]):
        t, c = time.perf_counter(), time.process_time()
        part(x)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
out = {"input": list(x.shape[-2:]), "seconds": min(wall), "cpu_seconds": min(cpu),
       "model_rss_mb": built, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
       "parameters_m": sum(p.numel() for p in part.parameters()) / 1e6}
print("RESULT " + json.dumps(out))
"""


def run(config: str, part: str, size: int, repeat: int, threads: int) -> dict:
    """One case in a fresh process: {seconds, cpu_seconds, model_rss_mb, peak_rss_mb, parameters_m, input}."""
    args = dict(config=config, part=part, size=size, repeat=repeat, threads=threads)
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"case {args} failed:\n{proc.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", help="preset or YAML (repeatable); default: "
                        "maskdino_swint_coco and maskdino_r50_3s_coco")
    parser.add_argument("--size", type=int, default=800)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    print("| config | part | input | parameters (M) | wall s | CPU s | peak RSS (MB) | RSS after build (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    for config in args.config or ["maskdino_swint_coco", "maskdino_r50_3s_coco"]:
        for part in ("backbone", "model"):
            r = run(config, part, args.size, args.repeat, args.threads)
            print(f"| {config} | {part} | {r['input'][0]}×{r['input'][1]} | {r['parameters_m']:.1f} | "
                  f"{r['seconds']:.2f} | {r['cpu_seconds']:.2f} | {r['peak_rss_mb']:.0f} | {r['model_rss_mb']:.0f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
