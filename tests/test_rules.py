"""Each LRP rule against an independent reference, in float64 on small random tensors.

References, none of which shares code with ``rules.py``:

1. Explicit LRP, written out: a layer is turned into its dense matrix m (out, in) by applying it to basis
   vectors; contributions c_ji = x_i m_ji (and the rule's variants of them) and denominators d_j give
   R_i = Σ_j c_ji / d_j · R_j. Norms, products, softmax and pooling are written out the same way.
2. Closed forms and properties from ``shared/docs/lrp_rules.md`` (LRP-0 of a linear model is w ⊙ x,
   softmax by hand, the uniform split, conservation).
3. Third-party implementations: zennit 0.5.1 (rules as module hooks that propagate relevance) and
   LXT 2.1 (explicit relevance-propagating autograd functions, and its gradient-mode "efficient" rules).
   Both are optional; the tests skip where they are not installed.

Relevance is computed the project's way: the output gradient is seeded with R_out / y and the relevance
of an input is input ⊙ gradient. Tolerances: everything is float64 and every reference computes the same
sums in another order, so agreement is ~1e-15 on O(1) values, worse only where a denominator nearly
cancels (R_j / z_j with |z_j| ≪ Σ_i |c_ij|; seen up to 1e-11); 1e-10 is asserted unless stated.
"""
from __future__ import annotations

import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from maskdino_lrp.lrp import rules

TOL = 1e-10


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)


# ----------------------------------------------------------------------------- helpers
def stab(z: torch.Tensor, eps: float) -> torch.Tensor:
    """The stabiliser written out: z + ε·sign(z), sign(0) = +1."""
    return z + eps * torch.where(z >= 0, 1.0, -1.0)


def lrp(fn, inputs, r_out):
    """Our relevance: y = fn(*inputs), output gradient seeded with R_out / y; returns y and [x ⊙ grad]."""
    xs = [t.clone().requires_grad_(True) for t in inputs]
    y = fn(*xs)
    seed = r_out / torch.where(y == 0, torch.ones_like(y), y).detach()
    grads = torch.autograd.grad(y, xs, seed, allow_unused=True)
    return y.detach(), [x.detach() * (0.0 if g is None else g) for x, g in zip(xs, grads)]


def explicit(contrib: torch.Tensor, denom: torch.Tensor, r_out: torch.Tensor) -> torch.Tensor:
    """R_i = Σ_j contrib_ji / denom_j · R_j for contrib (out, in); outputs with denom 0 pass nothing."""
    share = torch.where(denom == 0, 0.0, r_out / torch.where(denom == 0, 1.0, denom))
    return (contrib * share[:, None]).sum(0)


# Layers as (input shape, weight shape, conv geometry (stride, padding, dilation, groups) or None for linear).
LAYERS = {
    "linear": ((2, 6), (4, 6), None),
    "conv": ((1, 2, 5, 5), (3, 2, 3, 3), (1, 1, 1, 1)),
    "conv_stride2": ((1, 2, 5, 5), (3, 2, 3, 3), (2, 0, 1, 1)),
    "conv_dilated_grouped": ((1, 4, 6, 6), (4, 2, 3, 3), (1, 2, 2, 2)),
}
CONVS = [name for name, (_, _, geometry) in LAYERS.items() if geometry is not None]


def plain(name, w, b=None):
    """The layer's plain op t ↦ linear/conv(t, w, b)."""
    geometry = LAYERS[name][2]
    if geometry is None:
        return lambda t: F.linear(t, w, b)
    return lambda t: F.conv2d(t, w, b, *geometry)


def ours(rule, name, w, b, **params):
    """Our rule for the layer, as t ↦ rule(t, w, b, geometry..., params)."""
    geometry = LAYERS[name][2]
    if geometry is None:
        fn = {"epsilon": rules.linear_epsilon, "zplus": rules.linear_zplus, "gamma": rules.linear_gamma}[rule]
        return lambda t: fn(t, w, b, **params)
    fn = {"epsilon": rules.conv2d_epsilon, "zplus": rules.conv2d_zplus, "gamma": rules.conv2d_gamma}[rule]
    return lambda t: fn(t, w, b, *geometry, **params)


def dense(op, sample: torch.Tensor) -> torch.Tensor:
    """The matrix (out, in) of a linear, bias-free map on one sample (batch of 1): column i is op(e_i)."""
    n = sample.numel()
    with torch.no_grad():
        return op(torch.eye(n).reshape(n, *sample.shape[1:])).reshape(n, -1).T


def layer(name, signed=True, bias=True):
    in_shape, w_shape, _ = LAYERS[name]
    x = torch.randn(in_shape) if signed else torch.rand(in_shape) + 0.05
    w = torch.randn(w_shape)
    b = torch.randn(w_shape[0]) if bias else None
    return x, w, b


