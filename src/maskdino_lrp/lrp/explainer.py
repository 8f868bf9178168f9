"""``LRP(model).explain(image, ...)``: one LRP forward, one chunked batched backward, relevance at every stop.

The model's adapter (``maskdino_lrp.adapters``) says where the stops are, what the ledger books and how
outputs are read; this module only turns stop records into autograd inputs and reduces relevance.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from .composites import Composite, get_composite
from .engine import LEDGER_CATEGORIES, EngineError, LedgerEntry, LRPState, compact_saves, lrp_mode, trimmed_heap
from .explanation import Explanation, Level
from .recompute import recompute_segments, segment_names
from .rules import PixelInput, stabilize
from .targets import TargetFn, get_target, parse_queries, select_queries

if TYPE_CHECKING:
    from ..adapters.base import Adapter, Records, StopTensor

# the stop vocabulary of the DETR family, input → output (an adapter offers the ones its model has, in this order)
STOPS = ("pixels", "backbone", "encoder_input", "encoder_layers", "memory", "mask_features", "query_init",
         "decoder_layers")
# the memory estimate's default (MaskDINO's); explain() defaults to the model's adapter's ``default_stops``
DEFAULT_STOPS = ("pixels", "encoder_input", "memory")


@dataclass
class _Probe:
    """One autograd input and how its relevance (K, *shape) reduces: ``reductions[name](relevance)``."""

    tensor: torch.Tensor
    reductions: dict[str, Callable[[torch.Tensor], torch.Tensor]]
    record: "StopTensor | LedgerEntry | None" = None  # None: the pixel probe


def _reductions(layout: str, keep_channels: bool) -> dict[str, Callable]:
    """Relevance rows (K, *shape) → per-token / per-position maps (and per-channel rows) for one layout."""
    if layout == "map":  # (K, B=1, C, h, w) -> (K, h, w)
        return {"map": lambda r: r.sum(2)[:, 0]}
    if layout == "tokens":  # (K, B=1, T, C) -> (K, T)
        out = {"map": lambda r: r.sum(-1)[:, 0]}
        return {**out, "channels": lambda r: r[:, 0]} if keep_channels else out
    if layout == "sequence_first":  # (K, T, B=1, C) -> (K, T)
        out = {"map": lambda r: r.sum(-1)[:, :, 0]}
        return {**out, "channels": lambda r: r[:, :, 0]} if keep_channels else out
    raise EngineError(f"unknown stop layout {layout!r}")


@dataclass
class Session:
    """One image after the LRP forward: prepare → forward → backward (as often as needed) → cleanup."""

    lrp: "LRP"
    prepared: Any
    outputs: dict
    state: LRPState
    records: "Records"
    probe: torch.Tensor
    detections: Any
    levels: list[Level]
    forward_seconds: float
    _closed: bool = field(default=False, repr=False)

    def backward(self, queries: Any = "topk:5", target: str | TargetFn = "class",
                 stops: Sequence[str] | None = None, retain_graph: bool = True) -> Explanation:
        """Relevance of the chosen queries' targets at the chosen stops (chunked, batched backward).

        ``stops=None``: the adapter's ``default_stops``. The graph is kept for further calls unless
        ``retain_graph=False`` (the last call).
        """
        if self._closed:
            raise EngineError("this session was cleaned up; call LRP.prepare(image) again")
        adapter = self.lrp.adapter
        stops = _check_stops(adapter.default_stops if stops is None else stops, adapter.stops)
        target_name, target_fn = get_target(target)
        logits = self.outputs["pred_logits"][0].detach()
        qs, labels = select_queries(parse_queries(queries), self.detections, logits.shape[0], logits)
        if qs.numel() == 0:
            raise EngineError(f"query selection {queries!r} selected no query (no detection passes it); "
                              "try topk:N or explicit indices")
        values = target_fn(self.outputs, qs, labels)
        if values.shape != qs.shape:
            raise EngineError(f"target {target_name!r} must return one value per query, got shape {tuple(values.shape)}")
        if not values.requires_grad:
            raise EngineError(f"target {target_name!r} does not depend on the model's computation graph")
        start = time.perf_counter()
        probes = self._probes(stops)
        seeds = torch.eye(values.numel(), dtype=values.dtype, device=values.device)
        results = _batched_relevance(values, seeds, probes, self.lrp.chunk_size, retain_graph, self.lrp.batch_mode)
        backward_seconds = time.perf_counter() - start
        relevance, channels = _collect(probes, results)
        conservation = self._conservation(values.detach(), probes, results, stops)
        return Explanation(
            queries=qs, labels=labels, target=target_name, target_values=values.detach(), relevance=relevance,
            levels=self.levels, conservation=conservation,
            detections=self.lrp.adapter.describe(self.lrp.model, self.outputs, self.prepared, qs, labels),
            image=self.prepared.rgb, input_size=tuple(self.prepared.resized_size),
            composite=self.lrp.composite.name, channel_relevance=channels,
            meta={"forward_seconds": self.forward_seconds, "backward_seconds": backward_seconds,
                  "num_queries_total": int(logits.shape[0])},
        )

    # ------------------------------------------------------------------ stops → autograd inputs
    def _probes(self, stops: Sequence[str], ledger: bool = True) -> list[_Probe]:
        """The tensors to take relevance at (stops in the adapter's order, then the ledger in scope)."""
        adapter = self.lrp.adapter
        rh, rw = self.prepared.resized_size
        probes = []
        for stop in adapter.stops:
            if stop not in stops:
                continue
            if stop == "pixels":
                probes.append(_Probe(self.probe, {
                    "map": lambda r: r.sum(2)[:, 0, :rh, :rw],
                    "padding": lambda r: r.sum((1, 2, 3, 4)) - r.sum(2)[:, 0, :rh, :rw].sum((1, 2))}))
                continue
            for record in adapter.stop_tensors(self.records, stop, self.levels):
                probes.append(_Probe(record.tensor, _reductions(record.layout, self.lrp.keep_channels), record))
        if ledger:
            in_scope = adapter.ledger_scope(stops)
            for entry in self.state.ledger.entries:
                # a module called several times (a shared norm, a per-level encoding) books one entry per call
                if in_scope(entry):
                    probes.append(_Probe(entry.tensor, {"sum": lambda r: r.flatten(1).sum(1)}, entry))
        return probes

    # ------------------------------------------------------------------ report
    def _conservation(self, values: torch.Tensor, probes: list[_Probe], results: list[dict[str, torch.Tensor]],
                      stops: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
        """Per complete cut: target, relevance at the cut, what each ledger category took, the residual."""
        booked = [(p.record, r["sum"]) for p, r in zip(probes, results) if isinstance(p.record, LedgerEntry)]

        def row(total: torch.Tensor, in_cut: Callable[[LedgerEntry], bool]) -> dict[str, torch.Tensor]:
            out = {"target": values, "total": total}
            for category in LEDGER_CATEGORIES:
                out[category] = torch.zeros_like(values)
                for entry, value in booked:
                    if entry.category == category and in_cut(entry):
                        out[category] = out[category] + value
            out["residual"] = values - total - out["bias"] - out["embeddings"] - out["positional"]
            return out

        report = {}
        if "pixels" in stops:
            pixels = next(r for p, r in zip(probes, results) if p.record is None)
            report["pixels"] = row(pixels["map"].flatten(1).sum(1) + pixels["padding"], lambda entry: True)
            report["pixels"]["padding"] = pixels["padding"]
        for cut in self.lrp.adapter.cuts(self.records):
            if not all(s in stops for s in cut.stops):
                continue
            total = sum(r["map"].flatten(1).sum(1) for p, r in zip(probes, results)
                        if p.record is not None and not isinstance(p.record, LedgerEntry) and p.record.key in cut.keys)
            report[cut.name] = row(total, cut.ledger)
        return report

    def propagate(self, relevance: torch.Tensor, stops: Sequence[str] = ("encoder_input",),
                  retain_graph: bool = True) -> dict[str, torch.Tensor]:
        """Encoder-only mode: relevance given at the encoder output (memory) tokens → relevance at ``stops``.

        ``relevance`` is (K, T) per token (e.g. ``Explanation.relevance["memory"]`` of a decoder-only
        run) or (K, T, C) per channel. Token relevance is split over a token's channels in proportion to
        their absolute activations. Returns {stop: (K, …)} like :attr:`Explanation.relevance` (and
        ``channels:<stop>`` rows with ``keep_channels``); the sum is conserved up to what the encoder's
        biases and non-conservative rules take.
        """
        adapter = self.lrp.adapter
        memory = adapter.encoder_output(self.records)  # (B=1, T, C)
        x = memory.detach()[0]
        if tuple(relevance.shape[1:]) not in (tuple(x.shape), tuple(x.shape[:1])):
            raise EngineError(f"relevance must be (K, {x.shape[0]}) or (K, {x.shape[0]}, {x.shape[1]}), "
                              f"got {tuple(relevance.shape)}")
        if relevance.dim() == 2:
            share = x.abs() / x.abs().sum(-1, keepdim=True).clamp_min(1e-30)
            relevance = relevance[..., None] * share[None]
        seeds = (relevance / stabilize(x, 1e-12)[None])[:, None].to(x.dtype)  # (K, 1, T, C): g = R / x
        stops = _check_stops(stops, adapter.stops)
        beyond = [s for s in stops if s not in adapter.encoder_stops]
        if beyond:
            raise EngineError("propagate() goes from the encoder output towards the input; "
                              f"choose stops among {', '.join(adapter.encoder_stops)}")
        probes = self._probes(stops, ledger=False)
        results = _batched_relevance(memory, seeds, probes, self.lrp.chunk_size, retain_graph, self.lrp.batch_mode)
        relevance_at, channels = _collect(probes, results)
        return {**relevance_at, **{f"channels:{k}": v for k, v in channels.items()}}

    def cleanup(self) -> None:
        """Release the graph and recorded tensors."""
        self.outputs.clear()
        self.records.tensors.clear()
        self.state.ledger.entries.clear()
        self._closed = True


def _collect(probes: list[_Probe], results: list[dict[str, torch.Tensor]]
             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(relevance by key, per-channel relevance by key) from the stop probes' reductions.

    Records that share a key (the per-level maps of one token sequence) are flattened and concatenated
    in level order, after the other keys.
    """
    relevance: dict[str, torch.Tensor] = {}
    channels: dict[str, torch.Tensor] = {}
    sequences: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for probe, result in zip(probes, results):
        record = probe.record
        if isinstance(record, LedgerEntry):
            continue
        key = "pixels" if record is None else record.key
        if record is not None and record.level is not None:
            sequences.setdefault(key, []).append((record.level, result["map"].flatten(1)))
            continue
        relevance[key] = result["map"]
        if "channels" in result:
            channels[key] = result["channels"]
    for key, parts in sequences.items():  # (K, T) in the encoder's level order
        relevance[key] = torch.cat([t for _, t in sorted(parts, key=lambda part: part[0])], dim=1)
    return relevance, channels


def _check_stops(stops: Sequence[str] | str, allowed: Sequence[str] = STOPS) -> tuple[str, ...]:
    if isinstance(stops, str):
        stops = [s.strip() for s in stops.split(",") if s.strip()]
    bad = [s for s in stops if s not in allowed]
    if bad:
        raise EngineError(f"unknown stop {bad[0]!r}; stops: {', '.join(allowed)}")
    if not stops:
        raise EngineError(f"no stops given; choose from {', '.join(allowed)}")
    return tuple(stops)


def _widen(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def _grads(outputs: torch.Tensor, inputs: list[torch.Tensor], rows: torch.Tensor, keep: bool,
           batch_mode: str) -> list[torch.Tensor | None]:
    """Gradients (len(rows), *input.shape) of ``outputs`` seeded by each row, by one batched or one plain backward."""
    if batch_mode == "loop":
        grads = torch.autograd.grad(outputs, inputs, grad_outputs=rows[0], retain_graph=keep, allow_unused=True)
        return [None if g is None else g[None] for g in grads]
    return list(torch.autograd.grad(outputs, inputs, grad_outputs=rows, is_grads_batched=True,
                                    retain_graph=keep, allow_unused=True))


def _batched_relevance(outputs: torch.Tensor, seeds: torch.Tensor, probes: list[_Probe], chunk_size: int | None,
                       retain_graph: bool = False, batch_mode: str = "vmap") -> list[dict[str, torch.Tensor]]:
    """Relevance (gradient × input) at every probe for each row of ``seeds`` (K, *outputs.shape), reduced.

    For scalar targets ``outputs`` is (K,) and ``seeds`` the identity. ``batch_mode="vmap"``: one
    ``is_grads_batched`` backward per chunk of rows; ``"loop"``: one plain backward per row. Both give
    the same numbers; on CPUs the loop is faster (vmap's batching rules add overhead), on GPUs vmap.
    Returns one {reduction name: (K, …)} per probe.
    """
    k = seeds.shape[0]
    chunk = 1 if batch_mode == "loop" else (k if not chunk_size else max(1, int(chunk_size)))
    inputs = [p.tensor for p in probes]
    pieces: list[dict[str, list[torch.Tensor]]] = [{name: [] for name in p.reductions} for p in probes]
    for begin in range(0, k, chunk):
        rows = seeds[begin: begin + chunk]
        keep = retain_graph or begin + chunk < k
        with compact_saves():  # a recomputed segment must save what the forward saved
            grads = _grads(outputs, inputs, rows, keep, batch_mode)
        for probe, parts, x, g in zip(probes, pieces, inputs, grads):
            if g is None:
                g = torch.zeros((rows.shape[0], *x.shape), dtype=x.dtype, device=x.device)
            relevance = x.detach()[None] * g
            for name, reduce in probe.reductions.items():
                # reduced-precision runs report in float32 (NumPy has no bfloat16); the device stays
                parts[name].append(_widen(reduce(relevance).detach()))
        del grads
    return [{name: torch.cat(chunks) for name, chunks in parts.items()} for parts in pieces]


DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise EngineError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and floating dtype of the model's parameters (the input is brought to them)."""
    for param in model.parameters():
        if param.is_floating_point():
            return param.device, param.dtype
    return torch.device("cpu"), torch.get_default_dtype()


class LRP:
    """Layer-wise Relevance Propagation for a detector the adapters know (MaskDINO first).

    The adapter is found from the model (``maskdino_lrp.adapters.find_adapter``) unless given.
    ``recompute=True`` keeps no forward graph inside the adapter's segments (``Adapter.segments``; or give
    module names): the backward recomputes them, the same relevance for less memory (:mod:`.recompute`).
    ``device`` / ``dtype`` move the model (bfloat16 / float16: autocast forward); ``trim_heap=True`` returns
    the C heap's free pages after each module of the forward (CPUs, glibc; :func:`.engine.trimmed_heap`).

    >>> lrp = LRP(model, composite="default")
    >>> explanation = lrp.explain("image.png", queries="topk:5", target="class", stops=["pixels", "memory"])
    """

    def __init__(self, model: nn.Module, composite: str | Composite = "default", chunk_size: int | None = 16,
                 keep_channels: bool = False, batch_mode: str = "auto", adapter: "Adapter | None" = None,
                 recompute: bool | Sequence[str] = False, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, trim_heap: bool = False):
        if adapter is None:
            from ..adapters import ADAPTERS, find_adapter

            adapter = find_adapter(model)
            if adapter is None:
                raise EngineError(f"{type(model).__name__} is not a model the engine recognises: no adapter matches "
                                  f"it (adapters: {', '.join(ADAPTERS)}); pass adapter=, or build a MaskDINO with "
                                  "maskdino_lrp.build_model")
        adapter.check(model)
        self.adapter = adapter
        if batch_mode not in ("auto", "vmap", "loop"):
            raise EngineError(f"batch_mode must be 'auto', 'vmap' or 'loop', got {batch_mode!r}")
        self.model = model.eval()
        dtype = _dtype(dtype)
        # bfloat16 / float16: the forward under autocast (weights stay as they are, as in mixed-precision
        # inference; MaskDINO's pixel decoder up-casts as officially), the backward in the forward's dtypes
        self.autocast = dtype if dtype in (torch.bfloat16, torch.float16) else None
        if device is not None or (dtype is not None and self.autocast is None):
            self.model.to(device=device, dtype=None if self.autocast else dtype)  # in place, as nn.Module.to
        self.device, self.dtype = _placement(self.model)
        self.composite = get_composite(composite)
        self.chunk_size = chunk_size
        self.keep_channels = keep_channels
        if batch_mode == "auto":  # measured: vmap's batching overhead outweighs its gain on CPUs
            batch_mode = "vmap" if self.device.type == "cuda" else "loop"
        self.batch_mode = batch_mode
        # segments whose forward graph is recomputed in the backward instead of kept (lrp/recompute.py)
        self.segments = segment_names(recompute, adapter.segments(model))
        self.trim_heap = trim_heap  # engine.trimmed_heap: lower peak resident memory on CPUs (glibc)

    def prepare(self, image: Any, channel_order: str = "RGB") -> Session:
        """Pre-process ``image`` and run the LRP forward; returns a session for :meth:`Session.backward`."""
        adapter = self.adapter
        prepared = adapter.prepare(self.model, image, channel_order)
        x = prepared.tensor.to(device=self.device, dtype=self.dtype)
        probe = torch.ones_like(x, requires_grad=True)  # gradient × input at the probe = pixel relevance
        pixels = PixelInput(x, probe, *adapter.input_bounds(self.model, x))
        start = time.perf_counter()
        with torch.enable_grad(), torch.autocast(self.device.type, self.autocast or torch.bfloat16,
                                                 enabled=self.autocast is not None), \
                lrp_mode(self.model, self.composite, pixels, adapter) as state, \
                adapter.record(self.model, state.ledger) as records, \
                recompute_segments(self.model, self.segments, state.ledger), \
                trimmed_heap(self.trim_heap and self.device.type == "cpu"):
            outputs = adapter.forward(self.model, x * probe, records)
        forward_seconds = time.perf_counter() - start
        detections = adapter.postprocess(self.model, outputs, prepared)
        levels = adapter.levels(records, x)
        return Session(self, prepared, outputs, state, records, probe, detections, levels, forward_seconds)

    def explain(self, image: Any, queries: Any = "topk:5", target: str | TargetFn = "class",
                stops: Sequence[str] | None = None, channel_order: str = "RGB") -> Explanation:
        """Explain the chosen queries of ``image``: prepare, forward, backward, cleanup in one call.

        ``stops=None``: the model's adapter's ``default_stops`` (the stops its model has, e.g. no ``memory`` for
        an encoder-only YOLOS)."""
        session = self.prepare(image, channel_order)
        try:
            return session.backward(queries, target, stops, retain_graph=False)
        finally:
            session.cleanup()
