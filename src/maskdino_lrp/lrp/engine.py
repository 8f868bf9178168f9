"""The LRP engine: rules attached to modules for one forward, relevance by one batched backward.

Relevance is gradient × input under modified backward rules. Inside :func:`lrp_mode` each module that
needs a rule gets an instance-level ``forward`` that computes the same values through the rule's op;
on exit (also after an exception) the instance attributes are removed and the canonizers restore what
they changed, so the model is bit-identical to before. Relevance then follows the real computation graph.

Which modules are of which kind comes from :func:`~.composites.module_kind` (torch types and structure)
and the model's adapter (``maskdino_lrp.adapters``), which also computes the model's own attention
modules under a rule's steps, names the layer that sees the pixels, the batch norms to fold, and what must
stay connected. The engine itself names no model.

Where relevance leaves the image path it is recorded in a :class:`Ledger`: biases (and LayerNorm β,
folded batch-norm shifts), learned embeddings (level embeddings, query embeddings), and positional
inputs (sine encodings, reference-point embeddings, booked by the adapter's hooks).
``target = Σ R(pixels) + ledger + residual``, where the residual is what non-conservative rules
(epsilon, the AttnLRP softmax) and constants the engine does not see take.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from torch.overrides import TorchFunctionMode

from .canonizers import BatchNormFold
from .composites import Composite, get_composite, module_kind
from .rules import PixelInput, Rule

if TYPE_CHECKING:
    from ..adapters.base import Adapter

log = logging.getLogger(__name__)


class EngineError(ValueError):
    """A model or request the engine cannot handle, with what to do."""


# ----------------------------------------------------------------------------- ledger
LEDGER_CATEGORIES = ("bias", "embeddings", "positional")


@dataclass
class LedgerEntry:
    """One tensor outside the image path that receives relevance: its category, name and leaf tensor.

    ``name`` is the qualified name of the parameter (``…bias``), of a free parameter, or of the constant
    input an adapter booked; a module called several times books one entry per call.
    """

    category: str  # one of LEDGER_CATEGORIES
    name: str
    tensor: torch.Tensor


@dataclass
class Ledger:
    """Tensors outside the image path that receive relevance, in the order the forward met them."""

    entries: list[LedgerEntry] = field(default_factory=list)

    def track(self, category: str, name: str, tensor: torch.Tensor | None) -> torch.Tensor | None:
        """A leaf copy of ``tensor`` whose gradient × value is the relevance it absorbs."""
        if tensor is None:
            return None
        leaf = tensor.detach().requires_grad_(True)
        self.entries.append(LedgerEntry(category, name, leaf))
        return leaf

    def add(self, category: str, name: str, tensor: torch.Tensor) -> None:
        """Record an existing leaf (a learned embedding parameter)."""
        self.entries.append(LedgerEntry(category, name, tensor))


# ----------------------------------------------------------------------------- module forwards
@dataclass
class _Patch:
    """What a module's rule forward needs besides the module and its rule."""

    name: str
    ledger: Ledger
    adapter: "Adapter"
    linear_rule: Rule  # the projections' rule inside attention modules
    pixels: PixelInput | None  # only for the layer that sees the pixels


def _plain_forward_overridden(module: nn.Module, base: type) -> bool:
    return type(module).forward is not base.forward


def _linear_forward(module: nn.Linear, rule: Rule, p: _Patch) -> Callable:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return rule.linear(x, module.weight, p.ledger.track("bias", f"{p.name}.bias", module.bias))

    return forward


def _conv_forward(module: nn.Conv2d, rule: Rule, p: _Patch) -> Callable:
    """A conv, then what the adapter says its own forward applies after it (e.g. a norm and activation)."""
    geometry = (module.stride, module.padding, module.dilation, module.groups)
    epilogue = p.adapter.conv_epilogue(module)

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = rule.conv2d(x, module.weight, p.ledger.track("bias", f"{p.name}.bias", module.bias), geometry, p.pixels)
        return epilogue(y) if epilogue is not None else y

    return forward


def _norm_forward(module: nn.Module, rule: Rule, p: _Patch) -> Callable:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return rule.norm(module, x, p.ledger.track("bias", f"{p.name}.bias", module.bias))

    return forward


def _elementwise_forward(module: nn.Module, rule: Rule, p: _Patch) -> Callable:
    fn = type(module)()

    def forward(x: torch.Tensor) -> torch.Tensor:
        return rule.elementwise(fn, x)

    return forward


def _product_forward(module: nn.Module, rule: Rule, p: _Patch) -> Callable:
    def forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return rule.product(module.equation, a, b)

    return forward


