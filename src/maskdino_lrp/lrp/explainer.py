"""``LRP(model).explain(image, ...)``: one LRP forward, one chunked batched backward, relevance at every stop."""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..model.pixel_decoder import encoder_call_inputs
from .composites import Composite, get_composite
from .engine import EngineError, LRPState, PixelInput, lrp_mode
from .explanation import Explanation, Level
from .targets import TargetFn, get_target, parse_queries, select_queries

log = logging.getLogger(__name__)

STOPS = ("pixels", "backbone", "encoder_input", "encoder_layers", "memory", "mask_features", "query_init",
         "decoder_layers")
DEFAULT_STOPS = ("pixels", "encoder_input", "memory")
# where relevance is complete: every path from the target to the pixels crosses each of these sets once
CUTS = {
    "pixels": ("pixels",),
    "backbone": ("backbone",),
    # the decoder's memory and the FPN's lateral (res2) features: mask_features is computed from both
    "memory": ("memory",),
}
# ledger entries downstream of the memory cut: the decoder, and the FPN convs after the lateral ones
_AFTER_MEMORY = (_PREDICTOR := "sem_seg_head.predictor", "sem_seg_head.pixel_decoder.layer_",
                 "sem_seg_head.pixel_decoder.mask_features")


def _check_model(model: nn.Module) -> None:
    needed = ("backbone", "sem_seg_head", "prepare")
    missing = [n for n in needed if not hasattr(model, n)]
    if missing or not hasattr(model.sem_seg_head, "predictor") or not hasattr(model.sem_seg_head, "pixel_decoder"):
        raise EngineError(
            f"{type(model).__name__} is not a model the engine recognises: it needs a MaskDINO layout "
            "(backbone, sem_seg_head.pixel_decoder, sem_seg_head.predictor, prepare()); "
            "build one with maskdino_lrp.build_model"
        )


