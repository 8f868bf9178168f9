"""Benchmarks: what explaining costs next to a forward and a plain gradient of the same model, measured now.

Cases, each in a fresh subprocess so that its peak memory is its own (resident memory ``ru_maxrss`` on
CPUs, ``torch.cuda.max_memory_allocated`` on GPUs): the forward (no graph), a plain autograd gradient of
one class logit with respect to the pixels (the same target an explanation starts from), and LRP of 1, 10
and 100 queries in one call (one forward, the backward batched or looped). Ratios compare cases measured in
this run, on this machine; the saved-for-backward bytes per module kind of the LRP forward and of the plain
gradient's forward are counted exactly (``torch.autograd.graph.saved_tensors_hooks``), independent of load.
Run ``maskdino-lrp bench --help``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

_CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
from maskdino_lrp import build_model
from maskdino_lrp.bench import count_saved, device_peak, reset_peak, synchronize
from maskdino_lrp.lrp.explainer import LRP
torch.manual_seed(0)
device, dtype = torch.device(args["device"]), getattr(torch, args["dtype"])
half = dtype in (torch.bfloat16, torch.float16)  # autocast, as LRP(dtype=...) runs it; weights stay float32
model = build_model(args["config"], overrides=args.get("overrides")).eval().to(
    device=device, dtype=None if half else dtype)
def autocast():
    return torch.autocast(device.type, dtype if half else torch.bfloat16, enabled=half)
size = args["size"]
image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = {}

def timed(fn, repeat):
    best = float("inf")
    for _ in range(repeat):
        synchronize(device); t = time.perf_counter(); fn(); synchronize(device)
        best = min(best, time.perf_counter() - t)
    return best

def prepared_input():
    return model.prepare(image).tensor.to(device=device, dtype=None if half else dtype)

def gradient():  # a plain autograd gradient of one class logit w.r.t. the pixels (the weights take none)
    x = prepared_input().requires_grad_(True)
    with autocast():
        logits = model(x)["pred_logits"][0]
    torch.autograd.grad(logits[0, int(logits[0].argmax())], x)

case = args["case"]
for p in model.parameters():
    p.requires_grad_(False)
if case == "forward":
    x = prepared_input()
    with torch.no_grad(), autocast():
        model(x)  # warm-up
        reset_peak(device)
        out["seconds"] = timed(lambda: model(x), args["repeat"])
elif case == "gradient":
    gradient()  # warm-up
    reset_peak(device)
    out["seconds"] = timed(gradient, args["repeat"])
elif case == "lrp":
    lrp = LRP(model, composite=args["composite"], chunk_size=args["chunk"], batch_mode=args["batch_mode"],
              dtype=dtype if half else None, trim_heap=args.get("trim_heap", False))
    k = min(args["k"], model.num_queries)
    out["k"] = k
    lrp.explain(image, queries=[0], target="class", stops=args["stops"])  # warm-up
    reset_peak(device)
    out["seconds"] = timed(lambda: lrp.explain(image, queries=list(range(k)), target="class",
                                               stops=args["stops"]), args["repeat"])
elif case == "saved":
    out["lrp"] = count_saved(model, image, device, dtype, lrp=True, composite=args["composite"])
    out["gradient"] = count_saved(model, image, device, dtype, lrp=False)
peak = device_peak(device)
out["peak_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0) if peak is None else peak / 2**20
out["model_mb"] = base / 1024.0
print("RESULT " + json.dumps(out))
"""

THREADS = 2