def _max_pool_forward(module: nn.MaxPool2d, rule: Rule, p: _Patch) -> Callable:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return rule.max_pool(module, x)

    return forward


def multihead_attention(module: nn.MultiheadAttention, query, key, value, key_padding_mask=None,
                        need_weights=True, attn_mask=None, average_attn_weights=True, *,
                        in_proj_bias: torch.Tensor | None = None,
                        project: Callable = F.linear, scores: Callable = torch.bmm,
                        probabilities: Callable = lambda s: torch.softmax(s, -1), mix: Callable = torch.bmm,
                        record: Callable | None = None):
    """nn.MultiheadAttention's computation (sequence- or batch-first) with each step replaceable.

    ``project(x, w, b)`` the q/k/v projections, ``scores(q, kᵀ)``, ``probabilities(scores)``,
    ``mix(attention, v)``; ``record(attention)`` sees the (B·H, Lq, Lk) probabilities. The LRP rules
    and the attention-based baselines (rollout, Chefer) both build on this one function.
    """
    if module.bias_k is not None or module.add_zero_attn:
        raise EngineError("nn.MultiheadAttention with add_bias_kv / add_zero_attn is not supported")
    if module.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    tgt_len, bsz, embed = query.shape
    heads = module.num_heads
    head_dim = embed // heads
    if module._qkv_same_embed_dim:
        wq, wk, wv = module.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
    bq, bk, bv = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)
    # (L, B, E) -> (B*H, L, d)
    q = project(query, wq, bq).reshape(tgt_len, bsz * heads, head_dim).transpose(0, 1) / math.sqrt(head_dim)
    k = project(key, wk, bk).reshape(key.shape[0], bsz * heads, head_dim).transpose(0, 1)
    v = project(value, wv, bv).reshape(value.shape[0], bsz * heads, head_dim).transpose(0, 1)
    logits = scores(q, k.transpose(1, 2))
    if attn_mask is not None:
        mask = attn_mask if attn_mask.dim() == 3 else attn_mask[None]
        logits = logits.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    if key_padding_mask is not None:
        pad = key_padding_mask.view(bsz, 1, 1, -1).expand(bsz, heads, 1, -1).reshape(bsz * heads, 1, -1)
        logits = logits.masked_fill(pad, float("-inf"))
    attn = probabilities(logits)
    if record is not None:
        record(attn)
    out = module.out_proj(mix(attn, v).transpose(0, 1).reshape(tgt_len, bsz, embed))
    if module.batch_first:
        out = out.transpose(0, 1)
    weights = None
    if need_weights:
        weights = attn.detach().view(bsz, heads, tgt_len, -1)
        weights = weights.mean(1) if average_attn_weights else weights
    return out, weights


def _tracker(p: _Patch) -> Callable[..., torch.Tensor | None]:
    """``track(suffix, tensor, category="bias")``: book a constant the module uses under its own name."""
    prefix = f"{p.name}." if p.name else ""  # the model itself is the attention module: no leading dot
    return lambda suffix, tensor, category="bias": p.ledger.track(category, prefix + suffix, tensor)


def _mha_forward(module: nn.Module, rule: Rule, p: _Patch) -> Callable:
    """Dot-product attention under the rule's steps: the adapter's kernel, or nn.MultiheadAttention's."""
    steps = rule.attention(p.linear_rule)
    kernel = p.adapter.kernel(module, "mha", steps, _tracker(p))
    if kernel is not None:
        return kernel
    if not isinstance(module, nn.MultiheadAttention):
        raise EngineError(f"{p.name} ({type(module).__name__}) is an attention module the engine cannot compute; "
                          "its model's adapter must supply a kernel for it (Adapter.kernel)")
    track = _tracker(p)

    def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        return multihead_attention(module, query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, in_proj_bias=track("in_proj_bias", module.in_proj_bias),
                                   **vars(steps))

    return forward


def _deform_forward(module: nn.Module, rule: Rule, p: _Patch) -> Callable:
    """Multi-scale deformable attention under the rule's steps, computed by the adapter's kernel."""
    kernel = p.adapter.kernel(module, "deform_attn", rule.deformable(), _tracker(p))
    if kernel is None:
        raise EngineError(f"{p.name} ({type(module).__name__}) looks like a multi-scale deformable attention, but no "
                          "adapter computes it; pass the model's adapter (lrp_mode(..., adapter=...))")
    return kernel


