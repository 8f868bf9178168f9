"""LRP rules as modified gradients: each function computes the plain op's value, and its gradient is the rule.

Relevance at a tensor is gradient × input. Every rule here is written with ordinary differentiable
torch ops and ``detach`` (no custom autograd functions), so it works unchanged under
``torch.autograd.grad(..., is_grads_batched=True)`` (vmap over the backward).

The central device is :func:`modified`: the forward value is ``z``; the gradient flows through a
*modified* pre-activation ``z_mod`` (the rule's weighting of the contributions) scaled by the constant
``z / z_mod``. For an input-linear ``z_mod`` with contributions c_ij (Σ_i c_ij = z_mod_j) this gives
R_i = Σ_j c_ij / z_mod_j · R_j — the generic LRP redistribution (Montavon et al. 2019).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F


def stabilize(z: torch.Tensor, epsilon: float = 1e-9) -> torch.Tensor:
    """z + ε·sign(z), with sign(0) = +1, so that the result is never zero."""
    return z + epsilon * (z >= 0).to(z.dtype).mul(2).sub(1)


def modified(z: torch.Tensor, z_mod: torch.Tensor, epsilon: float = 1e-9) -> torch.Tensor:
    """Value ``z``; gradient that of ``z_mod`` scaled by the constant z / stabilize(z_mod, ε)."""
    ratio = (z / stabilize(z_mod, epsilon)).detach()
    return z_mod * ratio + (z - z_mod * ratio).detach()


# ----------------------------------------------------------------------------- linear layers
def epsilon_scaled(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``z`` itself, its incoming gradient scaled by z / (z + ε sign z) — the epsilon rule's only change.

    Done with a tensor hook rather than :func:`modified`: no extra forward ops or saved tensors besides
    the ratio (the hook also runs under batched, vmapped backward passes).
    """
    if z.requires_grad:
        ratio = (z / stabilize(z, epsilon)).detach()
        z.register_hook(lambda g: g * ratio)
    return z


def linear_epsilon(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, epsilon: float = 1e-6) -> torch.Tensor:
    """Epsilon rule: R_i = Σ_j x_i w_ij / (z_j + ε sign z_j) · R_j; the bias and ε absorb the rest."""
    return epsilon_scaled(F.linear(x, weight, bias), epsilon)


