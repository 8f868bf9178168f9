"""Throughput of explain on Ray workers against one process, and Ray's fixed start cost (demo model).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ray_throughput.py --images 12 --workers 1,2

Measured in one run, on generated shapes images (160 px, ``topk:2``, every output format):
- one process (``BatchExplainer.run_all``, 1 torch thread): model build, images per minute;
- ``ray.init`` of a local instance (``num_cpus`` = the most workers asked, object store bounded);
- per worker count N (1 torch thread each): the time until N workers have built their model (the
  fixed cost), then the whole run (:func:`~maskdino_lrp.analysis.distributed.explain_on_ray`) and its
  images per minute with and without that start;
- what one image's answer puts in the object store (its pickled result);
- the load average before and after (the figures mean little on a machine that is busy with other work).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import sys
import tempfile
import time
from pathlib import Path


def _images(folder: Path, n: int) -> None:
    from PIL import Image

    from maskdino_lrp.data.shapes import generate_sample

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(generate_sample(11, i).image).save(folder / f"img_{i:03d}.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=12)
    p.add_argument("--workers", default="1,2", help="comma list of worker counts")
    p.add_argument("--queries", default="topk:2")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",")]

    import ray
    import torch

    from maskdino_lrp.analysis.distributed import ExplainWorker, _worker_copy, explain_on_ray
    from maskdino_lrp.analysis.runner import BatchExplainer
    from maskdino_lrp.distributed import object_store_bytes, worker_pool
    from maskdino_lrp.model.checkpoint import shipped_weights

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    out: dict = {"images": args.images, "queries": args.queries, "cores": os.cpu_count(),
                 "load_before": os.getloadavg()}
    try:
        _images(root / "images", args.images)

        def runner(folder: Path) -> BatchExplainer:
            return BatchExplainer("demo", folder, checkpoint=shipped_weights("demo"), queries=args.queries,
                                  progress=False)

        r = runner(root / "single")
        t0 = time.perf_counter()
        _ = r.model
        out["single_model_build_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        done = r.run_all([root / "images"])
        seconds = time.perf_counter() - t0
        assert done["done"] == args.images, done
        out["single_s"] = seconds
        out["single_images_per_min"] = 60 * args.images / seconds
        print(f"one process: model {out['single_model_build_s']:.2f} s, {args.images} images in {seconds:.1f} s "
              f"= {out['single_images_per_min']:.1f} images/min", flush=True)

        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=max(counts), object_store_memory=object_store_bytes(),
                 include_dashboard=False, log_to_driver=False)
        out["ray_init_s"] = time.perf_counter() - t0
        print(f"ray.init (local, {max(counts)} CPUs): {out['ray_init_s']:.2f} s", flush=True)
        for n in counts:
            t0 = time.perf_counter()
            with worker_pool(ExplainWorker, lambda k: (_worker_copy(r), k), "explain", workers=n, threads=1):
                ready = time.perf_counter() - t0
            t0 = time.perf_counter()
            folder = root / f"ray{n}"
            done = explain_on_ray(runner(folder), [root / "images"], workers=n, threads=1)
            total = time.perf_counter() - t0
            assert done["done"] == args.images, done
            for f in sorted((root / "single").rglob("*.csv")):  # the same files as one process
                assert f.read_bytes() == (folder / f.relative_to(root / "single")).read_bytes(), f
            row = {"workers_ready_s": ready, "run_s": total, "images_per_min": 60 * args.images / total,
                   "images_per_min_after_start": 60 * args.images / max(1e-9, total - ready)}
            out[f"ray_{n}"] = row
            print(f"{n} worker(s): ready in {ready:.2f} s; run {total:.1f} s = {row['images_per_min']:.1f} images/min "
                  f"({row['images_per_min_after_start']:.1f} after the start); "
                  f"{row['images_per_min'] / out['single_images_per_min']:.2f}x one process", flush=True)
        sample = json.loads((root / "single" / "manifest.json").read_text())
        r2 = runner(root / "one")
        from maskdino_lrp.analysis.runner import Source

        first = sorted((root / "images").iterdir())[0]
        result = r2.attempt_image(Source(first.name, first), first.name)
        out["result_bytes"] = len(pickle.dumps(result))
        print(f"object store per image: {out['result_bytes']} bytes (the pickled result; the files are written by "
              f"the worker); manifest of {len(sample['images'])} images", flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    out["load_after"] = os.getloadavg()
    print(f"load average before {out['load_before'][0]:.1f}, after {out['load_after'][0]:.1f} on {out['cores']} cores")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