def reference(rule, name, x, w, b, r_out, epsilon=0.0, gamma=0.0):
    """Explicit epsilon / z+ / gamma LRP of one layer, sample by sample, from its dense matrix."""
    out = []
    for xs, rs in zip(x, r_out):
        m = dense(plain(name, w), xs[None])  # (out, in)
        bias = plain(name, w, b)(torch.zeros_like(xs[None])).flatten() if b is not None else torch.zeros(m.shape[0])
        c = m * xs.flatten()[None]  # contributions x_i m_ji
        if rule == "epsilon":
            contrib, denom = c, stab(c.sum(1) + bias, epsilon)
        elif rule == "zplus":  # positive contributions: x⁺w⁺ and x⁻w⁻, and the positive bias
            contrib = c.clamp(min=0)
            denom = stab(contrib.sum(1) + bias.clamp(min=0), epsilon)
        else:  # gamma: contributions of the output's sign amplified by γ; outputs at 0 pass nothing
            z = c.sum(1) + bias
            up, down = c + gamma * c.clamp(min=0), c + gamma * c.clamp(max=0)
            contrib = torch.where(z[:, None] > 0, up, down)
            denom = torch.where(z > 0, up.sum(1) + bias + gamma * bias.clamp(min=0),
                                down.sum(1) + bias + gamma * bias.clamp(max=0))
            denom = torch.where(z == 0, 0.0, stab(denom, epsilon))
        out.append(explicit(contrib, denom, rs.flatten()).reshape(xs.shape))
    return torch.stack(out)


# ----------------------------------------------------------------------------- stabiliser
def test_stabilize_sign_convention():
    z = torch.tensor([-2.0, 0.0, 3.0])
    assert torch.equal(rules.stabilize(z, 0.5), torch.tensor([-2.5, 0.5, 3.5]))
    assert rules.stabilize(torch.zeros(2, dtype=torch.float16), 1e-3).dtype == torch.float16


# ----------------------------------------------------------------------------- layers: epsilon, z+, gamma
@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("signed", [True, False], ids=["signed_x", "positive_x"])
@pytest.mark.parametrize("rule, params", [
    ("epsilon", {"epsilon": 0.1}), ("epsilon", {"epsilon": 0.0}), ("zplus", {"epsilon": 1e-6}),
    ("gamma", {"gamma": 0.0, "epsilon": 1e-6}), ("gamma", {"gamma": 0.25, "epsilon": 1e-6}),
    ("gamma", {"gamma": 3.0, "epsilon": 1e-6}),
], ids=["eps0.1", "eps0", "zplus", "gamma0", "gamma0.25", "gamma3"])
def test_layer_rule_matches_explicit_lrp(rule, params, name, signed):
    x, w, b = layer(name, signed)
    y = plain(name, w, b)(x)
    r_out = torch.randn_like(y)
    _, (r,) = lrp(ours(rule, name, w, b, **params), [x], r_out)
    expected = reference(rule, name, x, w, b, r_out, params["epsilon"], params.get("gamma", 0.0))
    assert torch.allclose(r, expected, rtol=0, atol=TOL)


def test_linear_model_lrp0_is_w_times_x():
    """Property 2: f(x) = wᵀx; LRP-0 (epsilon rule with ε = 0) gives R = w ⊙ x exactly."""
    x, w = torch.randn(7), torch.randn(1, 7)
    _, (r,) = lrp(lambda t: rules.linear_epsilon(t, w, None, 0.0), [x], w @ x)
    assert torch.allclose(r, w[0] * x, rtol=0, atol=1e-14)


def test_epsilon_zero_is_the_plain_gradient():
    x, w, b = layer("conv")
    xs = x.clone().requires_grad_(True)
    g = torch.randn_like(plain("conv", w, b)(x))
    (ours_grad,) = torch.autograd.grad(rules.conv2d_epsilon(xs, w, b, 1, 1, 1, 1, 0.0), xs, g)
    (plain_grad,) = torch.autograd.grad(plain("conv", w, b)(xs), xs, g)
    assert torch.equal(ours_grad, plain_grad)


def test_epsilon_bias_and_stabiliser_absorb_the_rest():
    """Σ_i R_i = Σ_j R_j (z_j − b_j) / (z_j + ε sign z_j)."""
    x, w, b = layer("linear")
    eps = 0.3
    y, (r,) = lrp(lambda t: rules.linear_epsilon(t, w, b, eps), [x], r_out := torch.randn(2, 4))
    assert torch.allclose(r.sum(-1), (r_out * (y - b) / stab(y, eps)).sum(-1), rtol=0, atol=TOL)


def test_zero_denominator_passes_no_relevance():
    """z+ with ε = 0 where an output has no positive contribution: zero relevance, not NaN."""
    x, w = -torch.rand(1, 5) - 0.1, torch.rand(3, 5)  # every x_i w_ij < 0
    _, (r,) = lrp(lambda t: rules.linear_zplus(t, w, None, 0.0), [x], torch.ones(1, 3))
    assert torch.equal(r, torch.zeros_like(x))


# ----------------------------------------------------------------------------- first layer: z^B, flat
def first_layer_reference(rule, name, x, w, r_out, low, high, epsilon):
    m = dense(plain(name, w), x)
    if rule == "flat":
        contrib = dense(plain(name, torch.ones_like(w)), x)  # 1 where input i is in output j's receptive field
    else:
        contrib = m * x.flatten()[None] - m.clamp(min=0) * low.flatten()[None] - m.clamp(max=0) * high.flatten()[None]
    return explicit(contrib, stab(contrib.sum(1), epsilon), r_out.flatten()).reshape(x.shape)


def first_layer(rule, x, w, b, geometry, low, high, epsilon):
    """Our flat / z^B rule as probe ↦ output (the relevance arrives at the probe)."""
    if rule == "flat":
        return lambda p: rules.conv2d_flat(p, x, w, b, *geometry, epsilon)
    return lambda p: rules.conv2d_zbox(p, x, w, b, *geometry, low, high, epsilon)


