"""LRP rules as modified gradients: each function returns the plain op's value, and its gradient is the rule.

Relevance at a tensor ``t`` is ``t ⊙ g_t``, where ``g_t`` is the (modified) gradient. Seeding the gradient
of an output ``z`` with ``R / z`` therefore puts relevance ``R`` on it, and every rule below turns the
gradient arriving at its output into the gradient whose product with the input is the rule's relevance.

Conventions shared by every rule:

- **Forward value**: bit-identical to the plain op (the rule only changes the backward pass).
- **No custom autograd.Function**: each rule is ordinary differentiable torch ops plus ``detach``, so it
  works unchanged under ``torch.autograd.grad(..., is_grads_batched=True)`` (vmap over the backward:
  many targets in one backward). The forward itself may branch on data (``x < 0`` anywhere), so the
  rules are not meant for ``torch.func.vmap`` over the forward.
- **Stabiliser**: :func:`stabilize` is ``z + ε·sign(z)`` with sign(0) = +1 (zennit's ``Stabilizer``;
  LXT adds ``+ε`` whatever the sign). With ε = 0 a zero denominator yields zero relevance, not NaN.
- **Contributions and denominators**: a rule for a layer ``z_j = Σ_i x_i w_ij + b_j`` is written as
  contributions ``c_ij`` and a denominator ``d_j``; ``R_i = Σ_j c_ij / stabilize(d_j) · R_j``. Where the
  rule is linear in the input (``c_ij = x_i · m_ij``) it is the gradient of a modified pre-activation
  ``d`` times the constant ``z / stabilize(d)``, see :func:`redistribute`.

Sign conventions of the positive-contribution rules (zennit's ``ZPlus`` and ``Gamma``): a contribution
is *positive* when ``x_i w_ij > 0``, i.e. positive weight with positive input **or negative weight with
negative input** (``x⁺w⁺ + x⁻w⁻``). For post-ReLU inputs (x ≥ 0) this is the textbook z⁺ / γ rule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Size = int | tuple[int, int]  # a conv / pool geometry argument, as torch.nn.functional takes it

__all__ = [
    "stabilize", "scale_gradient", "redistribute",
    "linear_epsilon", "linear_gamma", "linear_zplus",
    "conv2d_epsilon", "conv2d_gamma", "conv2d_zplus", "conv2d_flat", "conv2d_zbox",
    "identity_rule", "layer_norm_lrp", "group_norm_lrp", "softmax_rule", "softmax_detached",
    "uniform_product", "uniform_matmul", "uniform_einsum",
    "maxpool2d_wta", "maxpool2d_proportional", "fold_batchnorm",
    "RuleError", "KINDS", "Rule", "rule_names", "AttentionSteps", "DeformSteps", "PixelInput",
    "Gradient", "Epsilon", "Gamma", "ZPlus", "Flat", "ZBox", "LayerNormRule", "Identity", "Uniform",
    "AttnLRP", "AHRule", "DeformValue", "DeformValueQuery", "WinnerTakesAll", "Proportional",
]


# ----------------------------------------------------------------------------- building blocks
def stabilize(z: torch.Tensor, epsilon: float = 1e-9) -> torch.Tensor:
    """z + ε·sign(z), with sign(0) = +1, so that the result is never zero for ε > 0."""
    return z + epsilon * (z >= 0).to(z.dtype).mul(2).sub(1)


def _with_value(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """Exactly ``value`` in the forward pass, the gradient of ``surrogate`` in the backward pass.

    ``surrogate - surrogate.detach()`` is exactly zero for finite values, so the sum is bit-identical
    to ``value``; only ``surrogate``'s graph receives the gradient.
    """
    return value.detach() + (surrogate - surrogate.detach())


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor, epsilon: float) -> torch.Tensor:
    """The constant numerator / stabilize(denominator, ε); zero where the stabilised denominator is zero."""
    d = stabilize(denominator.detach(), epsilon)
    zero = d == 0
    return torch.where(zero, torch.zeros_like(d), numerator.detach() / torch.where(zero, torch.ones_like(d), d))


def scale_gradient(z: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """``z`` unchanged; the gradient flowing back through it multiplied by the constant ``factor``."""
    if not z.requires_grad:
        return z
    factor = factor.detach() if isinstance(factor, torch.Tensor) else factor
    return _with_value(z, z * factor)


def redistribute(z: torch.Tensor, z_mod: torch.Tensor, epsilon: float = 1e-9) -> torch.Tensor:
    """Value ``z``; gradient that of the modified pre-activation ``z_mod`` times the constant z / stabilize(z_mod).

    For ``z_mod_j = Σ_i c_ij`` linear in the input x (``c_ij = x_i m_ij``) and the seed ``g_j = R_j / z_j``
    this gives ``x_i g_i = Σ_j c_ij / stabilize(z_mod_j) · R_j`` — the generic LRP redistribution
    (Montavon et al. 2019). A relevance "probe" input (see :func:`conv2d_zbox`) extends it to
    contributions that are not proportional to x.
    """
    if not z_mod.requires_grad:
        return z
    return _with_value(z, z_mod * _ratio(z, z_mod, epsilon))


def _traced(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will record an op on these tensors (else a rule's extra work is skipped)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _positive(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clamp(min=0)


def _negative(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clamp(max=0)


# ----------------------------------------------------------------------------- epsilon (linear, conv)
def _epsilon(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """The epsilon rule's only change: the gradient arriving at z scaled by z / (z + ε sign z)."""
    if epsilon == 0:
        return z
    return scale_gradient(z, _ratio(z, z, epsilon))


