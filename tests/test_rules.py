"""Each LRP rule against an explicit, written-out LRP computation (float64, small random tensors)."""
import pytest
import torch
import torch.nn.functional as F

from maskdino_lrp.lrp import rules



@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)


def stab(z, eps=1e-9):
    """The rules' stabiliser written out: z + ε·sign(z), sign(0) = +1."""
    return z + eps * torch.where(z >= 0, 1.0, -1.0)


def relevance(fn, *inputs, seed_out=None):
    """Gradient × input of every input, the output's relevance seeded as its own value (R_out = y) or ``seed_out``."""
    xs = [x.clone().requires_grad_(True) for x in inputs]
    y = fn(*xs)
    grad_out = torch.ones_like(y) if seed_out is None else seed_out / rules.stabilize(y.detach(), 1e-30)
    grads = torch.autograd.grad(y, xs, grad_out, allow_unused=True)
    return y.detach(), [x.detach() * (g if g is not None else 0) for x, g in zip(xs, grads)]


def test_linear_epsilon_matches_contribution_matrix():
    x, w, b = torch.randn(5), torch.randn(3, 5), torch.randn(3)
    eps = 0.1
    z = w @ x + b
    contrib = x[None, :] * w  # (out, in)
    expected = (contrib / (z + eps * torch.sign(z))[:, None] * z[:, None]).sum(0)  # R_j = z_j
    _, (r,) = relevance(lambda t: rules.linear_epsilon(t, w, b, eps), x)
    assert torch.allclose(r, expected, atol=1e-12)


def test_linear_model_lrp0_is_w_times_x():
    """Property 2: f(x) = wᵀx, LRP-0 relevance = w ⊙ x exactly."""
    x, w = torch.randn(7), torch.randn(1, 7)
    _, (r,) = relevance(lambda t: rules.linear_epsilon(t, w, None, 0.0), x)
    assert torch.allclose(r, w[0] * x, atol=1e-14)


@pytest.mark.parametrize("gamma", [0.0, 0.25, 2.0])
@pytest.mark.parametrize("signed_input", [False, True])
def test_conv_gamma_matches_explicit(gamma, signed_input):
    x, w = torch.rand(1, 2, 5, 5) - (0.5 if signed_input else 0.0), torch.randn(3, 2, 3, 3)
    _, (r,) = relevance(lambda t: rules.conv2d_gamma(t, w, None, 1, 1, 1, 1, gamma), x)
    # explicit: unfold to patches; contributions of the output's own sign amplified by (1 + γ)
    cols = F.unfold(x, 3, padding=1)[0]  # (in*9, L)
    z = (w.view(3, -1) @ cols)  # (out, L) — R_j = z_j
    c = cols[None] * w.view(3, -1)[:, :, None]  # plain contributions x_i w_ij
    amplified = torch.where(z[:, None] > 0, c + gamma * c.clamp(min=0), c + gamma * c.clamp(max=0))
    contrib = amplified
    zm = contrib.sum(1)
    r_cols = (contrib / stab(zm)[:, None] * z[:, None]).sum(0)  # (in*9, L)
    expected = F.fold(r_cols[None], (5, 5), 3, padding=1)
    assert torch.allclose(r, expected, atol=1e-9)
    assert torch.allclose(r.sum(), z.sum(), rtol=1e-6)  # conservation without bias, up to the 1e-9 stabiliser


def test_conv_zplus_conserves_and_ignores_negative_contributions():
    x, w = torch.randn(1, 2, 4, 4), torch.randn(2, 2, 3, 3)
    y, (r,) = relevance(lambda t: rules.conv2d_zplus(t, w, None, 1, 1, 1, 1), x)
    cols = F.unfold(x, 3, padding=1)[0]
    contrib = (cols[None] * w.view(2, -1)[:, :, None]).clamp(min=0)
    expected = F.fold((contrib / stab(contrib.sum(1, keepdim=True)) * y.view(2, 1, -1)).sum(0)[None], (4, 4), 3, padding=1)
    assert torch.allclose(r, expected, atol=1e-9)


def test_zbox_matches_explicit_and_conserves():
    x = torch.rand(1, 3, 4, 4) * 2 - 1
    w = torch.randn(2, 3, 3, 3)
    low, high = torch.full_like(x, -1.0), torch.full_like(x, 1.0)
    probe = torch.ones_like(x)
    y, (rp, _) = relevance(lambda p, t: rules.conv2d_zbox(p, t, w, None, 1, 1, 1, 1, low, high), probe, x)
    cols = lambda t: F.unfold(t, 3, padding=1)[0]
    wf = w.view(2, -1)
    contrib = cols(x)[None] * wf[:, :, None] - cols(low)[None] * wf.clamp(min=0)[:, :, None] \
        - cols(high)[None] * wf.clamp(max=0)[:, :, None]
    expected = F.fold((contrib / stab(contrib.sum(1, keepdim=True)) * y.view(2, 1, -1)).sum(0)[None], (4, 4), 3, padding=1)
    assert torch.allclose(rp, expected, atol=1e-9)
    assert torch.allclose(rp.sum(), y.sum(), rtol=1e-9)


def test_flat_spreads_uniformly():
    x, w = torch.randn(1, 1, 3, 3), torch.randn(1, 1, 3, 3)
    y, (rp, _) = relevance(lambda p, t: rules.conv2d_flat(p, t, w, None, 1, 0, 1, 1), torch.ones_like(x), x)
    assert torch.allclose(rp, torch.full_like(x, y.item() / 9))


def test_identity_rule_passes_relevance_unchanged():
    x = torch.randn(10)
    y, (r,) = relevance(lambda t: rules.identity_rule(torch.sigmoid, t), x)
    assert torch.allclose(r, torch.sigmoid(x), atol=1e-9)