_FORWARDS: dict[str, Callable[[nn.Module, Rule, _Patch], Callable]] = {
    "linear": _linear_forward, "conv": _conv_forward, "norm": _norm_forward, "elementwise": _elementwise_forward,
    "product": _product_forward, "max_pool": _max_pool_forward, "mha": _mha_forward, "deform_attn": _deform_forward,
}
_PLAIN = {"linear": nn.Linear, "conv": nn.Conv2d}  # kinds whose subclasses may add steps to the forward


# ----------------------------------------------------------------------------- smaller autograd records
_RELU = {F.relu, torch.relu, torch.Tensor.relu}
_RELU_INPLACE = {F.relu_, torch.relu_, torch.Tensor.relu_}
_CONV = {F.conv2d, torch.conv2d}
_MAX_POOL = {F.max_pool2d, getattr(F, "_max_pool2d", F.max_pool2d), torch.max_pool2d}


def _masked_relu(x: torch.Tensor, inplace: bool) -> torch.Tensor:
    """ReLU whose backward keeps a one-byte mask (x > 0), not the float output torch's ReLU keeps.

    Same value and gradient (zero where x <= 0, also at 0); a quarter of ReLU's share of the graph.
    """
    drop = x <= 0  # NaN stays NaN, as in torch's ReLU
    return x.masked_fill_(drop, 0.0) if inplace else x.masked_fill(drop, 0.0)