def _positive(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clamp(min=0)


def _negative(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clamp(max=0)


def _gamma_pre_activation(op: Callable, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          z: torch.Tensor, gamma: float, bias_view: Callable) -> torch.Tensor:
    """Sign-aware gamma pre-activation (zennit's Gamma): positive outputs amplify positive contributions
    (x⁺(w + γw⁺) + x⁻(w + γw⁻)), negative outputs amplify negative ones; so z_mod has z's sign and
    |z_mod| ≥ |z|, and the ratio z / z_mod stays in [0, 1] (no blow-up where z and Σ x(w + γw⁺) disagree).

    For x ≥ 0 (post-ReLU, the usual CNN body) one extra op suffices: Σ x w⁻ = (z − b) − Σ x w⁺.
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


def _conv_bias(b: torch.Tensor) -> torch.Tensor:
    return b.view(1, -1, 1, 1)


def linear_gamma(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gamma: float = 0.25,
                 epsilon: float = 1e-9) -> torch.Tensor:
    """Gamma rule: contributions of the output's own sign amplified by γ; γ→∞ approaches z+."""
    z = F.linear(x, weight, bias)
    return modified(z, _gamma_pre_activation(F.linear, x, weight, bias, z, gamma, lambda b: b), epsilon)


def linear_zplus(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, epsilon: float = 1e-9) -> torch.Tensor:
    """z+ rule (α1β0): only positive contributions x⁺w⁺ + x⁻w⁻ redistribute relevance."""
    z = F.linear(x, weight, bias)
    z_mod = F.linear(x.clamp(min=0), _positive(weight)) + F.linear(x.clamp(max=0), _negative(weight))
    return modified(z, z_mod, epsilon)


# ----------------------------------------------------------------------------- convolutions
def conv2d_epsilon(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride=1, padding=0,
                   dilation=1, groups=1, epsilon: float = 1e-6) -> torch.Tensor:
    """Epsilon rule for a 2-D convolution."""
    return epsilon_scaled(F.conv2d(x, weight, bias, stride, padding, dilation, groups), epsilon)


def conv2d_gamma(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride=1, padding=0,
                 dilation=1, groups=1, gamma: float = 0.25, epsilon: float = 1e-9) -> torch.Tensor:
    """Gamma rule for a convolution (sign-aware, see :func:`_gamma_pre_activation`)."""
    conv = lambda t, w, b: F.conv2d(t, w, b, stride, padding, dilation, groups)
    z = conv(x, weight, bias)
    return modified(z, _gamma_pre_activation(conv, x, weight, bias, z, gamma, _conv_bias), epsilon)


def conv2d_zplus(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride=1, padding=0,
                 dilation=1, groups=1, epsilon: float = 1e-9) -> torch.Tensor:
    """z+ rule for a convolution: positive contributions x⁺w⁺ + x⁻w⁻ only (zennit's ZPlus); bias ignored."""
    z = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    geometry = (stride, padding, dilation, groups)
    z_mod = F.conv2d(x.clamp(min=0), _positive(weight), None, *geometry) \
        + F.conv2d(x.clamp(max=0), _negative(weight), None, *geometry)
    return modified(z, z_mod, epsilon)


def conv2d_zbox(probe: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride=1,
                padding=0, dilation=1, groups=1, low: torch.Tensor | float = 0.0, high: torch.Tensor | float = 1.0,
                epsilon: float = 1e-9) -> torch.Tensor:
    """z^B rule for the layer that sees the pixels, bounded by ``low ≤ x ≤ high``.

    R_i = Σ_j (x_i w_ij − l_i w⁺_ij − h_i w⁻_ij) / z^B_j · R_j. The relevance is delivered to ``probe``
    (a tensor of ones the size of ``x``): gradient × input at the probe is the pixel relevance, exactly,
    even where x = 0 (a rule that is not proportional to x cannot be written as x ⊙ gradient).
    """
    z = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    geometry = (stride, padding, dilation, groups)
    low = torch.as_tensor(low, dtype=x.dtype, device=x.device)
    high = torch.as_tensor(high, dtype=x.dtype, device=x.device)
    z_box = F.conv2d(x * probe, weight, bias, *geometry) \
        - F.conv2d(low * probe, _positive(weight), None, *geometry) \
        - F.conv2d(high * probe, _negative(weight), None, *geometry)
    return modified(z, z_box, epsilon)


def conv2d_flat(probe: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride=1,
                padding=0, dilation=1, groups=1, epsilon: float = 1e-9) -> torch.Tensor:
    """Flat rule: each output's relevance spread uniformly over its receptive field (delivered to ``probe``)."""
    z = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    z_flat = F.conv2d(probe, torch.ones_like(weight), None, stride, padding, dilation, groups)
    return modified(z, z_flat, epsilon)


# ----------------------------------------------------------------------------- elementwise, norms, products
def identity_rule(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, epsilon: float = 1e-9) -> torch.Tensor:
    """Identity rule for an elementwise nonlinearity y = f(x): R_x = R_y (gradient f(x)/x)."""
    y = fn(x)
    return modified(y, x, epsilon)


def layer_norm_lrp(x: torch.Tensor, normalized_shape: Sequence[int], weight: torch.Tensor | None,
                   bias: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """LN-rule (Ali et al. 2022): the standard deviation is a constant; centring and the affine map are linear."""
    dims = tuple(range(-len(normalized_shape), 0))
    centred = x - x.mean(dims, keepdim=True)
    std = (centred.pow(2).mean(dims, keepdim=True) + eps).sqrt().detach()
    y = centred / std
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def group_norm_lrp(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float = 1e-5) -> torch.Tensor:
    """LN-rule for GroupNorm over (B, C, ...): per-group std constant."""
    b, c = x.shape[:2]
    grouped = x.reshape(b, num_groups, -1)
    centred = grouped - grouped.mean(-1, keepdim=True)
    std = (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt().detach()
    y = (centred / std).reshape(x.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y


def softmax_rule(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """AttnLRP softmax rule R_x_i = x_i (R_i − s_i Σ_j R_j): the plain gradient × input already is it."""
    return torch.softmax(x, dim)


def softmax_detached(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """AH-rule: attention probabilities as constants (relevance only through the values)."""
    return torch.softmax(x, dim).detach()


def uniform_product(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Uniform rule for u ⊙ v with both variable: each factor receives half the relevance."""
    return 0.5 * (u * v.detach()) + 0.5 * (u.detach() * v)


def uniform_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Uniform rule for a @ b (Q·Kᵀ, A·V): half the relevance to each factor."""
    return 0.5 * torch.matmul(a, b.detach()) + 0.5 * torch.matmul(a.detach(), b)


def uniform_einsum(equation: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Uniform rule for a bilinear einsum of two variable tensors (e.g. mask_embed · mask_features)."""
    return 0.5 * torch.einsum(equation, a, b.detach()) + 0.5 * torch.einsum(equation, a.detach(), b)


# ----------------------------------------------------------------------------- pooling, canonization
def maxpool2d_wta(x: torch.Tensor, kernel_size, stride=None, padding=0) -> torch.Tensor:
    """Winner-take-all: the window's maximum takes all relevance (the plain gradient)."""
    return F.max_pool2d(x, kernel_size, stride, padding)


def maxpool2d_proportional(x: torch.Tensor, kernel_size, stride=None, padding=0, epsilon: float = 1e-9) -> torch.Tensor:
    """Proportional: each window's relevance split over its inputs in proportion to their values (x ≥ 0)."""
    y = F.max_pool2d(x, kernel_size, stride, padding)
    k = kernel_size if isinstance(kernel_size, (tuple, list)) else (kernel_size, kernel_size)
    window_sum = F.avg_pool2d(x, kernel_size, stride, padding, count_include_pad=True) * (k[0] * k[1])
    return modified(y, window_sum, epsilon)


def fold_batchnorm(conv_weight: torch.Tensor, conv_bias: torch.Tensor | None, bn_weight: torch.Tensor,
                   bn_bias: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                   eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonization: a frozen batch norm after a conv folded into the conv's weight and bias."""
    scale = bn_weight * (running_var + eps).rsqrt()
    weight = conv_weight * scale.view(-1, *([1] * (conv_weight.dim() - 1)))
    bias = bn_bias - running_mean * scale
    if conv_bias is not None:
        bias = bias + conv_bias * scale
    return weight, bias
