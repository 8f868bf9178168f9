"""What the adapters of Hugging Face DETR-family detectors share: :class:`HFDetectionAdapter` and its helpers.

A family's adapter subclasses :class:`HFDetectionAdapter` and declares, as class attributes, the transformers
module its classes come from (``modeling``), its whole-model class names (``model_classes``), its dot-product
attention classes (``attention_classes``, computed by :func:`qkv_attention_kernel`), the score its detections
are ranked by (``score``: ``"softmax"`` without the last, no-object class, as DETR; ``"sigmoid"``, as
Deformable DETR and RT-DETR) and its stops; it writes ``record`` (hooks that record the stops and book the
constant inputs), ``stop_tensors``, ``ledger_scope`` and ``cuts``. Deformable attention modules are computed
by :func:`~.hf_deformable.deformable_kernel` without further declaration.

The base does the rest the transformers way: the image is resized and normalised as the folder's
``preprocessor_config.json`` says (:func:`read_preprocessor`, stored on the model as ``lrp_preprocess``),
the model is called with ``pixel_values``, the frozen batch norms right after a convolution are folded,
and the detections are the queries ranked by their best class score. transformers itself is never imported
here: classes are recognised by their module and name.

Boxes: the families apply the box sigmoid as a function, so ``forward`` also gives ``box_logits``, the final
boxes before it (the output of the module :meth:`HFDetectionAdapter.box_head` names, plus the reference the
family adds; checked to give ``pred_boxes`` bit for bit). Families that refine boxes layer by layer (Deformable
DETR, RT-DETR) set ``reference_chain``: transformers detaches each layer's reference box and the top-k proposal
boxes in its own code; ``connect`` keeps them connected (:func:`chain_detaches`), ``box_chain=False`` books them
as positional instead (where their inverse sigmoid is added).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..lrp.engine import EngineError, Ledger
from ..lrp.rules import AttentionSteps
from .base import Adapter, Cut, Records, StopTensor, hooks
from .hf_deformable import deformable_kernel, is_deformable

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "HFInput", "HFDetections", "HFDetectionAdapter", "is_hf_class",
           "is_frozen_norm", "read_preprocessor", "attend", "qkv_attention_kernel", "book_output", "book_input",
           "append_output", "chain_detaches", "book_finite", "last_output", "memory_and_layer_hooks"]

# transformers.activations classes that are parameterless elementwise functions rebuilt by calling the class
_ACTIVATIONS = ("GELUActivation", "NewGELUActivation", "FastGELUActivation", "QuickGELUActivation", "GELUTanh",
                "SiLUActivation", "AccurateGELUActivation")
# the statistics transformers' DETR-family image processors normalise with by default
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def is_hf_class(module: nn.Module, modeling: str, names: Sequence[str] = ()) -> bool:
    """Whether ``module``'s class comes from the transformers module ``modeling`` (and is one of ``names``)."""
    cls = type(module)
    return cls.__module__ == modeling and (not names or cls.__name__ in names)


def is_frozen_norm(norm: Any) -> bool:
    """A batch norm with fixed statistics (transformers' ``*FrozenBatchNorm2d``, or ``nn.BatchNorm2d``)."""
    return isinstance(norm, nn.Module) and hasattr(norm, "running_mean") and hasattr(norm, "running_var") \
        and not isinstance(norm, (nn.GroupNorm, nn.LayerNorm))


