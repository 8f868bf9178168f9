"""The ``maskdino-lrp`` command line: a thin layer over the library.

Exit codes: 0 success; 1 the command ran but found problems (validation failures, images that could
not be explained); 2 bad input (arguments, config, checkpoint, images, output folder).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import traceback
from typing import Sequence

PROG = "maskdino-lrp"
log = logging.getLogger("maskdino_lrp.cli")


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``maskdino-lrp: error: …``) instead of usage + message."""

    def error(self, message: str):  # noqa: D401 - argparse API
        hint = f" (see '{self.prog} --help')"
        raise CliError(message + hint)


_EPILOG_EXPLAIN = """\
examples:
  maskdino-lrp explain street.jpg --config maskdino_r50_3s_coco --checkpoint model_final.pth --out runs/street
  maskdino-lrp explain images/ --config tiny --queries thr:0.5 --stops pixels,encoder_input,memory --out runs/a
  maskdino-lrp explain images/ --hf ./detr-resnet-50 --queries topk:3 --out runs/detr   (save_pretrained folder)
  maskdino-lrp explain annotations/instances_val2017.json --config demo --workers 4 --out runs/val   (Ray, here)

Each image gets a folder under --out with, per explained query, token CSVs (level,y,x,relevance,raw;
relevance sums to 1), per-layer totals, raw arrays (.npz), metadata JSON and PNG overlays; the run
gets manifest.json and report.html. Re-running the same command resumes: finished images are skipped.
A bad image is reported and skipped (exit code 1 at the end); bad arguments exit with code 2.
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _image_size(text: str) -> tuple[int, int]:
    """``800`` (square) or ``WIDTHxHEIGHT`` → (height, width)."""
    try:
        if "x" in text.lower():
            w, h = (int(v) for v in text.lower().split("x"))
        else:
            w = h = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 800 or 1333x800 (width×height), got {text!r}") from None
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"image size must be positive, got {text!r}")
    return h, w


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .analysis.export import FORMATS
    from .analysis.validate import DEFAULT_MAX_RESIDUAL, DEFAULT_TOLERANCE
    from .lrp.composites import composite_names
    from .lrp.explainer import DEFAULT_STOPS, STOPS
    from .lrp.targets import TARGETS

    common = _Parser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="debug logging (memory per stage) and tracebacks on errors")

    parser = _Parser(prog=PROG, description="Layer-wise Relevance Propagation for MaskDINO: explain detections, "
                     "check written explanations, estimate memory.",
                     epilog="Run 'maskdino-lrp COMMAND --help' for a command's options. LOGLEVEL=DEBUG also turns on "
                     "debug logging.", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="debug logging (memory per stage) and tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("explain", parents=[common], help="explain detections of images (files or folders)",
                       description="Explain the detections of every image (files, or folders searched recursively) "
                       "and write CSVs, arrays, overlays and report.html.", epilog=_EPILOG_EXPLAIN,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGES", help="image files, folders of images, a COCO annotation "
                   ".json (its images, ids kept) or a .txt list of image paths")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--config", metavar="CFG",
                       help="preset name (tiny, maskdino_r50_3s_coco, …) or an official MaskDINO YAML")
    model.add_argument("--hf", metavar="DIR",
                       help="a local Hugging Face save_pretrained folder: DETR, Conditional DETR, Deformable DETR, "
                       "RT-DETR (v1, v2) or Mask2Former, by its config's model_type (needs pip install "
                       "maskdino-lrp[hf]); class names from its config's id2label")
    p.add_argument("--checkpoint", metavar="CKPT", help="weights: official .pth / detectron2 .pkl / .safetensors "
                   "(without: a preset's shipped weights, e.g. demo's, else random weights seeded by --seed, "
                   "with a warning)")
    p.add_argument("--partial-load", action="store_true",
                   help="load a checkpoint that does not fit the model (missing / unexpected / other-shape keys) "
                   "partially instead of refusing it; the rest keeps random weights")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; a rerun resumes in it)")
    p.add_argument("--queries", default="topk:5", metavar="SPEC",
                   help="which queries: topk:N (best N detections), thr:0.5 (score threshold), 3,7 (query indices) "
                   "or all (default: %(default)s)")
    p.add_argument("--target", default="class", metavar="NAME",
                   help=f"what to explain: {', '.join(TARGETS)}; refine:<coord>:<stage> is one stage's refinement "
                   "of a box coordinate (stages: proposal, 0 … last decoder layer) (default: %(default)s)")
    p.add_argument("--stops", default=None, metavar="LIST",
                   help=f"where to keep relevance, comma-separated from: {', '.join(STOPS)} (default: the model's "
                   "own: pixels,encoder_input,memory for MaskDINO and the encoder-decoder models, pixels,encoder_input "
                   "for YOLOS)")
    p.add_argument("--composite", default="default", metavar="NAME",
                   help=f"LRP rule composite: {', '.join(composite_names())} (default: %(default)s)")
    p.add_argument("--chunk-size", type=_positive_int, default=16, metavar="N",
                   help="targets per batched backward (default: %(default)s)")
    p.add_argument("--memory-budget", type=_positive_float, metavar="GB",
                   help="lower the chunk size so that the memory estimate fits this budget")
    p.add_argument("--dtype", choices=("float32", "float64", "bfloat16", "float16"), default="float32",
                   help="compute dtype; bfloat16/float16 run the forward under autocast and the relevance backward in "
                   "its dtypes, the conservation report shows the cost (default: %(default)s)")
    p.add_argument("--device", default="cpu", metavar="DEV", help="cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--trim-heap", action="store_true", help="return the C heap's free memory after each module of "
                   "the LRP forward: a lower peak resident memory on CPUs (glibc; full-size model at 800 px 6.7 -> 4.4 GB)")
    p.add_argument("--keep-channels", action="store_true", help="also keep per-channel token relevance (in the .npz)")
    p.add_argument("--recompute", action="store_true",
                   help="recompute backbone blocks and encoder layers in the backward instead of keeping their forward "
                   "graph: the same relevance in much less memory, one more forward of them per target")
    p.add_argument("--formats", default=",".join(FORMATS), metavar="LIST",
                   help=f"outputs besides the metadata JSON: {', '.join(FORMATS)} or all (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="torch seed for random-weight models (default: %(default)s)")
    p.add_argument("--threads", type=_positive_int, metavar="N", help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--image-root", metavar="DIR", help="where a COCO annotation file's images are (default: beside "
                   "it, or ../val2017 for annotations/instances_val2017.json)")
    p.add_argument("--workers", type=_positive_int, metavar="N",
                   help="explain on N Ray workers (Ray started on this machine, or joined with --ray-address / "
                   "RAY_ADDRESS); needs pip install maskdino-lrp[ray]")
    p.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (e.g. ray://head:10001 or auto); "
                   "workers default to its CPUs (its GPUs with --device cuda); the output folder and the images "
                   "must be at the same path on every node", default=None)

    p = sub.add_parser("validate", parents=[common], help="check written explanations (a run folder or one CSV)",
                       description="Check an output folder or a single file: token CSVs sum to 1, no NaN/Inf, "
                       "conservation within range, referenced files exist, CSVs agree with the .npz and the metadata; a run "
                       "folder is complete (manifest, every image folder listed and finished, no lock or temporary "
                       "files left); one line per problem, exit 1; statistics with --all.")
    p.add_argument("path", metavar="PATH", help="run folder, image folder, or a CSV / metadata JSON / npz file")
    p.add_argument("--tolerance", type=_positive_float, default=DEFAULT_TOLERANCE,
                   help="allowed |Σ relevance − 1| (default: %(default)g)")
    p.add_argument("--max-residual", type=_positive_float, default=DEFAULT_MAX_RESIDUAL,
                   help="allowed |residual| / max(|target|, |relevance at the cut|) at each complete cut "
                   "(default: %(default)g)")
    p.add_argument("--all", action="store_true", help="print every check, not only the failures")
    p.add_argument("--json", metavar="FILE", help="also write the checks and statistics to this JSON file")

    p = sub.add_parser("estimate", parents=[common], help="memory and time an LRP run needs, before running it",
                       description="Estimate the memory (forward, backward per target, total) and time of explaining "
                       "QUERIES targets of one image, from the config's shapes; recommend a chunk size for a budget.")
    p.add_argument("--config", required=True, metavar="CFG", help="preset name or official MaskDINO YAML")
    p.add_argument("--image-size", type=_image_size, required=True, metavar="SIZE",
                   help="input image size: 800 (square) or WIDTHxHEIGHT, before the model's resize")
    p.add_argument("--queries", type=_positive_int, required=True, metavar="K", help="number of explained queries")
    p.add_argument("--memory-budget", type=_positive_float, metavar="GB", help="memory available, for the chunk size")
    p.add_argument("--chunk-size", type=_positive_int, metavar="N", help="chunk size to estimate (default: recommended)")
    p.add_argument("--stops", default=",".join(DEFAULT_STOPS), metavar="LIST", help="stops (default: %(default)s)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--keep-channels", action="store_true")
    p.add_argument("--recompute", action="store_true", help="estimate explain --recompute")
    p.add_argument("--gflops", type=_positive_float, metavar="N",
                   help="this machine's matmul throughput in GFLOP/s (default: measured by a 0.1 s probe)")
    p.add_argument("--threads", type=_positive_int, metavar="N", help="torch CPU threads for the probe")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")

    sub.add_parser("bench", help="benchmarks (options: maskdino-lrp bench --help)", add_help=False)
    sub.add_parser("evaluate", help="explanation quality: methods × metrics (options: maskdino-lrp evaluate --help)",
                   add_help=False)
    sub.add_parser("train", help="train the demo model (options: maskdino-lrp train --help)", add_help=False)
    p = sub.add_parser("demo", parents=[common], help="explain a generated image with the shipped demo model",
                       description="Generate a synthetic shapes image, detect and explain objects with the shipped "
                       "demo model, write overlays, CSVs and report.html.")
    p.add_argument("--out", default="demo-output", metavar="DIR", help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, help="image seed (default: a fresh one, printed)")
    p.add_argument("--top", type=_positive_int, default=3, help="detections to explain (default: %(default)s)")
    p.add_argument("--composite", default="default", help="LRP composite (default: %(default)s)")
    p.add_argument("--device", default="cpu", metavar="DEV", help="cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="bfloat16/float16: forward under autocast, relevance backward in its dtypes (default: %(default)s)")
    return parser


# ----------------------------------------------------------------------------- commands
def _cmd_explain(args) -> int:
    from .analysis.export import FORMATS
    from .analysis.runner import BatchExplainer, LRPOptions, check_inputs, check_output_folder
    from .lrp.composites import get_composite
    from .lrp.targets import get_target, parse_queries
    from .model.checkpoint import shipped_weights
    from .model.config import check_instance_task, load_config

    # every check that needs no model first, cheapest first
    parse_queries(args.queries)
    get_target(args.target)
    get_composite(args.composite)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in (*FORMATS, "all")]
    if bad or not formats:
        raise CliError(f"unknown output format {(bad or [''])[0]!r}; choose from {', '.join(FORMATS)} or all")
    options = LRPOptions(chunk_size=args.chunk_size, stops=args.stops, keep_channels=args.keep_channels,
                         dtype=args.dtype, memory_budget_gb=args.memory_budget, recompute=args.recompute,
                         device=args.device, trim_heap=args.trim_heap)
    if _distributed(args):
        from .distributed import import_ray

        import_ray()  # a missing Ray is one line, before any folder is made
    if args.hf is not None:
        return _explain_hf(args, options, formats)
    check_instance_task(load_config(args.config), warn=False, source=args.config)  # before any work
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        raise CliError(f"checkpoint not found: {args.checkpoint}")
    checkpoint = args.checkpoint
    if checkpoint is None and shipped_weights(args.config) is not None:
        checkpoint = str(shipped_weights(args.config))  # a preset that ships weights uses them
        log.info("using the weights shipped with preset %s: %s", args.config, checkpoint)
    check_inputs(args.images, args.image_root)
    check_output_folder(args.out)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    runner = BatchExplainer(args.config, args.out, checkpoint=checkpoint, queries=args.queries,
                            target=args.target, composite=args.composite, options=options, formats=formats,
                            seed=args.seed, progress=not args.no_progress, strict=not args.partial_load)
    runner.load_manifest()  # a folder with other settings is an input error, before the model is built
    runner.check_lock()  # a folder another run is writing: refused before the model is built
    if not _distributed(args):  # distributed: each worker builds it, and the first to fail says why
        _ = runner.model  # built before any image: an unfit checkpoint is one error, random weights one warning
    return _run(runner, args)


def _distributed(args) -> bool:
    """Whether the run goes to Ray (--workers / --ray-address); without them Ray is never imported."""
    return bool(getattr(args, "workers", None) or getattr(args, "ray_address", None))


def _run(runner, args) -> int:
    """Run the explainer over the images (here, or on Ray workers); the one-line report and the exit code."""
    if _distributed(args):
        from .analysis.distributed import explain_on_ray

        counts = explain_on_ray(runner, args.images, workers=args.workers, address=args.ray_address,
                                image_root=args.image_root, threads=args.threads)
    else:
        counts = runner.run_all(args.images, image_root=args.image_root)
    print(f"{counts['done']} image(s) explained ({counts['queries']} queries), {counts['skipped']} already done, "
          f"{counts['failed']} failed; report: {os.path.join(args.out, 'report.html')}")
    if counts["failed"]:
        if counts["done"] + counts["skipped"] == 0:
            source, error = counts["failures"][0]
            raise CliError(f"no image could be explained ({source}: {error})")
        print(f"{PROG}: warning: {counts['failed']} image(s) failed; see {os.path.join(args.out, 'manifest.json')}",
              file=sys.stderr)
        return 1
    return 0


HF_INSTALL = "pip install maskdino-lrp[hf]"


def _check_hf_folder(folder: str) -> None:
    """CliError unless ``folder`` looks like a local ``save_pretrained`` folder (cheap: no import, no load)."""
    if not os.path.isdir(folder):
        raise CliError(f"--hf {folder}: no such folder (give a local save_pretrained folder)")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise CliError(f"--hf {folder}: not a Hugging Face model folder (no config.json; save one with "
                       "model.save_pretrained)")


# the transformers Auto class that loads each model type an adapter explains (config.json's "model_type")
HF_AUTO_CLASSES = {
    "detr": "AutoModelForObjectDetection",
    "deformable_detr": "AutoModelForObjectDetection",
    "conditional_detr": "AutoModelForObjectDetection",
    "dab-detr": "AutoModelForObjectDetection",
    "yolos": "AutoModelForObjectDetection",
    "rt_detr": "AutoModelForObjectDetection",
    "rt_detr_v2": "AutoModelForObjectDetection",
    "mask2former": "AutoModelForUniversalSegmentation",
}
# the adapter (maskdino_lrp.adapters.ADAPTERS) that explains each model type
HF_ADAPTERS = {"detr": "detr", "deformable_detr": "deformable_detr", "conditional_detr": "conditional_detr",
               "dab-detr": "dab_detr", "yolos": "yolos", "rt_detr": "rt_detr", "rt_detr_v2": "rt_detr_v2",
               "mask2former": "mask2former"}


def _import_auto_model(name: str = "AutoModelForObjectDetection"):
    """transformers' Auto class ``name``; CliError (how to install it) if transformers is missing."""
    try:
        import transformers
    except ImportError:
        raise CliError(f"--hf needs transformers: {HF_INSTALL}") from None
    return getattr(transformers, name)


