"""Long runs: explain every image of files / folders, resumable (the prototype's BatchLRPProcessor).

:class:`BatchExplainer` walks its inputs with a generator (one directory listing at a time, nothing
kept per finished image but its manifest line), explains each image, writes it with
:func:`~.export.save_explanation` and records it in ``manifest.json`` (written atomically after every
image). Running the same command again skips the images the manifest marks done; an image folder
left incomplete by an interrupted run (no manifest entry) is removed and redone, so a resumed run
ends with exactly the files of an uninterrupted one. A bad image (unreadable, too small, …) is
reported on stderr and in the manifest and skipped; it never stops the run.

:class:`LRPOptions` holds the performance settings (the prototype's LRPPerformanceConfig /
MemoryOptimizedLRP): chunk size, stops, channel relevance, dtype and a memory budget.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from .export import (DEFAULT_FORMATS, FORMATS, SUMMARY, atomic_write_json, remove_stale_temp_files, safe_name,
                     save_explanation)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MANIFEST_VERSION = 1
DTYPES = ("float32", "float64")


class RunError(ValueError):
    """Inputs or an output folder a run cannot use (no images, unwritable folder, other settings)."""


@dataclass
class LRPOptions:
    """Performance settings of an LRP run.

    - ``chunk_size``: targets per batched backward (None: all at once);
    - ``stops``: where relevance is kept (see :data:`maskdino_lrp.lrp.STOPS`);
    - ``keep_channels``: also keep per-channel relevance of token / query stops (large);
    - ``dtype``: ``float32`` or ``float64`` (the model is converted; twice the memory);
    - ``memory_budget_gb``: cap the chunk size so that the estimate (:mod:`.estimate`) fits.
    """

    chunk_size: int | None = 16
    stops: tuple[str, ...] = ("pixels", "encoder_input", "memory")
    keep_channels: bool = False
    dtype: str = "float32"
    memory_budget_gb: float | None = None

    def __post_init__(self) -> None:
        from ..lrp.explainer import STOPS

        if isinstance(self.stops, str):
            self.stops = tuple(s.strip() for s in self.stops.split(",") if s.strip())
        self.stops = tuple(self.stops)
        bad = [s for s in self.stops if s not in STOPS]
        if bad or not self.stops:
            raise RunError(f"unknown stop {bad[0]!r}; stops: {', '.join(STOPS)}" if bad
                           else f"no stops given; choose from {', '.join(STOPS)}")
        if self.dtype not in DTYPES:
            raise RunError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.chunk_size is not None and int(self.chunk_size) < 1:
            raise RunError(f"chunk size must be at least 1, got {self.chunk_size!r}")
        if self.memory_budget_gb is not None and self.memory_budget_gb <= 0:
            raise RunError(f"memory budget must be positive, got {self.memory_budget_gb!r} GB")


@dataclass
class ImageResult:
    """What happened to one image: ``done``, ``skipped`` (done by an earlier run) or ``failed``."""

    name: str
    source: str
    status: str
    queries: list[int] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    summary: dict | None = None


# ----------------------------------------------------------------------------- memory figures
def memory_mb() -> tuple[float | None, float | None]:
    """(current RSS, peak RSS) of this process in MB, where the platform tells (Linux /proc, resource)."""
    current = peak = None
    try:
        with open("/proc/self/statm") as f:
            current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)
    except (ImportError, OSError):
        pass
    return current, peak


def log_memory(stage: str, logger: logging.Logger = log) -> None:
    if logger.isEnabledFor(logging.DEBUG):
        current, peak = memory_mb()
        fmt = lambda v: "?" if v is None else f"{v:.0f} MB"
        logger.debug("memory after %s: RSS %s (peak %s)", stage, fmt(current), fmt(peak))


# ----------------------------------------------------------------------------- inputs
def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _walk(folder: Path) -> Iterator[Path]:
    """Image files under ``folder``, depth first, each directory's entries sorted by name."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        log.warning("cannot list %s: %s", folder, exc)
        return
    subdirs = []
    for entry in entries:
        try:
            if entry.is_dir():
                subdirs.append(Path(entry.path))
            elif entry.is_file() and _is_image(entry.name):
                yield Path(entry.path)
        except OSError:
            continue
    del entries
    for sub in subdirs:
        yield from _walk(sub)