@pytest.mark.parametrize("name", CONVS)
@pytest.mark.parametrize("rule", ["flat", "zbox"])
def test_first_layer_rule_matches_explicit_and_conserves(rule, name):
    x, w, b = layer(name)
    low, high = x - torch.rand_like(x), x + torch.rand_like(x)  # per-pixel bounds around x
    x[0, 0, 0, 0] = 0.0  # relevance must also reach a zero pixel
    y = plain(name, w, b)(x)
    r_out = torch.randn_like(y)
    _, (r,) = lrp(first_layer(rule, x, w, b, LAYERS[name][2], low, high, 1e-9), [torch.ones_like(x)], r_out)
    expected = first_layer_reference(rule, name, x, w, r_out, low, high, 1e-9)
    assert torch.allclose(r, expected, rtol=0, atol=TOL)
    # conservation by construction, bias and all (only the 1e-9 stabiliser deviates)
    assert math.isclose(r.sum().item(), r_out.sum().item(), rel_tol=1e-7)
    if rule == "zbox":
        assert r[0, 0, 0, 0] != 0


def test_flat_spreads_uniformly():
    x, w = torch.randn(1, 1, 3, 3), torch.randn(1, 1, 3, 3)
    y, (r,) = lrp(lambda p: rules.conv2d_flat(p, x, w, None, 1, 0, 1, 1, 0.0), [torch.ones_like(x)],
                 torch.tensor([[[[2.7]]]]))
    assert torch.allclose(r, torch.full_like(x, 0.3), rtol=0, atol=1e-15)


# ----------------------------------------------------------------------------- elementwise: identity rule
FUNCTIONS = {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}


@pytest.mark.parametrize("fn", list(FUNCTIONS))
@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_identity_rule_passes_relevance_unchanged(fn, eps):
    """R_x = R_y · x / stabilize(x, ε): exactly R_y for ε = 0."""
    x = torch.randn(20)
    y = FUNCTIONS[fn](x)
    r_out = torch.randn(20) * (y != 0)  # a zero output (ReLU) carries no relevance
    _, (r,) = lrp(lambda t: rules.identity_rule(FUNCTIONS[fn], t, eps), [x], r_out)
    assert torch.allclose(r, r_out * x / stab(x, eps), rtol=0, atol=TOL)


# ----------------------------------------------------------------------------- LayerNorm / GroupNorm: LN-rule
def ln_reference(x, w, b, eps, groups=None):
    """LN-rule written out per row (or per group): y_j = Σ_i (δ_ij − 1/n) x_i w_j / σ + b_j, σ a constant;
    R_i = Σ_j c_ji R_j / y_j with c_ji = (δ_ij − 1/n) x_i w_j / σ."""
    def one(row, w_row, b_row, r_row):
        n = row.numel()
        sigma = math.sqrt(row.var(unbiased=False).item() + eps)
        c = (torch.eye(n) - 1.0 / n) * row[None, :] * w_row[:, None] / sigma  # (out j, in i)
        y = c.sum(1) + b_row
        return explicit(c, y, r_row)

    return one


def test_layer_norm_rule_matches_explicit():
    x, w, b = torch.randn(3, 6), torch.rand(6) + 0.5, torch.randn(6)
    r_out = torch.randn(3, 6)
    y, (r,) = lrp(lambda t: rules.layer_norm_lrp(t, (6,), w, b, 1e-5), [x], r_out)
    one = ln_reference(x, w, b, 1e-5)
    expected = torch.stack([one(x[k], w, b, r_out[k]) for k in range(3)])
    assert torch.allclose(r, expected, rtol=0, atol=TOL)


def test_group_norm_rule_matches_explicit():
    x, w, b = torch.randn(2, 4, 3, 3), torch.rand(4) + 0.5, torch.randn(4)
    r_out = torch.randn(2, 4, 3, 3)
    y, (r,) = lrp(lambda t: rules.group_norm_lrp(t, 2, w, b, 1e-5), [x], r_out)
    one = ln_reference(x, w, b, 1e-5)
    expected = torch.zeros_like(x)
    for k in range(2):
        for g in range(2):
            ch = slice(2 * g, 2 * g + 2)
            w_row = w[ch].repeat_interleave(9)
            b_row = b[ch].repeat_interleave(9)
            expected[k, ch] = one(x[k, ch].flatten(), w_row, b_row, r_out[k, ch].flatten()).reshape(2, 3, 3)
    assert torch.allclose(r, expected, rtol=0, atol=TOL)


# ----------------------------------------------------------------------------- softmax
def test_softmax_rule_by_hand():
    """Property 3: R_x_i = x_i (R_i − s_i Σ_j R_j); not conservative — the share is reported, not hidden."""
    x = torch.tensor([0.5, -1.0, 2.0])
    r_out = torch.tensor([0.3, -0.2, 0.7])
    s = torch.softmax(x, 0)
    _, (r,) = lrp(lambda t: rules.softmax_rule(t, 0), [x], r_out)
    by_hand = torch.stack([x[i] * (r_out[i] - s[i] * r_out.sum()) for i in range(3)])
    assert torch.allclose(r, by_hand, rtol=0, atol=1e-15)
    total = (x * r_out).sum() - (x * s).sum() * r_out.sum()
    assert torch.isclose(r.sum(), total, rtol=0, atol=1e-15)
    assert abs(r.sum() - r_out.sum()) > 0.1  # here Σ R_x = 1.11 against Σ R = 0.8


