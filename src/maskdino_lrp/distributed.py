"""Ray underneath the distributed runs: the session and a pool of workers that survives losing some.

:func:`ray_session` starts Ray on this machine (its object store bounded by :func:`object_store_bytes`)
or joins a cluster (``address``, else ``RAY_ADDRESS``); a session the caller already started is used as
it is. :class:`WorkerPool` keeps N Ray actors of one class, each given one call at a time (so at most N
items are in flight and a lost call is the one the actor was running); when an actor dies (killed, out
of memory, its node gone) the call comes back as :class:`Lost` and a fresh actor takes the dead one's
place. What to do with a lost item (retry it elsewhere, give up and record it) is the caller's choice.

Ray is imported only here, and only when a distributed run is asked for: ``pip install maskdino-lrp[ray]``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
from dataclasses import dataclass
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

RAY_INSTALL = "pip install maskdino-lrp[ray]"
STORE_SHARE = 0.1  # of this machine's RAM; the store carries only results (images are read by the workers)
STORE_MIN = 80 * 2 ** 20  # below Ray's minimum (75 MiB) it refuses to start
STORE_MAX = 2 * 2 ** 30

__all__ = ["DistributedError", "Lost", "WorkerPool", "import_ray", "object_store_bytes", "ray_session",
           "worker_pool", "worker_threads"]


class DistributedError(ValueError):
    """Ray missing, a cluster that cannot be joined, or workers that cannot start or keep dying."""


@dataclass
class Lost:
    """A call whose worker died before answering: ``error`` says how, ``worker`` which one."""

    error: str
    worker: int


def import_ray():
    """The ``ray`` module; DistributedError (how to install it) where it is missing."""
    try:
        import ray
    except ImportError:
        raise DistributedError(f"--workers / --ray-address need Ray: {RAY_INSTALL}") from None
    return ray


def object_store_bytes(total_ram: int | None = None) -> int:
    """The object store of a local Ray: :data:`STORE_SHARE` of the RAM, within [80 MiB, 2 GiB]."""
    if total_ram is None:
        try:
            total_ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total_ram = 8 * 2 ** 30
    return int(min(STORE_MAX, max(STORE_MIN, STORE_SHARE * total_ram)))


def worker_threads(workers: int, threads: int | None, local: bool) -> int:
    """Torch threads (and CPUs asked of Ray) per worker: ``threads`` if given, else this machine's cores
    shared out among the local workers, else one (a cluster's nodes are sized by Ray's CPU resources)."""
    if threads:
        return int(threads)
    return max(1, (os.cpu_count() or 1) // max(1, workers)) if local else 1


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """``ray`` initialised for the duration: joined to ``address`` (or ``RAY_ADDRESS``) when given, else a
    local instance with ``num_cpus`` CPUs and a bounded object store; a session already running is used
    and left running."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    # ray.init installs its own SIGTERM/SIGINT handlers in this process; the caller's come back on exit
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    common = {"log_to_driver": True, "logging_level": logging.WARNING}
    try:
        if address:
            ray.init(address=address, **common)
        else:
            # "local": a new instance even where `ray start` left a cluster running (ray.init would join it)
            ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_bytes(),
                     include_dashboard=False, **common)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise DistributedError(f"cannot start {where}: {' '.join(str(exc).split())[:300]}") from None
    try:
        yield ray
    finally:
        ray.shutdown()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _cause(exc: BaseException) -> BaseException:
    """The worker's own exception inside a Ray task error (so a bad checkpoint reads as itself)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


class WorkerPool:
    """``workers`` Ray actors of ``actor_class`` (built with ``init_args``), each running ``method`` on one
    item at a time; dead actors are replaced, their calls reported as :class:`Lost`.

    ``actor_options`` are Ray's (``num_cpus``, ``num_gpus``, …). ``max_replacements`` bounds how many
    fresh actors may be started over the run (default: 3 per worker); past it DistributedError.
    """

    def __init__(self, actor_class: type, init_args: tuple, workers: int, method: str,
                 actor_options: dict | None = None, max_replacements: int | None = None):
        self.ray = import_ray()
        self._remote = self.ray.remote(actor_class).options(**(actor_options or {}))
        self._init_args = init_args
        self.method = method
        self.workers = int(workers)
        self.replacements_left = 3 * self.workers if max_replacements is None else int(max_replacements)
        self.actors: list[Any] = []
        self._running: dict[Any, tuple[int, Any]] = {}  # object ref → (slot, item)
        self.lost = 0  # calls lost to dead workers
        self.answers: list[Any] = []  # the workers' ready() answers

    def start(self) -> list[Any]:
        """Start every actor and wait for them; their ``ready()`` answers. A worker that fails to build
        raises its own exception (a bad checkpoint reads as itself)."""
        self.actors = [self._remote.remote(*self._init_args) for _ in range(self.workers)]
        try:
            return self.ray.get([a.ready.remote() for a in self.actors])
        except self.ray.exceptions.RayTaskError as exc:
            raise _cause(exc) from None
        except self.ray.exceptions.RayActorError as exc:
            raise _cause(exc) if _cause(exc) is not exc else DistributedError(
                f"a worker died while starting: {' '.join(str(exc).split())[:300]}") from None

    def has_room(self) -> bool:
        """Whether some worker is idle."""
        return len(self._running) < len(self.actors)

    def busy(self) -> bool:
        """Whether calls are running."""
        return bool(self._running)

    def submit(self, item: Any, *args: Any) -> None:
        """Run ``method(*args)`` on an idle worker; ``item`` comes back with its answer from :meth:`wait`."""
        busy = {slot for slot, _ in self._running.values()}
        slot = next(i for i in range(len(self.actors)) if i not in busy)
        ref = getattr(self.actors[slot], self.method).remote(*args)
        self._running[ref] = (slot, item)

    def wait(self, timeout: float | None = None) -> list[tuple[Any, Any]]:
        """Block until at least one call ends (or ``timeout`` s pass); (item, answer or :class:`Lost`) of each
        ended call. A call that raised in the worker raises here (the worker's own exception)."""
        ready, _ = self.ray.wait(list(self._running), num_returns=1, timeout=timeout)
        done = []
        for ref in ready:
            slot, item = self._running.pop(ref)
            try:
                done.append((item, self.ray.get(ref)))
            except self.ray.exceptions.RayTaskError as exc:
                raise _cause(exc) from None
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.WorkerCrashedError,
                    self.ray.exceptions.OutOfMemoryError, self.ray.exceptions.NodeDiedError,
                    self.ray.exceptions.ObjectLostError) as exc:
                self.lost += 1
                done.append((item, Lost(f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}", slot)))
                self._replace(slot)
        return done

    def _replace(self, slot: int) -> None:
        if self.replacements_left <= 0:
            raise DistributedError(f"workers keep dying ({self.lost} calls lost); see the Ray logs "
                                   "(/tmp/ray/session_latest/logs) for why (out of memory is the usual cause)")
        self.replacements_left -= 1
        with contextlib.suppress(Exception):
            self.ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self._remote.remote(*self._init_args)
        log.info("worker %d replaced", slot)

    def close(self) -> None:
        """Stop every actor (their processes end; the session stays)."""
        for actor in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(actor, no_restart=True)
        self.actors = []
        self._running.clear()


@contextlib.contextmanager
def worker_pool(actor_class: type, init_args: Callable[[int], tuple], method: str, *, workers: int | None = None,
                address: str | None = None, threads: int | None = None, gpus: int = 0,
                max_workers: int | None = None) -> Iterator[WorkerPool]:
    """A started :class:`WorkerPool` inside a :func:`ray_session`, closed on exit.

    ``workers``: how many (default: the cluster's CPUs / ``threads``, or its GPUs when ``gpus``), at most
    ``max_workers``; ``threads``: see :func:`worker_threads`, given to ``init_args(threads)`` and asked of
    Ray as each worker's CPUs; ``gpus``: GPUs per worker. The workers' ``ready()`` answers are in
    ``pool.answers``.
    """
    local = not (address or os.environ.get("RAY_ADDRESS"))
    n = workers or 0
    per_worker = worker_threads(n or (os.cpu_count() or 1), threads, local)
    with ray_session(address, num_cpus=n * per_worker if local and n else None) as ray:
        if not n:
            resources = ray.cluster_resources()
            n = max(1, int(resources.get("GPU", 0)) // max(1, gpus) if gpus else
                    int(resources.get("CPU", 1)) // per_worker)
        if max_workers:
            n = max(1, min(n, max_workers))
        pool = WorkerPool(actor_class, init_args(per_worker), n, method, {"num_cpus": per_worker, "num_gpus": gpus})
        try:
            pool.answers = pool.start()
            yield pool
        finally:
            pool.close()
