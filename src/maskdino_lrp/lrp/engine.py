"""The LRP engine: rules attached to modules for one forward, relevance by one batched backward.

Relevance is gradient × input under modified backward rules. Inside :func:`lrp_mode` each module that
needs a rule gets an instance-level ``forward`` that computes the same values through the rule's
autograd function; on exit (also after an exception) the instance attributes are removed, so the
model is bit-identical to before. Relevance then follows the real computation graph.

Where relevance leaves the image path it is recorded in a :class:`Ledger`: biases (and LayerNorm β,
folded batch-norm shifts), learned embeddings (level embeddings, query embeddings), and positional
inputs (sine encodings, reference-point embeddings). ``target = Σ R(pixels) + ledger + residual``,
where the residual is what non-conservative rules (epsilon, the AttnLRP softmax) and constants the
engine does not see (e.g. reference boxes added before the box sigmoid) take.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import rules
from .composites import Composite, RuleError, get_composite, module_kind
from .rules import PixelInput, Rule

log = logging.getLogger(__name__)


class EngineError(ValueError):
    """A model or request the engine cannot handle, with what to do."""


# ----------------------------------------------------------------------------- ledger
@dataclass
class Ledger:
    """Tensors outside the image path that receive relevance, by category."""

    entries: list[tuple[str, str, torch.Tensor]] = field(default_factory=list)

    def track(self, category: str, name: str, tensor: torch.Tensor | None) -> torch.Tensor | None:
        """A leaf copy of ``tensor`` whose gradient × value is the relevance it absorbs."""
        if tensor is None:
            return None
        leaf = tensor.detach().requires_grad_(True)
        self.entries.append((category, name, leaf))
        return leaf

    def add(self, category: str, name: str, tensor: torch.Tensor) -> None:
        """Record an existing leaf (a learned embedding parameter)."""
        self.entries.append((category, name, tensor))


# ----------------------------------------------------------------------------- module forwards
def _is_frozen_bn(norm: nn.Module | None) -> bool:
    return norm is not None and hasattr(norm, "running_mean") and hasattr(norm, "running_var") \
        and not isinstance(norm, (nn.GroupNorm, nn.LayerNorm))


def _linear_forward(name: str, module: nn.Linear, rule: Rule, ledger: Ledger) -> Callable:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return rule.linear(x, module.weight, ledger.track("bias", f"{name}.bias", module.bias))

    return forward


def _conv_forward(name: str, module: nn.Conv2d, rule: Rule, ledger: Ledger, pixels: PixelInput | None) -> Callable:
    """A conv (detectron2 style: optional ``norm`` and ``activation`` attributes); frozen BN is folded in."""
    norm = getattr(module, "norm", None)
    fold = _is_frozen_bn(norm)
    geometry = (module.stride, module.padding, module.dilation, module.groups)

    def forward(x: torch.Tensor) -> torch.Tensor:
        weight, bias = module.weight, module.bias
        if fold:
            weight, bias = rules.fold_batchnorm(weight, bias, norm.weight, norm.bias, norm.running_mean,
                                                norm.running_var, getattr(norm, "eps", 1e-5))
        y = rule.conv2d(x, weight, ledger.track("bias", f"{name}.bias", bias), geometry, pixels)
        if norm is not None and not fold:
            y = norm(y)
        activation = getattr(module, "activation", None)
        return activation(y) if activation is not None else y

    return forward


def _norm_forward(name: str, module: nn.Module, rule: Rule, ledger: Ledger) -> Callable:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return rule.norm(module, x, ledger.track("bias", f"{name}.bias", module.bias))

    return forward


def _elementwise_forward(module: nn.Module, rule: Rule) -> Callable:
    fn = type(module)()

    def forward(x: torch.Tensor) -> torch.Tensor:
        return rule.elementwise(fn, x)

    return forward


def _product_forward(module: nn.Module, rule: Rule) -> Callable:
    def forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return rule.product(module.equation, a, b)

    return forward


def _max_pool_forward(module: nn.MaxPool2d, rule: Rule) -> Callable:
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


def _mha_forward(name: str, module: nn.MultiheadAttention, rule: Rule, linear_rule: Rule, ledger: Ledger) -> Callable:
    """nn.MultiheadAttention with the rule's attention steps (AttnLRP, the AH-rule, the plain gradient)."""
    steps = vars(rule.attention(linear_rule))

    def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        bias = ledger.track("bias", f"{name}.in_proj_bias", module.in_proj_bias)
        return multihead_attention(module, query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, in_proj_bias=bias, **steps)

    return forward