def test_softmax_detached_passes_nothing_to_the_scores():
    x = torch.randn(4).requires_grad_(True)
    assert not rules.softmax_detached(x).requires_grad
    assert torch.equal(rules.softmax_detached(x), torch.softmax(x, -1))


# ----------------------------------------------------------------------------- products: uniform rule
def test_uniform_product_halves():
    """Property 4: R_u = R_v = R/2 elementwise."""
    u, v = torch.randn(6), torch.randn(6)
    r_out = torch.randn(6)
    _, (ru, rv) = lrp(rules.uniform_product, [u, v], r_out)
    assert torch.allclose(ru, r_out / 2, rtol=0, atol=1e-15) and torch.allclose(rv, r_out / 2, rtol=0, atol=1e-15)


def test_uniform_product_with_a_constant_gives_it_nothing():
    """As LXT's mul2: a factor without gradient is a constant, so the product is linear in the other."""
    u, v = torch.randn(6).requires_grad_(True), torch.randn(6)
    y = rules.uniform_product(u, v)
    r_out = torch.randn(6)
    (g,) = torch.autograd.grad(y, u, r_out / y.detach())
    assert torch.allclose(u.detach() * g, r_out, rtol=0, atol=TOL)


def test_uniform_product_of_a_tensor_with_itself_keeps_everything():
    u = torch.randn(5)
    _, (r,) = lrp(lambda t: rules.uniform_product(t, t), [u], r_out := torch.randn(5))
    assert torch.allclose(r, r_out, rtol=0, atol=TOL)


def bilinear_reference(a, b, r_out):
    """R_a_bik = Σ_j a_bik b_bkj R_bij / (2 y_bij) and R_b_bkj = Σ_i (same), written as loops over b, i, k, j."""
    y = a @ b
    ra, rb = torch.zeros_like(a), torch.zeros_like(b)
    for n in range(a.shape[0]):
        for i in range(a.shape[1]):
            for k in range(a.shape[2]):
                for j in range(b.shape[2]):
                    share = a[n, i, k] * b[n, k, j] * r_out[n, i, j] / (2 * y[n, i, j])
                    ra[n, i, k] += share
                    rb[n, k, j] += share
    return ra, rb


def test_uniform_matmul_matches_explicit_and_conserves():
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    r_out = torch.randn(2, 3, 5)
    _, (ra, rb) = lrp(rules.uniform_matmul, [a, b], r_out)
    ea, eb = bilinear_reference(a, b, r_out)
    assert torch.allclose(ra, ea, rtol=0, atol=TOL) and torch.allclose(rb, eb, rtol=0, atol=TOL)
    assert math.isclose((ra.sum() + rb.sum()).item(), r_out.sum().item(), rel_tol=TOL)


def test_uniform_einsum_mask_logits_match_explicit():
    """mask_embed (B, Q, C) · mask_features (B, C, H, W) -> (B, Q, H, W), the mask-logit product."""
    q, f = torch.randn(2, 3, 4), torch.randn(2, 4, 2, 3)
    r_out = torch.randn(2, 3, 2, 3)
    _, (rq, rf) = lrp(lambda s, t: rules.uniform_einsum("bqc,bchw->bqhw", s, t), [q, f], r_out)
    eq, ef = bilinear_reference(q, f.flatten(2), r_out.flatten(2))
    assert torch.allclose(rq, eq, rtol=0, atol=TOL) and torch.allclose(rf, ef.reshape(f.shape), rtol=0, atol=TOL)


# ----------------------------------------------------------------------------- max-pool
def pool_windows(x, y, kernel, stride, padding):
    """{(n, c, oy, ox): [(iy, ix), ...]} — each output's window, clipped to the input (padding excluded)."""
    h, w = x.shape[-2:]
    out = {}
    for n, c, oy, ox in torch.cartesian_prod(*(torch.arange(s) for s in y.shape)).tolist():
        rows = [r for r in range(oy * stride - padding, oy * stride - padding + kernel) if 0 <= r < h]
        cols = [q for q in range(ox * stride - padding, ox * stride - padding + kernel) if 0 <= q < w]
        out[n, c, oy, ox] = [(r, q) for r in rows for q in cols]
    return out


@pytest.mark.parametrize("kernel, stride, padding, ceil_mode",
                         [(2, 2, 0, False), (3, 2, 1, False), (3, 1, 1, False), (2, 2, 0, True)])
def test_maxpool_rules_match_explicit_and_conserve(kernel, stride, padding, ceil_mode):
    x = torch.rand(1, 2, 5, 5) + 0.1  # post-ReLU-like; no ties
    y = F.max_pool2d(x, kernel, stride, padding, ceil_mode=ceil_mode)
    r_out = torch.randn_like(y)
    windows = pool_windows(x, y, kernel, stride, padding)
    wta, proportional = torch.zeros_like(x), torch.zeros_like(x)
    for (n, c, oy, ox), cells in windows.items():
        values = torch.stack([x[n, c, r, q] for r, q in cells])
        r, q = cells[int(values.argmax())]
        wta[n, c, r, q] += r_out[n, c, oy, ox]
        for (r, q), v in zip(cells, values):
            proportional[n, c, r, q] += v / values.sum() * r_out[n, c, oy, ox]
    _, (r_wta,) = lrp(lambda t: rules.maxpool2d_wta(t, kernel, stride, padding, ceil_mode=ceil_mode), [x], r_out)
    _, (r_prop,) = lrp(lambda t: rules.maxpool2d_proportional(t, kernel, stride, padding, ceil_mode, 0.0), [x], r_out)
    assert torch.allclose(r_wta, wta, rtol=0, atol=TOL)
    assert torch.allclose(r_prop, proportional, rtol=0, atol=TOL)
    for r in (r_wta, r_prop):
        assert math.isclose(r.sum().item(), r_out.sum().item(), rel_tol=TOL)


