"""Explain a data set on Ray workers: the same folder, the same files, as :class:`~.runner.BatchExplainer`.

    >>> runner = BatchExplainer("demo", "runs/val", queries="topk:5")
    >>> counts = explain_on_ray(runner, ["val/"], workers=4)            # this machine
    >>> counts = explain_on_ray(runner, ["val.json"], address="ray://head:10001")  # a cluster

The driver (this process) does what the single-process run does around each image, through the same
runner steps: it takes the folder's lock, reads and writes the one manifest, plans each image in input
order (:meth:`~.runner.BatchExplainer.plan_image`: skip it if done, else reserve its output name) and
books each answer (:meth:`~.runner.BatchExplainer.record_image`); at the end it writes the report and the
data-set summary. Each worker (a Ray actor holding a copy of the runner) builds the model once and runs
:meth:`~.runner.BatchExplainer.attempt_image` on image after image, writing the image's folder itself;
so every image's files are those a single-process run writes, byte for byte. The output folder and the
images must therefore be at the same path on every node (a shared file system on a cluster).

At most one image per worker is in flight. A worker that dies mid-image (killed, out of memory, its node
lost) is replaced and the image goes to the next free worker, its half-written folder cleared; an image
that has lost ``max_attempts`` workers is recorded in the manifest as failed, with the reason. A driver
that dies leaves the folder in the state the single-process runner resumes from: rerun the command.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..distributed import Lost, WorkerPool, worker_pool
from .runner import BatchExplainer, ImageResult, Source, _progress, bar_write

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # workers an image may take down before it is recorded as failed

__all__ = ["ExplainWorker", "explain_on_ray", "run_on_ray"]


class ExplainWorker:
    """A Ray actor's state: a copy of the driver's runner whose model is built once, on the worker."""

    def __init__(self, runner: BatchExplainer, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.runner = runner
        warnings: list[str] = []
        runner._warn, warn = warnings.append, runner._warn
        _ = runner.model  # its one-time notices (random weights) go to the driver, said once
        runner._warn = warn
        self.warnings = warnings

    def ready(self) -> dict:
        """Where this worker runs and what building its model said."""
        return {"pid": os.getpid(), "host": socket.gethostname(), "warnings": self.warnings}

    def explain(self, source: Source, name: str) -> ImageResult:
        """The single-process runner's step for one image (writes ``out_dir/name``)."""
        return self.runner.attempt_image(source, name)


def _device(runner: BatchExplainer) -> str:
    return str(getattr(runner.options, "device", None) or "cpu")


def _worker_copy(runner: BatchExplainer) -> BatchExplainer:
    """The runner as shipped to workers: no model yet (each builds its own), no progress bars or report; a
    CUDA device becomes ``cuda``, the one GPU Ray gives the worker (it sees only that one)."""
    clone = copy.copy(runner)
    if _device(runner).startswith("cuda"):
        clone.options = dataclasses.replace(runner.options, device="cuda")
    clone._model = None
    clone._lrp = None
    clone.progress = False
    clone.report = False
    return clone


def _lost_error(lost: Lost, attempts: int) -> str:
    return (f"the worker explaining it died {attempts} time(s) (last: {lost.error}); too large for a worker's "
            "memory? lower --chunk-size or set --memory-budget, then rerun to retry it")


def run_on_ray(runner: BatchExplainer, inputs: Sequence[str | os.PathLike], *, workers: int | None = None,
               address: str | None = None, image_root: str | os.PathLike | None = None, threads: int | None = None,
               max_attempts: int = MAX_ATTEMPTS) -> Iterator[ImageResult]:
    """:meth:`BatchExplainer.run` with the images explained on Ray workers (see the module docstring).

    ``workers``: how many (default: one per CPU of the cluster / this machine, one per GPU with a CUDA
    ``runner.options.device``); ``address``: a cluster to join (else ``RAY_ADDRESS``, else Ray started here);
    ``threads``: torch threads and Ray CPUs per worker (default: this machine's cores shared out, one on a
    cluster).
    """
    gpus = 1 if _device(runner).startswith("cuda") else 0
    with worker_pool(ExplainWorker, lambda per_worker: (_worker_copy(runner), per_worker), "explain",
                     workers=workers, address=address, threads=threads, gpus=gpus) as pool:
        log.info("%d Ray worker(s) on %s", len(pool.actors), ", ".join(sorted({a["host"] for a in pool.answers})))
        for message in pool.answers[0]["warnings"]:
            runner._warn(message)
        yield from runner.run(inputs, image_root=image_root,
                              execute=lambda manifest, sources: _execute(runner, pool, manifest, sources, max_attempts))


def _execute(runner: BatchExplainer, pool: WorkerPool, manifest: dict, sources: Sequence[Source],
             max_attempts: int) -> Iterator[ImageResult]:
    """Plan the sources in input order, keep every worker busy, book each answer as it comes."""
    taken = runner.taken_names(manifest)
    bar = _progress(len(sources), runner.progress)
    attempts: dict[str, int] = {}
    done_queries = 0

    def book(finished: list[tuple[Any, Any]]) -> Iterator[ImageResult]:
        nonlocal done_queries
        for (source, name, fingerprint), answer in finished:
            if isinstance(answer, Lost):
                attempts[source.key] = attempts.get(source.key, 0) + 1
                _clear(runner.out_dir / name, runner.out_dir)
                if attempts[source.key] < max_attempts:
                    bar_write(bar, lambda: log.warning("a worker died while explaining %s (%s); retrying it",
                                                       source.path, answer.error))
                    pending.append((source, name, fingerprint))
                    continue
                answer = ImageResult(name, str(source.path), "failed", error=_lost_error(answer, attempts[source.key]),
                                     key=source.key)
            runner.record_image(manifest, source, answer, fingerprint, taken, bar)
            done_queries += len(answer.queries) if answer.status == "done" else 0
            bar.set_postfix(queries=done_queries, lost=pool.lost, refresh=False)
            bar.update(1)
            yield answer

    pending: list[tuple[Source, str, dict]] = []  # planned, not yet running; retries go first

    def dispatch() -> None:
        while pending and pool.has_room():
            item = pending.pop(0)
            pool.submit(item, item[0], item[1])

    try:
        for source in sources:
            planned = runner.plan_image(manifest, source, taken, bar)
            if isinstance(planned, ImageResult):
                bar.update(1)
                yield planned
                continue
            pending.append((source, *planned))
            dispatch()
            while pending:  # every worker busy: plan the next image only once one is free
                yield from book(pool.wait())
                dispatch()
        while pool.busy():
            yield from book(pool.wait())
            dispatch()
    finally:
        bar.close()


def _clear(folder: Path, out: Path) -> None:
    """Remove what a dead worker half wrote (its image is redone from scratch)."""
    if folder.is_dir() and folder.resolve().parent == out.resolve():
        shutil.rmtree(folder, ignore_errors=True)


def explain_on_ray(runner: BatchExplainer, inputs: Sequence[str | os.PathLike], **options: Any) -> dict:
    """Run :func:`run_on_ray` to the end; counts as :meth:`BatchExplainer.run_all` returns them."""
    counts: dict[str, Any] = {"done": 0, "skipped": 0, "failed": 0, "queries": 0, "failures": []}
    for result in run_on_ray(runner, inputs, **options):
        counts[result.status] += 1
        counts["queries"] += len(result.queries) if result.status == "done" else 0
        if result.status == "failed":
            counts["failures"].append((str(result.source), result.error))
    return counts