def linear_epsilon(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   epsilon: float = 1e-6) -> torch.Tensor:
    """Epsilon rule for ``F.linear``: R_i = Σ_j x_i w_ij / (z_j + ε sign z_j) · R_j; ε = 0 is the plain gradient.

    The bias and ε absorb the rest: Σ_i R_i = Σ_j R_j (z_j − b_j) / (z_j + ε sign z_j).
    """
    return _epsilon(F.linear(x, weight, bias), epsilon)


def conv2d_epsilon(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Size = 1,
                   padding: Size = 0, dilation: Size = 1, groups: int = 1, epsilon: float = 1e-6) -> torch.Tensor:
    """Epsilon rule for ``F.conv2d`` (same formula as :func:`linear_epsilon`, over receptive fields)."""
    return _epsilon(F.conv2d(x, weight, bias, stride, padding, dilation, groups), epsilon)


# ----------------------------------------------------------------------------- gamma and z+
def _gamma_denominator(op: Callable, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       z: torch.Tensor, gamma: float, bias_view: Callable) -> torch.Tensor:
    """zennit's generalised Gamma denominator, selected per output by the sign of z.

    z_j > 0: Σ_i x⁺_i (w + γw⁺)_ij + x⁻_i (w + γw⁻)_ij + b_j + γ b⁺_j  (contributions c + γc⁺),
    z_j < 0: Σ_i x⁺_i (w + γw⁻)_ij + x⁻_i (w + γw⁺)_ij + b_j + γ b⁻_j  (contributions c + γc⁻),
    so the denominator has z's sign and |d| ≥ |z|. Outputs with z_j = 0 pass no relevance.

    For x ≥ 0 (post-ReLU, the usual CNN body) one extra op suffices: Σ_i x_i w⁻_ij = (z − b)_j − Σ_i x_i w⁺_ij.
    (The check for negative inputs is a host sync on accelerators, one per call.)
    """
    if bool((x < 0).any()):
        w_up, w_down = weight + gamma * _positive(weight), weight + gamma * _negative(weight)
        b_up = None if bias is None else bias + gamma * _positive(bias)
        b_down = None if bias is None else bias + gamma * _negative(bias)
        x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
        up = op(x_pos, w_up, b_up) + op(x_neg, w_down, None)
        down = op(x_pos, w_down, b_down) + op(x_neg, w_up, None)
        return torch.where(z > 0, up, down)
    positive = op(x, _positive(weight), None)
    without_bias = z if bias is None else z - bias_view(bias)
    up = z + gamma * positive
    down = z + gamma * (without_bias - positive)
    if bias is not None:
        up = up + gamma * bias_view(_positive(bias))
        down = down + gamma * bias_view(_negative(bias))
    return torch.where(z > 0, up, down)


