"""Reading official checkpoints (.pth, detectron2 .pkl, .safetensors) and loading them with a key report.

``read_state_dict(path)`` returns ``{key: tensor}``; ``load_checkpoint(model, source)`` loads a path or a
state dict into a model and returns a :class:`LoadReport` listing loaded, missing, unexpected, shape-
mismatched and ignored (training-only) keys. Nothing is loaded silently: a tensor whose shape differs
from the model's is reported and left out, never reshaped.

Pickles are never unpickled with full trust by default: ``.pth`` goes through
``torch.load(weights_only=True)`` (numpy arrays and scalars allowed), ``.pkl`` through an unpickler that
can only rebuild numpy arrays, torch tensors (their storages read with ``weights_only=True``) and plain
containers.
"""
from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import nn

__all__ = ["CheckpointError", "LoadReport", "read_state_dict", "load_checkpoint", "shipped_weights",
           "TRAINING_ONLY_PREFIXES"]

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pth.tar")
PICKLE_SUFFIXES = (".pkl", ".pickle")
SAFETENSORS_SUFFIXES = (".safetensors",)
# Top-level names of entries that only training uses; never loaded into a model that lacks the key.
TRAINING_ONLY_PREFIXES = ("criterion", "optimizer", "scheduler", "iteration", "trainer", "lr_scheduler",
                          "grad_scaler", "scaler")
_MAX_LISTED = 50


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or (with ``strict=True``) that does not fit the model.

    When it does not fit, ``report`` holds the full :class:`LoadReport` (``str(report)`` lists every key).
    """

    def __init__(self, message: str, report: "LoadReport | None" = None):
        super().__init__(message)
        self.report = report


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
def _numpy_module(module: str) -> str:
    """numpy 1 pickles name ``numpy.core``, numpy 2 ``numpy._core``; use whichever this numpy has."""
    for old, new in (("numpy.core", "numpy._core"), ("numpy._core", "numpy.core")):
        if module == old or module.startswith(old + "."):
            try:
                __import__(module)
                return module
            except ImportError:
                return new + module[len(old):]
    return module


_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),  # numpy arrays pickled with protocol 2 carry their bytes through it
    ("collections", "OrderedDict"),
    *(("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "str",
                                "bytes", "bytearray", "bool", "slice")),
}


def _storage_from_bytes(data: bytes) -> Any:
    """The storage of a tensor that plain ``pickle`` wrote, read by ``torch.load(weights_only=True)`` instead of
    ``torch.storage._load_from_bytes`` (which trusts the bytes)."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


# Torch tensors in a plain pickle: the official tools/convert-pretrained-swin-model-to-d2.py pickles the
# Swin state dict's tensors as they are (detectron2's ResNet .pkl files hold numpy arrays).
_PICKLE_TORCH = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays, numpy scalars, torch tensors and plain containers; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)  # Python 2 pickles
        if (module, name) in _PICKLE_TORCH:
            return _PICKLE_TORCH[module, name]
        allowed = (module, name) in _PICKLE_ALLOWED or (module == "numpy.dtypes" and name.endswith("DType"))
        if not allowed:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (only numpy arrays, torch tensors "
                                         "and plain containers are allowed in a .pkl checkpoint)")
        return super().find_class(_numpy_module(module), name)


def _numpy_safe_globals() -> list:
    core = getattr(np, "_core", None) or np.core
    found = [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        found += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and isinstance(getattr(dtypes, n), type)]
    return found


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(SAFETENSORS_SUFFIXES):
        return "safetensors"
    if name.endswith(PICKLE_SUFFIXES):
        with open(path, "rb") as f:
            return "torch" if f.read(4) == b"PK\x03\x04" else "pickle"  # torch.save()d under a .pkl name
    if name.endswith(TORCH_SUFFIXES):
        return "torch"
    raise CheckpointError(f"checkpoint {path}: unknown file type {path.suffix!r}; use an official MaskDINO "
                          f".pth ({', '.join(TORCH_SUFFIXES)}), a detectron2 .pkl or a .safetensors file")


