"""Segment recomputation: the LRP forward keeps less for the backward and recomputes it there.

An explanation's memory is mostly the forward graph held for the backward (every tensor an op saves). With
recomputation, the forward of each *segment* — a module the adapter declares (a backbone block, an encoder
layer) — runs under ``torch.utils.checkpoint`` (non-reentrant): the graph's nodes are built as usual, so
every tensor of the forward stays a node of the one graph and relevance can be taken anywhere, but the
tensors the segment's ops save are dropped and recomputed from the segment's inputs when the backward first
needs them (one segment at a time), then freed again.

The rules must be the same during the recompute as in the forward, although the backward usually runs after
:func:`~.engine.lrp_mode` has restored the model: each call of a segment snapshots what the LRP mode set inside
it — the modules' rule ``forward``s, their parameter objects (folded batch norms), the parameters'
``requires_grad`` and the torch-function modes around the forward — and the recompute runs under that
snapshot, with the ledger's new entries discarded (the forward's leaves are the ones the backward reaches).
So the relevance is bit-identical to a run that keeps the graph; torch's determinism check compares the
recomputed tensors' shapes and dtypes as well.

Forward hooks inside a segment (an adapter's stop records, booked constants) cannot be replayed without
their side effects, so a segment containing one is refused; hooks on the segment module itself run outside
the recompute and are fine. Each backward recomputes the segments it crosses: one more forward of them per
backward pass (per target on CPUs, where targets are propagated one at a time).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.overrides import _get_current_function_mode_stack
from torch.utils.checkpoint import checkpoint

from .engine import EngineError, Ledger

__all__ = ["segment_names", "recompute_segments"]


def segment_names(recompute: bool | Sequence[str], declared: Sequence[str]) -> list[str]:
    """The segments to recompute: the adapter's ``declared`` ones for ``True``, none for ``False``, or the
    qualified module names given."""
    if isinstance(recompute, bool):
        if recompute and not declared:
            raise EngineError("recompute=True, but the model's adapter declares no segments (Adapter.segments); "
                              "pass the module names to recompute, e.g. recompute=['encoder.layers.0']")
        return list(declared) if recompute else []
    if isinstance(recompute, str):
        return [n.strip() for n in recompute.split(",") if n.strip()]
    return [str(n) for n in recompute]


@dataclass
class _State:
    """What the LRP mode set inside one segment: instance forwards, parameter objects, their grad flags."""

    forwards: list[tuple[nn.Module, Callable | None]]
    parameters: list[tuple[nn.Module, dict[str, Any]]]
    flags: list[tuple[torch.Tensor, bool]]
    modes: list[Any]  # torch-function modes active around the forward (they may change what ops save)


def _state(root: nn.Module) -> _State:
    inner = [m for m in root.modules() if m is not root]  # the root's forward is the segment's own callable
    modules = list(root.modules())
    return _State(
        forwards=[(m, m.__dict__.get("forward")) for m in inner],
        parameters=[(m, dict(m._parameters)) for m in modules],
        flags=[(p, p.requires_grad) for m in modules for p in m._parameters.values() if p is not None],
        modes=list(_get_current_function_mode_stack()),
    )


def _apply(state: _State) -> None:
    for module, forward in state.forwards:
        if forward is None:
            module.__dict__.pop("forward", None)
        else:
            module.__dict__["forward"] = forward
    for module, parameters in state.parameters:
        module.__dict__["_parameters"] = dict(parameters)
    for param, flag in state.flags:
        param.requires_grad_(flag)


@contextlib.contextmanager
def _replaying(root: nn.Module, snapshot: _State, ledger: Ledger) -> Iterator[None]:
    """The segment as the LRP forward saw it; the ledger's entries untouched; everything back on exit."""
    current = _state(root)
    entries = ledger.entries
    ledger.entries = []  # the recompute books fresh leaves the backward never reaches: not entries
    try:
        _apply(snapshot)
        with contextlib.ExitStack() as stack:
            # a mode is off inside its own handler (e.g. when it intercepted the autograd call): enter it again
            for mode in snapshot.modes:
                if not any(mode is active for active in _get_current_function_mode_stack()):
                    stack.enter_context(mode)
            yield
    finally:
        ledger.entries = entries
        _apply(current)


def _refuse_hooks(name: str, root: nn.Module) -> None:
    for inner_name, module in root.named_modules():
        if module is not root and (module._forward_hooks or module._forward_pre_hooks):
            raise EngineError(f"cannot recompute segment {name!r}: {name}.{inner_name} has forward hooks (a stop or "
                              "a booked input inside the segment); recompute smaller segments or none there")


def _segment_forward(name: str, root: nn.Module, inner: Callable, ledger: Ledger) -> Callable:
    def forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return inner(*args, **kwargs)
        _refuse_hooks(name, root)
        snapshot = _state(root)
        calls = [0]

        def run(*a: Any, **kw: Any) -> Any:
            calls[0] += 1
            if calls[0] == 1:  # the forward itself, under the LRP mode
                return inner(*a, **kw)
            with _replaying(root, snapshot, ledger):
                return inner(*a, **kw)

        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    return forward


@contextlib.contextmanager
def recompute_segments(model: nn.Module, names: Sequence[str], ledger: Ledger) -> Iterator[None]:
    """For the forwards run inside, each named module of ``model`` keeps no graph tensors; they are recomputed
    in the backward under the rules of the forward (see the module docstring). Enter it after the LRP mode."""
    if not names:
        yield
        return
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise EngineError(f"no module {unknown[0]!r} to recompute in {type(model).__name__}; "
                          "name modules as model.named_modules() does")
    ordered = sorted(set(names))
    for name in ordered:
        parts = name.split(".")
        outer = next((p for p in ("", *(".".join(parts[:i]) for i in range(1, len(parts)))) if p in ordered
                      and p != name), None)
        if outer is not None:
            raise EngineError(f"recompute segments {outer or '<the model>'!r} and {name!r} overlap; "
                              "name disjoint modules")
    saved = []
    try:
        for name in ordered:
            module = modules[name]
            saved.append((module, module.__dict__.get("forward")))
            module.__dict__["forward"] = _segment_forward(name, module, module.forward, ledger)
        yield
    finally:
        for module, forward in saved:
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = forward