def synchronize(device: Any) -> None:
    """Wait for the device's queued work (timings on GPUs)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: Any) -> None:
    """Start the device's peak-memory count afresh (GPUs; a process's resident peak cannot be reset)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def device_peak(device: Any) -> int | None:
    """Peak bytes allocated on a GPU since the last reset; None on CPUs (use the resident peak)."""
    import torch

    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def count_saved(model, image, device, dtype, lrp: bool = True, composite: str = "default") -> dict[str, float]:
    """MB the forward saves for the backward, by module kind (``conv``, ``linear``, ``deform_attn`` …; the ops of
    blocks and layers by the part of the model they are in), each storage counted once: the LRP forward (``lrp=True``) or a plain forward with grad."""
    import collections

    import torch
    from torch import nn

    from .adapters import find_adapter
    from .lrp.composites import module_kind
    from .lrp.explainer import LRP

    adapter = find_adapter(model)
    kinds = {id(m): (adapter.module_kind(n, m) if adapter else None) or module_kind(m) or _family(n)
             for n, m in model.named_modules()}
    stack: list[str] = []
    seen: set[int] = set()
    total: collections.Counter = collections.Counter()

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (expanded shapes, wrappers)
            return t
        if key not in seen and nbytes:
            seen.add(key)
            total[stack[-1] if stack else "other"] += nbytes
        return t

    pre = nn.modules.module.register_module_forward_pre_hook(
        lambda m, _a: stack.append(kinds.get(id(m)) or (stack[-1] if stack else "other")))
    post = nn.modules.module.register_module_forward_hook(lambda m, _a, _o: stack.pop() and None)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            half = dtype in (torch.bfloat16, torch.float16)
            if lrp:
                session = LRP(model, composite=composite, dtype=dtype if half else None).prepare(image)
                session.cleanup()
            else:
                x = model.prepare(image).tensor.to(device=device, dtype=None if half else dtype).requires_grad_(True)
                with torch.autocast(torch.device(device).type, dtype if half else torch.bfloat16, enabled=half):
                    model(x)
    finally:
        pre.remove()
        post.remove()
    return {k: v / 2**20 for k, v in total.most_common()}


def _family(name: str) -> str | None:
    """Where a module of no LRP kind (a block, a layer: its own elementwise ops) sits: its part of the model."""
    return f"other ops in {'.'.join(name.split('.')[:2])}" if name else None


def run_case(**kwargs: Any) -> dict:
    """Run one measurement in a fresh Python process; returns its result (seconds, peak MB, …)."""
    kwargs.setdefault("threads", THREADS)
    kwargs.setdefault("repeat", 1)
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("composite", "default")
    kwargs.setdefault("batch_mode", "auto")
    kwargs.setdefault("chunk", 16)
    kwargs.setdefault("stops", ["pixels"])
    env = dict(os.environ, OMP_NUM_THREADS=str(kwargs["threads"]))
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(kwargs)], capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"benchmark case {kwargs.get('case')} of {kwargs.get('config')} failed:\n{proc.stderr[-3000:]}")


def benchmark(config: str, size: int, ks: list[int], stops: list[str], chunk: int, repeat: int,
              batch_mode: str = "auto", device: str = "cpu", dtype: str = "float32", trim_heap: bool = False) -> dict:
    """Forward, plain gradient, LRP of 1 and of each K queries in one call; the ratios between them."""
    common = dict(config=config, size=size, device=device, dtype=dtype, trim_heap=trim_heap)
    rows = [{"case": "forward (no graph)", **run_case(case="forward", repeat=repeat, **common)},
            {"case": "plain gradient (one logit → pixels)", **run_case(case="gradient", repeat=repeat, **common)}]
    lrp = {}
    for k in [1, *ks]:
        result = run_case(case="lrp", k=k, chunk=chunk, stops=stops, repeat=repeat if k == 1 else 1,
                          batch_mode=batch_mode, **common)
        lrp[result["k"]] = result
        rows.append({"case": f"LRP, {result['k']} quer{'y' if result['k'] == 1 else 'ies'} in one call", **result})
    fwd, grad, one = rows[0], rows[1], lrp[1]
    ratios = {"LRP 1 / plain gradient (time)": one["seconds"] / grad["seconds"],
              "LRP 1 / forward (time)": one["seconds"] / fwd["seconds"],
              "LRP 1 / plain gradient (peak memory)": one["peak_mb"] / grad["peak_mb"],
              "plain gradient / forward (time)": grad["seconds"] / fwd["seconds"]}
    for k, result in lrp.items():
        if k > 1:
            ratios[f"LRP {k} / LRP 1 (time)"] = result["seconds"] / one["seconds"]
            ratios[f"LRP {k}: seconds per detection"] = result["seconds"] / k
    saved = run_case(case="saved", **common)
    return {"config": config, "size": size, "device": device, "dtype": dtype, "rows": rows, "ratios": ratios,
            "saved_mb": {"lrp": saved["lrp"], "gradient": saved["gradient"]}}