def _torch_load(path: Path, trusted: bool) -> Any:
    if trusted:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # numpy arrays / scalars (e.g. in the trainer state) need allow-listing
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        culprit = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
        if not culprit:
            raise  # not a refused object: a corrupt file, reported by the caller
        raise CheckpointError(
            f"checkpoint {path} holds Python objects other than tensors, which torch.load(weights_only=True) "
            f"refuses ({culprit[0]}). If you trust this file, read it with read_state_dict(path, trusted=True) "
            "and pass the result to load_checkpoint") from e


def _unwrap(obj: Any, path: Path | str) -> tuple[dict[str, Any], list[str]]:
    """The model's entries of a loaded checkpoint object, plus notes on what else it held."""
    notes: list[str] = []
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict of tensors; expected "
                              "a state dict or a dict with a 'model' entry")
    for wrapper in ("model", "state_dict"):
        inner = obj.get(wrapper)
        if isinstance(inner, Mapping):
            others = sorted(str(k) for k in obj if k != wrapper)
            if others:
                notes.append(f"took the {wrapper!r} entry; not loaded: {', '.join(others)}")
            return dict(inner), notes
    return dict(obj), notes


def _to_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray) and value.dtype != object:
        return torch.from_numpy(np.array(value, copy=True))
    return None


def _read(path: str | os.PathLike, trusted: bool = False) -> tuple[dict[str, Any], list[str]]:
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} does not exist; pass the path of an official MaskDINO "
                              ".pth, a detectron2 .pkl or a .safetensors file (or a state dict)")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; pass the checkpoint file inside it")
    kind = _kind(path)
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu"), []
        if kind == "torch":
            return _unwrap(_torch_load(path, trusted), path)
        with open(path, "rb") as f:
            data = f.read()
        obj = (pickle.loads(data, encoding="latin1") if trusted
               else _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load())
        state, notes = _unwrap(obj, path)
        if isinstance(obj, Mapping) and obj.get("__author__"):
            notes.insert(0, f"written by {obj['__author__']}")
        if isinstance(obj, Mapping) and obj.get("matching_heuristics"):
            notes.append("the file asks for detectron2's name-matching heuristics, which are not applied; "
                         "use prefix_map (e.g. {'': 'backbone.'}) to place its keys")
        return state, notes
    except CheckpointError:
        raise
    except Exception as e:  # corrupt or truncated files raise many different types
        raise CheckpointError(f"checkpoint {path} could not be read as a {kind} file ({type(e).__name__}: {e}); "
                              "it may be truncated or corrupt — download it again") from e


