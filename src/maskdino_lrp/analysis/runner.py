"""Long runs: explain every image of files / folders, resumable (the prototype's BatchLRPProcessor).

:class:`BatchExplainer` walks its inputs (every format PIL opens, ``.gif`` included; other files are
counted in one warning, named at debug level), explains each image, writes it with
:func:`~.export.save_explanation` and records it in ``manifest.json`` (written atomically after every
image).

Identity: the manifest keys each image by its *source key*, the path below the folder it was found in
(a file given by name: its name), and records its output folder, its size, time and SHA-1. The folder
name is a function of the source key alone (:func:`output_name`: readable where that is unambiguous,
with a short hash of the key otherwise), so adding, removing or renaming other files never moves an
output. Two inputs with the same key (``x/a.png`` and ``y/a.png``) are refused before any work.

Resuming: running the same command again skips the images the manifest marks done whose folder is
complete and whose file is unchanged; an image folder left incomplete by an interrupted run is removed
and redone, so a resumed run ends with exactly the files of an uninterrupted one. A manifest of the
first format (keyed by output name) is taken over image by image, matched by source path.

Per image the run plans (:meth:`BatchExplainer.plan_image`: skip, or reserve the output name), explains
(:meth:`BatchExplainer.attempt_image`) and books the answer (:meth:`BatchExplainer.record_image`); the
distributed run (:mod:`.distributed`) does the same steps with the explaining on Ray workers, so both write
the same files. Inputs may also be data-set files (a COCO annotation ``.json``, a ``.txt`` list of paths:
:mod:`.datasets`); the run ends with ``report.html`` and the data-set summary (:mod:`.summary`).

One run per folder: :class:`RunLock` (``.maskdino-lrp.lock``, the owner's pid and host); a second run
into the same folder refuses, a lock left by a killed run is taken over. A bad image (unreadable, too
small, …) is reported on stderr and in the manifest and skipped; it never stops the run.

:class:`LRPOptions` holds the performance settings (the prototype's LRPPerformanceConfig /
MemoryOptimizedLRP): chunk size, stops, channel relevance, dtype and a memory budget.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
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
MANIFEST_VERSION = 2  # 2: images keyed by source (1: by output name, handed out in scan order)
DTYPES = ("float32", "float64", "bfloat16", "float16")


class RunError(ValueError):
    """Inputs or an output folder a run cannot use (no images, unwritable folder, other settings)."""


@dataclass
class LRPOptions:
    """Performance settings of an LRP run.

    - ``chunk_size``: targets per batched backward (None: all at once);
    - ``stops``: where relevance is kept (see :data:`maskdino_lrp.lrp.STOPS`); None: the model's adapter's
      ``default_stops``;
    - ``keep_channels``: also keep per-channel relevance of token / query stops (large);
    - ``dtype``: ``float32`` or ``float64`` (the model is converted; twice the memory), or ``bfloat16`` /
      ``float16`` (the forward under autocast, the backward in its dtypes; the conservation report shows the cost);
    - ``device``: where the model and the relevance computation run (``cpu``, ``cuda``, ``cuda:1`` …);
    - ``memory_budget_gb``: cap the chunk size so that the estimate (:mod:`.estimate`) fits;
    - ``recompute``: recompute the adapter's segments in the backward instead of keeping their forward graph
      (same relevance, less memory, one more forward of them per target; :mod:`maskdino_lrp.lrp.recompute`).
    """

    chunk_size: int | None = 16
    stops: tuple[str, ...] | None = None
    keep_channels: bool = False
    dtype: str = "float32"
    memory_budget_gb: float | None = None
    recompute: bool = False
    device: str = "cpu"
    trim_heap: bool = False  # LRP(trim_heap=...): lower peak resident memory on CPUs (glibc)

    def __post_init__(self) -> None:
        from ..lrp.explainer import STOPS

        if isinstance(self.stops, str):
            self.stops = tuple(s.strip() for s in self.stops.split(",") if s.strip())
        self.stops = None if self.stops is None else tuple(self.stops)
        bad = [s for s in self.stops or () if s not in STOPS]
        if bad or self.stops == ():
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
    key: str = ""  # the source key (the manifest's key: path below the input folder)


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
def image_extensions() -> tuple[str, ...]:
    """File extensions of every format PIL can open here (``.png``, ``.jpg``, ``.gif``, ``.tif``, ``.webp`` …)."""
    global _EXTENSIONS
    if _EXTENSIONS is None:
        from PIL import Image

        Image.init()
        found = {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
        _EXTENSIONS = tuple(sorted(found | set(IMAGE_EXTENSIONS)))
    return _EXTENSIONS


_EXTENSIONS: tuple[str, ...] | None = None


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in image_extensions()


def _walk(folder: Path, skipped: list[Path] | None = None) -> Iterator[Path]:
    """Image files under ``folder``, depth first, each directory's entries sorted by name; other files
    (not an image extension PIL opens, or hidden) go to ``skipped``."""
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
            elif skipped is not None:
                skipped.append(Path(entry.path))
        except OSError:
            continue
    del entries
    for sub in subdirs:
        yield from _walk(sub, skipped)


# Output names: readable, and a function of the source alone. The manifest keys every image by its *source
# key* (the path below the input folder it was found in, ``/``-separated; a file given by name: its name).
# The output folder is that key with ``/`` written ``__`` when this is reversible: no component changed by
# :func:`~.export.safe_name` (letters and digits of any script are kept), none holds ``__`` or starts / ends
# with ``._``, at most :data:`NAME_BYTES` bytes. Any other key gets the cleaned name plus ``-`` and the first
# 10 hex digits of the key's SHA-1 before the extension: ``a b.png`` → ``a_b-1c0e…d2.png`` while ``a_b.png``
# stays ``a_b.png``, whatever else is in the folder and in whatever order files appear.
NAME_BYTES = 150
HASH_DIGITS = 10


def source_hash(key: str) -> str:
    return hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()[:HASH_DIGITS]


def _truncate_bytes(text: str, limit: int) -> str:
    data = text.encode("utf-8", "surrogateescape")
    return text if len(data) <= limit else data[:limit].decode("utf-8", "ignore").rstrip("._") or "image"


def output_name(key: str, hashed: bool = False) -> str:
    """The output folder name of the image with source key ``key`` (see above); ``hashed`` forces the
    hashed form (used when the readable one is already taken by another source)."""
    parts = key.split("/")
    flat = "__".join(parts)
    clean = safe_name(flat)
    readable = (not hashed and clean == flat and len(flat.encode("utf-8", "surrogateescape")) <= NAME_BYTES
                and all(p and "__" not in p and p[0] not in "._" and p[-1] not in "._" for p in parts))
    if readable:
        return flat
    stem, ext = os.path.splitext(clean)
    if not (1 < len(ext) <= 6 and ext[1:].isalnum()):
        stem, ext = clean, ""
    return f"{_truncate_bytes(stem, NAME_BYTES - len(ext) - HASH_DIGITS - 1)}-{source_hash(key)}{ext}"


@dataclass(frozen=True)
class Source:
    """One input image: ``key`` (the manifest's key: path below its input folder, or the file's name),
    ``path`` (as found), ``name`` (its default output folder, :func:`output_name`) and ``image_id`` (its id
    in a COCO annotation file it was listed in, kept in its summary and manifest record)."""

    key: str
    path: Path
    image_id: int | str | None = None

    @property
    def name(self) -> str:
        return output_name(self.key)


def iter_sources(inputs: Iterable[str | os.PathLike], skipped: list[Path] | None = None,
                 image_root: str | os.PathLike | None = None) -> Iterator[Source]:
    """Every image of ``inputs``: files as given, folders walked recursively (sorted), the images a COCO
    annotation file or a text file of paths lists (see :mod:`.datasets`; ``image_root``: where a COCO
    file's images are), as :class:`Source`."""
    from .datasets import is_list_file, list_file_sources

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for p in _walk(path, skipped):
                yield Source(p.relative_to(path).as_posix(), p)
        elif is_list_file(path):
            yield from list_file_sources(path, image_root)
        else:
            yield Source(path.name, path)


def iter_images(inputs: Iterable[str | os.PathLike]) -> Iterator[tuple[str, Path]]:
    """(output name, path) of every image: files as given, folders walked recursively (sorted).

    The name depends on the image's own path (below the folder given, or its file name) and on nothing
    else: see :func:`output_name`.
    """
    for source in iter_sources(inputs):
        yield source.name, source.path


def count_images(inputs: Iterable[str | os.PathLike]) -> int:
    """How many images :func:`iter_images` yields (streams; keeps nothing)."""
    return sum(1 for _ in iter_images(inputs))


def collect_sources(inputs: Sequence[str | os.PathLike],
                    image_root: str | os.PathLike | None = None) -> tuple[list[Source], list[Path]]:
    """Every distinct image of ``inputs`` and the files skipped as not images.

    The same file reached twice (given twice, or given and inside a given folder) counts once. Two
    different files with the same source key (``x/a.png`` and ``y/a.png`` given as files, or two folders
    holding ``a.png``) would share one output: RunError, before anything is done.
    """
    skipped: list[Path] = []
    sources: list[Source] = []
    seen_paths: set[str] = set()
    by_key: dict[str, Path] = {}
    for source in iter_sources(inputs, skipped, image_root):
        real = os.path.realpath(source.path)
        if real in seen_paths:
            log.debug("%s is given more than once: explained once", source.path)
            continue
        seen_paths.add(real)
        other = by_key.get(source.key)
        if other is not None:
            raise RunError(f"{other} and {source.path} would share the output of {source.key!r}: give their common "
                           "folder instead (outputs are named by the path below it), or explain them into "
                           "separate --out folders")
        by_key[source.key] = source.path
        sources.append(source)
    return sources, skipped


def report_skipped(skipped: Sequence[Path]) -> None:
    """One warning with the count of files skipped as not images; their names at debug level."""
    if not skipped:
        return
    exts = sorted({p.suffix.lower() or "(none)" for p in skipped})
    log.warning("skipped %d file(s) that are not images this tool reads (%s); -v lists them", len(skipped),
                ", ".join(exts[:8]) + (" …" if len(exts) > 8 else ""))
    for p in skipped:
        log.debug("skipped (not an image): %s", p)


def file_fingerprint(path: Path, digest: bool = True) -> dict:
    """Size, modification time and (``digest``) SHA-1 of a file: what resuming compares."""
    st = path.stat()
    out: dict[str, Any] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if digest:
        h = hashlib.sha1()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out["sha1"] = h.hexdigest()
    return out


def check_inputs(inputs: Sequence[str | os.PathLike], image_root: str | os.PathLike | None = None) -> None:
    """Raise RunError for a missing path, an unreadable file given by name, a folder without images, or a
    COCO annotation / path list file that cannot be read or names missing images."""
    from PIL import Image, UnidentifiedImageError

    from .datasets import check_list_file, is_list_file

    if not inputs:
        raise RunError("no images given")
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise RunError(f"image file not found: {path}")
        if path.is_dir():
            if next(_walk(path), None) is None:
                exts = image_extensions()
                raise RunError(f"no images found in folder {path} (looked for the formats PIL opens: "
                               f"{' '.join(e for e in IMAGE_EXTENSIONS + ('.gif',) if e in exts)} and "
                               f"{len(exts) - len(IMAGE_EXTENSIONS) - 1} more)")
            continue
        if is_list_file(path):
            check_list_file(path, image_root)
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


# ----------------------------------------------------------------------------- one run per folder
LOCK = ".maskdino-lrp.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    return True


class RunLock:
    """``out_dir/.maskdino-lrp.lock``: one run at a time per output folder.

    The file holds the owner's pid, host and start time. Where the platform has ``fcntl.flock`` the lock
    is the kernel's on that file (released when the owner dies, however it dies: a lock file left by a
    killed run is simply taken over); elsewhere, or on a file system without ``flock``, the file's
    existence is the lock and one left by a dead process on this host is taken over. A second run
    refuses with RunError (one line: who holds it).
    """

    use_flock = True  # False: the lock file's existence alone (what platforms without flock get)

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self._fd: int | None = None
        self.taken_over: dict | None = None  # the dead owner's record when a stale lock was taken over

    # -------------------------------------------------------------- reading
    def owner(self) -> dict | None:
        """The recorded owner (pid, host, started, command) or None (no lock file / unreadable)."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8") or "null")
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def held_by_other(self) -> dict | None:
        """The owner's record if a live run other than this object holds the lock, else None."""
        if self._fd is not None or not self.path.exists():
            return None
        owner = self.owner() or {}
        flocked = self._probe_flock()
        if flocked is not None:
            return (owner or {"pid": "?", "host": "?"}) if flocked else None
        return owner if owner and not self._stale(owner) else None

    def _probe_flock(self) -> bool | None:
        """True: someone holds the flock; False: nobody; None: flock not available here."""
        try:
            import fcntl
        except ImportError:
            return None
        if not self.use_flock:
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError as exc:
            return True if exc.errno in (errno.EAGAIN, errno.EACCES) else None
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        finally:
            os.close(fd)

    @staticmethod
    def _stale(owner: dict) -> bool:
        """A recorded owner that is certainly gone: this host, and no process with that pid."""
        try:
            pid = int(owner.get("pid"))
        except (TypeError, ValueError):
            return False
        return owner.get("host") == socket.gethostname() and not _pid_alive(pid)

    def describe(self, owner: dict | None) -> str:
        owner = owner or {}
        since = f", since {owner['started']}" if owner.get("started") else ""
        return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}{since}"

    def _busy(self, owner: dict | None) -> RunError:
        return RunError(f"{self.folder} is in use by another run ({self.describe(owner)}); wait for it to finish "
                        f"or use another --out (a lock left by a crashed run on another host: delete {self.path})")

    # -------------------------------------------------------------- acquiring
    def _record(self) -> bytes:
        return (json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                            "command": " ".join(sys.argv)[:500]}) + "\n").encode()

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            return self
        try:
            import fcntl
        except ImportError:
            fcntl = None
        if not self.use_flock:
            fcntl = None
        for _ in range(20):
            if fcntl is not None:
                done = self._acquire_flock(fcntl)
                if done is None:  # no flock on this file system
                    fcntl = None
                    continue
                if done:
                    return self
            elif self._acquire_exclusive():
                return self
        raise RunError(f"cannot take the lock {self.path}: it keeps changing; is another run starting?")

    def _acquire_flock(self, fcntl) -> bool | None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunError(f"cannot create the lock file {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._busy(self.owner()) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise self._busy(self.owner()) from None
            return None
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the previous owner removed the file between our open and flock: try again
            os.close(fd)
            return False
        previous = self.owner()
        if previous and previous.get("pid") != os.getpid():
            self.taken_over = previous
        os.ftruncate(fd, 0)
        os.pwrite(fd, self._record(), 0)
        os.fsync(fd)
        self._fd = fd
        return True

    def _acquire_exclusive(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            owner = self.owner()
            if owner is None:  # being written right now, or garbage
                try:
                    age = time.time() - self.path.stat().st_mtime
                except FileNotFoundError:
                    return False
                if age < 30:
                    time.sleep(0.2)
                    return False
            elif not self._stale(owner):
                raise self._busy(owner) from None
            self.taken_over = owner or {}
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return False
        except OSError as exc:
            raise RunError(f"cannot create the lock file {self.path}: {exc.strerror or exc}") from None
        os.write(fd, self._record())
        os.fsync(fd)
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still holding it: a waiting open sees a new inode
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# ----------------------------------------------------------------------------- the runner
class BatchExplainer:
    """Explain every image of a set of files / folders into ``out_dir``, resumably.

    >>> runner = BatchExplainer("tiny", "runs/a", queries="topk:3")
    >>> for result in runner.run(["images/"]):
    ...     print(result.name, result.status)

    ``model`` is a built :class:`~maskdino_lrp.MaskDINO`, or a config (preset / YAML / dict) that is
    built with ``checkpoint`` after seeding torch with ``seed`` (so random-weight models are the
    same on every run, which resuming relies on), or a callable returning a built model (any model an
    adapter explains, e.g. a Hugging Face DETR), called when the model is first needed. ``model_name``
    names the model in the settings and each summary.json (default: the config, or the model's class).
    """

    def __init__(self, model: Any, out_dir: str | os.PathLike, *, checkpoint: str | os.PathLike | None = None,
                 overrides: Mapping[str, Any] | None = None, queries: Any = "topk:5", target: str = "class",
                 composite: str = "default", options: LRPOptions | None = None,
                 formats: Sequence[str] = DEFAULT_FORMATS, seed: int = 0, progress: bool = True,
                 report: bool = True, warn: Callable[[str], None] | None = None, strict: bool = True,
                 model_name: str | None = None):
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
        self.strict = bool(strict)  # False: a checkpoint that does not fit is loaded partially (--partial-load)
        self.overrides = dict(overrides or {})
        self._warn = warn or (lambda msg: _stderr(f"maskdino-lrp: warning: {msg}"))
        self._model_arg = model
        self.model_name = model_name
        self._model = None
        self._lrp = None
        self._parameters: int | None = None

    # -------------------------------------------------------------- settings and manifest
    @property
    def settings(self) -> dict:
        """What the outputs depend on; a resumed run must have the same."""
        model = self._model_arg
        config = self.model_name or (str(model) if isinstance(model, (str, os.PathLike)) else (
            "<dict>" if isinstance(model, Mapping) else type(model).__name__))
        return {"config": config, "overrides": self.overrides, "checkpoint": self.checkpoint, "seed": self.seed,
                "queries": self.queries, "target": self.target, "composite": self.composite,
                "stops": list(self.stops), "keep_channels": self.options.keep_channels,
                "dtype": self.options.dtype, "formats": list(self.formats)}

    def _new_manifest(self) -> dict:
        return {"version": MANIFEST_VERSION, "settings": self.settings, "images": {}}

    def load_manifest(self) -> dict:
        """The folder's manifest (a new one if there is none); RunError if it was written with other
        settings or cannot be read. A manifest of format version 1 (images keyed by output name) is
        converted: its finished images wait under ``legacy`` (keyed by the source path as given) until a
        run meets their source again and takes them over (see :meth:`run`)."""
        path = self.out_dir / MANIFEST
        if not path.is_file():
            return self._new_manifest()
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RunError(f"cannot read {path}: {exc}; move it away to start the run afresh") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("images", {}), dict):
            raise RunError(f"{path} is not a maskdino-lrp manifest; move it away or use another output folder")
        version = manifest.get("version", 1)
        if not isinstance(version, int) or version > MANIFEST_VERSION:
            raise RunError(f"{path} has manifest version {version!r}, newer than this maskdino-lrp understands "
                           f"({MANIFEST_VERSION}); use the newer version or another output folder")
        old = manifest.get("settings", {})
        new = self.settings
        diff = [k for k in new if json.dumps(old.get(k), sort_keys=True) != json.dumps(new[k], sort_keys=True)]
        if diff:
            k = diff[0]
            raise RunError(f"{self.out_dir} holds a run with other settings ({k}: {old.get(k)!r} there, "
                           f"{new[k]!r} now); use another output folder")
        if version < 2:
            manifest = self._from_version1(manifest)
        manifest.setdefault("images", {})
        return manifest

    def _from_version1(self, manifest: dict) -> dict:
        legacy: dict[str, dict] = {}
        for name, rec in manifest.get("images", {}).items():
            if isinstance(rec, dict) and rec.get("status") == "done" and rec.get("source"):
                legacy.setdefault(str(rec["source"]), {**rec, "output": rec.get("output", name)})
        log.info("manifest of format version 1: %d finished image(s) to take over by source", len(legacy))
        return {"version": MANIFEST_VERSION, "settings": manifest.get("settings", self.settings), "images": {},
                "legacy": legacy, "migrated_from_version": 1}

    def check_lock(self) -> None:
        """RunError when another live run holds the output folder (cheap; takes nothing)."""
        lock = RunLock(self.out_dir)
        owner = lock.held_by_other()
        if owner is not None:
            raise lock._busy(owner)

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
            elif callable(self._model_arg):  # a loader: built only once the folder and inputs are checked
                model = self._model_arg()
            else:
                torch.manual_seed(self.seed)
                model = build_model(self._model_arg, overrides=self.overrides or None, checkpoint=self.checkpoint,
                                    strict=self.strict)
            if self.options.dtype == "float64":
                model = model.double()
            self._model = model.eval()
            if getattr(model, "random_weights", False):  # said once per run (and in summary.json, report.html)
                self._warn(f"no checkpoint: {self.settings['config']} runs on random weights (torch seed {self.seed}); "
                           "the explanations say nothing about a trained model (pass a checkpoint)")
            log_memory("building the model")
        return self._model

    @property
    def stops(self) -> tuple[str, ...]:
        """The stops kept: the options', else the model's adapter's ``default_stops`` (MaskDINO's without building
        a model from a config; a callable's model is loaded to find its adapter)."""
        if self.options.stops is not None:
            return self.options.stops
        import torch

        from ..adapters import find_adapter, get_adapter

        if isinstance(self._model_arg, torch.nn.Module) or callable(self._model_arg):
            return (find_adapter(self.model) or get_adapter("maskdino")).default_stops
        return get_adapter("maskdino").default_stops  # a MaskDINO config

    @property
    def lrp(self):
        if self._lrp is None:
            from ..lrp.explainer import LRP

            half = self.options.dtype if self.options.dtype in ("bfloat16", "float16") else None
            self._lrp = LRP(self.model, composite=self.composite, chunk_size=self.options.chunk_size,
                            keep_channels=self.options.keep_channels, recompute=self.options.recompute,
                            device=self.options.device, dtype=half, trim_heap=self.options.trim_heap)
        return self._lrp

    def _chunk_for(self, image_size: tuple[int, int], k: int) -> int | None:
        chunk = self.options.chunk_size
        if self.options.memory_budget_gb is None:
            return chunk
        from .estimate import estimate

        if self._parameters is None:
            self._parameters = sum(p.numel() for p in self.model.parameters()) + sum(b.numel() for b in self.model.buffers())
        est = estimate(self.model.cfg, image_size, k, memory_budget_gb=self.options.memory_budget_gb,
                       stops=self.stops, dtype=self.options.dtype, keep_channels=self.options.keep_channels,
                       gflops=1.0, parameters=self._parameters, formats=self.formats,
                       recompute=self.options.recompute)
        if not est.fits:
            from .estimate import HEADROOM

            self._warn(f"estimated memory {est.total_for(1) / 2 ** 30:.2f} GB exceeds {HEADROOM:.0%} of the budget of "
                       f"{self.options.memory_budget_gb:g} GB even one target at a time")
        log.debug("memory budget %.2f GB: chunk %d (estimate %.2f GB)", self.options.memory_budget_gb,
                  est.recommended_chunk, est.total_for(est.recommended_chunk) / 2 ** 30)
        return est.recommended_chunk if chunk is None else min(chunk, est.recommended_chunk)

    def _weights_info(self) -> dict:
        """``{"weights": source, "random_weights": bool, …}`` of the model, for each image's summary.json."""
        info = getattr(self.model, "weights_info", None)
        if callable(info):
            return dict(info())
        # a model from elsewhere (Hugging Face): name it and its class, so each summary says what ran
        return {"weights": self.settings["config"], "model_class": type(self.model).__name__}

    # -------------------------------------------------------------- one image
    def _passes(self, k: int) -> int:
        """Backward passes the explainer makes for ``k`` targets (one per chunk; one per target in loop mode)."""
        if getattr(self.lrp, "batch_mode", None) == "loop":
            return k
        chunk = self.lrp.chunk_size or k
        return -(-k // max(1, int(chunk)))

    def explain_image(self, name: str, path: Path, key: str | None = None,
                      image_id: int | str | None = None) -> ImageResult:
        """Explain one image and write its folder; raises on a bad image (the caller records it)."""
        from ..lrp.targets import get_target, parse_queries, select_queries

        start = time.perf_counter()
        progress = _ImageProgress(name, self.progress)
        extra = {**self._weights_info(), **({"source_key": key} if key is not None else {}),
                 **({"image_id": image_id} if image_id is not None else {})}
        try:
            progress.forward()
            session = self.lrp.prepare(path)
            try:
                log_memory(f"the LRP forward of {name}")
                logits = session.outputs["pred_logits"][0].detach()
                qs, _ = select_queries(parse_queries(self.queries), session.detections, logits.shape[0], logits)
                folder = self.out_dir / name
                if qs.numel() == 0:
                    folder.mkdir(parents=True, exist_ok=True)
                    summary = {"image": name, "source": str(path), "num_queries": 0, "queries": [], "files": [],
                               "note": f"query selection {self.queries!r} selected no query", **extra}
                    atomic_write_json(folder / SUMMARY, summary)
                    return ImageResult(name, str(path), "done", [], time.perf_counter() - start, summary=summary,
                                       key=key or name)
                self.lrp.chunk_size = self._chunk_for(tuple(session.prepared.original_size), int(qs.numel()))
                progress.backward(int(qs.numel()), self._passes(int(qs.numel())))
                target_name, target_fn = get_target(self.target)
                expl = session.backward(self.queries, progress.counting(target_name, target_fn), self.stops,
                                        retain_graph=False)
            finally:
                session.cleanup()
            progress.writing()
            log_memory(f"the LRP backward of {name} ({len(expl)} queries)")
            summary = save_explanation(expl, self.out_dir, name, formats=self.formats, source=path, extra=extra)
            log_memory(f"writing {name}")
            del expl
        finally:
            progress.close()
        return ImageResult(name, str(path), "done", [q["query"] for q in summary["queries"]],
                           time.perf_counter() - start, summary=summary, key=key or name)

    # -------------------------------------------------------------- the run
    def _summary_of(self, folder: Path) -> dict | None:
        try:
            data = json.loads((folder / SUMMARY).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _belongs_to_other(self, folder: Path, source: Source) -> bool:
        """``folder`` holds the finished output of another source (say, the same name on a case-insensitive
        file system, or an older run's folder)."""
        if not folder.is_dir():
            return False
        summary = self._summary_of(folder)
        if summary is None:
            return False  # incomplete: an interrupted attempt, redone
        if "source_key" in summary:
            return summary["source_key"] != source.key
        return str(summary.get("source")) != str(source.path)

    def _name_for(self, source: Source, taken: Mapping[str, str | None]) -> str:
        """The output folder of a source not yet done: its :func:`output_name`, or the hashed form when a
        different source already has that folder."""
        out = self.out_dir
        for hashed in (False, True):
            name = output_name(source.key, hashed=hashed)
            if taken.get(name, source.key) == source.key and not self._belongs_to_other(out / name, source):
                return name
        raise RunError(f"cannot name the output of {source.path}: both {output_name(source.key)!r} and "
                       f"{name!r} in {out} belong to other images")

    def _unchanged(self, record: dict, path: Path) -> bool:
        """The source file is the one the record was made from (size and time, else the SHA-1)."""
        try:
            quick = file_fingerprint(path, digest=False)
        except OSError:
            return True  # unreadable now: explaining would fail anyway; keep what was done
        if "sha1" not in record or (record.get("size") == quick["size"] and record.get("mtime_ns") == quick["mtime_ns"]):
            if "sha1" not in record:  # taken over from a version-1 manifest: fingerprint it now
                record.update(file_fingerprint(path))
            return True
        full = file_fingerprint(path)
        if full["sha1"] == record["sha1"]:
            record.update(full)  # touched, not changed
            return True
        return False

    def _take_over_legacy(self, manifest: dict, source: Source) -> dict | None:
        """A version-1 manifest's finished image with this source (its folder's summary agrees): now keyed by source."""
        legacy = manifest.get("legacy")
        if not legacy or str(source.path) not in legacy:
            return None
        rec = legacy.pop(str(source.path))
        summary = self._summary_of(self.out_dir / str(rec.get("output")))
        if summary is None or str(summary.get("source")) != str(source.path):
            log.info("version-1 record of %s does not match its folder %s: explained again", source.path,
                     rec.get("output"))
            return None
        record = {"status": "done", "source": str(source.path), "output": rec["output"],
                  "queries": rec.get("queries", []), "seconds": rec.get("seconds"), "migrated_from_version": 1}
        manifest["images"][source.key] = record
        return record

    def run(self, inputs: Sequence[str | os.PathLike], *, image_root: str | os.PathLike | None = None,
            execute: Callable[[dict, Sequence[Source]], Iterator[ImageResult]] | None = None
            ) -> Iterator[ImageResult]:
        """Explain every image of ``inputs`` (files / folders / COCO annotation or path list files), yielding
        one result per image.

        The output folder is locked for the run (:class:`RunLock`: a second run into it refuses). Images
        are keyed by source (:func:`output_name`); one whose record is done, whose folder is complete and
        whose file is unchanged (size and time, else SHA-1) is skipped; a changed one is explained again.
        ``execute(manifest, sources)`` explains the sources (default: one after the other in this process;
        :mod:`.distributed` hands them to Ray workers through the same :meth:`plan_image`,
        :meth:`attempt_image` and :meth:`record_image` steps). The run ends with ``report.html`` and the
        data-set summary (:mod:`.summary`) when ``report`` is on.
        """
        out = check_output_folder(self.out_dir)
        lock = RunLock(out).acquire()  # before anything is read or written: a busy folder is refused as it is
        try:
            if lock.taken_over is not None:
                self._warn(f"took over the lock of a run that is gone ({lock.describe(lock.taken_over)}); "
                           "its unfinished image is redone")
            manifest = self.load_manifest()
            sources, skipped = collect_sources(inputs, image_root)
            report_skipped(skipped)
            for folder in [out, *(p for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))]:
                remove_stale_temp_files(folder)
            manifest["total"] = len(sources)
            manifest["finished"] = False
            self._save_manifest(manifest)
            yield from (execute or self._run_sources)(manifest, sources)
            manifest["finished"] = True
            legacy = manifest.get("legacy")
            if legacy:
                self._warn(f"{len(legacy)} image folder(s) of the earlier manifest format match no input of this run; "
                           f"they are kept and listed under 'legacy' in {MANIFEST}")
            self._save_manifest(manifest)
        finally:
            try:
                if self.report and out.is_dir():
                    from .render import write_report
                    from .summary import write_dataset_summary

                    try:
                        write_report(out)
                        write_dataset_summary(out)
                    except OSError as exc:
                        self._warn(f"cannot write the report: {exc}")
            finally:
                lock.release()

    def _run_sources(self, manifest: dict, sources: Sequence[Source]) -> Iterator[ImageResult]:
        """The single-process run: each source planned, explained and recorded in turn."""
        taken = self.taken_names(manifest)
        bar = _progress(len(sources), self.progress)
        done_queries = 0
        try:
            for source in sources:
                planned = self.plan_image(manifest, source, taken, bar)
                if isinstance(planned, ImageResult):
                    bar.update(1)
                    yield planned
                    continue
                name, fingerprint = planned
                result = self.attempt_image(source, name)
                self.record_image(manifest, source, result, fingerprint, taken, bar)
                done_queries += len(result.queries) if result.status == "done" else 0
                bar.set_postfix(queries=done_queries, refresh=False)
                bar.update(1)
                yield result
        finally:
            bar.close()

    @staticmethod
    def taken_names(manifest: dict) -> dict[str, str | None]:
        """Output folder name → the source key that owns it (None: a version-1 record not yet taken over)."""
        taken: dict[str, str | None] = {rec["output"]: key for key, rec in manifest["images"].items()
                                        if rec.get("output")}
        taken.update({str(rec.get("output")): None for rec in manifest.get("legacy", {}).values()})
        return taken

    def plan_image(self, manifest: dict, source: Source, taken: dict[str, str | None],
                   bar: Any = None) -> ImageResult | tuple[str, dict]:
        """The ``skipped`` result of an image an earlier run finished (folder complete, file unchanged), or
        the (output name, file fingerprint) it is to be explained into: the name is reserved in ``taken``
        and what an interrupted attempt left in that folder is removed."""
        out = self.out_dir
        key, path = source.key, source.path
        record = manifest["images"].get(key) or self._take_over_legacy(manifest, source)
        name = None
        if record and record.get("status") == "done" and record.get("output"):
            name = record["output"]
            if (out / name / SUMMARY).is_file() and self._unchanged(record, path):
                return ImageResult(name, str(path), "skipped", record.get("queries", []), key=key)
            if (out / name / SUMMARY).is_file():
                bar_write(bar, lambda: self._warn(f"{path} changed since it was explained: explaining it again"))
        if name is None:
            name = self._name_for(source, taken)
        taken[name] = key
        folder = out / name
        if folder.is_dir() and folder.resolve().parent == out.resolve():
            shutil.rmtree(folder)  # an interrupted attempt, or the output of an earlier version of the file
        try:
            fingerprint = file_fingerprint(path)
        except OSError:
            fingerprint = {}
        return name, fingerprint

    def attempt_image(self, source: Source, name: str) -> ImageResult:
        """Explain one image into ``out_dir/name``: a ``done`` result, or ``failed`` with a one-line error
        (a bad image never ends the run). The one per-image step of every runner, local or distributed."""
        path, key = source.path, source.key
        try:
            if source.image_id is None:
                return self.explain_image(name, path, key=key)
            return self.explain_image(name, path, key=key, image_id=source.image_id)
        except (KeyboardInterrupt, SystemExit):
            raise
        except MemoryError:
            return ImageResult(name, str(path), "failed", error="out of memory; lower --chunk-size or set "
                               "--memory-budget", key=key)
        except Exception as exc:
            log.debug("image %s failed", path, exc_info=True)
            message = " ".join(str(exc).split()) or type(exc).__name__
            return ImageResult(name, str(path), "failed", error=f"{type(exc).__name__}: {message}", key=key)

    def record_image(self, manifest: dict, source: Source, result: ImageResult, fingerprint: Mapping[str, Any],
                     taken: dict[str, str | None], bar: Any = None) -> None:
        """Book ``result`` in the manifest and save it (atomically); a failed image's folder is removed and
        its name released."""
        key, path, name = source.key, source.path, result.name
        ident = {} if source.image_id is None else {"image_id": source.image_id}
        if result.status == "failed":
            folder = self.out_dir / name
            if folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
            manifest["images"][key] = {"status": "failed", "source": str(path), "error": result.error, **ident}
            if taken.get(name) == key:
                del taken[name]
            bar_write(bar, lambda: self._warn(f"skipped {path}: {result.error}"))
        else:
            manifest["images"][key] = {"status": "done", "source": str(path), "output": name, **ident,
                                       "queries": result.queries, "seconds": round(result.seconds, 3), **fingerprint}
            taken[name] = key
        self._save_manifest(manifest)

    def run_all(self, inputs: Sequence[str | os.PathLike], **run_options: Any) -> dict:
        """Run to the end (``run_options``: see :meth:`run`); returns counts ``{"done", "skipped", "failed",
        "queries"}`` and the failures."""
        counts = {"done": 0, "skipped": 0, "failed": 0, "queries": 0, "failures": []}
        for result in self.run(inputs, **run_options):
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


class _ImageProgress:
    """Progress inside one image, for models where one image takes long: the LRP forward, then each
    backward pass (one per chunk of targets). Log lines (INFO: stages, DEBUG: passes) and, with the
    progress bar on, a second bar under the run's that appears only for an image slower than ``delay`` s."""

    def __init__(self, name: str, enabled: bool, delay: float = 2.0):
        self.name = name
        self.enabled = enabled
        self.delay = delay
        self.bar = None
        self.passes = 0
        self.calls = 0
        self.t0 = time.perf_counter()
        self.t_stage = self.t0

    def _label(self, stage: str) -> str:
        short = self.name if len(self.name) <= 24 else self.name[:11] + "…" + self.name[-12:]
        return f"{short}: {stage}"

    def forward(self) -> None:
        log.info("%s: LRP forward", self.name)
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=None, desc=self._label("forward"), unit="pass", leave=False, position=1,
                            delay=self.delay, file=sys.stderr, dynamic_ncols=True)

    def backward(self, targets: int, passes: int) -> None:
        now = time.perf_counter()
        log.info("%s: forward took %.1f s; backward for %d target(s) in %d pass(es)", self.name, now - self.t_stage,
                 targets, passes)
        self.t_stage = now
        self.passes = passes
        if self.bar is not None:
            self.bar.reset(total=passes)
            self.bar.set_description_str(self._label("backward"), refresh=False)

    def _pass_started(self, _grad) -> None:
        self.calls += 1
        log.debug("%s: backward pass %d/%d (%.1f s into the backward)", self.name, self.calls, self.passes,
                  time.perf_counter() - self.t_stage)
        if self.bar is not None and 1 < self.calls <= self.passes:
            self.bar.update(1)  # the previous pass has finished
        return None

    def counting(self, name: str, target_fn: Callable) -> Callable:
        """``target_fn`` whose values report each backward pass when the gradient reaches them."""

        def target(outputs, queries, labels):
            values = target_fn(outputs, queries, labels)
            if getattr(values, "requires_grad", False):
                values.register_hook(self._pass_started)
            return values

        target.__name__ = name
        return target

    def writing(self) -> None:
        now = time.perf_counter()
        log.info("%s: backward took %.1f s; writing", self.name, now - self.t_stage)
        self.t_stage = now
        if self.bar is not None:
            self.bar.n = self.passes
            self.bar.set_description_str(self._label("writing"))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="image", desc="explaining", file=sys.stderr, dynamic_ncols=True)


def bar_write(bar, fn: Callable[[], None]) -> None:
    """Print around a live progress bar without breaking it."""
    if bar is None:
        fn()
        return
    try:
        from tqdm import tqdm

        if isinstance(bar, tqdm):
            with tqdm.external_write_mode(file=sys.stderr):
                fn()
            return
    except ImportError:
        pass
    fn()