def format_result(result: dict) -> str:
    """Markdown: the cases, the ratios, and the saved-for-backward MB by module kind."""
    head = f"### {result['config']} at {result['size']}², {result['device']}, {result['dtype']}"
    lines = [head, "", "| case | seconds | peak MB |", "|---|---|---|"]
    lines += [f"| {r['case']} | {r['seconds']:.3f} | {r['peak_mb']:.0f} |" for r in result["rows"]]
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {name} | {value:.3f} |" for name, value in result["ratios"].items()]
    lrp, grad = result["saved_mb"]["lrp"], result["saved_mb"]["gradient"]
    lines += ["", "| saved for backward (MB) | LRP forward | plain gradient forward |", "|---|---|---|"]
    for kind in sorted(set(lrp) | set(grad), key=lambda k: -lrp.get(k, 0)):
        lines.append(f"| {kind} | {lrp.get(kind, 0):.1f} | {grad.get(kind, 0):.1f} |")
    lines.append(f"| total | {sum(lrp.values()):.1f} | {sum(grad.values()):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``maskdino-lrp bench`` / ``python -m maskdino_lrp.bench``."""
    parser = argparse.ArgumentParser(prog="maskdino-lrp bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append",
                        help="preset or YAML (repeatable); default: demo, maskdino_r50_3s_coco_3dec, maskdino_r50_3s_coco")
    parser.add_argument("--size", type=int, action="append", help="image size per config (default 160 for demo and "
                        "tiny, 800 otherwise)")
    parser.add_argument("--k", type=int, action="append", help="query counts explained in one call besides 1 "
                        "(default 10 and 100)")
    parser.add_argument("--stops", default="pixels")
    parser.add_argument("--chunk", type=int, default=16, help="targets per batched backward")
    parser.add_argument("--repeat", type=int, default=2, help="repeats of the forward, gradient and 1-query cases "
                        "(best of)")
    parser.add_argument("--batch-mode", default="auto", choices=["auto", "vmap", "loop"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--threads", type=int, default=2,
                        help="torch intra-op threads (use 1 when other work shares the cores: oversubscribed "
                             "OpenMP threads make small ops orders of magnitude slower)")
    parser.add_argument("--trim-heap", action="store_true", help="LRP(trim_heap=True): the C heap's free pages "
                        "returned after each module of the LRP forward (lower peak RSS on CPUs)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    global THREADS
    THREADS = args.threads
    configs = args.config or ["demo", "maskdino_r50_3s_coco_3dec", "maskdino_r50_3s_coco"]
    sizes = args.size or [160 if c in ("tiny", "demo") else 800 for c in configs]
    if len(sizes) != len(configs):
        parser.error(f"give one --size per --config ({len(configs)} configs, {len(sizes)} sizes)")
    ks = args.k or [10, 100]
    results = []
    start = time.perf_counter()
    for config, size in zip(configs, sizes):
        print(f"benchmarking {config} at {size}×{size} …", file=sys.stderr, flush=True)
        results.append(benchmark(config, size, ks, args.stops.split(","), args.chunk, args.repeat, args.batch_mode,
                                 args.device, args.dtype, args.trim_heap))
        print(format_result(results[-1]) + "\n", flush=True)
    print(f"(total benchmark time {time.perf_counter() - start:.0f} s; each case in its own process)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