@dataclass(frozen=True)
class _ShapeOf:
    """A saved tensor of which the backward reads only the shape (dtype, device)."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device


def _pack_shape_of(x: torch.Tensor) -> Callable[[torch.Tensor], object]:
    def pack(t: torch.Tensor) -> object:
        same = t.dtype == x.dtype and t.shape == x.shape and t.device == x.device and t.data_ptr() == x.data_ptr()
        return _ShapeOf(t.shape, t.dtype, t.device) if same else t

    return pack


def _unpack_shape_of(saved: object) -> torch.Tensor:
    if isinstance(saved, _ShapeOf):  # stride-0 zeros: the shape without the memory
        return torch.zeros((), dtype=saved.dtype, device=saved.device).expand(saved.shape)
    return saved


def _input_shape_only(func: Callable, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """``func(*args, **kwargs)`` keeping only the shape of ``x`` for the backward (which reads nothing else)."""
    with torch.autograd.graph.saved_tensors_hooks(_pack_shape_of(x), _unpack_shape_of):
        return func(*args, **kwargs)


class _CompactSaves(TorchFunctionMode):
    """Within it, ops that autograd would record with a large saved tensor record a smaller one instead.

    Only the input gradient is ever computed in LRP mode (weights take no gradient), so a convolution's
    backward needs its weight, not its input, and a max-pool's its indices; torch saves the inputs anyway
    (one backward formula for all of an op's inputs). ReLU saves its float output; a one-byte mask does.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_grad_enabled() or not args or not isinstance(args[0], torch.Tensor) \
                or not args[0].requires_grad:
            return func(*args, **kwargs)
        x = args[0]
        if func in _CONV:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if isinstance(weight, torch.Tensor) and not weight.requires_grad:
                return _input_shape_only(func, x, args, kwargs)
        elif func in _MAX_POOL:
            return _input_shape_only(func, x, args, kwargs)
        elif (func in _RELU or func in _RELU_INPLACE) and x.is_floating_point():
            inplace = func in _RELU_INPLACE or bool(kwargs.get("inplace", args[1] if len(args) > 1 else False))
            return _masked_relu(x, inplace)
        return func(*args, **kwargs)


def compact_saves() -> contextlib.AbstractContextManager:
    """Autograd records for the LRP forward: same values and gradients, smaller saved tensors.

    Convolutions and max-pools keep only their input's shape, ReLUs a one-byte mask. Enter it around the
    LRP forward and around every backward that may recompute parts of the forward (:mod:`.recompute`), so
    that a recompute saves what the forward saved.
    """
    return _CompactSaves()


@contextlib.contextmanager
def trimmed_heap(enabled: bool = True) -> Iterator[None]:
    """While inside, return the C heap's free pages to the system after every module's forward (glibc only).

    glibc keeps the holes that freed 1–32 MB tensors leave in its heap; on a full-size model they, not the
    tensors, set the forward's peak resident memory (measured at 800×800: 6.7 GB peak without, 4.4 GB with,
    the official plain gradient 4.3–4.6 GB; docs/results/perf.md). Costs one ``malloc_trim`` per module call.
    Does nothing where there is no glibc.
    """
    trim = _malloc_trim() if enabled else None
    if trim is None:
        yield
        return
    handle = nn.modules.module.register_module_forward_hook(lambda _m, _a, _o: trim(0) and None)
    try:
        yield
    finally:
        handle.remove()


def _malloc_trim() -> Callable[[int], int] | None:
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
        return None


# ----------------------------------------------------------------------------- the context
@dataclass
class LRPState:
    """What one LRP forward leaves behind: the ledger and the rule attached to each module."""

    ledger: Ledger = field(default_factory=Ledger)
    rules: dict[str, Rule] = field(default_factory=dict)


def _free_parameters(model: nn.Module, skip: set[int], kind_of: Callable[[str, nn.Module], str | None]
                     ) -> list[tuple[str, nn.Module, str, nn.Parameter]]:
    """Parameters used directly (not through a patched module): level embeddings, query embeddings.

    One (qualified name, module, attribute name, parameter) per module that holds one.
    """
    out = []
    for mod_name, module in model.named_modules():
        if id(module) in skip or kind_of(mod_name, module) is not None or _is_frozen_norm(module):
            continue
        for p_name, param in module.named_parameters(recurse=False):
            out.append((f"{mod_name}.{p_name}" if mod_name else p_name, module, p_name, param))
    return out


def _is_frozen_norm(module: nn.Module) -> bool:
    """A batch norm with fixed statistics: an affine map folded into the layer before it, never an input."""
    return hasattr(module, "running_mean") and hasattr(module, "running_var") \
        and not isinstance(module, (nn.GroupNorm, nn.LayerNorm))


def resolve_adapter(model: nn.Module, adapter: "Adapter | None" = None) -> "Adapter":
    """The adapter given, else the registered one that matches ``model``, else the generic one."""
    if adapter is not None:
        return adapter
    from ..adapters import Adapter, find_adapter

    return find_adapter(model) or Adapter()


@contextlib.contextmanager
def lrp_mode(model: nn.Module, composite: str | Composite = "default", pixels: PixelInput | None = None,
             adapter: "Adapter | None" = None) -> Iterator[LRPState]:
    """Attach the composite's rules to ``model`` for the forwards run inside; restore it exactly on exit.

    ``adapter`` describes the model family (found from the model when not given, see
    :func:`maskdino_lrp.adapters.find_adapter`).
    """
    composite = get_composite(composite)
    adapter = resolve_adapter(model, adapter)
    state = LRPState()
    first = adapter.pixel_layer(model)
    linear_rule = composite.by_kind.get("linear") or Rule("epsilon")
    canonizer = BatchNormFold(adapter.batchnorm_pairs(model))
    patched: list[nn.Module] = []
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    flags = {id(p): p.requires_grad for p in model.parameters()}

    def kind_of(name: str, module: nn.Module) -> str | None:
        return adapter.module_kind(name, module) or module_kind(module)

    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(canonizer)
            for name, module in model.named_modules():
                kind = kind_of(name, module)
                # the pixel rules (flat, z^B) need the pixel input; without it the first conv gets its kind's rule
                rule = composite.rule_for(name, module, is_first_layer=module is first and pixels is not None,
                                          kind=kind, groups=adapter.groups)
                if rule is None:
                    continue
                if kind in _PLAIN and _plain_forward_overridden(module, _PLAIN[kind]) \
                        and adapter.conv_epilogue(module) is None:
                    raise EngineError(f"{name} ({type(module).__name__}) overrides {_PLAIN[kind].__name__}.forward; "
                                      "its model's adapter must say what it adds (Adapter.conv_epilogue)")
                patch = _Patch(name, state.ledger, adapter, linear_rule, pixels if module is first else None)
                module.forward = _FORWARDS[kind](module, rule, patch)
                patched.append(module)
                state.rules[name] = rule
            skip = {id(m) for m in patched} | {id(m) for m in canonizer.norms}
            free = _free_parameters(model, skip, kind_of)
            for param in model.parameters():
                # weights need no gradient: only relevance is computed, and the forward keeps less
                param.requires_grad_(False)
            for pname, module, attr, param in free:
                # a leaf of its own (same storage) stands in for the parameter: the ledger reads its gradient
                # also after the model's flags are restored (e.g. a model frozen with requires_grad_(False))
                leaf = nn.Parameter(param.detach(), requires_grad=True)
                module._parameters[attr] = leaf
                swapped.append((module, attr, param))
                state.ledger.add("embeddings", pname, leaf)
            stack.enter_context(adapter.connect(model))
            stack.enter_context(compact_saves())
            log.debug("LRP mode: %d modules patched, %d free parameters", len(patched), len(free))
            yield state
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)
        for module, attr, param in reversed(swapped):
            module._parameters[attr] = param
        for param in model.parameters():
            param.requires_grad_(flags.get(id(param), True))