# ----------------------------------------------------------------------------- canonization
def test_fold_batchnorm_equals_conv_then_bn():
    x, w, c = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3), torch.randn(3)
    g, b, m, v = torch.rand(3) + 0.5, torch.randn(3), torch.randn(3), torch.rand(3) + 0.1
    for conv_bias in (None, c):
        ref = F.batch_norm(F.conv2d(x, w, conv_bias, padding=1), m, v, g, b, False, 0.0, 1e-5)
        wf, bf = rules.fold_batchnorm(w, conv_bias, g, b, m, v, 1e-5)
        assert torch.allclose(F.conv2d(x, wf, bf, padding=1), ref, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- conservation (zero bias, ε = 0)
def conservation_cases():
    """name -> (fn, inputs, outputs' relevance sums to compare): bias-free, ε = 0, β = 0."""
    x, w, _ = layer("conv")
    xl, wl, _ = layer("linear")
    xp = torch.rand(1, 2, 5, 5) + 0.1
    probe = torch.ones_like(x)
    low, high = x - torch.rand_like(x), x + torch.rand_like(x)
    bias = torch.randn(3)  # flat and z^B conserve by construction, bias and all
    return {
        "linear_epsilon": (lambda t: rules.linear_epsilon(t, wl, None, 0.0), [xl]),
        "linear_zplus": (lambda t: rules.linear_zplus(t, wl, None, 0.0), [xl]),
        "linear_gamma": (lambda t: rules.linear_gamma(t, wl, None, 0.5, 0.0), [xl]),
        "conv_epsilon": (lambda t: rules.conv2d_epsilon(t, w, None, 1, 1, 1, 1, 0.0), [x]),
        "conv_zplus": (lambda t: rules.conv2d_zplus(t, w, None, 1, 1, 1, 1, 0.0), [x]),
        "conv_gamma": (lambda t: rules.conv2d_gamma(t, w, None, 1, 1, 1, 1, 0.5, 0.0), [x]),
        "conv_gamma_positive_x": (lambda t: rules.conv2d_gamma(t, w, None, 1, 1, 1, 1, 0.5, 0.0), [xp]),
        "conv_flat": (lambda p: rules.conv2d_flat(p, x, w, bias, 1, 1, 1, 1, 0.0), [probe]),
        "conv_zbox": (lambda p: rules.conv2d_zbox(p, x, w, bias, 1, 1, 1, 1, low, high, 0.0), [probe]),
        "layer_norm": (lambda t: rules.layer_norm_lrp(t, (5,), torch.rand(5) + 0.5, None), [torch.randn(3, 5)]),
        "group_norm": (lambda t: rules.group_norm_lrp(t, 2, torch.rand(2) + 0.5, None), [x]),
        "identity": (lambda t: rules.identity_rule(F.gelu, t, 0.0), [x]),
        "uniform_product": (rules.uniform_product, [x, torch.randn_like(x)]),
        "uniform_matmul": (rules.uniform_matmul, [torch.randn(2, 3, 4), torch.randn(2, 4, 5)]),
        "uniform_einsum": (lambda a, b: rules.uniform_einsum("bqc,bchw->bqhw", a, b), [torch.randn(1, 3, 2), x]),
        "maxpool_wta": (lambda t: rules.maxpool2d_wta(t, 3, 2, 1), [xp]),
        "maxpool_proportional": (lambda t: rules.maxpool2d_proportional(t, 3, 2, 1, False, 0.0), [xp]),
    }


@pytest.mark.parametrize("case", list(conservation_cases()))
def test_conservation(case):
    """Σ R_in = Σ R_out to 1e-10 (relative) with zero biases and ε = 0."""
    fn, inputs = conservation_cases()[case]
    y = fn(*inputs)
    r_out = torch.randn_like(y)
    _, rs = lrp(fn, inputs, r_out)
    assert math.isclose(sum(r.sum().item() for r in rs), r_out.sum().item(), rel_tol=TOL)


# ----------------------------------------------------------------------------- forward values and batched backward
def rule_cases(dtype=torch.float64):
    """name -> (rule fn, plain fn, inputs): every public rule on small inputs."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 4, 4, generator=g, dtype=dtype)
    xp = torch.rand(1, 2, 4, 4, generator=g, dtype=dtype) + 0.1
    w = torch.randn(3, 2, 3, 3, generator=g, dtype=dtype)
    b = torch.randn(3, generator=g, dtype=dtype)
    xl = torch.randn(2, 5, generator=g, dtype=dtype)
    wl = torch.randn(3, 5, generator=g, dtype=dtype)
    bl = torch.randn(3, generator=g, dtype=dtype)
    ln_w, ln_b = torch.rand(4, generator=g, dtype=dtype) + 0.5, torch.randn(4, generator=g, dtype=dtype)
    u = torch.randn(1, 2, 4, 4, generator=g, dtype=dtype)
    a, m = torch.randn(2, 3, 4, generator=g, dtype=dtype), torch.randn(2, 4, 3, generator=g, dtype=dtype)
    q, f = torch.randn(1, 3, 2, generator=g, dtype=dtype), torch.randn(1, 2, 4, 4, generator=g, dtype=dtype)
    probe = torch.ones_like(x)
    low, high = x - 1, x + 1
    conv = lambda t: F.conv2d(t, w, b, 1, 1)  # noqa: E731
    lin = lambda t: F.linear(t, wl, bl)  # noqa: E731
    return {
        "linear_epsilon": (lambda t: rules.linear_epsilon(t, wl, bl, 0.01), lin, [xl]),
        "linear_gamma": (lambda t: rules.linear_gamma(t, wl, bl, 0.25), lin, [xl]),
        "linear_zplus": (lambda t: rules.linear_zplus(t, wl, bl), lin, [xl]),
        "conv_epsilon": (lambda t: rules.conv2d_epsilon(t, w, b, 1, 1, 1, 1, 0.01), conv, [x]),
        "conv_gamma": (lambda t: rules.conv2d_gamma(t, w, b, 1, 1, 1, 1, 0.25), conv, [x]),
        "conv_gamma_positive_x": (lambda t: rules.conv2d_gamma(t, w, b, 1, 1, 1, 1, 0.25), conv, [xp]),
        "conv_zplus": (lambda t: rules.conv2d_zplus(t, w, b, 1, 1, 1, 1), conv, [x]),
        "conv_flat": (lambda p: rules.conv2d_flat(p, x, w, b, 1, 1, 1, 1), lambda p: conv(x), [probe]),
        "conv_zbox": (lambda p: rules.conv2d_zbox(p, x, w, b, 1, 1, 1, 1, low, high), lambda p: conv(x), [probe]),
        "identity": (lambda t: rules.identity_rule(F.gelu, t), F.gelu, [x]),
        "layer_norm": (lambda t: rules.layer_norm_lrp(t, (4,), ln_w, ln_b),
                       lambda t: F.layer_norm(t, (4,), ln_w, ln_b), [x]),
        "group_norm": (lambda t: rules.group_norm_lrp(t, 2, ln_w[:2], ln_b[:2]),
                       lambda t: F.group_norm(t, 2, ln_w[:2], ln_b[:2]), [x]),
        "softmax": (lambda t: rules.softmax_rule(t, -1), lambda t: torch.softmax(t, -1), [x]),
        "uniform_product": (rules.uniform_product, torch.mul, [x, u]),
        "uniform_matmul": (rules.uniform_matmul, torch.matmul, [a, m]),
        "uniform_einsum": (lambda s, t: rules.uniform_einsum("bqc,bchw->bqhw", s, t),
                           lambda s, t: torch.einsum("bqc,bchw->bqhw", s, t), [q, f]),
        "maxpool_wta": (lambda t: rules.maxpool2d_wta(t, 2, 2), lambda t: F.max_pool2d(t, 2, 2), [x]),
        "maxpool_proportional": (lambda t: rules.maxpool2d_proportional(t, 3, 1, 1),
                                 lambda t: F.max_pool2d(t, 3, 1, 1), [xp]),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(rule_cases()))
def test_forward_value_is_bit_identical_to_the_plain_op(case, dtype):
    fn, plain_fn, inputs = rule_cases(dtype)[case]
    expected = plain_fn(*inputs)
    assert torch.equal(fn(*[t.clone().requires_grad_(True) for t in inputs]).detach(), expected)
    with torch.no_grad():  # nothing traced: the plain op
        assert torch.equal(fn(*inputs), expected)


@pytest.mark.parametrize("case", list(rule_cases()))
def test_batched_backward_equals_one_at_a_time(case):
    """torch.autograd.grad(..., is_grads_batched=True) (vmap over the backward) gives every row's gradient."""
    fn, _, inputs = rule_cases()[case]
    xs = [t.clone().requires_grad_(True) for t in inputs]
    y = fn(*xs).flatten()
    seeds = torch.randn(y.numel(), y.numel())
    batched = torch.autograd.grad(y, xs, seeds, is_grads_batched=True, retain_graph=True)
    for k in range(y.numel()):
        single = torch.autograd.grad(y, xs, seeds[k], retain_graph=True)
        for bg, sg in zip(batched, single):
            assert torch.allclose(bg[k], sg, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- third party: zennit
def import_zennit():
    """zennit, or skip. zennit 0.5.1's package ``__init__`` imports its ResNet canonizers, which import
    torchvision for two block classes only; torchvision is not installed here (it pins torch and is heavy),
    so when it is absent a stub with two placeholder classes stands in for that import and is removed after."""
    if importlib.util.find_spec("zennit") is None:
        pytest.skip("zennit not installed")
    stubs = {}
    if importlib.util.find_spec("torchvision") is None:
        resnet = types.ModuleType("torchvision.models.resnet")
        resnet.Bottleneck = type("Bottleneck", (torch.nn.Module,), {})
        resnet.BasicBlock = type("BasicBlock", (torch.nn.Module,), {})
        models = types.ModuleType("torchvision.models")
        models.resnet = resnet
        root = types.ModuleType("torchvision")
        root.models = models
        stubs = {"torchvision": root, "torchvision.models": models, "torchvision.models.resnet": resnet}
        sys.modules.update(stubs)
    try:
        return pytest.importorskip("zennit")
    finally:
        for key in stubs:
            sys.modules.pop(key, None)


def zennit_relevance(rule, module, x, r_out):
    """zennit propagates relevance as the gradient: with its rule hooked on the module, the input's gradient
    for the output gradient R_out is the input relevance."""
    handle = rule.register(module)
    try:
        xs = x.clone().requires_grad_(True)
        (relevance,) = torch.autograd.grad(module(xs), xs, r_out)
    finally:
        handle.remove()
    return relevance


def torch_layer(name, w, b):
    geometry = LAYERS[name][2]
    if geometry is None:
        module = torch.nn.Linear(w.shape[1], w.shape[0])
    else:
        stride, padding, dilation, groups = geometry
        module = torch.nn.Conv2d(w.shape[1] * groups, w.shape[0], w.shape[2:], stride, padding, dilation, groups)
    with torch.no_grad():
        module.weight.copy_(w)
        module.bias.copy_(b)
    return module


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("signed", [True, False], ids=["signed_x", "positive_x"])
@pytest.mark.parametrize("rule", ["epsilon", "zplus", "gamma"])
def test_matches_zennit_layer_rules(rule, name, signed):
    """Same stabiliser convention (z + ε sign z, sign 0 = +1) and the same handling of negative inputs
    (z+ and gamma count x⁻w⁻ as positive; gamma picks the amplified sign by the output's sign)."""
    zennit = import_zennit()
    x, w, b = layer(name, signed)
    r_out = torch.randn_like(plain(name, w, b)(x))
    theirs_rule, params = {
        "epsilon": (zennit.rules.Epsilon(epsilon=0.1), {"epsilon": 0.1}),
        "zplus": (zennit.rules.ZPlus(stabilizer=1e-6), {"epsilon": 1e-6}),
        "gamma": (zennit.rules.Gamma(gamma=0.25, stabilizer=1e-6), {"gamma": 0.25, "epsilon": 1e-6}),
    }[rule]
    theirs = zennit_relevance(theirs_rule, torch_layer(name, w, b), x, r_out)
    _, (r,) = lrp(ours(rule, name, w, b, **params), [x], r_out)
    assert torch.allclose(r, theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", CONVS)
@pytest.mark.parametrize("rule", ["flat", "zbox"])
def test_matches_zennit_first_layer_rules(rule, name):
    """zennit's Flat and ZBox; their gradient at the input is our gradient at the probe."""
    zennit = import_zennit()
    x, w, b = layer(name)
    low, high = x - torch.rand_like(x), x + torch.rand_like(x)
    r_out = torch.randn_like(plain(name, w, b)(x))
    if rule == "flat":
        theirs_rule = zennit.rules.Flat(stabilizer=1e-6)
    else:
        theirs_rule = zennit.rules.ZBox(low, high, stabilizer=1e-6)
    theirs = zennit_relevance(theirs_rule, torch_layer(name, w, b), x, r_out)
    _, (r,) = lrp(first_layer(rule, x, w, b, LAYERS[name][2], low, high, 1e-6), [torch.ones_like(x)], r_out)
    assert torch.allclose(r, theirs, rtol=0, atol=1e-12)


def test_fold_batchnorm_matches_zennit_merge():
    zennit = import_zennit()
    conv, bn = torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.copy_(torch.randn(3))
        bn.running_var.copy_(torch.rand(3) + 0.1)
    wf, bf = rules.fold_batchnorm(conv.weight.detach(), conv.bias.detach(), bn.weight.detach(), bn.bias.detach(),
                                  bn.running_mean, bn.running_var, bn.eps)
    zennit.canonizers.MergeBatchNorm.merge_batch_norm([conv], bn)
    assert torch.allclose(wf, conv.weight, rtol=0, atol=1e-14) and torch.allclose(bf, conv.bias, rtol=0, atol=1e-14)


# ----------------------------------------------------------------------------- third party: LXT
def lxt_explicit():
    """LXT's explicit rules: autograd functions whose backward returns relevance (input gradient = relevance)."""
    return pytest.importorskip("lxt.explicit.functional")


def lxt_efficient():
    """LXT's gradient-mode rules. ``lxt.efficient``'s package ``__init__`` imports its transformers model patches;
    the rules module itself only needs torch, so it is loaded from its file."""
    lxt = pytest.importorskip("lxt")
    path = Path(lxt.__file__).parent / "efficient" / "rules.py"
    spec = importlib.util.spec_from_file_location("_lxt_efficient_rules", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lxt_relevance(fn, inputs, r_out):
    xs = [t.clone().requires_grad_(True) for t in inputs]
    return torch.autograd.grad(fn(*xs), xs, r_out)


def test_matches_lxt_linear_epsilon():
    """LXT stabilises with z + ε whatever the sign of z; we use z + ε sign z (zennit). So: ε = 0 on signed
    outputs, and ε = 0.1 where every z > 0 (the bias is chosen so), where the two conventions coincide."""
    lf = lxt_explicit()
    x, w, b = layer("linear")
    r_out = torch.randn(2, 4)
    (theirs,) = lxt_relevance(lambda t: lf.linear_epsilon(t, w, b, 0.0), [x], r_out)
    _, (r,) = lrp(lambda t: rules.linear_epsilon(t, w, b, 0.0), [x], r_out)
    assert torch.allclose(r, theirs, rtol=0, atol=1e-12)
    wx = F.linear(x, w)
    b_pos = (1.0 + wx.abs() - wx)  # per-sample bias making z = 1 + |Wx| > 0; rows of x taken one by one
    for k in range(2):
        (theirs,) = lxt_relevance(lambda t: lf.linear_epsilon(t, w, b_pos[k], 0.1), [x[k]], r_out[k])
        _, (r,) = lrp(lambda t: rules.linear_epsilon(t, w, b_pos[k], 0.1), [x[k]], r_out[k])
        assert torch.allclose(r, theirs, rtol=0, atol=1e-12)


def test_matches_lxt_layer_norm():
    """LXT's layer_norm divides the output relevance by y + ε (ε = 1e-6 by default, +ε whatever the sign);
    with ε = 0 it is ours exactly, and with its default we seed ours with R / (y + 1e-6) to match."""
    lf = lxt_explicit()
    x, w, b = torch.randn(3, 6), torch.rand(6) + 0.5, torch.randn(6)
    r_out = torch.randn(3, 6)
    (theirs,) = lxt_relevance(lambda t: lf.layer_norm_grad_fn.apply(t, w, b, 1e-5, 0.0), [x], r_out)
    y, (r,) = lrp(lambda t: rules.layer_norm_lrp(t, (6,), w, b, 1e-5), [x], r_out)
    assert torch.allclose(r, theirs, rtol=0, atol=1e-12)
    (theirs,) = lxt_relevance(lambda t: lf.layer_norm(t, w, b, 1e-5), [x], r_out)
    _, (r,) = lrp(lambda t: rules.layer_norm_lrp(t, (6,), w, b, 1e-5), [x], r_out * y / (y + 1e-6))
    assert torch.allclose(r, theirs, rtol=0, atol=1e-12)


def test_matches_lxt_softmax():
    lf = lxt_explicit()
    x, r_out = torch.randn(3, 5), torch.randn(3, 5)
    (theirs,) = lxt_relevance(lambda t: lf.softmax(t, -1), [x], r_out)
    _, (r,) = lrp(lambda t: rules.softmax_rule(t, -1), [x], r_out)
    assert torch.allclose(r, theirs, rtol=0, atol=1e-12)


def test_matches_lxt_matmul_and_mul():
    """LXT's matmul is the epsilon rule on a·b followed by the uniform split (ε = 0 here); mul2 the uniform split,
    with everything to the variable factor when the other is constant."""
    lf = lxt_explicit()
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    r_out = torch.randn(2, 3, 5)
    theirs = lxt_relevance(lambda s, t: lf.matmul(s, t, False, 0.0), [a, b], r_out)
    _, r = lrp(rules.uniform_matmul, [a, b], r_out)
    for mine, their in zip(r, theirs):
        assert torch.allclose(mine, their, rtol=0, atol=1e-12)
    u, v, r_uv = torch.randn(6), torch.randn(6), torch.randn(6)
    theirs = lxt_relevance(lf.mul2, [u, v], r_uv)
    _, r = lrp(rules.uniform_product, [u, v], r_uv)
    for mine, their in zip(r, theirs):
        assert torch.allclose(mine, their, rtol=0, atol=1e-12)
    (theirs,) = lxt_relevance(lambda s: lf.mul2(s, v), [u], r_uv)
    _, (r,) = lrp(lambda s: rules.uniform_product(s, v), [u], r_uv)
    assert torch.allclose(r, theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("fn", list(FUNCTIONS))
def test_matches_lxt_efficient_identity_rule(fn):
    """LXT's identity_rule_implicit: gradient f(x) / (x + ε), ε = 1e-10 added whatever the sign of x. Compared
    with ε = 0 on signed x, and with its default ε on x > 0, where the two stabilisers coincide."""
    lxt_rules = lxt_efficient()
    f = FUNCTIONS[fn]
    for x, eps, theirs_fn in [
        (torch.randn(20), 0.0, lambda t: lxt_rules.identity_rule_implicit_fn.apply(f, t, 0.0)),
        (torch.rand(20) + 0.01, 1e-10, lambda t: lxt_rules.identity_rule_implicit(f, t)),
    ]:
        g = torch.randn(20)
        (theirs,) = lxt_relevance(theirs_fn, [x], g)
        (mine,) = lxt_relevance(lambda t: rules.identity_rule(f, t, eps), [x], g)
        assert torch.allclose(mine, theirs, rtol=1e-15, atol=0)


def test_matches_lxt_efficient_uniform_matmul():
    """LXT's efficient uniform rule: the matmul's plain gradient divided by 2 (divide_gradient)."""
    lxt_rules = lxt_efficient()
    a, b, g = torch.randn(2, 3, 4), torch.randn(2, 4, 5), torch.randn(2, 3, 5)
    theirs = lxt_relevance(lambda s, t: lxt_rules.divide_gradient(torch.matmul(s, t), 2), [a, b], g)
    mine = lxt_relevance(rules.uniform_matmul, [a, b], g)
    for m, t in zip(mine, theirs):
        assert torch.allclose(m, t, rtol=0, atol=1e-14)