def _hf_model_type(folder: str) -> str:
    """The folder's config.json ``model_type``; CliError unless an adapter explains that type."""
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise CliError(f"--hf {folder}: cannot read config.json ({exc})") from None
    if model_type not in HF_AUTO_CLASSES:
        raise CliError(f"--hf {folder}: model_type {model_type!r} is not one maskdino-lrp explains "
                       f"(supported: {', '.join(HF_AUTO_CLASSES)})")
    return model_type


def load_hf_model(folder: str):
    """The model of a local ``save_pretrained`` folder, loaded by the Auto class of its config's ``model_type``,
    in eval mode, checked to be a model an adapter explains; CliError if the folder is not one or transformers
    is missing."""
    from .adapters import find_adapter
    from .adapters.hf_common import read_preprocessor

    _check_hf_folder(folder)
    model_type = _hf_model_type(folder)
    auto = _import_auto_model(HF_AUTO_CLASSES[model_type])
    try:
        model = auto.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:  # no weights, an unknown model type, a broken config
        message = " ".join(str(exc).split())[:300]
        raise CliError(f"--hf {folder}: cannot load a {model_type} model ({type(exc).__name__}: {message})") \
            from None
    adapter = find_adapter(model)
    if adapter is None:
        raise CliError(f"--hf {folder}: {type(model).__name__} is not a model maskdino-lrp explains "
                       f"(supported model types: {', '.join(HF_AUTO_CLASSES)})")
    adapter.check(model)  # EngineError (one line) for an unsupported variant, e.g. a timm backbone
    try:  # the folder's resize and normalisation, which the adapter applies (its defaults: ImageNet, no resize)
        model.lrp_preprocess = read_preprocessor(folder)
    except (OSError, ValueError, TypeError) as exc:
        raise CliError(f"--hf {folder}: cannot read preprocessor_config.json ({exc})") from None
    return model.eval()