@contextlib.contextmanager
def _record_stops(model: nn.Module, state: LRPState) -> Iterator[None]:
    """Forward hooks that record the tensors at every stop and turn positional inputs into ledger leaves."""
    rec = state.records
    rec.update(encoder_layers=[], decoder_layers=[])
    head = model.sem_seg_head
    encoder = head.pixel_decoder.transformer.encoder
    decoder = head.predictor.decoder
    handles = []

    def on_backbone(_m, _args, out):
        rec["backbone"] = dict(out)

    def on_pos(_m, _args, out):  # sine position encoding of the encoder: a constant input
        return state.ledger.track("positional", "sem_seg_head.pixel_decoder.pe_layer", out)

    def on_encoder(_m, args, kwargs):
        rec["encoder_input"], shapes = encoder_call_inputs(args, kwargs)
        rec["spatial_shapes"] = [tuple(int(v) for v in s) for s in shapes]

    def on_predictor(_m, args, kwargs):
        rec["memory"] = list(args[0] if args else kwargs["x"])
        rec["mask_features"] = args[1] if len(args) > 1 else kwargs["mask_features"]

    def on_decoder(_m, args, kwargs):
        rec["query_init"] = args[0] if args else kwargs["tgt"]

    def on_ref_head(_m, args):  # sine embedding of (detached) reference boxes: positional
        return (state.ledger.track("positional", f"{_PREDICTOR}.decoder.ref_point_head.input", args[0]),) + args[1:]

    def on_box_reference(_m, _args, out):  # the box a layer refines: positional, not content
        return state.ledger.track("positional", f"{_PREDICTOR}.box_reference", out)

    def on_lateral(_m, _args, out):
        rec.setdefault("lateral", []).append(out)

    def on_decoder_norm(_m, _args, out):  # (Q, B, C); the last call is the final prediction head's
        rec["decoder_embedding"] = out.transpose(0, 1)

    handles.append(model.backbone.register_forward_hook(on_backbone))
    handles.append(head.pixel_decoder.pe_layer.register_forward_hook(on_pos))
    handles.append(encoder.register_forward_pre_hook(on_encoder, with_kwargs=True))
    for layer in encoder.layers:
        handles.append(layer.register_forward_hook(lambda _m, _a, out: rec["encoder_layers"].append(out)))
    handles.append(head.predictor.register_forward_pre_hook(on_predictor, with_kwargs=True))
    handles.append(decoder.register_forward_pre_hook(on_decoder, with_kwargs=True))
    for layer in decoder.layers:
        handles.append(layer.register_forward_hook(
            lambda _m, _a, out: rec["decoder_layers"].append(out[0] if isinstance(out, tuple) else out)))
    if getattr(decoder, "ref_point_head", None) is not None:
        handles.append(decoder.ref_point_head.register_forward_pre_hook(on_ref_head))
    handles.append(head.predictor.decoder_norm.register_forward_hook(on_decoder_norm))
    if hasattr(head.predictor, "box_reference"):
        handles.append(head.predictor.box_reference.register_forward_hook(on_box_reference))
    for name, module in head.pixel_decoder.named_children():
        if name.startswith("adapter_"):
            handles.append(module.register_forward_hook(on_lateral))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class Session:
    """One image after the LRP forward: the prototype's prepare → forward → backward → cleanup flow."""

    lrp: "LRP"
    prepared: Any
    outputs: dict
    state: LRPState
    probe: torch.Tensor
    detections: Any
    levels: list[Level]
    forward_seconds: float
    _closed: bool = field(default=False, repr=False)

    def backward(self, queries: Any = "topk:5", target: str | TargetFn = "class",
                 stops: Sequence[str] = DEFAULT_STOPS, retain_graph: bool = True) -> Explanation:
        """Relevance of the chosen queries' targets at the chosen stops (chunked, batched backward).

        The graph is kept for further calls unless ``retain_graph=False`` (the last call).
        """
        if self._closed:
            raise EngineError("this session was cleaned up; call LRP.prepare(image) again")
        stops = _check_stops(stops)
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
        inputs, reducers = self._inputs(stops)
        seeds = torch.eye(values.numel(), dtype=values.dtype, device=values.device)
        sums = _batched_relevance(values, seeds, inputs, reducers, self.lrp.chunk_size, retain_graph,
                                  self.lrp.batch_mode)
        backward_seconds = time.perf_counter() - start
        relevance = {k: v for k, v in sums.items() if not k.startswith(("ledger:", "channels:", "padding", "memory@"))}
        memory = [sums[k] for k in sorted((k for k in sums if k.startswith("memory@")), key=lambda k: int(k[7:]))]
        if memory:  # the decoder's memory maps, flattened in the encoder's level order: (K, T)
            relevance["memory"] = torch.cat(memory, dim=1)
        channels = {k[len("channels:"):]: v for k, v in sums.items() if k.startswith("channels:")}
        conservation = self._conservation(values.detach(), sums, stops)
        return Explanation(
            queries=qs, labels=labels, target=target_name, target_values=values.detach(), relevance=relevance,
            levels=self.levels, conservation=conservation, detections=self._query_info(qs, labels),
            image=self.prepared.rgb, input_size=tuple(self.prepared.resized_size),
            composite=self.lrp.composite.name, channel_relevance=channels,
            meta={"forward_seconds": self.forward_seconds, "backward_seconds": backward_seconds,
                  "num_queries_total": int(logits.shape[0])},
        )

    # ------------------------------------------------------------------ stops → autograd inputs
    def _inputs(self, stops: Sequence[str]) -> tuple[list[torch.Tensor], list[dict[str, Callable]]]:
        """The tensors to take relevance at, each with the reductions (by output key) applied to it."""
        rec = self.state.records
        rh, rw = self.prepared.resized_size
        inputs: list[torch.Tensor] = []
        reducers: list[dict[str, Callable]] = []
        keep_channels = self.lrp.keep_channels

        def add(tensor: torch.Tensor, **reductions: Callable) -> None:
            inputs.append(tensor)
            reducers.append(reductions)

        def tokens(key: str, tensor: torch.Tensor, batch_first: bool) -> None:
            # encoder tensors are (B, T, C), decoder tensors (T, B, C); relevance rows are (k, *shape)
            per_token = (lambda r: r.sum(-1)[:, 0]) if batch_first else (lambda r: r.sum(-1)[:, :, 0])
            extra = {f"channels:{key}": (lambda r: r[:, 0]) if batch_first else (lambda r: r[:, :, 0])}
            add(tensor, **{key: per_token}, **(extra if keep_channels else {}))

        spatial = lambda r: r.sum(2)[:, 0]  # (k, B=1, C, h, w) -> (k, h, w)
        if "pixels" in stops:
            add(self.probe, pixels=lambda r: r.sum(2)[:, 0, :rh, :rw],
                padding=lambda r: r.sum((1, 2, 3, 4)) - r.sum(2)[:, 0, :rh, :rw].sum((1, 2)))
        if "backbone" in stops:
            for name, t in rec["backbone"].items():
                add(t, **{f"backbone.{name}": spatial})
        if "encoder_input" in stops:
            tokens("encoder_input", rec["encoder_input"], batch_first=True)
        if "encoder_layers" in stops:
            for i, t in enumerate(rec["encoder_layers"]):
                tokens(f"encoder_layer{i}", t, batch_first=True)
        if "memory" in stops:
            for level_index, t in self._memory_order():
                add(t, **{f"memory@{level_index}": lambda r: spatial(r).flatten(1)})
            for i, t in enumerate(rec.get("lateral", [])):
                add(t, **{f"lateral{i}": spatial})
        if "mask_features" in stops:
            add(rec["mask_features"], mask_features=spatial)
        if "query_init" in stops:
            tokens("query_init", rec["query_init"], batch_first=False)
        if "decoder_layers" in stops:
            for i, t in enumerate(rec["decoder_layers"]):
                tokens(f"decoder_layer{i}", t, batch_first=False)
        for i, (category, name, leaf) in enumerate(self._ledger_for(stops)):
            # a module called several times (a shared norm, a per-level encoding) tracks one leaf per call
            add(leaf, **{f"ledger:{category}:{name}#{i}": lambda r: r.flatten(1).sum(1)})
        return inputs, reducers

    def _memory_order(self) -> list[tuple[int, torch.Tensor]]:
        """Decoder memory maps matched to encoder levels by size (the decoder reverses level order)."""
        maps = self.state.records["memory"]
        out = []
        for i, lv in enumerate(self.levels):
            match = [t for t in maps if tuple(t.shape[-2:]) == (lv.height, lv.width)]
            if match:
                out.append((i, match[0]))
        return out

    def _ledger_for(self, stops: Sequence[str]):
        """Ledger leaves downstream of the deepest requested stop (so autograd goes no deeper than asked)."""
        entries = self.state.ledger.entries
        if "pixels" in stops:
            return entries
        if any(s in stops for s in ("backbone", "encoder_input", "encoder_layers")):
            return [e for e in entries if not e[1].startswith("backbone.")]
        return [e for e in entries if e[1].startswith(_AFTER_MEMORY)]

    # ------------------------------------------------------------------ report
    def _conservation(self, values: torch.Tensor, sums: dict[str, torch.Tensor], stops) -> dict[str, dict[str, torch.Tensor]]:
        def ledger(category: str, exclude: tuple[str, ...] = (), only: tuple[str, ...] | None = None) -> torch.Tensor:
            total = torch.zeros_like(values)
            for key, v in sums.items():
                if not key.startswith(f"ledger:{category}:"):
                    continue
                name = key.split(":", 2)[2].rsplit("#", 1)[0]
                if name.startswith(exclude) or (only is not None and not name.startswith(only)):
                    continue
                total = total + v
            return total

        report = {}
        for cut, needed in CUTS.items():
            if not all(s in stops for s in needed):
                continue
            if cut == "pixels":
                total = sums["pixels"].flatten(1).sum(1) + sums["padding"]
                kw: dict = {}
            elif cut == "backbone":
                # backbone stages are chained: the shallowest feature already carries everything above it
                first = min((k for k in sums if k.startswith("backbone.")), key=lambda k: int(k[-1]))
                total = sums[first].flatten(1).sum(1)
                kw = {"exclude": ("backbone.stem",) + tuple(f"backbone.res{i}." for i in range(2, int(first[-1]) + 1))}
            else:
                total = sum(v.flatten(1).sum(1) for k, v in sums.items() if k.startswith(("memory@", "lateral")))
                kw = {"only": _AFTER_MEMORY}
            row = {"target": values, "total": total}
            for category in ("bias", "embeddings", "positional"):
                row[category] = ledger(category, **kw)
            row["residual"] = values - total - row["bias"] - row["embeddings"] - row["positional"]
            if cut == "pixels":
                row["padding"] = sums["padding"]
            report[cut] = row
        return report

    def _query_info(self, qs: torch.Tensor, labels: torch.Tensor) -> list[dict]:
        model = self.lrp.model
        out = self.outputs
        masks = model.masks_to_image(out["pred_masks"][0, qs].detach(), self.prepared)
        boxes = model.boxes_to_image(out["pred_boxes"][0, qs].detach(), self.prepared)
        cls = out["pred_logits"][0, qs, labels].detach().sigmoid()
        binary = masks > 0
        mask_score = (masks.sigmoid().flatten(1) * binary.flatten(1)).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
        names = getattr(model, "class_names", [])
        info = []
        for i, (q, label) in enumerate(zip(qs.tolist(), labels.tolist())):
            info.append({
                "query": q, "label": label, "class": names[label] if label < len(names) else str(label),
                "class_score": float(cls[i]), "score": float(cls[i] * mask_score[i]),
                "box": [float(v) for v in boxes[i]], "mask": binary[i].cpu().numpy(),
            })
        return info

    def propagate(self, relevance: torch.Tensor, stops: Sequence[str] = ("encoder_input",),
                  retain_graph: bool = True) -> dict[str, torch.Tensor]:
        """Encoder-only mode: relevance given at the encoder output (memory) tokens → relevance at ``stops``.

        ``relevance`` is (K, T) per token (e.g. ``Explanation.relevance["memory"]`` of a decoder-only
        run) or (K, T, C) per channel. Token relevance is split over a token's channels in proportion to
        their absolute activations. Returns {stop: (K, …)} like :attr:`Explanation.relevance`; the sum
        is conserved up to what the encoder's biases and non-conservative rules take.
        """
        memory = self.state.records["encoder_layers"][-1]  # (B=1, T, C)
        x = memory.detach()[0]
        if tuple(relevance.shape[1:]) not in (tuple(x.shape), tuple(x.shape[:1])):
            raise EngineError(f"relevance must be (K, {x.shape[0]}) or (K, {x.shape[0]}, {x.shape[1]}), "
                              f"got {tuple(relevance.shape)}")
        if relevance.dim() == 2:
            share = x.abs() / x.abs().sum(-1, keepdim=True).clamp_min(1e-30)
            relevance = relevance[..., None] * share[None]
        from .rules import stabilize
        seeds = (relevance / stabilize(x, 1e-12)[None])[:, None].to(x.dtype)  # (K, 1, T, C): g = R / x
        stops = _check_stops(stops)
        if any(s in stops for s in ("memory", "mask_features", "query_init", "decoder_layers")):
            raise EngineError("propagate() goes from the encoder output towards the input; "
                              "choose stops among pixels, backbone, encoder_input, encoder_layers")
        inputs, reducers = self._inputs(stops)
        keep = [i for i, reductions in enumerate(reducers) if not any(k.startswith("ledger:") for k in reductions)]
        sums = _batched_relevance(memory, seeds, [inputs[i] for i in keep], [reducers[i] for i in keep],
                                  self.lrp.chunk_size, retain_graph, self.lrp.batch_mode)
        return {k: v for k, v in sums.items() if k != "padding"}

    def cleanup(self) -> None:
        """Release the graph and recorded tensors."""
        self.outputs.clear()
        self.state.records.clear()
        self.state.ledger.entries.clear()
        self._closed = True