def iter_images(inputs: Iterable[str | os.PathLike]) -> Iterator[tuple[str, Path]]:
    """(output name, path) of every image: files as given, folders walked recursively (sorted).

    The name is the file name (for a folder: the path below it, ``/`` as ``__``), made file-system
    safe; a repeated name gets ``-2``, ``-3`` … in input order, so it is the same on every run.
    """
    seen: dict[str, int] = {}
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths = ((p, p.relative_to(path)) for p in _walk(path))
        else:
            paths = iter([(path, Path(path.name))])
        for p, rel in paths:
            name = safe_name("__".join(rel.parts))
            n = seen.get(name, 0) + 1
            seen[name] = n
            yield (name if n == 1 else f"{name}-{n}"), p


def count_images(inputs: Iterable[str | os.PathLike]) -> int:
    """How many images :func:`iter_images` yields (streams; keeps nothing)."""
    return sum(1 for _ in iter_images(inputs))


def check_inputs(inputs: Sequence[str | os.PathLike]) -> None:
    """Raise RunError for a missing path, an unreadable file given by name, or a folder without images."""
    from PIL import Image, UnidentifiedImageError

    if not inputs:
        raise RunError("no images given")
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise RunError(f"image file not found: {path}")
        if path.is_dir():
            if next(_walk(path), None) is None:
                raise RunError(f"no images found in folder {path} (looked for {' '.join(IMAGE_EXTENSIONS)})")
            continue
        try:
            with Image.open(path) as im:
                im.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise RunError(f"cannot read image {path}: {exc}") from None


