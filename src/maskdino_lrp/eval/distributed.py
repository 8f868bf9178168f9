"""The evaluation on Ray workers: each worker builds the models and methods once and evaluates image
after image (the single-process run's :func:`~.per_image.evaluate_image`); the driver writes each answer
into the run's one resumable store (:class:`~.parts.PartStore`), so a rerun, a shard or an
``--aggregate-only`` sees the same parts whichever way they were made.

At most one image per worker is in flight; a worker that dies is replaced and its image retried on the
next free one; an image that takes down :data:`MAX_ATTEMPTS` workers is left out of the store (a rerun
retries it) and named in the run's notes.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
from typing import Any, Sequence

from ..distributed import Lost, worker_pool
from .parts import PartStore
from .settings import EvalSettings

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3

__all__ = ["EvalWorker", "evaluate_on_ray"]


class EvalWorker:
    """A Ray actor's state: the shared context of an evaluation (models, methods), built once."""

    def __init__(self, settings: EvalSettings, model: Any, threads: int):
        import torch

        from .. import build_model
        from .run import image_context

        torch.set_num_threads(threads)
        if str(settings.device).startswith("cuda"):  # the one GPU Ray gives this worker, whatever its index
            settings = dataclasses.replace(settings, device="cuda")
        if model is None:
            model = build_model(settings.config, checkpoint=settings.checkpoint)
        self.context = image_context(settings, model)

    def ready(self) -> dict:
        """Where this worker runs."""
        return {"pid": os.getpid(), "host": socket.gethostname()}

    def evaluate(self, index: int) -> dict[str, Any]:
        """Image ``index``'s part, as the single-process run computes it."""
        from . import run

        return run._evaluate_image(index, self.context)


def evaluate_on_ray(settings: EvalSettings, model: Any, todo: Sequence[int], parts: PartStore, *,
                    workers: int | None = None, address: str | None = None, threads: int | None = None,
                    progress: bool = True, max_attempts: int = MAX_ATTEMPTS) -> list[str]:
    """Evaluate the images ``todo`` on Ray workers into ``parts``; returns notes on images given up.

    ``model``: shipped to the workers as it is, or None (each builds ``settings.config`` with its
    checkpoint). ``workers`` / ``address`` / ``threads`` as in :func:`maskdino_lrp.analysis.distributed.run_on_ray`.
    """
    gpus = 1 if str(settings.device).startswith("cuda") else 0
    notes: list[str] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="evaluating", unit="image", file=sys.stderr, dynamic_ncols=True)
    try:
        with worker_pool(EvalWorker, lambda per_worker: (settings, model, per_worker), "evaluate", workers=workers,
                         address=address, threads=threads, gpus=gpus, max_workers=len(todo)) as pool:
            pending = list(todo)
            attempts: dict[int, int] = {}
            while pending or pool.busy():
                while pending and pool.has_room():
                    index = pending.pop(0)
                    pool.submit(index, index)
                for index, answer in pool.wait():
                    if isinstance(answer, Lost):
                        attempts[index] = attempts.get(index, 0) + 1
                        if attempts[index] < max_attempts:
                            log.warning("a worker died while evaluating image %d (%s); retrying it", index,
                                        answer.error)
                            pending.insert(0, index)
                            continue
                        notes.append(f"image {index} not evaluated: the worker evaluating it died {attempts[index]} "
                                     f"time(s) (last: {answer.error}); rerun the command to retry it")
                    else:
                        parts.write(index, answer)
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return notes