def _check_stops(stops: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(stops, str):
        stops = [s.strip() for s in stops.split(",") if s.strip()]
    bad = [s for s in stops if s not in STOPS]
    if bad:
        raise EngineError(f"unknown stop {bad[0]!r}; stops: {', '.join(STOPS)}")
    if not stops:
        raise EngineError(f"no stops given; choose from {', '.join(STOPS)}")
    return tuple(stops)


def _batched_relevance(outputs: torch.Tensor, seeds: torch.Tensor, inputs: list[torch.Tensor],
                       reducers: list[dict[str, Callable]], chunk_size: int | None, retain_graph: bool = False,
                       batch_mode: str = "vmap") -> dict[str, torch.Tensor]:
    """Relevance (gradient × input) at every input for each row of ``seeds`` (K, *outputs.shape).

    For scalar targets ``outputs`` is (K,) and ``seeds`` the identity. ``batch_mode="vmap"``: one
    ``is_grads_batched`` backward per chunk of rows; ``"loop"``: one plain backward per row. Both give
    the same numbers; on CPUs the loop is faster (vmap's batching rules add overhead), on GPUs vmap.
    """
    k = seeds.shape[0]
    chunk = 1 if batch_mode == "loop" else (k if not chunk_size else max(1, int(chunk_size)))
    pieces: dict[str, list[torch.Tensor]] = {key: [] for reductions in reducers for key in reductions}
    for begin in range(0, k, chunk):
        rows = seeds[begin: begin + chunk]
        keep = retain_graph or begin + chunk < k
        if batch_mode == "loop":
            grads = torch.autograd.grad(outputs, inputs, grad_outputs=rows[0], retain_graph=keep, allow_unused=True)
            grads = [None if g is None else g[None] for g in grads]
        else:
            grads = torch.autograd.grad(outputs, inputs, grad_outputs=rows, is_grads_batched=True,
                                        retain_graph=keep, allow_unused=True)
        for reductions, x, g in zip(reducers, inputs, grads):
            if g is None:
                g = torch.zeros((rows.shape[0], *x.shape), dtype=x.dtype, device=x.device)
            relevance = x.detach()[None] * g
            for key, reduce in reductions.items():
                pieces[key].append(reduce(relevance).detach())
        del grads
    return {key: torch.cat(parts) for key, parts in pieces.items()}


class LRP:
    """Layer-wise Relevance Propagation for a MaskDINO.

    >>> lrp = LRP(model, composite="default")
    >>> explanation = lrp.explain("image.png", queries="topk:5", target="class", stops=["pixels", "memory"])
    """

    def __init__(self, model: nn.Module, composite: str | Composite = "default", chunk_size: int | None = 16,
                 keep_channels: bool = False, batch_mode: str = "auto"):
        _check_model(model)
        if batch_mode not in ("auto", "vmap", "loop"):
            raise EngineError(f"batch_mode must be 'auto', 'vmap' or 'loop', got {batch_mode!r}")
        self.model = model.eval()
        self.composite = get_composite(composite)
        self.chunk_size = chunk_size
        self.keep_channels = keep_channels
        if batch_mode == "auto":  # measured: vmap's batching overhead outweighs its gain on CPUs
            batch_mode = "vmap" if next(model.parameters()).is_cuda else "loop"
        self.batch_mode = batch_mode

    def _input_bounds(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = self.model.pixel_mean, self.model.pixel_std
        low = ((0.0 - mean) / std).expand_as(x[0])[None].expand_as(x)
        high = ((255.0 - mean) / std).expand_as(x[0])[None].expand_as(x)
        return low.contiguous(), high.contiguous()

    def prepare(self, image: Any, channel_order: str = "RGB") -> Session:
        """Pre-process ``image`` and run the LRP forward; returns a session for :meth:`Session.backward`."""
        prepared = self.model.prepare(image, channel_order)
        x = prepared.tensor
        probe = torch.ones_like(x, requires_grad=True)  # gradient × input at the probe = pixel relevance
        low, high = self._input_bounds(x)
        pixels = PixelInput(x, probe, low, high)
        start = time.perf_counter()
        with torch.enable_grad(), lrp_mode(self.model, self.composite, pixels) as state, \
                _record_stops(self.model, state):
            outputs = self.model(x * probe)
        forward_seconds = time.perf_counter() - start
        outputs["decoder_embedding"] = state.records.get("decoder_embedding")
        detections = self.model.postprocess(outputs, prepared)
        shapes = state.records.get("spatial_shapes", [])
        hp = x.shape[-2]
        levels, start_index = [], 0
        for h, w in shapes:
            stride = int(round(hp / h))
            levels.append(Level(f"stride{stride}", stride, h, w, start_index))
            start_index += h * w
        return Session(self, prepared, outputs, state, probe, detections, levels, forward_seconds)

    def explain(self, image: Any, queries: Any = "topk:5", target: str | TargetFn = "class",
                stops: Sequence[str] = DEFAULT_STOPS, channel_order: str = "RGB") -> Explanation:
        """Explain the chosen queries of ``image``: prepare, forward, backward, cleanup in one call."""
        session = self.prepare(image, channel_order)
        try:
            return session.backward(queries, target, stops, retain_graph=False)
        finally:
            session.cleanup()