def read_state_dict(path: str | os.PathLike, *, trusted: bool = False) -> dict[str, torch.Tensor]:
    """``{key: tensor}`` from an official ``.pth`` (its ``"model"`` entry, or a bare state dict), a detectron2
    ``.pkl`` (numpy arrays, ``{"model": ...}`` or bare) or a ``.safetensors`` file; CPU tensors as stored.

    Entries that are not arrays/tensors are dropped. ``trusted=True`` unpickles with full trust (only for
    files you trust). Raises :class:`CheckpointError` naming the path for missing, unknown or corrupt files.
    """
    state, _ = _read(path, trusted)
    out = {}
    for key, value in state.items():
        tensor = _to_tensor(value)
        if tensor is not None:
            out[str(key)] = tensor
    return out


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
@dataclass(repr=False)
class LoadReport:
    """What :func:`load_checkpoint` did. ``mismatched`` holds (key, checkpoint shape, model shape)."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    model_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    checkpoint_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when every model key was loaded and every checkpoint key placed (ignored ones aside)."""
        return not (self.missing or self.unexpected or self.mismatched)

    @property
    def total(self) -> int:
        """Number of model keys."""
        return len(self.model_shapes) or len(self.loaded) + len(self.missing) + len(self.mismatched)

    def summary(self, examples: int = 3) -> str:
        """One line: loaded / total, then missing, unexpected and shape-mismatch counts with a few names each."""
        def shape(s: Iterable[int] | None) -> str:
            return "[" + ", ".join(str(d) for d in s) + "]" if s is not None else "?"

        def some(names: list[str]) -> str:
            more = f", … {len(names) - examples} more" if len(names) > examples else ""
            return ", ".join(names[:examples]) + more

        parts = [f"checkpoint {self.source} matches {len(self.loaded)} of {self.total} model keys"]
        if self.missing:
            parts.append(f"{len(self.missing)} missing ({some(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected ({some(self.unexpected)})")
        if self.mismatched:
            parts.append(f"{len(self.mismatched)} with another shape ("
                         + some([f"{k}: checkpoint {shape(c)} vs model {shape(m)}" for k, c, m in self.mismatched])
                         + ")")
        if self.ignored:
            parts.append(f"{len(self.ignored)} training-only or foreign keys ignored")
        hints = [n for n in self.notes if n.startswith("nothing loaded, but")]
        return "; ".join(parts + hints)

    def __repr__(self) -> str:
        return (f"LoadReport(source={self.source!r}, loaded={len(self.loaded)}, missing={len(self.missing)}, "
                f"unexpected={len(self.unexpected)}, mismatched={len(self.mismatched)}, ignored={len(self.ignored)})")

    def __str__(self) -> str:
        lines = [f"checkpoint {self.source}: loaded {len(self.loaded)} of {self.total} model keys"
                 + (" — all keys match" if self.ok else "")]

        def section(title: str, rows: list[str]) -> None:
            if not rows:
                return
            lines.append(f"  {title} ({len(rows)}):")
            lines.extend(f"    {r}" for r in rows[:_MAX_LISTED])
            if len(rows) > _MAX_LISTED:
                lines.append(f"    … and {len(rows) - _MAX_LISTED} more")

        def shape(s: Iterable[int] | None) -> str:
            return "[" + ", ".join(str(d) for d in s) + "]" if s is not None else "?"

        section("missing in checkpoint (left as initialised)",
                [f"{k} {shape(self.model_shapes.get(k))}" for k in self.missing])
        section("unexpected (in checkpoint, not in model)",
                [f"{k} {shape(self.checkpoint_shapes.get(k))}" for k in self.unexpected])
        section("shape mismatch (not loaded)",
                [f"{k}: checkpoint {shape(c)} vs model {shape(m)}" for k, c, m in self.mismatched])
        if self.ignored:
            groups: dict[str, int] = {}
            for k in self.ignored:
                top = k.split(".", 1)[0]
                groups[top + (".*" if "." in k else "")] = groups.get(top + (".*" if "." in k else ""), 0) + 1
            section("ignored (training-only or not part of this model)",
                    [f"{g} ({n} key{'s' if n != 1 else ''})" for g, n in groups.items()])
        section("notes", list(self.notes))
        return "\n".join(lines)


def _apply_prefix_map(key: str, prefix_map: Mapping[str, str]) -> str:
    for old in sorted(prefix_map, key=len, reverse=True):
        if key.startswith(old):
            return prefix_map[old] + key[len(old):]
    return key


def _frozen_bn_prefixes(model: nn.Module) -> set[str]:
    from .backbone import FrozenBatchNorm2d

    return {f"{name}." if name else "" for name, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)}