def read_preprocessor(folder: str) -> dict | None:
    """The resize and normalisation of a ``save_pretrained`` folder's ``preprocessor_config.json`` (None if absent),
    as :meth:`HFDetectionAdapter.prepare` reads them from a model's ``lrp_preprocess`` attribute.

    ``shortest_edge``/``longest_edge`` resize keeping the aspect ratio (DETR, Deformable DETR); ``height`` and
    ``width`` resize to a fixed size (RT-DETR); ``rescale_factor`` and ``image_mean``/``image_std`` normalise.
    """
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    size = config.get("size") or {}
    out: dict[str, Any] = {}
    if config.get("do_resize", True):
        if "shortest_edge" in size:
            out["shortest_edge"] = int(size["shortest_edge"])
            out["longest_edge"] = int(size.get("longest_edge") or 10 ** 9)
        elif "height" in size and "width" in size:
            out["height"], out["width"] = int(size["height"]), int(size["width"])
    if config.get("do_rescale", True):
        out["rescale_factor"] = float(config.get("rescale_factor", 1 / 255))
    else:
        out["rescale_factor"] = 1.0
    if config.get("do_normalize", True):
        out["image_mean"] = tuple(float(v) for v in config.get("image_mean", IMAGENET_MEAN))
        out["image_std"] = tuple(float(v) for v in config.get("image_std", IMAGENET_STD))
    else:
        out["image_mean"], out["image_std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return out


@dataclass
class HFInput:
    """An image prepared for a transformers detector: the normalised tensor (1, 3, H, W) and its RGB source."""

    tensor: torch.Tensor
    rgb: np.ndarray
    resized_size: tuple[int, int]  # (h, w) of the tensor: the image's own unless the processor resizes
    original_size: tuple[int, int]


@dataclass
class HFDetections:
    """Queries sorted by their best class score (softmax without no-object, or sigmoid, per family)."""

    query_indices: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor

    def __len__(self) -> int:
        return int(self.query_indices.numel())


# ----------------------------------------------------------------------------- kernels and hooks
def attend(steps: AttentionSteps, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scaling: float,
           attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head dot-product attention of projected (B, L, H·d) queries, keys and values under a rule's steps.

    Queries and keys may have another per-head size than values (Conditional DETR concatenates a positional
    half). ``attention_mask`` (B, 1, Lq, Lk): additive, or boolean with True = attend. Returns the heads'
    outputs (B, Lq, H·d_v), before the output projection, and the probabilities (B, H, Lq, Lk), detached.
    """
    b, lq, _ = q.shape
    lk = k.shape[1]

    def split(t: torch.Tensor) -> torch.Tensor:  # (B, L, H·d) -> (B·H, L, d)
        return t.view(b, t.shape[1], heads, -1).transpose(1, 2).reshape(b * heads, t.shape[1], -1)

    logits = steps.scores(split(q), split(k).transpose(1, 2)) * scaling
    if attention_mask is not None:
        mask = attention_mask.expand(b, heads, lq, lk).reshape(-1, lq, lk)
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    attn = steps.probabilities(logits)
    out = steps.mix(attn, split(v)).view(b, heads, lq, -1).transpose(1, 2).reshape(b, lq, -1)
    return out, attn.detach().view(b, heads, lq, lk)


def qkv_attention_kernel(module: nn.Module, steps: AttentionSteps, track: Callable, cross: bool = False,
                         output: str = "o_proj") -> Callable:
    """A transformers DETR-style attention (``q_proj``/``k_proj``/``v_proj``, ``output``; ``head_dim``,
    ``scaling``; position embeddings added to queries and keys, not values) under a rule's steps.

    Self-attention takes ``(hidden_states, attention_mask, position_embeddings)``; ``cross=True`` (DETR's
    ``DetrCrossAttention``) adds ``key_value_states`` and ``encoder_position_embeddings`` for the keys. The
    position embeddings are booked per call (``positional``), so each use's relevance is counted where it
    enters. The projections are the patched linear modules (their rule, their biases booked).
    """
    out_proj = getattr(module, output)

    def forward(hidden_states, key_value_states=None, attention_mask=None, position_embeddings=None,
                encoder_position_embeddings=None, **_):
        position_embeddings = track("position_embeddings", position_embeddings, "positional")
        if not cross:
            key_value_states, key_pos = hidden_states, position_embeddings
        else:
            key_pos = track("encoder_position_embeddings", encoder_position_embeddings, "positional")
        query_in = hidden_states if position_embeddings is None else hidden_states + position_embeddings
        key_in = key_value_states if key_pos is None else key_value_states + key_pos
        heads = hidden_states.shape[-1] // module.head_dim
        out, attn = attend(steps, module.q_proj(query_in), module.k_proj(key_in), module.v_proj(key_value_states),
                           heads, module.scaling, attention_mask)
        return out_proj(out), attn

    return forward


def book_output(ledger: Ledger, name: str, category: str = "positional") -> Callable:
    """A forward hook that replaces a module's output by a leaf booked in ``ledger`` (a constant input the
    downstream computation reads, e.g. a position embedding module's output)."""
    return lambda _m, _args, out: ledger.track(category, name, out)


def book_input(ledger: Ledger, name: str, category: str = "positional") -> Callable:
    """A forward pre-hook that replaces a module's first positional input by a leaf booked in ``ledger``
    (e.g. the sine embedding of detached proposal boxes that a projection reads)."""
    return lambda _m, args: (ledger.track(category, name, args[0]),) + tuple(args[1:])


def append_output(into: list, pick: Callable[[Any], torch.Tensor] | None = None) -> Callable:
    """A forward hook appending a module's output (or ``pick(output)``) to ``into`` (one entry per layer)."""
    return lambda _m, _args, out: into.append(pick(out) if pick is not None else out)


def memory_and_layer_hooks(rec: dict, decoder: nn.Module, encoder_layers: Iterable[nn.Module],
                           pick: Callable[[Any], torch.Tensor] | None = None) -> list:
    """Forward hooks recording ``rec["memory"]`` (the decoder's ``encoder_hidden_states``) and each encoder and
    decoder layer's output in ``rec["encoder_layers"]`` / ``rec["decoder_layers"]`` (``pick``: from a tuple)."""
    def on_decoder(_m, _args, kwargs):
        rec["memory"] = kwargs["encoder_hidden_states"]

    return [decoder.register_forward_pre_hook(on_decoder, with_kwargs=True),
            *(layer.register_forward_hook(append_output(rec.setdefault("encoder_layers", []), pick))
              for layer in encoder_layers),
            *(layer.register_forward_hook(append_output(rec.setdefault("decoder_layers", []), pick))
              for layer in decoder.layers)]


def last_output(into: dict, key: str) -> Callable:
    """A forward hook keeping a module's latest output in ``into[key]`` (a head called once per layer)."""
    return lambda _m, _args, out: into.__setitem__(key, out)


def book_finite(ledger: Ledger, name: str, tensor: torch.Tensor, category: str = "positional") -> torch.Tensor:
    """``tensor`` with its finite entries replaced by a leaf booked in ``ledger``; the values stay bit for bit
    (proposal anchors of invalid tokens are inf: they take no relevance and must not enter the ledger's sums)."""
    finite = torch.isfinite(tensor)
    return ledger.track(category, name, torch.where(finite, tensor, 0.0)) + torch.where(finite, 0.0, tensor)


class _ChainDetaches(TorchFunctionMode):
    """``Tensor.detach`` called by the code of the given modules returns ``replace(tensor)`` instead (see
    :func:`chain_detaches`); every other detach (the rules', the kernels', the ledger's) is left alone."""

    def __init__(self, modules: Sequence[str], replace: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.modules, self.replace = tuple(modules), replace

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.detach and self._called_from_model():
            return self.replace(args[0])
        return func(*args, **(kwargs or {}))

    def _called_from_model(self) -> bool:
        frame = sys._getframe(2)  # 0: this method, 1: __torch_function__, 2: the caller or another mode's handler
        while frame is not None and frame.f_code.co_name == "__torch_function__":  # modes stacked above this one
            frame = frame.f_back
        return frame is not None and frame.f_globals.get("__name__") in self.modules


@contextlib.contextmanager
def chain_detaches(modules: Sequence[str], replace: Callable[[torch.Tensor], torch.Tensor] | None = None
                   ) -> Iterator[None]:
    """Within it, the detaches written in the transformers modules ``modules`` (e.g. a decoder's
    ``reference_points = new_reference_points.detach()``) give ``replace(tensor)``: the tensor itself (None: the
    chain stays connected, the values are the same) or, e.g., a booked leaf. The model is not modified."""
    with _ChainDetaches(modules, replace or (lambda t: t)):
        yield


# ----------------------------------------------------------------------------- the base adapter
class HFDetectionAdapter(Adapter):
    """The shared part of the transformers DETR-family adapters (see the module docstring)."""

    modeling: str = ""  # e.g. "transformers.models.detr.modeling_detr"
    model_classes: tuple[str, ...] = ()  # whole models this adapter explains
    attention_classes: tuple[str, ...] = ()  # DETR-style dot-product attention (q/k/v/o_proj)
    cross_attention_classes: tuple[str, ...] = ()  # … whose keys come from the memory (DETR's cross-attention)
    # attention classes the family computes with its own kernel: class name -> kernel(module, steps, track)
    attention_kernels: Mapping[str, Callable] = {}
    score: str = "sigmoid"  # "softmax": the last class is "no object"; "sigmoid": independent classes
    # (conv, norm) attribute pairs of the backbone's conv layers whose norm follows the conv directly
    conv_norm_attributes: tuple[tuple[str, str], ...] = (("convolution", "normalization"),)
    groups = {"backbone": ("model.backbone.*", "backbone.*")}
    # transformers detaches the reference boxes each layer refines (and the proposals): see chain_detaches
    reference_chain: bool = False
    # ledger name prefixes upstream of the encoder's input (backbone, input projection) and of the memory (those
    # and the encoder): what the shared ledger scope and token cuts leave out
    upstream_of_encoder: tuple[str, ...] = ()
    upstream_of_memory: tuple[str, ...] = ()

    def __init__(self, box_chain: bool = True):
        self.box_chain = box_chain

    # ------------------------------------------------------------------ detection
    def _ours(self, module: nn.Module, names: Sequence[str] | None = None) -> bool:
        """Whether ``module`` is of this family (and, given ``names``, one of those classes; none if empty)."""
        if names is not None and not names:
            return False
        return is_hf_class(module, self.modeling, names or ())

    def matches(self, model: nn.Module) -> bool:
        return any(self._ours(m) for m in model.modules())

    def check(self, model: nn.Module) -> None:
        if not self._ours(model, self.model_classes):
            raise EngineError(f"{type(model).__name__} is not a model the {self.name} adapter explains: give a "
                              f"transformers {' or '.join(self.model_classes)}")
        # a config loaded by from_pretrained may lack the flag (transformers 5 consumes it): look at the modules too
        if getattr(model.config, "use_timm_backbone", False) or any(
                type(m).__module__.startswith("timm.") for m in self.backbone(model).modules()):
            raise EngineError(f"{self.name} with a timm backbone is not supported: build it with "
                              "use_timm_backbone=False and a transformers backbone config (e.g. ResNetConfig)")

    @staticmethod
    def backbone(model: nn.Module) -> nn.Module:
        """The CNN body (``model.model.backbone`` of a whole model; the model itself for a part)."""
        inner = getattr(model, "model", None)
        return getattr(inner, "backbone", model) if isinstance(inner, nn.Module) else model

    # ------------------------------------------------------------------ modules
    def module_kind(self, name, module):
        if self._ours(module, self.attention_classes + self.cross_attention_classes + tuple(self.attention_kernels)):
            return "mha"
        # transformers' own GELU/SiLU modules (ACT2FN): parameterless elementwise maps, as nn.GELU
        return "elementwise" if is_hf_class(module, "transformers.activations", _ACTIVATIONS) else None

    def kernel(self, module, kind, steps, track):
        if kind == "mha" and self._ours(module, tuple(self.attention_kernels)):
            return self.attention_kernels[type(module).__name__](module, steps, track)
        if kind == "mha" and self._ours(module, self.attention_classes + self.cross_attention_classes):
            return qkv_attention_kernel(module, steps, track, cross=self._ours(module, self.cross_attention_classes))
        if kind == "deform_attn" and is_deformable(module):
            return deformable_kernel(module, steps, track)
        return None

    def batchnorm_pairs(self, model):
        pairs = []
        for m in model.modules():
            for conv, norm in self.conv_norm_attributes:
                if isinstance(getattr(m, conv, None), nn.Conv2d) and is_frozen_norm(getattr(m, norm, None)):
                    pairs.append((getattr(m, conv), getattr(m, norm)))
        return pairs

    def pixel_layer(self, model):
        return super().pixel_layer(self.backbone(model))

    @contextlib.contextmanager
    def connect(self, model: nn.Module) -> Iterator[None]:
        """With ``reference_chain`` and ``box_chain``: the model's own detaches of reference boxes keep the chain."""
        if not (self.reference_chain and self.box_chain):
            yield
            return
        with chain_detaches((self.modeling,)):
            yield

    @contextlib.contextmanager
    def cut_chain(self, ledger: Ledger) -> Iterator[None]:
        """For ``record``: with ``box_chain=False``, each detached reference box the model refines is booked as
        positional where it is added, in the inverse-sigmoid space (the chain cut where the model cuts it, its
        parts accounted for); else nothing. The family's ``inverse_sigmoid`` is wrapped meanwhile."""
        module = sys.modules.get(self.modeling)
        original = getattr(module, "inverse_sigmoid", None)
        if not self.reference_chain or self.box_chain or original is None:
            yield
            return

        def inverse_sigmoid(x, *args, **kwargs):
            out = original(x, *args, **kwargs)
            return out if x.requires_grad else ledger.track("positional", "model.decoder.box_reference", out)

        module.inverse_sigmoid = inverse_sigmoid
        try:
            yield
        finally:
            module.inverse_sigmoid = original

    def encoder_output(self, records: Records) -> torch.Tensor:
        """The last encoder layer's output, recorded under ``encoder_layers`` by the family's ``record``."""
        return records.tensors["encoder_layers"][-1]

    # ------------------------------------------------------------------ pixels and outputs
    def prepare(self, model, image, channel_order="RGB"):
        """An image (path, array, PIL image, as MaskDINO takes) resized and normalised as the folder's processor
        config says, or the output of the model's own image processor (a mapping with ``pixel_values``)."""
        from ..model.maskdino import read_image, resize_shortest_edge

        if isinstance(image, Mapping) and "pixel_values" in image:
            return self._from_processor(model, image)
        rgb = read_image(image, channel_order)
        settings = getattr(model, "lrp_preprocess", None) or {}  # from a preprocessor config (read_preprocessor)
        resized = rgb
        if "shortest_edge" in settings:  # the processor's resize, so the model sees what it was trained on
            resized = resize_shortest_edge(rgb, settings["shortest_edge"], settings["longest_edge"])
        elif "height" in settings:
            resized = _resize_to(rgb, settings["height"], settings["width"])
        param = next(model.parameters())
        x = torch.from_numpy(resized.copy()).permute(2, 0, 1).to(param) * settings.get("rescale_factor", 1 / 255)
        mean, std = self._stats(model, param)
        return HFInput(((x - mean) / std)[None], rgb, tuple(resized.shape[:2]), tuple(rgb.shape[:2]))

    def _from_processor(self, model: nn.Module, features: Mapping) -> HFInput:
        """A processor's output as it is; the RGB image shown in reports is its de-normalised copy."""
        x = torch.as_tensor(features["pixel_values"])
        if x.dim() != 4 or x.shape[0] != 1 or x.shape[1] != 3:
            raise EngineError(f"pixel_values of shape {tuple(x.shape)}: give one image's processor output "
                              "(1, 3, H, W), e.g. processor(images=image, return_tensors='pt')")
        mask = features.get("pixel_mask")
        if mask is not None and not bool(torch.as_tensor(mask).all()):
            raise EngineError("the processor padded this image (pixel_mask has zeros): give one image per call, "
                              "unpadded")
        param = next(model.parameters())
        x = x.to(param)
        mean, std = self._stats(model, x)
        scale = (getattr(model, "lrp_preprocess", None) or {}).get("rescale_factor", 1 / 255)
        rgb = ((x[0] * std + mean) / scale).clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        size = tuple(int(v) for v in x.shape[-2:])
        return HFInput(x, rgb, size, size)

    @staticmethod
    def _stats(model: nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        settings = getattr(model, "lrp_preprocess", None) or {}
        mean = torch.tensor(settings.get("image_mean", IMAGENET_MEAN), dtype=like.dtype, device=like.device)
        std = torch.tensor(settings.get("image_std", IMAGENET_STD), dtype=like.dtype, device=like.device)
        return mean.view(3, 1, 1), std.view(3, 1, 1)

    def input_bounds(self, model, x):
        mean, std = self._stats(model, x)
        top = 255.0 * (getattr(model, "lrp_preprocess", None) or {}).get("rescale_factor", 1 / 255)
        return ((0.0 - mean) / std).expand_as(x).contiguous(), ((top - mean) / std).expand_as(x).contiguous()

    def forward(self, model, x, records):
        out, boxes = self.call(model, x, records)
        return {"pred_logits": out.logits, "pred_boxes": out.pred_boxes, "decoder_embedding": out.last_hidden_state,
                **boxes}

    def call(self, model: nn.Module, x: torch.Tensor, records: Records) -> tuple[Any, dict]:
        """The model's output for ``pixel_values=x`` and its box outputs: ``box_logits`` (when they give
        ``pred_boxes`` bit for bit) and, for families with :meth:`box_stages`, ``box_anchor``/``box_refinements``."""
        head, seen = self.box_head(model), {}
        handles = [] if head is None else [head.register_forward_hook(last_output(seen, "head"))]
        with hooks(handles):
            out = model(pixel_values=x)
        boxes: dict[str, Any] = {}
        if "head" in seen:
            logits = self.final_box_logits(model, out, seen["head"], records)
            if logits is not None and torch.equal(logits.sigmoid(), out.pred_boxes):
                boxes["box_logits"] = logits
        stages = self.box_stages(model, records, seen.get("head"))
        if stages is not None:
            boxes["box_anchor"], boxes["box_refinements"] = stages
        return out, boxes

    def stop_tensors(self, records: Records, stop: str, levels: Sequence) -> list[StopTensor]:
        """The encoder-decoder stops as the DETR-style ``record`` hooks keep them: the backbone's feature maps,
        the encoder's input and the memory as token sequences, each encoder and decoder layer's output."""
        rec = records.tensors
        if stop == "backbone":
            return [StopTensor(stop, f"backbone.stage{i}", t, "map") for i, t in enumerate(rec["backbone"])]
        if stop in ("encoder_input", "memory"):
            return [StopTensor(stop, stop, rec[stop], "tokens")]
        if stop in ("encoder_layers", "decoder_layers"):
            return [StopTensor(stop, f"{stop[:-1]}{i}", t, "tokens") for i, t in enumerate(rec[stop])]
        return []

    def ledger_scope(self, stops: Sequence[str]):
        if "pixels" in stops:
            return lambda entry: True
        if "backbone" in stops:
            return lambda entry: not entry.name.startswith("model.backbone.")
        upstream = self.upstream_of_encoder
        return lambda entry: not entry.name.startswith(upstream)

    def token_cuts(self) -> list[Cut]:
        """The cuts at the encoder's input and at the memory: the encoder reads only its input tokens (and
        constant positions), the decoder only the memory (and its own queries)."""
        encoder, memory = self.upstream_of_encoder, self.upstream_of_memory
        return [Cut("encoder_input", ("encoder_input",), ("encoder_input",),
                    lambda entry: not entry.name.startswith(encoder)),
                Cut("memory", ("memory",), ("memory",), lambda entry: not entry.name.startswith(memory))]

    def box_head(self, model: nn.Module) -> nn.Module | None:
        """The module whose (last) output the final box logits are made of (None: no box logits)."""
        head = getattr(model, "bbox_predictor", None)
        return head if isinstance(head, nn.Module) else None

    def final_box_logits(self, model: nn.Module, out: Any, head: torch.Tensor, records: Records
                         ) -> torch.Tensor | None:
        """The final boxes (B, Q, 4) before the sigmoid from the box head's output: as it is after the forward
        (DETR; Conditional and DAB-DETR add their reference to it in place), the last layer's if stacked."""
        return head[-1] if head.dim() == 4 else head

    def box_stages(self, model: nn.Module, records: Records, head: torch.Tensor | None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """(anchor, {stage: delta}) adding up to the final boxes' inverse sigmoid (see the ``Adapter``
        docstring), for families that refine boxes from proposals (``head``: the box head's last output);
        None: none."""
        return None

    def class_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-class probabilities (…, C) of the object classes from the logits, as the family scores them."""
        if self.score == "softmax":
            return logits.softmax(-1)[..., :-1]  # the last class is "no object"
        return logits.sigmoid()

    def postprocess(self, model, outputs, prepared):
        scores, labels = self.class_scores(outputs["pred_logits"][0].detach()).max(-1)
        order = scores.argsort(descending=True)
        return HFDetections(order, labels[order], scores[order])

    def describe(self, model, outputs, prepared, queries, labels):
        probs = self.class_scores(outputs["pred_logits"][0, queries].detach())
        boxes = outputs["pred_boxes"][0, queries].detach()
        h, w = prepared.original_size
        id2label = getattr(model.config, "id2label", None) or {}
        info = []
        for i, (q, label) in enumerate(zip(queries.tolist(), labels.tolist())):
            cx, cy, bw, bh = boxes[i].tolist()
            score = float(probs[i, label]) if label < probs.shape[-1] else 0.0
            info.append({"query": q, "label": label, "class": id2label.get(label, str(label)),
                         "class_score": score, "score": score,
                         "box": [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]})
        return info


def _resize_to(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """A fixed-size bilinear resize (transformers' processors resize with PIL's bilinear filter)."""
    from PIL import Image

    if rgb.shape[:2] == (height, width):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.BILINEAR))