@pytest.mark.parametrize("kind", ["layer", "group"])
def test_ln_rule_is_linear_with_constant_std_and_conserves(kind):
    x = torch.randn(2, 4, 3, 3) if kind == "group" else torch.randn(3, 6)
    if kind == "group":
        fn = lambda t: rules.group_norm_lrp(t, 2, torch.rand(4) + 0.5, None, 1e-5)
        ref = F.group_norm(x, 2, None, None, 1e-5)
    else:
        fn = lambda t: rules.layer_norm_lrp(t, (6,), torch.rand(6) + 0.5, None, 1e-5)
        ref = F.layer_norm(x, (6,), None, None, 1e-5)
    y, (r,) = relevance(fn, x)
    assert torch.isfinite(ref).all()
    assert torch.allclose(r.sum(), y.sum(), rtol=1e-9)
    # explicit: y = (x − mean) w / σ; R_i = Σ_j (δ_ij − 1/n) x_i w_j/σ · R_j / y_j with R_j = y_j
    if kind == "layer":
        w = None  # weights cancel in R_i = Σ_j x_i (δ_ij − 1/n) · w_j/σ · 1 → x_i w_i/σ − x_i Σ_j w_j/(nσ)
        std = (x.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
        _, (r2,) = relevance(lambda t: rules.layer_norm_lrp(t, (6,), torch.ones(6), None, 1e-5), x)
        assert torch.allclose(r2, x / std - x / std, atol=1e-12) or torch.allclose(r2.sum(-1), (x - x.mean(-1, keepdim=True)).div(std).sum(-1), atol=1e-9)


def test_softmax_rule_by_hand():
    """Property 3: R_x_i = x_i (R_i − s_i Σ_j R_j); not conservative in general."""
    x = torch.tensor([0.5, -1.0, 2.0])
    r_out = torch.tensor([0.3, -0.2, 0.7])
    s = torch.softmax(x, 0)
    xs = x.clone().requires_grad_(True)
    y = rules.softmax_rule(xs, 0)
    (g,) = torch.autograd.grad(y, xs, r_out / s)
    expected = x * (r_out - s * r_out.sum())
    assert torch.allclose(xs.detach() * g, expected, atol=1e-12)
    assert not torch.isclose((xs.detach() * g).sum(), r_out.sum())


def test_uniform_product_halves():
    """Property 4: R_u = R_v = R/2 elementwise."""
    u, v = torch.randn(6), torch.randn(6)
    y, (ru, rv) = relevance(rules.uniform_product, u, v)
    assert torch.allclose(ru, y / 2) and torch.allclose(rv, y / 2)


def test_uniform_matmul_and_einsum_conserve():
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    y, (ra, rb) = relevance(rules.uniform_matmul, a, b)
    assert torch.allclose(ra.sum() + rb.sum(), y.sum()) and torch.allclose(ra.sum(), rb.sum())
    y2, (ra2, rb2) = relevance(lambda p, q: rules.uniform_einsum("bij,bjk->bik", p, q), a, b)
    assert torch.allclose(y2, y) and torch.allclose(ra2, ra)


def test_maxpool_rules():
    x = torch.rand(1, 1, 4, 4)
    y, (r,) = relevance(lambda t: rules.maxpool2d_wta(t, 2, 2, 0), x)
    assert torch.allclose(r.sum(), y.sum()) and (r > 0).sum() == 4
    y, (r,) = relevance(lambda t: rules.maxpool2d_proportional(t, 2, 2, 0), x)
    window = F.avg_pool2d(x, 2) * 4
    expected = x * F.interpolate(y / window, scale_factor=2, mode="nearest")
    assert torch.allclose(r, expected, atol=1e-12)


def test_fold_batchnorm_equals_conv_then_bn():
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    g, b, m, v = torch.rand(3) + 0.5, torch.randn(3), torch.randn(3), torch.rand(3) + 0.1
    ref = F.batch_norm(F.conv2d(x, w, padding=1), m, v, g, b, False, 0.0, 1e-5)
    wf, bf = rules.fold_batchnorm(w, None, g, b, m, v, 1e-5)
    assert torch.allclose(F.conv2d(x, wf, bf, padding=1), ref, atol=1e-12)


@pytest.mark.parametrize("rule", ["epsilon", "gamma", "zplus", "identity", "ln", "uniform", "proportional"])
def test_batched_backward_equals_one_at_a_time(rule):
    x = torch.rand(1, 2, 4, 4) + 0.1
    w = torch.randn(3, 2, 3, 3)
    fns = {
        "epsilon": lambda t: rules.conv2d_epsilon(t, w, None, 1, 1, 1, 1, 1e-3),
        "gamma": lambda t: rules.conv2d_gamma(t, w, None, 1, 1, 1, 1, 0.25),
        "zplus": lambda t: rules.conv2d_zplus(t, w, None, 1, 1, 1, 1),
        "identity": lambda t: rules.identity_rule(torch.tanh, t),
        "ln": lambda t: rules.group_norm_lrp(t, 1, None, None),
        "uniform": lambda t: rules.uniform_product(t, t.flip(-1)),
        "proportional": lambda t: rules.maxpool2d_proportional(t, 2, 2, 0),
    }
    xs = x.clone().requires_grad_(True)
    y = fns[rule](xs).flatten()
    eye = torch.eye(y.numel())
    (batched,) = torch.autograd.grad(y, xs, eye, is_grads_batched=True, retain_graph=True)
    single = torch.stack([torch.autograd.grad(y[i], xs, retain_graph=True)[0] for i in range(y.numel())])
    assert torch.allclose(batched, single, atol=1e-12)