def check_output_folder(out_dir: str | os.PathLike) -> Path:
    """Create ``out_dir`` and make sure files can be written there; RunError if not."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise RunError(f"output folder {out} is not writable: {exc.strerror or exc}") from None
    return out


# ----------------------------------------------------------------------------- the runner
class BatchExplainer:
    """Explain every image of a set of files / folders into ``out_dir``, resumably.

    >>> runner = BatchExplainer("tiny", "runs/a", queries="topk:3")
    >>> for result in runner.run(["images/"]):
    ...     print(result.name, result.status)

    ``model`` is a built :class:`~maskdino_lrp.MaskDINO`, or a config (preset / YAML / dict) that is
    built with ``checkpoint`` after seeding torch with ``seed`` (so random-weight models are the
    same on every run, which resuming relies on).
    """

    def __init__(self, model: Any, out_dir: str | os.PathLike, *, checkpoint: str | os.PathLike | None = None,
                 overrides: Mapping[str, Any] | None = None, queries: Any = "topk:5", target: str = "class",
                 composite: str = "default", options: LRPOptions | None = None,
                 formats: Sequence[str] = DEFAULT_FORMATS, seed: int = 0, progress: bool = True,
                 report: bool = True, warn: Callable[[str], None] | None = None):
        from ..lrp.composites import get_composite
        from ..lrp.targets import get_target, parse_queries

        self.options = options or LRPOptions()
        self.queries = str(parse_queries(queries)) if not isinstance(queries, (list, tuple)) else \
            ",".join(str(int(q)) for q in queries)
        parse_queries(self.queries)
        get_target(target)
        get_composite(composite)
        self.target = target
        self.composite = composite
        formats = tuple(f for f in (FORMATS if "all" in formats else formats))
        bad = [f for f in formats if f not in FORMATS]
        if bad:
            raise RunError(f"unknown output format {bad[0]!r}; choose from {', '.join(FORMATS)}")
        self.formats = tuple(f for f in FORMATS if f in formats)  # canonical order: same settings on resume
        self.seed = int(seed)
        self.progress = progress
        self.report = report
        self.out_dir = Path(out_dir)
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.overrides = dict(overrides or {})
        self._warn = warn or (lambda msg: _stderr(f"maskdino-lrp: warning: {msg}"))
        self._model_arg = model
        self._model = None
        self._lrp = None
        self._parameters: int | None = None

    # -------------------------------------------------------------- settings and manifest
    @property
    def settings(self) -> dict:
        """What the outputs depend on; a resumed run must have the same."""
        model = self._model_arg
        config = str(model) if isinstance(model, (str, os.PathLike)) else (
            "<dict>" if isinstance(model, Mapping) else type(model).__name__)
        return {"config": config, "overrides": self.overrides, "checkpoint": self.checkpoint, "seed": self.seed,
                "queries": self.queries, "target": self.target, "composite": self.composite,
                "stops": list(self.options.stops), "keep_channels": self.options.keep_channels,
                "dtype": self.options.dtype, "formats": list(self.formats)}

    def load_manifest(self) -> dict:
        path = self.out_dir / MANIFEST
        if not path.is_file():
            return {"version": MANIFEST_VERSION, "settings": self.settings, "images": {}}
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise RunError(f"cannot read {path}: {exc}; move it away to start the run afresh") from None
        old = manifest.get("settings", {})
        new = self.settings
        diff = [k for k in new if json.dumps(old.get(k), sort_keys=True) != json.dumps(new[k], sort_keys=True)]
        if diff:
            k = diff[0]
            raise RunError(f"{self.out_dir} holds a run with other settings ({k}: {old.get(k)!r} there, "
                           f"{new[k]!r} now); use another output folder")
        manifest.setdefault("images", {})
        return manifest

    def _save_manifest(self, manifest: dict) -> None:
        manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        atomic_write_json(self.out_dir / MANIFEST, manifest)

    # -------------------------------------------------------------- model
    @property
    def model(self):
        if self._model is None:
            import torch

            from .. import build_model

            if isinstance(self._model_arg, torch.nn.Module):
                model = self._model_arg
            else:
                torch.manual_seed(self.seed)
                model = build_model(self._model_arg, overrides=self.overrides or None, checkpoint=self.checkpoint)
            if self.options.dtype == "float64":
                model = model.double()
            self._model = model.eval()
            log_memory("building the model")
        return self._model

    @property
    def lrp(self):
        if self._lrp is None:
            from ..lrp.explainer import LRP

            self._lrp = LRP(self.model, composite=self.composite, chunk_size=self.options.chunk_size,
                            keep_channels=self.options.keep_channels)
        return self._lrp

    def _chunk_for(self, image_size: tuple[int, int], k: int) -> int | None:
        chunk = self.options.chunk_size
        if self.options.memory_budget_gb is None:
            return chunk
        from .estimate import estimate

        if self._parameters is None:
            self._parameters = sum(p.numel() for p in self.model.parameters()) + sum(b.numel() for b in self.model.buffers())
        est = estimate(self.model.cfg, image_size, k, memory_budget_gb=self.options.memory_budget_gb,
                       stops=self.options.stops, dtype=self.options.dtype, keep_channels=self.options.keep_channels,
                       gflops=1.0, parameters=self._parameters)
        if not est.fits:
            self._warn(f"estimated memory {est.total_for(1) / 2 ** 30:.2f} GB exceeds the budget of "
                       f"{self.options.memory_budget_gb:g} GB even one target at a time")
        log.debug("memory budget %.2f GB: chunk %d (estimate %.2f GB)", self.options.memory_budget_gb,
                  est.recommended_chunk, est.total_for(est.recommended_chunk) / 2 ** 30)
        return est.recommended_chunk if chunk is None else min(chunk, est.recommended_chunk)

    # -------------------------------------------------------------- one image
    def explain_image(self, name: str, path: Path) -> ImageResult:
        """Explain one image and write its folder; raises on a bad image (the caller records it)."""
        from ..lrp.targets import parse_queries, select_queries

        start = time.perf_counter()
        session = self.lrp.prepare(path)
        try:
            log_memory(f"the LRP forward of {name}")
            logits = session.outputs["pred_logits"][0].detach()
            qs, _ = select_queries(parse_queries(self.queries), session.detections, logits.shape[0], logits)
            folder = self.out_dir / name
            if qs.numel() == 0:
                folder.mkdir(parents=True, exist_ok=True)
                summary = {"image": name, "source": str(path), "num_queries": 0, "queries": [], "files": [],
                           "note": f"query selection {self.queries!r} selected no query"}
                atomic_write_json(folder / SUMMARY, summary)
                return ImageResult(name, str(path), "done", [], time.perf_counter() - start, summary=summary)
            self.lrp.chunk_size = self._chunk_for(tuple(session.prepared.original_size), int(qs.numel()))
            expl = session.backward(self.queries, self.target, self.options.stops, retain_graph=False)
        finally:
            session.cleanup()
        log_memory(f"the LRP backward of {name} ({len(expl)} queries)")
        summary = save_explanation(expl, self.out_dir, name, formats=self.formats, source=path)
        log_memory(f"writing {name}")
        del expl
        return ImageResult(name, str(path), "done", [q["query"] for q in summary["queries"]],
                           time.perf_counter() - start, summary=summary)

    # -------------------------------------------------------------- the run
    def run(self, inputs: Sequence[str | os.PathLike]) -> Iterator[ImageResult]:
        """Explain every image of ``inputs`` (files / folders), yielding one result per image."""
        out = check_output_folder(self.out_dir)
        manifest = self.load_manifest()
        remove_stale_temp_files(out)
        images = manifest["images"]
        total = count_images(inputs)
        bar = _progress(total, self.progress)
        done_queries = 0
        try:
            for name, path in iter_images(inputs):
                record = images.get(name)
                if record and record.get("status") == "done" and (out / name / SUMMARY).is_file():
                    bar.update(1)
                    yield ImageResult(name, str(path), "skipped", record.get("queries", []))
                    continue
                stale = out / name
                if stale.is_dir() and stale.resolve().parent == out.resolve():
                    shutil.rmtree(stale)  # a folder an interrupted run left without a manifest entry
                try:
                    result = self.explain_image(name, path)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except MemoryError:
                    result = ImageResult(name, str(path), "failed", error="out of memory; lower --chunk-size "
                                         "or set --memory-budget")
                except Exception as exc:  # a bad image never ends the run
                    log.debug("image %s failed", path, exc_info=True)
                    message = " ".join(str(exc).split()) or type(exc).__name__
                    result = ImageResult(name, str(path), "failed", error=f"{type(exc).__name__}: {message}")
                if result.status == "failed":
                    if (out / name).is_dir():
                        shutil.rmtree(out / name, ignore_errors=True)
                    images[name] = {"status": "failed", "source": str(path), "error": result.error}
                    bar_write(bar, lambda: self._warn(f"skipped {path}: {result.error}"))
                else:
                    images[name] = {"status": "done", "source": str(path), "output": name,
                                    "queries": result.queries, "seconds": round(result.seconds, 3)}
                    done_queries += len(result.queries)
                self._save_manifest(manifest)
                bar.set_postfix(queries=done_queries, refresh=False)
                bar.update(1)
                yield result
        finally:
            bar.close()
            if self.report and out.is_dir():
                from .render import write_report

                try:
                    write_report(out)
                except OSError as exc:
                    self._warn(f"cannot write the report: {exc}")

    def run_all(self, inputs: Sequence[str | os.PathLike]) -> dict:
        """Run to the end; returns counts ``{"done", "skipped", "failed", "queries"}`` and the failures."""
        counts = {"done": 0, "skipped": 0, "failed": 0, "queries": 0, "failures": []}
        for result in self.run(inputs):
            counts[result.status] += 1
            counts["queries"] += len(result.queries) if result.status == "done" else 0
            if result.status == "failed":
                counts["failures"].append((str(result.source), result.error))
        return counts


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="image", desc="explaining", file=sys.stderr, dynamic_ncols=True)


def bar_write(bar, fn: Callable[[], None]) -> None:
    """Print around a live progress bar without breaking it."""
    try:
        from tqdm import tqdm

        if isinstance(bar, tqdm):
            with tqdm.external_write_mode(file=sys.stderr):
                fn()
            return
    except ImportError:
        pass
    fn()