def _zplus_denominator(op: Callable, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """zennit's ZPlus denominator Σ_i (x⁺_i w⁺_ij + x⁻_i w⁻_ij) + b⁺_j: positive contributions only."""
    positive = op(x.clamp(min=0), _positive(weight), _positive(bias))
    if bool((x < 0).any()):
        positive = positive + op(x.clamp(max=0), _negative(weight), None)
    return positive


def _linear_bias(b: torch.Tensor) -> torch.Tensor:
    return b


def _conv_bias(b: torch.Tensor) -> torch.Tensor:
    return b.view(1, -1, 1, 1)


def linear_gamma(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gamma: float = 0.25,
                 epsilon: float = 1e-9) -> torch.Tensor:
    """Gamma rule for ``F.linear``: contributions of the output's own sign amplified by γ.

    R_i = Σ_j (c_ij + γ c^±_ij) / (Σ_i (c_ij + γ c^±_ij) + b_j + γ b^±_j) · R_j, c_ij = x_i w_ij, ± the sign of z_j
    (see :func:`_gamma_denominator`). γ = 0 is LRP-0 (bias absorbing); γ → ∞ approaches z⁺.
    """
    z = F.linear(x, weight, bias)
    if not _traced(x, weight, bias):
        return z
    return redistribute(z, _gamma_denominator(F.linear, x, weight, bias, z, gamma, _linear_bias), epsilon)


def linear_zplus(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 epsilon: float = 1e-9) -> torch.Tensor:
    """z⁺ rule (α1β0) for ``F.linear``: R_i = Σ_j (x_i w_ij)⁺ / (Σ_i (x_i w_ij)⁺ + b⁺_j) · R_j."""
    z = F.linear(x, weight, bias)
    if not _traced(x, weight, bias):
        return z
    return redistribute(z, _zplus_denominator(F.linear, x, weight, bias), epsilon)


def conv2d_gamma(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Size = 1,
                 padding: Size = 0, dilation: Size = 1, groups: int = 1, gamma: float = 0.25,
                 epsilon: float = 1e-9) -> torch.Tensor:
    """Gamma rule for ``F.conv2d`` (zennit's generalised ``Gamma``, see :func:`linear_gamma`)."""
    def conv(t, w, b):
        return F.conv2d(t, w, b, stride, padding, dilation, groups)

    z = conv(x, weight, bias)
    if not _traced(x, weight, bias):
        return z
    return redistribute(z, _gamma_denominator(conv, x, weight, bias, z, gamma, _conv_bias), epsilon)


def conv2d_zplus(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Size = 1,
                 padding: Size = 0, dilation: Size = 1, groups: int = 1, epsilon: float = 1e-9) -> torch.Tensor:
    """z⁺ rule for ``F.conv2d`` (zennit's ``ZPlus``, see :func:`linear_zplus`)."""
    def conv(t, w, b):
        return F.conv2d(t, w, b, stride, padding, dilation, groups)

    z = conv(x, weight, bias)
    if not _traced(x, weight, bias):
        return z
    return redistribute(z, _zplus_denominator(conv, x, weight, bias), epsilon)


# ----------------------------------------------------------------------------- first layer: z^B and flat
def conv2d_zbox(probe: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                stride: Size = 1, padding: Size = 0, dilation: Size = 1, groups: int = 1,
                low: torch.Tensor | float = 0.0, high: torch.Tensor | float = 1.0,
                epsilon: float = 1e-9) -> torch.Tensor:
    """z^B rule for the layer that sees the pixels, bounded by ``low ≤ x ≤ high`` (zennit's ``ZBox``).

    R_i = Σ_j c_ij / Σ_i c_ij · R_j with c_ij = x_i w_ij − l_i w⁺_ij − h_i w⁻_ij (≥ 0 when low ≤ x ≤ high, not
    checked); the bias takes no
    relevance (as in zennit, where its terms cancel), so the rule conserves by construction.
    The rule is not proportional to x, so it cannot be written as x ⊙ gradient: the relevance is
    delivered to ``probe``, a tensor of ones shaped like ``x`` (probe ⊙ gradient at the probe = pixel
    relevance, exactly, also where x = 0). The value returned is ``conv2d(x, weight, bias)``.
    """
    z = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if not _traced(probe, weight):
        return z
    geometry = (stride, padding, dilation, groups)
    low = torch.as_tensor(low, dtype=x.dtype, device=x.device)
    high = torch.as_tensor(high, dtype=x.dtype, device=x.device)
    z_box = F.conv2d(x.detach() * probe, weight, None, *geometry) \
        - F.conv2d(low * probe, _positive(weight), None, *geometry) \
        - F.conv2d(high * probe, _negative(weight), None, *geometry)
    return redistribute(z, z_box, epsilon)


def conv2d_flat(probe: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                stride: Size = 1, padding: Size = 0, dilation: Size = 1, groups: int = 1,
                epsilon: float = 1e-9) -> torch.Tensor:
    """Flat rule (zennit's ``Flat``): each output's relevance spread uniformly over its receptive field.

    R_i = Σ_j 1[i ∈ field(j)] / |field(j)| · R_j, where padding is not part of a field; delivered to
    ``probe`` (ones shaped like ``x``, see :func:`conv2d_zbox`). The value returned is ``conv2d(x, weight, bias)``.
    """
    z = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if not _traced(probe):
        return z
    z_flat = F.conv2d(probe, torch.ones_like(weight), None, stride, padding, dilation, groups)
    return redistribute(z, z_flat, epsilon)


# ----------------------------------------------------------------------------- elementwise, norms
def identity_rule(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, epsilon: float = 1e-9) -> torch.Tensor:
    """Identity rule for an elementwise nonlinearity y = f(x) (AttnLRP eq. 9): R_x = R_y.

    The gradient is g_out ⊙ f(x) / stabilize(x, ε). Where x = 0 but f(0) ≠ 0 (sigmoid, not ReLU/GELU)
    R_y cannot be represented as x ⊙ g: that relevance is lost at x while the gradient there is
    f(0)/ε. ``fn`` must be elementwise and must not modify its input in place.
    """
    if not _traced(x):
        return fn(x)
    with torch.no_grad():
        y = fn(x)
    return _with_value(y, x * _ratio(y, x, epsilon))


def layer_norm_lrp(x: torch.Tensor, normalized_shape: int | Sequence[int], weight: torch.Tensor | None,
                   bias: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """LN-rule (Ali et al. 2022; AttnLRP): the std is a constant, centring and the affine map are linear.

    The value is ``F.layer_norm``'s; the gradient is that of (x − mean(x)) / σ.detach() · γ + β.
    """
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not _traced(x, weight, bias):
        return F.layer_norm(x, shape, weight, bias, eps)
    with torch.no_grad():
        value = F.layer_norm(x, shape, weight, bias, eps)
    dims = tuple(range(-len(shape), 0))
    std = (x.detach().var(dims, unbiased=False, keepdim=True) + eps).sqrt()
    y = (x - x.mean(dims, keepdim=True)) / std
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return _with_value(value, y)


def group_norm_lrp(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float = 1e-5) -> torch.Tensor:
    """LN-rule for ``F.group_norm`` over (B, C, ...): per-group std constant, centring and affine linear."""
    if not _traced(x, weight, bias):
        return F.group_norm(x, num_groups, weight, bias, eps)
    with torch.no_grad():
        value = F.group_norm(x, num_groups, weight, bias, eps)
    b, c = x.shape[:2]
    grouped = x.reshape(b, num_groups, -1)  # (B, G, C/G · spatial)
    std = (grouped.detach().var(-1, unbiased=False, keepdim=True) + eps).sqrt()
    y = ((grouped - grouped.mean(-1, keepdim=True)) / std).reshape(x.shape)
    channel = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.view(channel)
    if bias is not None:
        y = y + bias.view(channel)
    return _with_value(value, y)


# ----------------------------------------------------------------------------- softmax and products
def softmax_rule(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """AttnLRP softmax rule (Achtibat et al. 2024, Prop. 3.1): R_x_i = x_i (R_i − s_i Σ_j R_j).

    Plain gradient × input already is this rule, so this is ``torch.softmax``; it exists so that
    composites can name it. It is not conservative (softmax is not homogeneous). Masked inputs (−inf)
    get gradient 0 — nothing flows upstream from them — but −inf ⊙ 0 reads as NaN if relevance is taken
    at the scores themselves (LXT sets those inputs to 0).
    """
    return torch.softmax(x, dim)


def softmax_detached(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """AH-rule (Ali et al. 2022): attention probabilities as constants, relevance only through the values."""
    return torch.softmax(x, dim).detach()


def _uniform(y: torch.Tensor, *factors: torch.Tensor) -> torch.Tensor:
    """Split y's relevance equally over the factors that carry gradient (AttnLRP's uniform rule, LXT's mul2)."""
    variable = sum(bool(f.requires_grad) for f in factors)
    return scale_gradient(y, 1.0 / variable) if variable > 1 else y


def uniform_product(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Uniform rule for u ⊙ v: both variable ⇒ R_u = R_v = R/2 elementwise; a constant factor gets none."""
    return _uniform(u * v, u, v)


def uniform_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Uniform rule for a @ b (Q·Kᵀ, A·V): each variable factor gets half.

    R_a_ik = Σ_j a_ik b_kj R_ij / (2 y_ij) and R_b_kj = Σ_i a_ik b_kj R_ij / (2 y_ij) (gradient halved).
    """
    return _uniform(torch.matmul(a, b), a, b)


def uniform_einsum(equation: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Uniform rule for a bilinear einsum of two tensors (e.g. mask_embed · mask_features): half to each."""
    return _uniform(torch.einsum(equation, a, b), a, b)


# ----------------------------------------------------------------------------- pooling, canonization
def maxpool2d_wta(x: torch.Tensor, kernel_size: Size, stride: Size | None = None, padding: Size = 0,
                  dilation: Size = 1, ceil_mode: bool = False) -> torch.Tensor:
    """Winner-take-all: each window's maximum takes all of its relevance (the plain gradient)."""
    return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode)


def maxpool2d_proportional(x: torch.Tensor, kernel_size: Size, stride: Size | None = None, padding: Size = 0,
                           ceil_mode: bool = False,
                           epsilon: float = 1e-9) -> torch.Tensor:
    """Proportional rule: each window's relevance split over the window's inputs in proportion to their values.

    R_i = Σ_{w ∋ i} x_i / stabilize(Σ_{k ∈ w} x_k) · R_w, summing over every (possibly overlapping)
    window w that contains i; padding is not part of a window. This is LRP-0 of the sum pool with the
    same windows, so it conserves; it is meant for x ≥ 0 (after a ReLU), where it is a convex split.
    """
    y = F.max_pool2d(x, kernel_size, stride, padding, ceil_mode=ceil_mode)
    if not _traced(x):
        return y
    window_sum = F.avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad=True, divisor_override=1)
    return redistribute(y, window_sum, epsilon)


def fold_batchnorm(conv_weight: torch.Tensor, conv_bias: torch.Tensor | None, bn_weight: torch.Tensor,
                   bn_bias: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                   eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonization: a frozen batch norm after a conv (or linear) folded into its weight and bias."""
    scale = bn_weight * (running_var + eps).rsqrt()
    weight = conv_weight * scale.view(-1, *([1] * (conv_weight.dim() - 1)))
    bias = bn_bias - running_mean * scale
    if conv_bias is not None:
        bias = bias + conv_bias * scale
    return weight, bias



# ----------------------------------------------------------------------------- rule objects
# The module kinds a rule can be attached to. The engine finds a module's kind (composites.module_kind);
# a rule says which kinds it applies to and implements the op of each.
KINDS = ("linear", "conv", "norm", "mha", "deform_attn", "product", "elementwise", "max_pool")


class RuleError(ValueError):
    """An unknown rule, module kind or composite, or a rule parameter that is misspelt or out of range."""


@dataclass
class PixelInput:
    """The model input as the first layer's rules see it: value, relevance probe (ones), and value bounds."""

    value: torch.Tensor
    probe: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor


@dataclass(frozen=True)
class AttentionSteps:
    """How an attention's steps compute under a rule: q/k/v projections, scores, probabilities, mixing."""

    project: Callable  # (x, weight, bias) -> x Wᵀ + b
    scores: Callable  # (q, kᵀ) -> logits
    probabilities: Callable  # logits -> probabilities over the last axis
    mix: Callable  # (probabilities, v) -> output


@dataclass(frozen=True)
class DeformSteps:
    """How a multi-scale deformable attention computes under a rule.

    ``query_relevance``: the attention weights are computed from the live query (else from a detached one);
    ``constant_weights``: the attention weights are detached; ``product``: the product of sampled values
    and weights (None: the plain, linear core); ``plain``: the sampling locations stay connected to the
    query too, so the backward is autograd's own (else they are positional constants and carry no relevance).
    """

    query_relevance: bool
    constant_weights: bool
    product: Callable | None
    plain: bool = False


class _RuleMeta(type):
    """``Rule("gamma", gamma=0.5)`` builds the registered rule of that name (here: ``Gamma(gamma=0.5)``)."""

    def __call__(cls, *args: Any, **params: Any):
        if cls is Rule:
            if len(args) != 1 or not isinstance(args[0], str):
                raise RuleError(f"Rule(name, **params) takes one rule name; rules: {', '.join(rule_names())}")
            if args[0] not in Rule.registry:
                # named but not defined: refused where it is attached, with the kind's choices
                return _UnknownRule(args[0], params)
            return rule_class(args[0])(**params)
        if args:
            raise RuleError(f"rule {cls.name!r} takes keyword parameters only, e.g. {cls.name.title()}"
                            f"({', '.join(f'{k}={v!r}' for k, v in cls.defaults.items())})")
        return super().__call__(**params)


class Rule(metaclass=_RuleMeta):
    """An LRP rule: a name, the module kinds it applies to, and validated parameters.

    A subclass implements the op of each kind it lists in ``kinds`` (``linear``, ``conv2d``, ``norm``,
    ``elementwise``, ``product``, ``max_pool``, ``attention``, ``deformable``); each returns the plain op's
    value and puts the rule into the backward pass. ``defaults`` names the parameters and their defaults;
    any other keyword is an error, as is a parameter outside its range.
    """

    name: ClassVar[str]
    kinds: ClassVar[tuple[str, ...]]
    defaults: ClassVar[Mapping[str, float]] = {}
    registry: ClassVar[dict[str, type["Rule"]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name in Rule.registry:
            raise RuleError(f"two rules are named {cls.name!r}")
        unknown = [k for k in cls.kinds if k not in KINDS]
        if unknown:
            raise RuleError(f"rule {cls.name!r} names unknown module kind {unknown[0]!r}; kinds: {', '.join(KINDS)}")
        Rule.registry[cls.name] = cls

    def __init__(self, **params: Any):
        for key in params:
            if key not in self.defaults:
                accepted = ", ".join(self.defaults) or "none"
                raise RuleError(f"rule {self.name!r} has no parameter {key!r} (its parameters: {accepted})")
        values = {**self.defaults, **params}
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RuleError(f"rule {self.name!r}: {key} must be a finite number, got {value!r}")
            if value < 0:
                raise RuleError(f"rule {self.name!r}: {key} must be >= 0, got {value!r}")
        self.params: dict[str, float] = values

    def applies_to(self, kind: str) -> bool:
        """Whether this rule can be attached to modules of ``kind``."""
        return kind in self.kinds

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.params == self.params

    def __hash__(self) -> int:
        return hash((self.name, tuple(sorted(self.params.items()))))

    def __repr__(self) -> str:
        args = "".join(f", {k}={v!r}" for k, v in self.params.items())
        return f"Rule({self.name!r}{args})"

    def _missing(self, kind: str):
        raise RuleError(f"rule {self.name!r} does not apply to {kind!r} modules")

    # the op of each kind; a rule implements those of its ``kinds``
    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``F.linear`` under this rule."""
        self._missing("linear")

    def conv2d(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geometry: tuple,
               pixels: PixelInput | None) -> torch.Tensor:
        """``F.conv2d`` (geometry = stride, padding, dilation, groups) under this rule."""
        self._missing("conv")

    def norm(self, module: nn.Module, x: torch.Tensor, beta: torch.Tensor | None) -> torch.Tensor:
        """A LayerNorm / GroupNorm module's op with shift ``beta`` under this rule."""
        self._missing("norm")

    def elementwise(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """An elementwise nonlinearity under this rule."""
        self._missing("elementwise")

    def product(self, equation: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """A bilinear einsum of two tensors under this rule."""
        self._missing("product")

    def max_pool(self, module: nn.MaxPool2d, x: torch.Tensor) -> torch.Tensor:
        """A max-pool module's op under this rule."""
        self._missing("max_pool")

    def attention(self, linear: "Rule") -> AttentionSteps:
        """The steps of a dot-product attention under this rule; ``linear`` is the projections' rule."""
        self._missing("mha")

    def deformable(self) -> DeformSteps:
        """How a multi-scale deformable attention computes under this rule."""
        self._missing("deform_attn")


class _UnknownRule:
    """A rule name that no rule has: it applies to no module kind (the composite names the choices)."""

    kinds: tuple[str, ...] = ()

    def __init__(self, name: str, params: Mapping[str, Any]):
        self.name, self.params = name, dict(params)

    def applies_to(self, kind: str) -> bool:
        return False

    def __repr__(self) -> str:
        return f"Rule({self.name!r}) (no rule of that name; rules: {', '.join(rule_names())})"


def rule_class(name: str) -> type[Rule]:
    """The rule class registered under ``name``."""
    if name not in Rule.registry:
        raise RuleError(f"unknown rule {name!r}; rules: {', '.join(rule_names())}")
    return Rule.registry[name]


def rule_names(kind: str | None = None) -> list[str]:
    """Names of the registered rules (those that apply to ``kind``, if given)."""
    return [n for n, c in Rule.registry.items() if kind is None or kind in c.kinds]


def norm_plain(module: nn.Module, x: torch.Tensor, beta: torch.Tensor | None) -> torch.Tensor:
    """LayerNorm / GroupNorm with the ordinary gradient (the std is not a constant), in plain ops.

    Written out because the fused kernels' backward does not run under vmap (batched backwards).
    """
    if isinstance(module, nn.LayerNorm):
        dims = tuple(range(-len(module.normalized_shape), 0))
        centred = x - x.mean(dims, keepdim=True)
        y = centred / (centred.pow(2).mean(dims, keepdim=True) + module.eps).sqrt()
        return y * module.weight + beta if module.weight is not None else y
    grouped = x.reshape(x.shape[0], module.num_groups, -1)
    centred = grouped - grouped.mean(-1, keepdim=True)
    y = (centred / (centred.pow(2).mean(-1, keepdim=True) + module.eps).sqrt()).reshape(x.shape)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return y * module.weight.view(shape) + beta.view(shape) if module.weight is not None else y


class Gradient(Rule):
    """The plain gradient (LRP-0 for ops linear in the input): every op computed as is."""

    name = "gradient"
    kinds = ("linear", "conv", "norm", "mha", "deform_attn", "product", "elementwise")

    def linear(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def conv2d(self, x, weight, bias, geometry, pixels):
        return F.conv2d(x, weight, bias, *geometry)

    def norm(self, module, x, beta):
        return norm_plain(module, x, beta)

    def elementwise(self, fn, x):
        return fn(x)

    def product(self, equation, a, b):
        return torch.einsum(equation, a, b)

    def attention(self, linear):
        return AttentionSteps(linear.linear, torch.bmm, lambda s: torch.softmax(s, -1), torch.bmm)

    def deformable(self):
        return DeformSteps(query_relevance=True, constant_weights=False, product=None, plain=True)


class Epsilon(Rule):
    """Epsilon rule (:func:`linear_epsilon`, :func:`conv2d_epsilon`)."""

    name = "epsilon"
    kinds = ("linear", "conv")
    defaults = {"epsilon": 1e-6}

    def linear(self, x, weight, bias):
        return linear_epsilon(x, weight, bias, self.params["epsilon"])

    def conv2d(self, x, weight, bias, geometry, pixels):
        return conv2d_epsilon(x, weight, bias, *geometry, self.params["epsilon"])


class Gamma(Rule):
    """Gamma rule (:func:`linear_gamma`, :func:`conv2d_gamma`)."""

    name = "gamma"
    kinds = ("linear", "conv")
    defaults = {"gamma": 0.25, "epsilon": 1e-9}

    def linear(self, x, weight, bias):
        return linear_gamma(x, weight, bias, self.params["gamma"], self.params["epsilon"])

    def conv2d(self, x, weight, bias, geometry, pixels):
        return conv2d_gamma(x, weight, bias, *geometry, self.params["gamma"], self.params["epsilon"])


class ZPlus(Rule):
    """z⁺ rule (:func:`linear_zplus`, :func:`conv2d_zplus`)."""

    name = "zplus"
    kinds = ("linear", "conv")
    defaults = {"epsilon": 1e-9}

    def linear(self, x, weight, bias):
        return linear_zplus(x, weight, bias, self.params["epsilon"])

    def conv2d(self, x, weight, bias, geometry, pixels):
        return conv2d_zplus(x, weight, bias, *geometry, self.params["epsilon"])


def _pixels_for(rule: str, x: torch.Tensor, pixels: PixelInput | None) -> PixelInput:
    if pixels is None or pixels.value.shape != x.shape:
        raise RuleError(f"the {rule} rule applies to the layer that sees the pixels only")
    return pixels


class Flat(Rule):
    """Flat rule for the layer that sees the pixels (:func:`conv2d_flat`)."""

    name = "flat"
    kinds = ("conv",)
    defaults = {"epsilon": 1e-9}

    def conv2d(self, x, weight, bias, geometry, pixels):
        pixels = _pixels_for(self.name, x, pixels)
        return conv2d_flat(pixels.probe, pixels.value, weight, bias, *geometry, self.params["epsilon"])


class ZBox(Rule):
    """z^B rule for the layer that sees the pixels, bounded by the input range (:func:`conv2d_zbox`)."""

    name = "zbox"
    kinds = ("conv",)
    defaults = {"epsilon": 1e-9}

    def conv2d(self, x, weight, bias, geometry, pixels):
        pixels = _pixels_for(self.name, x, pixels)
        return conv2d_zbox(pixels.probe, pixels.value, weight, bias, *geometry, pixels.low, pixels.high,
                           self.params["epsilon"])


class LayerNormRule(Rule):
    """LN-rule: the std is a constant (:func:`layer_norm_lrp`, :func:`group_norm_lrp`)."""

    name = "ln"
    kinds = ("norm",)

    def norm(self, module, x, beta):
        if isinstance(module, nn.LayerNorm):
            return layer_norm_lrp(x, module.normalized_shape, module.weight, beta, module.eps)
        return group_norm_lrp(x, module.num_groups, module.weight, beta, module.eps)


class Identity(Rule):
    """Identity rule for elementwise nonlinearities (:func:`identity_rule`)."""

    name = "identity"
    kinds = ("elementwise",)
    defaults = {"epsilon": 1e-9}

    def elementwise(self, fn, x):
        return identity_rule(fn, x, self.params["epsilon"])


class Uniform(Rule):
    """Uniform rule for a bilinear product of two variable tensors (:func:`uniform_einsum`)."""

    name = "uniform"
    kinds = ("product",)

    def product(self, equation, a, b):
        return uniform_einsum(equation, a, b)


class AttnLRP(Rule):
    """AttnLRP for dot-product attention: uniform rule on Q·Kᵀ and A·V, softmax rule."""

    name = "attnlrp"
    kinds = ("mha",)

    def attention(self, linear):
        return AttentionSteps(linear.linear, uniform_matmul, lambda s: softmax_rule(s, -1), uniform_matmul)


class AHRule(Rule):
    """AH-rule (Ali et al. 2022): attention probabilities as constants, relevance only through the values."""

    name = "ah"
    kinds = ("mha",)

    def attention(self, linear):
        return AttentionSteps(linear.linear, torch.bmm, lambda s: softmax_detached(s, -1), torch.bmm)


class DeformValue(Rule):
    """Deformable attention, value path: attention and bilinear weights are constants."""

    name = "value"
    kinds = ("deform_attn",)

    def deformable(self):
        return DeformSteps(query_relevance=False, constant_weights=True, product=None)


class DeformValueQuery(Rule):
    """Deformable attention, value + query path: the product of values and weights split uniformly."""

    name = "value+query"
    kinds = ("deform_attn",)

    def deformable(self):
        return DeformSteps(query_relevance=True, constant_weights=False, product=uniform_product)


class WinnerTakesAll(Rule):
    """Max-pool, winner-take-all (:func:`maxpool2d_wta`: the plain gradient)."""

    name = "wta"
    kinds = ("max_pool",)

    def max_pool(self, module, x):
        return F.max_pool2d(x, module.kernel_size, module.stride, module.padding, module.dilation,
                            ceil_mode=module.ceil_mode)


class Proportional(Rule):
    """Max-pool, proportional to the window's inputs (:func:`maxpool2d_proportional`)."""

    name = "proportional"
    kinds = ("max_pool",)
    defaults = {"epsilon": 1e-9}

    def max_pool(self, module, x):
        return maxpool2d_proportional(x, module.kernel_size, module.stride, module.padding,
                                      epsilon=self.params["epsilon"])