def load_checkpoint(model: nn.Module, source: str | os.PathLike | Mapping[str, Any], strict: bool = True,
                    prefix_map: Mapping[str, str] | None = None, name: str | None = None) -> LoadReport:
    """Load a checkpoint (path or state dict) into ``model``; return the key report.

    * Keys carrying a DDP ``module.`` prefix (all of them) are stripped; then ``prefix_map``
      ``{old prefix: new prefix}`` renames keys (longest matching prefix wins; ``""`` matches every key).
    * Training-only entries (``criterion.*``, ``optimizer``, ``scheduler``, ``iteration``, …) and anything under
      a top-level name the model does not have (``teacher.*``) are ignored and listed as such.
    * Shape mismatches are reported and not loaded; tensors are converted to the model's dtype.
    * A key the model holds under several names (shared tensors) counts as loaded when any name is given.
    * FrozenBN norms given only ``weight``/``bias`` (Caffe2-converted files) get identity statistics, as in
      detectron2.

    With ``strict=True`` (the default) a checkpoint that does not fit — anything missing, unexpected or of
    another shape — raises :class:`CheckpointError` with a one-line summary (``.report`` holds the full
    report) before the model is changed. ``strict=False`` asks for a partial load: what fits is loaded, the
    rest is only reported. Training-only and foreign entries (above) never make a checkpoint unfit.
    ``name`` labels the source in the report (default: the path, or ``<state dict>``).
    """
    notes: list[str] = []
    if isinstance(source, Mapping):
        label = "<state dict>"
        raw, more = _unwrap(source, label) if not any(isinstance(v, (torch.Tensor, np.ndarray))
                                                       for v in source.values()) else (dict(source), [])
        notes += more
    elif isinstance(source, (str, os.PathLike)):
        label = str(source)
        raw, more = _read(source)
        notes += more
    else:
        raise CheckpointError(f"load_checkpoint takes a checkpoint path or a state dict, not {type(source).__name__}")

    model_state = model.state_dict(keep_vars=True)
    model_keys = list(model_state)
    top_names = {k.split(".", 1)[0] for k in model_keys} | {n for n, _ in model.named_children()}
    non_persistent = {n for n, _ in model.named_buffers()} - set(model_keys)
    label = name or label
    report = LoadReport(source=label, model_shapes={k: tuple(v.shape) for k, v in model_state.items()})

    keys = [str(k) for k in raw if str(k).split(".", 1)[0] not in TRAINING_ONLY_PREFIXES]
    if keys and "module" not in top_names and all(k.startswith("module.") for k in keys):
        raw = {(str(k)[len("module."):] if str(k).startswith("module.") else k): v for k, v in raw.items()}
        notes.append("stripped the DDP 'module.' prefix from every key")
    if prefix_map:
        renamed: dict[str, Any] = {}
        for k, v in raw.items():
            renamed[_apply_prefix_map(str(k), prefix_map)] = v
        raw = renamed

    to_load: dict[str, torch.Tensor] = {}
    converted: dict[tuple[str, str], int] = {}
    for key, value in raw.items():
        key = str(key)
        top = key.split(".", 1)[0]
        if key not in model_state:
            if key in non_persistent:
                report.ignored.append(key)
                notes.append(f"{key} is a non-persistent buffer of the model; not loaded")
            elif top not in top_names or top in TRAINING_ONLY_PREFIXES:
                report.ignored.append(key)
            elif key.endswith("num_batches_tracked"):
                report.ignored.append(key)  # a BatchNorm step counter; FrozenBN has none
            else:
                report.unexpected.append(key)
                tensor = _to_tensor(value)
                if tensor is not None:
                    report.checkpoint_shapes[key] = tuple(tensor.shape)
            continue
        tensor = _to_tensor(value)
        if tensor is None:
            report.unexpected.append(key)
            notes.append(f"{key} holds a {type(value).__name__}, not a tensor")
            continue
        target = model_state[key]
        report.checkpoint_shapes[key] = tuple(tensor.shape)
        if tuple(tensor.shape) != tuple(target.shape):
            report.mismatched.append((key, tuple(tensor.shape), tuple(target.shape)))
            continue
        if tensor.dtype != target.dtype:
            converted[(str(tensor.dtype), str(target.dtype))] = converted.get((str(tensor.dtype), str(target.dtype)), 0) + 1
            tensor = tensor.to(target.dtype)
        to_load[key] = tensor

    # FrozenBN given weight/bias only: identity statistics are implied (detectron2 does the same).
    implied = 0
    for prefix in _frozen_bn_prefixes(model):
        if (prefix + "weight" in to_load or prefix + "bias" in to_load):
            for stat, fill in (("running_mean", torch.zeros_like), ("running_var", torch.ones_like)):
                k = prefix + stat
                if k in model_state and k not in to_load and k not in report.checkpoint_shapes:
                    to_load[k] = fill(model_state[k].detach(), device="cpu")
                    implied += 1
    if implied:
        notes.append(f"filled {implied} FrozenBN running statistics with identity values (the checkpoint stores "
                     "folded weight/bias only, as Caffe2-converted ones do)")

    # Shared tensors: a model key is covered when any key naming the same tensor is loaded.
    by_tensor: dict[int, list[str]] = {}
    for k, v in model_state.items():
        by_tensor.setdefault(id(v), []).append(k)
    mismatched_keys = {k for k, _, _ in report.mismatched}
    counters = 0
    for k, v in model_state.items():
        if k in to_load:
            report.loaded.append(k)
            continue
        aliases = by_tensor[id(v)]
        if any(a in to_load for a in aliases):
            report.loaded.append(k)
        elif k in mismatched_keys:
            continue
        elif k.endswith("num_batches_tracked"):
            counters += 1
        else:
            report.missing.append(k)
    for aliases in by_tensor.values():
        given = [a for a in aliases if a in to_load]
        if len(given) > 1 and any(not torch.equal(to_load[given[0]], to_load[a]) for a in given[1:]):
            notes.append(f"shared tensor given different values under {', '.join(given)}; the last one wins")

    if counters:
        notes.append(f"{counters} BatchNorm step counters (num_batches_tracked) not in the checkpoint; left as is")
    for (src, dst), n in converted.items():
        notes.append(f"converted {n} tensor{'s' if n != 1 else ''} from {src} to {dst}")
    if report.ignored and not report.loaded:
        hints = {}
        for k in report.ignored:
            for p in {f"{t}." for t in top_names}:
                if p + k in model_state:
                    hints[p] = hints.get(p, 0) + 1
        if hints:
            best = max(hints, key=hints.get)
            notes.append(f"nothing loaded, but {hints[best]} checkpoint keys match under {best!r}: try "
                         f"prefix_map={{'': {best!r}}}")
        if any("_" in k and "." not in k for k in report.ignored):
            notes.append("keys without dots (e.g. 'res2_0_branch2a_w') look like Caffe2 names, which are not "
                         "converted; use a detectron2-format (.pth) checkpoint")
    report.notes = notes

    if strict and not report.ok:
        raise CheckpointError(f"{report.summary()}; the checkpoint does not fit the model (a partial load, "
                              "which keeps the rest randomly initialised, needs --partial-load / strict=False)",
                              report)
    if to_load:
        result = model.load_state_dict(to_load, strict=False)
        for k in result.unexpected_keys:  # only a custom _load_from_state_dict could produce these
            if k not in report.unexpected:
                report.unexpected.append(k)
    return report


def shipped_weights(config: Any) -> Path | None:
    """The weights shipped for a preset (``weights/<preset>.safetensors``, e.g. the demo's), or None.

    ``config`` is a preset name or the path of a preset's YAML; any other config ships no weights.
    """
    if not isinstance(config, (str, os.PathLike)):
        return None
    from .config import PRESET_DIR

    text = str(config)
    path = Path(text)
    if not path.suffix and (PRESET_DIR / f"{text}.yaml").is_file():
        name = text
    elif path.suffix in (".yaml", ".yml") and path.is_file() and path.resolve().parent == PRESET_DIR.resolve():
        name = path.stem
    else:
        return None
    weights = WEIGHTS_DIR / f"{name}.safetensors"
    return weights if weights.is_file() else None
