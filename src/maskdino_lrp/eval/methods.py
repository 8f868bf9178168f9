"""Explanation methods behind one interface, registered by name.

    >>> method = get_method("gradient")
    >>> heatmap = method.attribute(model, prepared, query=3, label=1)        # (h, w)
    >>> result = method.attribute_batch(model, prepared, [3, 5], [1, 0])     # AttributionMaps, maps (2, h, w)

Every method explains the same scalar, the class logit ``outputs["pred_logits"][0, query, label]``
(LRP's ``target="class"``), and returns a pixel map at the model input size (resized, padding
cropped: ``prepared.resized_size``).

Shared conventions:

* **Graph.** Gradient-based methods (gradient, gradient × input, IG, SmoothGrad, Chefer) run with
  the two-stage query content *connected* to the encoder memory, as the LRP engine does (the
  official code detaches it, which is a training detail and not part of the function). Reference
  boxes stay detached, as in the engine. So ``gradient × input`` equals the engine's ``gradient``
  composite (a test checks this).
* **Input space.** Gradients are taken at the normalised, padded input the model sees; channels are
  summed; the padding is cropped.
* **Token maps → pixels** (rollout, Chefer): each encoder level's (h_l, w_l) token map is upsampled
  bilinearly (align_corners=False) to the padded input and scaled by h_l·w_l / (H_p·W_p), so a
  token's value is spread over its stride × stride footprint (its mass is kept); the levels are
  summed and the padding cropped (:func:`tokens_to_pixels`). Rollout and Chefer hold dense token ×
  token matrices (O(heads · T²) memory), fine for the shapes data (T = 525 at 160 px) but not for
  COCO-size inputs; ``max_tokens`` (default 4096) turns that into a clear error.
* **Deformable attention as an attention map** (rollout, Chefer): query q's attention to value token
  t in head h is Σ_{l,p,c} A_{q,h,l,p} · β_{q,h,l,p,c} over the samples p and bilinear corners c that
  land on t (the sampled attention weights splatted to the tokens; out-of-map corners weigh 0). Its
  gradient is the exact gradient of the target with respect to that dense matrix, ∂y/∂M_{q,h,t} =
  Σ_d g_{q,h,d} v_{t,h,d}, where g is the gradient at the attention output before ``output_proj``.
"""
from __future__ import annotations

import abc
import contextlib
import inspect
import time
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from ..lrp.composites import Composite

__all__ = [
    "AttributionMaps", "Method", "MethodError", "register_method", "get_method", "method_names",
    "available_methods", "captum_available", "class_logit", "connected_query_content", "tokens_to_pixels",
    "AttentionRecorder", "splat_deformable_attention",
    "LRPMethod", "Gradient", "GradientTimesInput", "IntegratedGradients", "SmoothGrad", "AttentionRollout",
    "CheferAttention", "RandomMap", "LRP_METHODS", "DEFAULT_METHODS",
]


class MethodError(ValueError):
    """An unknown method or one that cannot run here (e.g. captum missing)."""


@dataclass
class AttributionMaps:
    """Pixel maps of K explained (query, label) pairs of one image and what producing them cost.

    (Named apart from captum's ``Attribution``, which is a method class there.)
    """

    maps: torch.Tensor  # (K, h, w) at the model input size, float32 on CPU
    seconds: float  # wall time for all K maps together
    extras: list[dict[str, float]] = field(default_factory=list)  # per map, e.g. LRP conservation
    tokens: torch.Tensor | None = None  # (K, T) the method's own encoder-input-token maps, where it has them

    @property
    def seconds_per_map(self) -> float:
        return self.seconds / max(1, int(self.maps.shape[0]))


# ----------------------------------------------------------------------------- shared helpers
def class_logit(outputs: dict, query: int, label: int) -> torch.Tensor:
    """The explained scalar: the class logit of ``query`` for ``label`` in image 0."""
    return outputs["pred_logits"][0, query, label]


def connected_query_content(model: nn.Module) -> ContextManager[None]:
    """The model's graph as the LRP engine sees it: its adapter's ``connect`` (MaskDINO: the two-stage query
    content stays connected to the encoder memory); restored on exit."""
    from ..lrp.engine import resolve_adapter

    return resolve_adapter(model).connect(model)


