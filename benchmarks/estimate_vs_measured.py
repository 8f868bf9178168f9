"""Memory estimate vs measured peak: ``maskdino-lrp estimate``'s total against the peak resident memory
(``ru_maxrss``) of a real run, each case in its own fresh process.

A case runs what ``maskdino-lrp explain IMAGE`` runs, in a new Python process: imports, the model built
(random weights, seeded), a generated photo of the case's size written to a temporary PNG, then
:class:`~maskdino_lrp.analysis.runner.BatchExplainer` on it (K queries, chunk size, stops, the formats
given). The printed ratio is measured / estimated; ±25 % is the target.

    python benchmarks/estimate_vs_measured.py                 # the small cases (a few minutes)
    python benchmarks/estimate_vs_measured.py --large         # + the two large ones (~8 GB and ~10 GB each)
    python benchmarks/estimate_vs_measured.py --case 3s-800   # one case

Cases run one at a time (a large one needs the memory of the machine for itself); ``--threads`` torch
threads each (default 2).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FOUR_SCALE = str(HERE / "maskdino_r50_4s.yaml")  # official-style 4-scale config (res2..res5 tokens)
SMALL_INPUT = {"INPUT.MIN_SIZE_TEST": 320, "INPUT.MAX_SIZE_TEST": 533}

# name: (config, overrides, (image height, width), large?)
CASES = {
    "tiny-128": ("tiny", None, (128, 128), False),
    "tiny-photo": ("tiny", None, (2000, 3000), False),
    "demo-160": ("demo", None, (160, 160), False),
    "demo-photo": ("demo", None, (2000, 3000), False),
    "3s-320": ("maskdino_r50_3s_coco", SMALL_INPUT, (320, 320), False),
    "3s-320-photo": ("maskdino_r50_3s_coco", SMALL_INPUT, (2000, 3000), False),
    "4s-320": (FOUR_SCALE, SMALL_INPUT, (320, 320), False),
    "3s-800": ("maskdino_r50_3s_coco", None, (800, 800), True),
    "4s-512": (FOUR_SCALE, {"INPUT.MIN_SIZE_TEST": 512, "INPUT.MAX_SIZE_TEST": 853}, (512, 512), True),
}

_CHILD = r"""
import json, os, resource, sys, tempfile, time
args = json.loads(sys.argv[1])
import numpy as np, torch
torch.set_num_threads(args["threads"])
from PIL import Image
from maskdino_lrp.analysis.runner import BatchExplainer, LRPOptions
h, w = args["size"]
tmp = tempfile.mkdtemp(prefix="estimate-bench-")
path = os.path.join(tmp, "photo.png")
Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
start = time.perf_counter()
runner = BatchExplainer(args["config"], os.path.join(tmp, "out"), overrides=args["overrides"],
                        queries=",".join(str(q) for q in range(args["k"])),
                        options=LRPOptions(chunk_size=args["chunk"], stops=args["stops"]), formats=args["formats"],
                        progress=False, report=False)
counts = runner.run_all([path])
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("RESULT " + json.dumps({"peak_bytes": peak, "seconds": seconds, "failures": counts["failures"]}))
"""


def measure(config: str, overrides: dict | None, size: tuple[int, int], k: int, chunk: int, stops: str,
            formats: list[str], threads: int) -> dict:
    """Peak resident bytes and seconds of one run in a fresh process."""
    args = {"config": config, "overrides": overrides, "size": list(size), "k": k, "chunk": chunk, "stops": stops,
            "formats": formats, "threads": threads}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            out = json.loads(line[len("RESULT "):])
            if out["failures"]:
                raise RuntimeError(f"the run failed: {out['failures']}")
            return out
    raise RuntimeError(f"case failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="run only these cases (repeatable)")
    parser.add_argument("--large", action="store_true", help="also the large cases (8-10 GB each, minutes)")
    parser.add_argument("--k", type=int, default=5, help="explained queries (default: %(default)s)")
    parser.add_argument("--chunk", type=int, default=16, help="chunk size (default: %(default)s)")
    parser.add_argument("--stops", default="pixels,encoder_input,memory")
    parser.add_argument("--formats", default="csv,npz,png", help="outputs written (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    from maskdino_lrp.analysis.estimate import estimate

    names = args.case or [n for n, c in CASES.items() if args.large or not c[3]]
    formats = [f for f in args.formats.split(",") if f]
    rows = []
    print(f"{'case':<14} {'image':>11} {'tokens':>7} {'estimate':>10} {'measured':>10} {'ratio':>6} {'seconds':>8}")
    for name in names:
        config, overrides, size, _ = CASES[name]
        est = estimate(config, size, args.k, chunk_size=args.chunk, stops=args.stops, overrides=overrides,
                       formats=formats, gflops=1.0)
        got = measure(config, overrides, size, args.k, args.chunk, args.stops, formats, args.threads)
        ratio = got["peak_bytes"] / est.total_bytes
        row = {"case": name, "config": config, "overrides": overrides, "image": list(size), "tokens": est.shapes.tokens,
               "estimate_mb": est.total_bytes / 2 ** 20, "measured_mb": got["peak_bytes"] / 2 ** 20, "ratio": ratio,
               "seconds": got["seconds"]}
        rows.append(row)
        print(f"{name:<14} {size[1]:>5}×{size[0]:<5} {est.shapes.tokens:>7} {row['estimate_mb']:>8.0f}MB "
              f"{row['measured_mb']:>8.0f}MB {ratio:>6.2f} {got['seconds']:>8.1f}", flush=True)
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"\nworst |measured/estimate - 1| = {worst:.0%} over {len(rows)} case(s) (target: within 25%)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