def _explain_hf(args, options, formats: list[str]) -> int:
    """``explain --hf DIR``: the same runner on a Hugging Face model (loaded after the cheap checks)."""
    from .analysis.runner import BatchExplainer, check_inputs, check_output_folder

    from .adapters import get_adapter

    for flag, given in (("--checkpoint", args.checkpoint), ("--partial-load", args.partial_load),
                        ("--memory-budget", args.memory_budget)):
        if given:  # the weights are the folder's; the memory estimate knows MaskDINO configs only
            raise CliError(f"{flag} does not apply to --hf models")
    _check_hf_folder(args.hf)  # a bad folder, an unknown model type or no transformers fails before the output
    model_type = _hf_model_type(args.hf)
    _import_auto_model(HF_AUTO_CLASSES[model_type])  # folder is made
    if options.stops is None:  # the model's own, known before it loads (the manifest records them)
        options.stops = get_adapter(HF_ADAPTERS[model_type]).default_stops
    check_inputs(args.images, args.image_root)
    check_output_folder(args.out)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    runner = BatchExplainer(lambda: load_hf_model(args.hf), args.out, queries=args.queries, target=args.target,
                            composite=args.composite, options=options, formats=formats, seed=args.seed,
                            progress=not args.no_progress, model_name=f"hf:{args.hf}")
    runner.load_manifest()  # other settings or a busy folder: refused before the model is loaded
    runner.check_lock()
    if not _distributed(args):
        _ = runner.model  # loaded before any image: a bad folder is one error, not one failure per image
    return _run(runner, args)