@contextlib.contextmanager
def _input_gradients_only(model: nn.Module) -> Iterator[None]:
    """Parameters need no gradient for an attribution; restore their flags on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _crop(maps: torch.Tensor, prepared: Any) -> torch.Tensor:
    """(K, Hp, Wp) → (K, h, w): drop the padding."""
    rh, rw = prepared.resized_size
    return maps[..., :rh, :rw]


def tokens_to_pixels(tokens: torch.Tensor, shapes: Sequence[tuple[int, int]], padded_size: tuple[int, int],
                     resized_size: tuple[int, int]) -> torch.Tensor:
    """Encoder-token maps (K, T) over levels ``shapes`` → pixel maps (K, h, w) at the model input size.

    Each level is upsampled bilinearly to the padded input and scaled by its token count / pixel
    count (mass-preserving: a token's value is spread over its footprint); levels are summed and the
    padding cropped.
    """
    k = tokens.shape[0]
    hp, wp = padded_size
    out = tokens.new_zeros((k, hp, wp))
    start = 0
    for h, w in shapes:
        level = tokens[:, start: start + h * w].reshape(k, 1, h, w)
        up = F.interpolate(level, size=(hp, wp), mode="bilinear", align_corners=False)[:, 0]
        out = out + up * (h * w) / float(hp * wp)
        start += h * w
    if start != tokens.shape[1]:
        raise ValueError(f"level shapes {list(shapes)} cover {start} tokens, the maps have {tokens.shape[1]}")
    rh, rw = resized_size
    return out[:, :rh, :rw]


def _image_seed(prepared: Any) -> int:
    return zlib.crc32(np.ascontiguousarray(prepared.rgb).tobytes())


# ----------------------------------------------------------------------------- the interface
class Method(abc.ABC):
    """One explanation method. Subclasses implement :meth:`_maps`; the rest is shared."""

    name: str = "method"
    needs_captum: bool = False
    needs_warm_up: bool = True  # a first call that initialises kernels / caches, kept out of the timing

    def attribute(self, model: nn.Module, prepared: Any, query: int, label: int) -> torch.Tensor:
        """Pixel map (h, w) at the model input size explaining ``pred_logits[0, query, label]``."""
        return self.attribute_batch(model, prepared, [query], [label]).maps[0]

    def attribute_batch(self, model: nn.Module, prepared: Any, queries: Sequence[int],
                        labels: Sequence[int]) -> AttributionMaps:
        """Maps (K, h, w) for K (query, label) pairs of one prepared image, with the wall time."""
        queries = [int(q) for q in queries]
        labels = [int(l) for l in labels]
        if len(queries) != len(labels):
            raise MethodError(f"{len(queries)} queries but {len(labels)} labels")
        start = time.perf_counter()
        maps, extras, *tokens = self._maps(model, prepared, queries, labels)
        seconds = time.perf_counter() - start
        maps = maps.detach().float().cpu()
        expected = (len(queries), *prepared.resized_size)
        if tuple(maps.shape) != expected:  # pragma: no cover - a method bug, not a user error
            raise RuntimeError(f"method {self.name!r} returned maps of shape {tuple(maps.shape)}, expected {expected}")
        token_maps = tokens[0].detach().float().cpu() if tokens and tokens[0] is not None else None
        return AttributionMaps(maps, seconds, extras or [{} for _ in queries], token_maps)

    @abc.abstractmethod
    def _maps(self, model: nn.Module, prepared: Any, queries: list[int], labels: list[int]) -> tuple:
        """(maps (K, Hp or h, …) cropped to (K, h, w), extras per map or None[, token maps (K, T) or None])."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


_REGISTRY: dict[str, Callable[..., Method]] = {}


def register_method(name: str, factory: Callable[..., Method]) -> None:
    """Register a method factory under ``name`` (replaces an existing one)."""
    _REGISTRY[name] = factory


def method_names() -> list[str]:
    """All registered method names (also those whose dependencies are missing here)."""
    return list(_REGISTRY)


def captum_available() -> bool:
    """Whether captum can be imported."""
    try:
        import captum.attr  # noqa: F401
    except ImportError:
        return False
    return True


def available_methods() -> list[str]:
    """Registered methods that can run here (captum methods only when captum is installed)."""
    has_captum = captum_available()
    return [n for n, f in _REGISTRY.items() if has_captum or not getattr(f, "needs_captum", False)]


def get_method(name: str, **options: Any) -> Method:
    """A method by registered name, e.g. ``get_method("integrated-gradients", n_steps=32)``."""
    if name not in _REGISTRY:
        raise MethodError(f"unknown method {name!r}; methods: {', '.join(_REGISTRY)}")
    factory = _REGISTRY[name]
    if getattr(factory, "needs_captum", False) and not captum_available():
        raise MethodError(f"method {name!r} needs captum: pip install --no-deps captum")
    return factory(**options)


# ----------------------------------------------------------------------------- ours: LRP
class LRPMethod(Method):
    """LRP with a composite (a preset name or a :class:`~maskdino_lrp.lrp.composites.Composite`; the method is
    called ``lrp-<name>``), the engine in ``maskdino_lrp.lrp``; K queries in one batched backward.

    Extras per map: the pixel cut's conservation report — target, total (pixels + padding), bias,
    embeddings, positional, residual.
    """

    def __init__(self, composite: str | Composite = "default", chunk_size: int | None = 16):
        self.composite = composite
        self.chunk_size = chunk_size
        self.name = f"lrp-{composite if isinstance(composite, str) else composite.name}"

    def _maps(self, model, prepared, queries, labels):
        from ..lrp.explainer import LRP

        fixed_labels = torch.tensor(labels, dtype=torch.long)

        def class_target(outputs, qs, _labels):  # the given labels, not the engine's argmax
            return outputs["pred_logits"][0, qs, fixed_labels.to(qs.device)]

        explanation = LRP(model, composite=self.composite, chunk_size=self.chunk_size).explain(
            prepared.rgb, queries=queries, target=class_target, stops=("pixels", "encoder_input"))
        report = explanation.conservation.get("pixels", {})
        extras = [{key: float(value[i]) for key, value in report.items()} for i in range(len(queries))]
        return explanation.relevance["pixels"], extras, explanation.relevance["encoder_input"]


LRP_METHODS = {f"lrp-{c}": c for c in ("default", "ah", "deform-query", "epsilon")}
for _name, _composite in LRP_METHODS.items():
    register_method(_name, lambda composite=_composite, **kw: LRPMethod(composite, **kw))


# ----------------------------------------------------------------------------- gradients
class _GradientBase(Method):
    """One forward, one backward per target, gradient at the normalised padded input."""

    def _gradients(self, model, prepared, queries, labels) -> tuple[torch.Tensor, torch.Tensor]:
        x = prepared.tensor.detach().clone().requires_grad_(True)
        with torch.enable_grad(), connected_query_content(model), _input_gradients_only(model):
            outputs = model(x)
            grads = []
            for i, (q, label) in enumerate(zip(queries, labels)):
                (g,) = torch.autograd.grad(class_logit(outputs, q, label), x, retain_graph=i < len(queries) - 1)
                grads.append(g[0])
        return x.detach()[0], torch.stack(grads)  # (3, Hp, Wp), (K, 3, Hp, Wp)


class Gradient(_GradientBase):
    """Saliency (Simonyan et al. 2014): |∂y/∂x| summed over the colour channels."""

    name = "gradient"

    def _maps(self, model, prepared, queries, labels):
        _, grads = self._gradients(model, prepared, queries, labels)
        return _crop(grads.abs().sum(1), prepared), None


class GradientTimesInput(_GradientBase):
    """Gradient × input (Shrikumar et al. 2016), signed, summed over channels (normalised input)."""

    name = "gradient-x-input"

    def _maps(self, model, prepared, queries, labels):
        x, grads = self._gradients(model, prepared, queries, labels)
        return _crop((grads * x[None]).sum(1), prepared), None


register_method("gradient", Gradient)
register_method("gradient-x-input", GradientTimesInput)


class _CaptumBase(Method):
    needs_captum = True

    @staticmethod
    def _forward_func(model, query: int, label: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            return model(x)["pred_logits"][:, query, label]  # one scalar per batch element

        return forward


class IntegratedGradients(_CaptumBase):
    """Integrated Gradients (Sundararajan et al. 2017, captum): baseline = the all-zero normalised
    input (the dataset-mean colour), ``n_steps`` Gauss–Legendre points; signed, summed over channels.

    Extras: ``target`` = f(x) − f(baseline) and ``total`` = Σ attributions (completeness). On a
    two-stage detector the path crosses changes of the top-k query selection, so completeness is
    only approximate whatever ``n_steps``.
    """

    name = "integrated-gradients"

    def __init__(self, n_steps: int = 16, internal_batch_size: int = 4):
        self.n_steps = n_steps
        self.internal_batch_size = internal_batch_size

    def _maps(self, model, prepared, queries, labels):
        from captum.attr import IntegratedGradients as CaptumIG

        x = prepared.tensor.detach()
        maps, extras = [], []
        with torch.enable_grad(), connected_query_content(model), _input_gradients_only(model):
            for q, label in zip(queries, labels):
                ig = CaptumIG(self._forward_func(model, q, label))
                attr, delta = ig.attribute(x, baselines=torch.zeros_like(x), n_steps=self.n_steps,
                                           internal_batch_size=self.internal_batch_size,
                                           return_convergence_delta=True)
                total = float(attr.sum())
                # completeness: Σ attributions should equal f(x) − f(baseline); delta is the difference
                extras.append({"target": total - float(delta.sum()), "total": total})
                maps.append(attr[0].sum(0))
        return _crop(torch.stack(maps), prepared), extras


class SmoothGrad(_CaptumBase):
    """SmoothGrad (Smilkov et al. 2017, captum NoiseTunnel over Saliency): mean |∂y/∂x| over
    ``nt_samples`` noisy copies, noise σ = ``noise_level`` · (max − min) of the normalised input."""

    name = "smoothgrad"

    def __init__(self, nt_samples: int = 16, noise_level: float = 0.15, batch_size: int = 4, seed: int = 0):
        self.nt_samples = nt_samples
        self.noise_level = noise_level
        self.batch_size = batch_size
        self.seed = seed

    def _maps(self, model, prepared, queries, labels):
        from captum.attr import NoiseTunnel, Saliency

        x = prepared.tensor.detach()
        stdev = self.noise_level * float(x.max() - x.min())
        maps = []
        with torch.enable_grad(), connected_query_content(model), _input_gradients_only(model), \
                torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for q, label in zip(queries, labels):
                tunnel = NoiseTunnel(Saliency(self._forward_func(model, q, label)))
                attr = tunnel.attribute(x, nt_type="smoothgrad", nt_samples=self.nt_samples,
                                        nt_samples_batch_size=self.batch_size, stdevs=stdev)
                maps.append(attr[0].sum(0))
        return _crop(torch.stack(maps), prepared), None


register_method("integrated-gradients", IntegratedGradients)
register_method("smoothgrad", SmoothGrad)


# ----------------------------------------------------------------------------- attention recording
def splat_deformable_attention(weights: torch.Tensor, locations: torch.Tensor,
                               spatial_shapes: Sequence[tuple[int, int]], num_tokens: int) -> torch.Tensor:
    """Dense attention (N, Lq, H, T) of deformable attention: A·β of every sample splatted to its corners.

    ``weights`` (N, Lq, H, L, P) after softmax, ``locations`` (N, Lq, H, L, P, 2) in [0, 1]; levels
    are laid out one after another in ``spatial_shapes`` order. Corners outside a map get no weight.
    """
    from ..model.deform_attn import bilinear_corners

    n, lq, h = weights.shape[:3]
    out = weights.new_zeros((n, lq, h, num_tokens))
    start = 0
    for lvl, (height, width) in enumerate(spatial_shapes):
        for index, beta in bilinear_corners(locations[:, :, :, lvl], height, width):  # (N, Lq, H, P)
            out.scatter_add_(3, index + start, weights[:, :, :, lvl] * beta)
        start += height * width
    return out


@dataclass
class DeformRecord:
    """One call of a deformable attention: what the attention map and its gradient need."""

    weights: torch.Tensor  # (N, Lq, H, L, P) after softmax, detached
    locations: torch.Tensor  # (N, Lq, H, L, P, 2), detached
    value: torch.Tensor  # (N, T, H, D), detached
    core: torch.Tensor | None  # (N, Lq, H*D) before output_proj (in the graph)
    shapes: list[tuple[int, int]]

    def attention(self) -> torch.Tensor:
        """Dense splatted attention (N, Lq, H, T)."""
        return splat_deformable_attention(self.weights, self.locations, self.shapes, self.value.shape[1])

    def attention_gradient(self, core_grad: torch.Tensor) -> torch.Tensor:
        """∂y/∂M (N, Lq, H, T) from the gradient at the attention output (N, Lq, H*D)."""
        n, lq, _ = core_grad.shape
        _, t, h, d = self.value.shape
        return torch.einsum("nqhd,nthd->nqht", core_grad.view(n, lq, h, d), self.value)


@dataclass
class MHARecord:
    """One call of a multi-head attention: its probabilities (B*H, Lq, Lk) and values (B*H, Lk, d), detached,
    and its output (in the graph), from which :meth:`attention_gradient` gives ∂y/∂probabilities."""

    attention: torch.Tensor
    value: torch.Tensor
    output: torch.Tensor
    out_weight: torch.Tensor  # out_proj.weight (E, E)
    batch_first: bool

    def attention_gradient(self, output_grad: torch.Tensor) -> torch.Tensor:
        """∂y/∂A (B*H, Lq, Lk) from the gradient at the output: the output is out_proj of the heads' A·V, so
        ∂y/∂(A·V) = ∂y/∂out · W_out per head and ∂y/∂A = ∂y/∂(A·V) · Vᵀ."""
        g = output_grad.transpose(0, 1) if self.batch_first else output_grad  # (L, B, E)
        length, bsz, _ = g.shape
        heads = self.value.shape[0] // bsz
        g = (g @ self.out_weight.to(g)).reshape(length, bsz * heads, -1).transpose(0, 1)  # (B*H, L, d)
        return torch.bmm(g, self.value.transpose(1, 2).to(g))


def _deform_hooks(module: nn.Module, records: list) -> list:
    """Hooks on a deformable attention: its inputs give the (detached) weights, locations and values, the
    input of its ``output_proj`` the attention output in the graph; the module computes as always."""
    from ..model import deform_attn as da

    signature = inspect.signature(module.forward)

    def on_call(_module, args, kwargs):
        call = signature.bind(*args, **kwargs).arguments
        with torch.no_grad():
            value = module.project_values(call["input_flatten"], call.get("input_padding_mask"))
            locations, weights = da.sampling_locations_and_weights(module, call["query"], call["reference_points"],
                                                                  call["input_spatial_shapes"])
        shapes = call["input_spatial_shapes"]
        shapes = [(int(h), int(w)) for h, w in (shapes.tolist() if torch.is_tensor(shapes) else shapes)]
        records.append(DeformRecord(weights, locations, value, None, shapes))

    def on_core(_module, args):
        records[-1].core = args[0]

    return [module.register_forward_pre_hook(on_call, with_kwargs=True),
            module.output_proj.register_forward_pre_hook(on_core)]


def _mha_hook(module: nn.MultiheadAttention, records: list) -> Any:
    """A hook on nn.MultiheadAttention: its probabilities and values recomputed (detached) from the call's
    inputs by the engine's :func:`~maskdino_lrp.lrp.engine.multihead_attention`, its output as computed."""
    from ..lrp.engine import multihead_attention

    signature = inspect.signature(module.forward)

    def on_output(_module, args, kwargs, output):
        call = signature.bind(*args, **kwargs)
        call.apply_defaults()
        a = call.arguments
        kept: list[torch.Tensor] = []
        with torch.no_grad():
            multihead_attention(module, a["query"], a["key"], a["value"], a["key_padding_mask"], False,
                                a["attn_mask"], in_proj_bias=module.in_proj_bias, record=kept.append)
            value = a["value"].transpose(0, 1) if module.batch_first else a["value"]
            wv = module.in_proj_weight.chunk(3)[2] if module._qkv_same_embed_dim else module.v_proj_weight
            bv = module.in_proj_bias.chunk(3)[2] if module.in_proj_bias is not None else None
            heads = module.num_heads
            v = F.linear(value, wv, bv).reshape(value.shape[0], value.shape[1] * heads, -1).transpose(0, 1)
        records.append(MHARecord(kept[0], v, output[0], module.out_proj.weight.detach(), module.batch_first))

    return module.register_forward_hook(on_output, with_kwargs=True)


class AttentionRecorder:
    """Context manager: records every encoder and decoder attention of a MaskDINO during a forward.

    After the forward: ``encoder`` — one :class:`DeformRecord` per encoder layer (token self-attention,
    encoder token order); ``decoder_self`` — one :class:`MHARecord` per decoder layer (query
    self-attention); ``decoder_cross`` — one :class:`DeformRecord` per decoder layer (query → memory
    tokens, in the decoder's level order, see :meth:`decoder_to_encoder_tokens`). Only hooks: the model
    computes as always; they are removed on exit, also after an error.
    """

    def __init__(self, model: nn.Module):
        try:
            self.encoder_layers = list(model.sem_seg_head.pixel_decoder.transformer.encoder.layers)
            self.decoder_layers = list(model.sem_seg_head.predictor.decoder.layers)
        except AttributeError as exc:
            raise MethodError("attention methods need a MaskDINO layout (sem_seg_head.pixel_decoder.transformer."
                              "encoder, sem_seg_head.predictor.decoder); build one with maskdino_lrp.build_model") from exc
        self.encoder: list[DeformRecord] = []
        self.decoder_self: list[MHARecord] = []
        self.decoder_cross: list[DeformRecord] = []
        self._handles: list = []

    def __enter__(self) -> "AttentionRecorder":
        try:
            for layer in self.encoder_layers:
                self._handles += _deform_hooks(layer.self_attn, self.encoder)
            for layer in self.decoder_layers:
                self._handles.append(_mha_hook(layer.self_attn, self.decoder_self))
                self._handles += _deform_hooks(layer.cross_attn, self.decoder_cross)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def encoder_shapes(self) -> list[tuple[int, int]]:
        return self.encoder[0].shapes

    def decoder_to_encoder_tokens(self) -> torch.Tensor:
        """Index e (T,) with decoder memory token j = encoder token e[j].

        The decoder reads the encoder's levels in reverse order (official); levels are matched by
        that rule and checked by shape, token order within a level is the same (row-major).
        """
        enc = self.encoder_shapes
        dec = self.decoder_cross[0].shapes
        if sorted(enc) != sorted(dec) or len(enc) != len(dec):
            raise MethodError(f"decoder memory levels {dec} do not match the encoder levels {enc}")
        starts, s = [], 0
        for h, w in enc:
            starts.append(s)
            s += h * w
        index = []
        for i, (h, w) in enumerate(dec):
            lvl = len(enc) - 1 - i
            if enc[lvl] != (h, w):  # fall back to the unique level of that shape
                lvl = enc.index((h, w))
            index.append(torch.arange(h * w) + starts[lvl])
        return torch.cat(index)


def _check_token_count(rec: "AttentionRecorder", max_tokens: int) -> None:
    num_tokens = sum(h * w for h, w in rec.encoder_shapes)
    if num_tokens > max_tokens:
        raise MethodError(
            f"{num_tokens} encoder tokens: rollout / Chefer build dense token × token matrices (heads × T² floats); "
            f"the limit is max_tokens={max_tokens}. Use a smaller input or raise max_tokens if memory allows")


def _decoder_cross_to_encoder_order(attention: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(…, T) in decoder token order → (…, T) in encoder token order."""
    out = torch.zeros_like(attention)
    out[..., index] = attention
    return out


# ----------------------------------------------------------------------------- attention rollout
def _rollout(matrices: Sequence[torch.Tensor]) -> torch.Tensor:
    """Abnar & Zuidema's rollout of head-averaged self-attention: Π_l (A_l + I)/rowsum, last layer left."""
    n = matrices[0].shape[-1]
    eye = torch.eye(n, dtype=matrices[0].dtype, device=matrices[0].device)
    joint = eye
    for a in matrices:
        a = a + eye
        a = a / a.sum(-1, keepdim=True)
        joint = a @ joint
    return joint


class AttentionRollout(Method):
    """Attention rollout (Abnar & Zuidema 2020) for an encoder-decoder detector, as Chefer et al. 2021
    adapt it to DETR: R_ii = rollout of the encoder self-attention, R_qq = rollout of the decoder
    query self-attention, map = (R_qqᵀ · Ā_cross · R_ii)[query], with Ā_cross the head-averaged
    cross-attention of the last decoder layer (deformable: splatted to the tokens). No gradients:
    the map does not depend on the label."""

    name = "attention-rollout"

    def __init__(self, max_tokens: int = 4096):
        self.max_tokens = max_tokens

    def _maps(self, model, prepared, queries, labels):
        with torch.no_grad(), AttentionRecorder(model) as rec:
            model(prepared.tensor)
            _check_token_count(rec, self.max_tokens)
            r_ii = _rollout([r.attention()[0].mean(1) for r in rec.encoder])  # (T, T)
            r_qq = _rollout([r.attention.mean(0) for r in rec.decoder_self])  # (Q, Q); batch 1: (H, Q, Q)
            cross = rec.decoder_cross[-1].attention()[0].mean(1)  # (Q, T_dec)
            cross = _decoder_cross_to_encoder_order(cross, rec.decoder_to_encoder_tokens())
            r_qi = r_qq.t() @ cross @ r_ii
            tokens = r_qi[torch.tensor(queries, device=r_qi.device)]
            pixels = tokens_to_pixels(tokens, rec.encoder_shapes, prepared.tensor.shape[-2:], prepared.resized_size)
            return pixels, None, tokens


register_method("attention-rollout", AttentionRollout)


# ----------------------------------------------------------------------------- Chefer et al. 2021
def _gradient_weighted(attention: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Ā = E_h[(∇A ⊙ A)⁺] (Chefer et al. 2021, Eq. 5); heads on dim 0 → (Lq, Lk)."""
    return (gradient * attention).clamp(min=0).mean(0)


def _normalise_self_relevance(r: torch.Tensor) -> torch.Tensor:
    """R̄ = (R − I) / rowsum(R − I) + I (Eqs. 8–9); a row with nothing added stays the identity row."""
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
    added = r - eye
    sums = added.sum(-1, keepdim=True)
    added = torch.where(sums > 0, added / sums.clamp(min=1e-30), torch.zeros_like(added))
    return added + eye


class CheferAttention(Method):
    """Generic attention-model explainability (Chefer et al., ICCV 2021), encoder-decoder rules.

    With Ā = E_h[(∇A ⊙ A)⁺] per attention layer (gradients of the class logit):
    R_ii = I, then per encoder layer R_ii += Ā R_ii (rule 6); R_qq = I, R_qi = 0; per decoder layer
    query self-attention R_qq += Ā R_qq, R_qi += Ā R_qi (rules 6–7), then cross-attention
    R_qi += R̄_qqᵀ Ā_qi R̄_ii (rule 10 with the normalisation of Eqs. 8–9, transposes as published and
    in the official DETR code). The map is R_qi[query] over encoder tokens. Deformable attention
    enters through its splatted attention matrix and that matrix's exact gradient (module doc).
    Query content starts at zero relevance as for DETR's learned queries (the two-stage top-k
    selection is not an attention and gets no rule).
    """

    name = "chefer"

    def __init__(self, max_tokens: int = 4096):
        self.max_tokens = max_tokens

    def _maps(self, model, prepared, queries, labels):
        x = prepared.tensor.detach().clone().requires_grad_(True)
        tokens = []
        with torch.enable_grad(), connected_query_content(model), _input_gradients_only(model), \
                AttentionRecorder(model) as rec:
            outputs = model(x)
            _check_token_count(rec, self.max_tokens)
            index = rec.decoder_to_encoder_tokens()
            enc_att = [r.attention()[0] for r in rec.encoder]  # (T, H, T)
            cross_att = [r.attention()[0] for r in rec.decoder_cross]  # (Q, H, T_dec)
            self_att = [r.attention for r in rec.decoder_self]  # (H, Q, Q) for batch 1
            graph = [r.core for r in rec.encoder] + [r.output for r in rec.decoder_self] + \
                [r.core for r in rec.decoder_cross]
            n_enc, n_dec = len(rec.encoder), len(rec.decoder_self)
            for i, (q, label) in enumerate(zip(queries, labels)):
                grads = torch.autograd.grad(class_logit(outputs, q, label), graph, allow_unused=True,
                                            retain_graph=i < len(queries) - 1)
                grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, graph)]
                enc_grads = grads[:n_enc]
                self_grads = [r.attention_gradient(g) for r, g in zip(rec.decoder_self, grads[n_enc:n_enc + n_dec])]
                cross_grads = grads[n_enc + n_dec:]
                num_tokens = enc_att[0].shape[-1] if enc_att else rec.decoder_cross[0].value.shape[1]
                r_ii = torch.eye(num_tokens, dtype=x.dtype, device=x.device)
                for att, rec_l, g in zip(enc_att, rec.encoder, enc_grads):
                    cam = _gradient_weighted(att.permute(1, 0, 2), rec_l.attention_gradient(g)[0].permute(1, 0, 2))
                    r_ii = r_ii + cam @ r_ii
                num_queries = self_att[0].shape[-1]
                r_qq = torch.eye(num_queries, dtype=x.dtype, device=x.device)
                r_qi = torch.zeros(num_queries, num_tokens, dtype=x.dtype, device=x.device)
                r_ii_bar = _normalise_self_relevance(r_ii)
                for att_s, g_s, att_c, rec_c, g_c in zip(self_att, self_grads, cross_att, rec.decoder_cross,
                                                         cross_grads):
                    cam = _gradient_weighted(att_s, g_s)
                    r_qq = r_qq + cam @ r_qq
                    r_qi = r_qi + cam @ r_qi
                    cam_c = _gradient_weighted(att_c.permute(1, 0, 2), rec_c.attention_gradient(g_c)[0].permute(1, 0, 2))
                    cam_c = _decoder_cross_to_encoder_order(cam_c, index)
                    r_qi = r_qi + _normalise_self_relevance(r_qq).t() @ cam_c @ r_ii_bar
                tokens.append(r_qi[q])
        tokens = torch.stack(tokens).detach()
        return tokens_to_pixels(tokens, rec.encoder_shapes, prepared.tensor.shape[-2:], prepared.resized_size), None, tokens


register_method("chefer", CheferAttention)


# ----------------------------------------------------------------------------- random
class RandomMap(Method):
    """Uniform random values in [0, 1), seeded by (seed, image content, query, label): reproducible."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def _maps(self, model, prepared, queries, labels):
        h, w = prepared.resized_size
        maps = []
        for q, label in zip(queries, labels):
            entropy = np.random.SeedSequence([self.seed, _image_seed(prepared), q, label]).generate_state(1)[0]
            g = torch.Generator().manual_seed(int(entropy))
            maps.append(torch.rand((h, w), generator=g))
        return torch.stack(maps), None


register_method("random", RandomMap)

def _drise(**options: Any) -> Method:
    """D-RISE (black-box, :mod:`.drise`); imported when asked for, since that module builds on :class:`Method`."""
    from .drise import DRise

    return DRise(**options)


register_method("d-rise", _drise)

DEFAULT_METHODS: tuple[str, ...] = (
    *LRP_METHODS, "gradient", "gradient-x-input", "integrated-gradients", "smoothgrad", "attention-rollout",
    "chefer", "d-rise", "random",
)
