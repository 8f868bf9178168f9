"""What the LRP engine needs to know about a model family, in one place: the :class:`Adapter` interface.

The engine (``maskdino_lrp.lrp``) attaches rules by module kind and takes relevance wherever it is told;
an adapter tells it, for one family of models:

- **pixels**: how an image becomes the model input, its value bounds, and which layer sees the pixels;
- **structure**: which modules are of which kind beyond torch's own types, and how the model's own
  attention modules compute under a rule's steps (*kernels*); which (conv, batch norm) pairs fold;
- **connections**: what must stay connected for LRP (e.g. a detached query initialisation);
- **stops**: the tensors relevance can be taken at (:class:`StopTensor`, one record each) and the
  constant inputs the ledger books (position encodings, reference points), recorded by hooks;
- **cuts**: sets of stops every path from the target to the pixels crosses once (where relevance is
  complete), each with the ledger entries upstream of it;
- **outputs**: the standard output keys targets read (``pred_logits``, ``pred_boxes``, ``pred_masks``,
  ``decoder_embedding``), the post-processed detections, and what is reported per explained query.
  Box explanations read, where the family has them: ``box_logits`` (B, Q, 4), the final boxes before a sigmoid
  the model applies as a function (box targets then take it under the identity rule); ``box_refinements``
  ({stage: (B, Q, 4)}, e.g. ``proposal``, ``0`` … per decoder layer), the deltas that add up, on
  ``box_anchor`` (B, Q, 4, a booked positional constant: the grid anchor of a proposal), to the final box's
  inverse sigmoid.
- **box chain** (``box_chain``): models that refine boxes layer by layer detach each layer's reference box
  (a training measure); with ``box_chain`` True, ``connect`` keeps that chain connected, so a box's relevance
  reaches the content that placed it and only the anchor is booked as positional.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator, Sequence

import torch
from torch import nn

if TYPE_CHECKING:  # only for annotations: the engine imports this module, not the other way round
    from ..lrp.engine import Ledger, LedgerEntry
    from ..lrp.explanation import Level
    from ..lrp.rules import AttentionSteps, DeformSteps

# how a stop tensor's relevance reduces to the Explanation's layout
LAYOUTS = ("pixels", "map", "tokens", "sequence_first")


@dataclass
class StopTensor:
    """One tensor relevance is taken at.

    ``stop`` is the requested stop it belongs to, ``key`` the name of its relevance in the
    :class:`~maskdino_lrp.lrp.explanation.Explanation`; records with one key and a ``level`` are flattened
    and concatenated in level order (the memory's per-level maps). ``layout``: ``"map"`` (B, C, h, w) → (K, h, w),
    ``"tokens"`` (B, T, C) → (K, T), ``"sequence_first"`` (T, B, C) → (K, T), ``"pixels"`` the model input.
    """

    stop: str
    key: str
    tensor: torch.Tensor
    layout: str
    level: int | None = None  # the encoder level of a map that is one part of a token sequence

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"stop tensor {self.key!r}: layout must be one of {LAYOUTS}, got {self.layout!r}")


@dataclass(frozen=True)
class Cut:
    """A complete cut of the graph: the stop tensors whose relevance, with the ledger entries upstream
    of the cut excluded, accounts for the whole target."""

    name: str
    stops: tuple[str, ...]  # the stops that must have been requested
    keys: tuple[str, ...]  # relevance keys (StopTensor.key) that make up the cut
    ledger: Callable[["LedgerEntry"], bool]  # which ledger entries lie between the cut and the target


@dataclass
class Records:
    """What the adapter's hooks recorded during the LRP forward (a family's own fields in ``tensors``)."""

    tensors: dict[str, Any] = field(default_factory=dict)
    spatial_shapes: list[tuple[int, int]] = field(default_factory=list)  # encoder token levels (h, w)


class Adapter:
    """One model family's structure for the LRP engine (see the module docstring); subclass per family."""

    name: str = "generic"
    stops: tuple[str, ...] = ("pixels",)
    default_stops: tuple[str, ...] = ("pixels",)
    # stops upstream of the encoder output that Session.propagate() can reach
    encoder_stops: tuple[str, ...] = ()
    # connect() keeps the reference-box chain connected (see the module docstring); False books each layer's
    # reference box as a positional constant instead (the model's own detached chain)
    box_chain: bool = True
    # module groups composites name as ``@group`` (qualified-name patterns): ``backbone`` is the CNN body
    groups: dict[str, tuple[str, ...]] = {"backbone": ("backbone.*",)}

    # ------------------------------------------------------------------ detection
    def matches(self, model: nn.Module) -> bool:
        """Whether this adapter describes ``model`` (a whole model or one of its parts)."""
        return False

    def check(self, model: nn.Module) -> None:
        """Raise ValueError (saying what is missing) unless ``model`` is a whole model this adapter explains."""

    # ------------------------------------------------------------------ modules (used by lrp_mode)
    def module_kind(self, name: str, module: nn.Module) -> str | None:
        """The kind of a module the generic classification does not know (None: the generic answer)."""
        return None

    def kernel(self, module: nn.Module, kind: str, steps: "AttentionSteps | DeformSteps",
               track: Callable[..., torch.Tensor | None]) -> Callable | None:
        """A forward computing ``module`` (of an attention kind) under a rule's ``steps``; None if not ours.

        ``track(suffix, tensor, category="bias")`` books a constant the kernel uses directly (a bias, a
        position embedding: ``category="positional"``) in the ledger under the module's name, returns its leaf.
        """
        return None

    def conv_epilogue(self, module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """What a conv module applies after the convolution in its own forward (None: nothing)."""
        return None

    def batchnorm_pairs(self, model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
        """(conv, batch norm) pairs whose norm is frozen and applied right after the conv: folded for LRP."""
        return []

    def pixel_layer(self, model: nn.Module) -> nn.Module | None:
        """The layer that sees the pixels (gets the composite's first-layer rule)."""
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                return module
        return None

    def segments(self, model: nn.Module) -> list[str]:
        """Qualified names of modules ``LRP(recompute=True)`` recomputes in the backward instead of keeping their
        forward graph: disjoint, with no forward hooks inside (none by default)."""
        return []

    def connect(self, model: nn.Module) -> ContextManager[None]:
        """Keep connected, for the forwards inside, what the model detaches but the decision depends on."""
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ pixels and outputs (used by LRP)
    def _not_for_images(self, method: str) -> NotImplementedError:
        # The generic adapter serves lrp_mode on plain networks; explaining images needs a family's adapter.
        return NotImplementedError(f"the {self.name} adapter has no {method}(): explaining images needs a model "
                                   "family's adapter (pass adapter=, or see maskdino_lrp.adapters)")

    def prepare(self, model: nn.Module, image: Any, channel_order: str = "RGB") -> Any:
        """Pre-process an image; the result has ``tensor`` (1, 3, H, W), ``rgb`` and ``resized_size``."""
        raise self._not_for_images("prepare")

    def input_bounds(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Lowest and highest value each input element can take (the z^B rule's bounds), shaped like x."""
        raise self._not_for_images("input_bounds")

    def forward(self, model: nn.Module, x: torch.Tensor, records: Records) -> dict:
        """Run the model; returns the standard outputs (``pred_logits`` (B, Q, C), ``pred_boxes``, …)."""
        raise self._not_for_images("forward")

    def postprocess(self, model: nn.Module, outputs: dict, prepared: Any) -> Any:
        """Detections (``query_indices``, ``labels``, ``scores``, sorted by score) from the outputs."""
        raise self._not_for_images("postprocess")

    def describe(self, model: nn.Module, outputs: dict, prepared: Any, queries: torch.Tensor,
                 labels: torch.Tensor) -> list[dict]:
        """Per explained query: class, scores, box, mask — what the Explanation reports."""
        return [{"query": q, "label": label} for q, label in zip(queries.tolist(), labels.tolist())]

    # ------------------------------------------------------------------ stops (used by Session)
    def record(self, model: nn.Module, ledger: "Ledger") -> ContextManager[Records]:
        """Hooks, for the forward inside, that record stop tensors and book constant inputs in ``ledger``."""
        return contextlib.nullcontext(Records())

    def levels(self, records: Records, x: torch.Tensor) -> list["Level"]:
        """The encoder's token levels (names, strides, sizes, offsets in the flattened sequence)."""
        from ..lrp.explanation import Level

        levels, start = [], 0
        for h, w in records.spatial_shapes:
            stride = int(round(x.shape[-2] / h))
            levels.append(Level(f"stride{stride}", stride, h, w, start))
            start += h * w
        return levels

    def stop_tensors(self, records: Records, stop: str, levels: Sequence["Level"]) -> list[StopTensor]:
        """The recorded tensors of one stop (not ``pixels``, which the engine owns)."""
        return []

    def ledger_scope(self, stops: Sequence[str]) -> Callable[["LedgerEntry"], bool]:
        """Which ledger entries to take relevance at: those downstream of the deepest requested stop."""
        return lambda entry: True

    def cuts(self, records: Records) -> list[Cut]:
        """The complete cuts this family reports conservation at (besides the pixels)."""
        return []

    def encoder_output(self, records: Records) -> torch.Tensor:
        """The encoder's output tokens (B, T, C), where :meth:`Session.propagate` starts."""
        raise NotImplementedError(f"the {self.name} adapter has no encoder-only mode")


def pixel_decoder_stop_tensors(records: Records, stop: str) -> list[StopTensor] | None:
    """The stops MaskDINO-style segmenters (MaskDINO, Mask2Former) record alike: the backbone's named feature maps,
    the encoder's input and layers as tokens, the mask features as a map, the decoder layers sequence-first.
    None for any other stop (the family's own: its memory, its query initialisation)."""
    rec = records.tensors
    if stop == "backbone":
        return [StopTensor(stop, f"backbone.{name}", t, "map") for name, t in rec["backbone"].items()]
    if stop == "encoder_input":
        return [StopTensor(stop, stop, rec[stop], "tokens")]
    if stop == "encoder_layers":
        return [StopTensor(stop, f"encoder_layer{i}", t, "tokens") for i, t in enumerate(rec[stop])]
    if stop == "mask_features":
        return [StopTensor(stop, stop, rec[stop], "map")]
    if stop == "decoder_layers":
        return [StopTensor(stop, f"decoder_layer{i}", t, "sequence_first") for i, t in enumerate(rec[stop])]
    return None


@contextlib.contextmanager
def hooks(handles: list) -> Iterator[None]:
    """Remove the hook handles on exit (also after an error)."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