def _deform_forward(name: str, module: nn.Module, rule: Rule) -> Callable:
    """Multi-scale deformable attention under the rule's steps (value path, value + query path, gradient)."""
    from ..model import deform_attn as da
    steps = rule.deformable()

    def forward(query, reference_points, input_flatten, input_spatial_shapes, input_level_start_index,
                input_padding_mask=None):
        value = module.project_values(input_flatten, input_padding_mask)
        query_for_weights = query if steps.query_relevance else query.detach()
        locations, weights = da.sampling_locations_and_weights(module, query_for_weights, reference_points,
                                                              input_spatial_shapes)
        locations = locations.detach()  # offsets and bilinear weights are positional: no relevance
        if steps.constant_weights:
            weights = weights.detach()
        if steps.product is not None:
            sampled = da.sample_values(value, input_spatial_shapes, input_level_start_index, locations)
            out = da.weighted_sum(sampled, weights, product=steps.product)
        else:  # linear in the value with constant weights: the plain core propagates it
            out = da.ms_deform_attn_core(value, input_spatial_shapes, input_level_start_index, locations, weights)
        return module.output_proj(out)

    return forward


# ----------------------------------------------------------------------------- the context
@dataclass
class LRPState:
    """What one LRP forward leaves behind: patched modules, the ledger, and recorded tensors."""

    ledger: Ledger = field(default_factory=Ledger)
    records: dict[str, Any] = field(default_factory=dict)
    rules: dict[str, Rule] = field(default_factory=dict)


def _first_conv(model: nn.Module) -> nn.Conv2d | None:
    backbone = getattr(model, "backbone", model)
    for module in backbone.modules():
        if isinstance(module, nn.Conv2d):
            return module
    return None


def _free_parameters(model: nn.Module, patched: set[int]) -> list[tuple[str, nn.Parameter]]:
    """Parameters used directly (not through a patched module): level embeddings, query embeddings."""
    out = []
    for mod_name, module in model.named_modules():
        if id(module) in patched or module_kind(module) is not None:
            continue
        if _is_frozen_bn(module):
            continue
        for p_name, param in module.named_parameters(recurse=False):
            out.append((f"{mod_name}.{p_name}" if mod_name else p_name, param))
    return out


@contextlib.contextmanager
def lrp_mode(model: nn.Module, composite: str | Composite = "default",
             pixels: PixelInput | None = None) -> Iterator[LRPState]:
    """Attach the composite's rules to ``model`` for the forwards run inside; restore it exactly on exit."""
    composite = get_composite(composite)
    state = LRPState()
    first = _first_conv(model)
    patched: list[nn.Module] = []
    flags = {id(p): p.requires_grad for p in model.parameters()}
    detach_flags = []
    try:
        for name, module in model.named_modules():
            # the pixel rules (flat, z^B) need the pixel input; without it the first conv gets its kind's rule
            rule = composite.rule_for(name, module, is_first_layer=module is first and pixels is not None)
            if rule is None:
                continue
            kind = module_kind(module)
            if kind == "linear":
                fwd = _linear_forward(name, module, rule, state.ledger)
            elif kind == "conv":
                fwd = _conv_forward(name, module, rule, state.ledger, pixels if module is first else None)
            elif kind == "norm":
                fwd = _norm_forward(name, module, rule, state.ledger)
            elif kind == "elementwise":
                fwd = _elementwise_forward(module, rule)
            elif kind == "product":
                fwd = _product_forward(module, rule)
            elif kind == "max_pool":
                fwd = _max_pool_forward(module, rule)
            elif kind == "mha":
                fwd = _mha_forward(name, module, rule, composite.by_kind.get("linear") or Rule("epsilon"), state.ledger)
            elif kind == "deform_attn":
                fwd = _deform_forward(name, module, rule)
            else:  # pragma: no cover - module_kind and this table are written together
                raise RuleError(f"no forward for module kind {kind!r}")
            module.forward = fwd
            patched.append(module)
            state.rules[name] = rule
        patched_ids = {id(m) for m in patched}
        free = _free_parameters(model, patched_ids)
        free_ids = {id(p) for _, p in free}
        for param in model.parameters():
            # weights need no gradient: only relevance is computed, and the forward keeps less
            param.requires_grad_(id(param) in free_ids)
        for pname, param in free:
            state.ledger.add("embeddings", pname, param)
        for module in model.modules():
            if hasattr(module, "detach_query_content"):
                detach_flags.append((module, module.detach_query_content))
                module.detach_query_content = False  # the selected query content is part of the decision
        log.debug("LRP mode: %d modules patched, %d free parameters", len(patched), len(free))
        yield state
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)
        for param in model.parameters():
            param.requires_grad_(flags.get(id(param), True))
        for module, value in detach_flags:
            module.detach_query_content = value