def _cmd_validate(args) -> int:
    from .analysis.export import atomic_write_json
    from .analysis.validate import validate

    if not os.path.exists(args.path):
        raise CliError(f"nothing to validate: {args.path} does not exist")
    result = validate(args.path, tolerance=args.tolerance, max_residual=args.max_residual)
    if args.json:
        atomic_write_json(args.json, result.to_dict())
    if args.all:
        print(result.table())
    elif not result.ok:
        print(result.table(failed_only=True, max_rows=200))
    print(result.summary())
    return 0 if result.ok else 1


def _cmd_estimate(args) -> int:
    from .analysis.estimate import estimate

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    est = estimate(args.config, args.image_size, args.queries, memory_budget_gb=args.memory_budget,
                   chunk_size=args.chunk_size, stops=args.stops, dtype=args.dtype, keep_channels=args.keep_channels,
                   gflops=args.gflops, recompute=args.recompute)
    if args.json:
        print(json.dumps(est.to_dict(), indent=2))
    else:
        print(est.table())
    return 0


def _lazy(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(f"maskdino_lrp.{module}")
    except ModuleNotFoundError as exc:
        if exc.name == f"maskdino_lrp.{module}":
            raise CliError(f"{what} is not available in this installation (maskdino_lrp.{module} is missing)") from None
        raise


def _cmd_bench(argv: list[str]) -> int:
    bench = _lazy("bench", "the benchmark")
    if not hasattr(bench, "main"):
        raise CliError("the benchmark is not available: maskdino_lrp.bench has no main()")
    return int(bench.main(argv) or 0)


def _cmd_evaluate(argv: list[str]) -> int:
    from .eval.run import main as evaluate_main

    return int(evaluate_main(argv) or 0)


def _cmd_train(argv: list[str]) -> int:
    from .train.__main__ import main as train_main

    return int(train_main(argv) or 0)


_PASS_THROUGH = {"bench": _cmd_bench, "evaluate": _cmd_evaluate, "train": _cmd_train}


def _cmd_demo(args) -> int:
    demo = _lazy("demo", "the demo")
    if not hasattr(demo, "run"):
        raise CliError("the demo is not available: maskdino_lrp.demo has no run()")
    from .lrp.composites import get_composite

    get_composite(args.composite)  # an unknown name is a one-line error before any work
    demo.run(args.out, seed=args.seed, top=args.top, composite=args.composite, device=args.device, dtype=args.dtype)
    return 0


# ----------------------------------------------------------------------------- entry point
def _logging(verbose: int):
    """Log levels for one command: ``-v`` or LOGLEVEL, for the maskdino_lrp loggers only (see logsetup)."""
    from .logsetup import configured

    return configured(verbose, os.environ.get("LOGLEVEL"))


def _user_errors() -> tuple[type[BaseException], ...]:
    from .analysis.estimate import EstimateError
    from .analysis.export import ExportError
    from .analysis.runner import RunError
    from .distributed import DistributedError
    from .lrp.composites import RuleError
    from .lrp.engine import EngineError
    from .lrp.targets import TargetError
    from .model.checkpoint import CheckpointError
    from .model.config import ConfigError
    from .model.maskdino import ImageError

    return (CliError, ConfigError, ImageError, CheckpointError, TargetError, RuleError, EngineError, RunError,
            ExportError, EstimateError, DistributedError, FileNotFoundError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``maskdino-lrp``; returns the exit code (0 ok, 1 problems found, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = sum(1 for a in argv if a in ("-v", "--verbose") or (a.startswith("-v") and set(a[1:]) == {"v"}))
    debug = bool(verbose) or os.environ.get("LOGLEVEL", "").upper() == "DEBUG"
    errors: tuple = (CliError,)
    try:
        errors = _user_errors()
        # bench takes its own options (and --help): hand everything after the word over
        globals_, rest = [], argv
        while rest and rest[0].startswith("-") and rest[0] not in ("-h", "--help", "--version"):
            globals_.append(rest[0])
            rest = rest[1:]
        if rest and rest[0] in _PASS_THROUGH:
            # train / evaluate set up their own progress logging: only -v / LOGLEVEL override it
            with _logging(verbose) if verbose or os.environ.get("LOGLEVEL") else contextlib.nullcontext():
                return _PASS_THROUGH[rest[0]](rest[1:])
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return 2
        handler = {"explain": _cmd_explain, "validate": _cmd_validate, "estimate": _cmd_estimate,
                   "demo": _cmd_demo}[args.command]
        with _logging(getattr(args, "verbose", 0) or verbose):
            return handler(args)
    except errors as exc:
        if debug:
            traceback.print_exc()
        message = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, FileNotFoundError) and exc.filename:
            message = f"{exc.strerror or 'not found'}: {exc.filename}"
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
