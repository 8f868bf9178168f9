"""Multi-scale deformable attention: our gather sampler against F.grid_sample and the official core."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from maskdino_lrp.model import deform_attn as da
from maskdino_lrp.model.deform_attn import MSDeformAttn


def _level_start(shapes: torch.Tensor) -> torch.Tensor:
    return torch.cat((shapes.new_zeros((1,)), shapes.prod(1).cumsum(0)[:-1]))


def _grid_sample_core(value, shapes, locations, weights):
    """The official pure-PyTorch core (grid_sample per level), written independently for the test."""
    n, _, m, d = value.shape
    _, len_q, _, n_levels, n_points, _ = locations.shape
    per_level = value.split([h * w for h, w in shapes.tolist()], dim=1)
    grids = 2 * locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes.tolist()):
        v = per_level[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    a = weights.transpose(1, 2).reshape(n * m, 1, len_q, n_levels * n_points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * a).sum(-1).view(n, m * d, len_q)
    return out.transpose(1, 2)


def test_sampler_matches_grid_sample_including_outside():
    g = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[7, 11], [4, 5], [1, 3]])
    n, m, d, len_q, n_points = 2, 3, 5, 17, 4
    value = torch.randn(n, int(shapes.prod(1).sum()), m, d, generator=g)
    # locations well outside [0, 1] too, plus exact pixel centres and pixel edges
    loc = torch.rand(n, len_q, m, 3, n_points, 2, generator=g) * 1.6 - 0.3
    loc[0, 0, 0, 0, 0] = torch.tensor([0.5 / 11, 0.5 / 7])
    loc[0, 0, 0, 0, 1] = torch.tensor([0.0, 1.0])
    loc[0, 0, 0, 0, 2] = torch.tensor([-0.5 / 11 - 1e-7, 1.0 + 0.5 / 7])
    ours = da.sample_values(value, shapes, _level_start(shapes), loc)
    assert ours.shape == (n, len_q, m, 3, n_points, d)
    per_level = value.split(shapes.prod(1).tolist(), dim=1)
    for lvl, (h, w) in enumerate(shapes.tolist()):
        v = per_level[lvl].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        grid = (2 * loc[:, :, :, lvl] - 1).transpose(1, 2).flatten(0, 1)  # (N*M, Lq, P, 2)
        ref = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        ref = ref.view(n, m, d, len_q, n_points).permute(0, 3, 1, 4, 2)
        torch.testing.assert_close(ours[:, :, :, lvl], ref, atol=1e-6, rtol=1e-5)


def test_integer_and_half_pixel_locations():
    shapes = torch.tensor([[4, 6]])
    tokens = 24
    value = torch.eye(tokens)[None, :, None, :]  # (1, 24, 1, 24): token t has one-hot value e_t
    # pixel centre of (row 2, col 3) → all weight on token 2·6 + 3
    centre = torch.tensor([(3 + 0.5) / 6, (2 + 0.5) / 4]).view(1, 1, 1, 1, 1, 2)
    out = da.sample_values(value, shapes, None, centre)[0, 0, 0, 0, 0]
    expected = torch.zeros(tokens)
    expected[2 * 6 + 3] = 1.0
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    # the corner shared by pixels (1,2), (1,3), (2,2), (2,3) → 25 % each
    corner = torch.tensor([3 / 6, 2 / 4]).view(1, 1, 1, 1, 1, 2)
    out = da.sample_values(value, shapes, None, corner)[0, 0, 0, 0, 0]
    expected = torch.zeros(tokens)
    expected[[1 * 6 + 2, 1 * 6 + 3, 2 * 6 + 2, 2 * 6 + 3]] = 0.25
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    # half a pixel outside the top-left corner: the sample sees a quarter of pixel (0, 0), the rest is zero
    outside = torch.tensor([0.0, 0.0]).view(1, 1, 1, 1, 1, 2)
    out = da.sample_values(value, shapes, None, outside)[0, 0, 0, 0, 0]
    expected = torch.zeros(tokens)
    expected[0] = 0.25
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def _random_module(seed: int, n_levels: int) -> MSDeformAttn:
    torch.manual_seed(seed)
    module = MSDeformAttn(64, n_levels, 4, 3)
    with torch.no_grad():  # non-trivial offsets and attention weights (the official init has zeros)
        module.sampling_offsets.weight.normal_(0, 0.3)
        module.attention_weights.weight.normal_(0, 0.3)
    return module


def test_module_matches_official_core_points_and_boxes():
    shapes = torch.tensor([[6, 9], [3, 5], [2, 2]])
    lsi = _level_start(shapes)
    module = _random_module(1, 3)
    g = torch.Generator().manual_seed(2)
    n, len_q = 2, 13
    x = torch.randn(n, int(shapes.prod(1).sum()), 64, generator=g)
    query = torch.randn(n, len_q, 64, generator=g)
    pad = torch.zeros(n, x.shape[1], dtype=torch.bool)
    pad[1, -7:] = True
    for ref in (torch.rand(n, len_q, 3, 2, generator=g),
                torch.cat([torch.rand(n, len_q, 3, 2, generator=g), 0.05 + 0.5 * torch.rand(n, len_q, 3, 2, generator=g)], -1)):
        out = module(query, ref, x, shapes, lsi, pad)
        # the official composition, with grid_sample as its core
        value = module.value_proj(x).masked_fill(pad[..., None], 0.0).view(n, -1, 4, 16)
        offsets = module.sampling_offsets(query).view(n, len_q, 4, 3, 3, 2)
        weights = F.softmax(module.attention_weights(query).view(n, len_q, 4, 9), -1).view(n, len_q, 4, 3, 3)
        if ref.shape[-1] == 2:
            norm = torch.stack([shapes[..., 1], shapes[..., 0]], -1)
            loc = ref[:, :, None, :, None, :] + offsets / norm[None, None, None, :, None, :]
        else:
            loc = ref[:, :, None, :, None, :2] + offsets / 3 * ref[:, :, None, :, None, 2:] * 0.5
        expected = module.output_proj(_grid_sample_core(value, shapes, loc, weights))
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
        got_loc, got_w = da.sampling_locations_and_weights(module, query, ref, shapes)
        torch.testing.assert_close(got_loc, loc, atol=0, rtol=0)
        torch.testing.assert_close(got_w, weights, atol=0, rtol=0)


def test_decomposition_recomposes_forward_and_is_linear_in_value():
    shapes = torch.tensor([[5, 4], [2, 3]])
    lsi = _level_start(shapes)
    module = _random_module(3, 2)
    x = torch.randn(1, 26, 64)
    query = torch.randn(1, 6, 64)
    ref = torch.rand(1, 6, 2, 2)
    value = module.project_values(x)
    offsets, logits = da.sampling_offsets_and_logits(module, query)
    loc = da.sampling_locations(module, ref, offsets, shapes)
    weights = da.attention_softmax(module, logits)
    sampled = da.sample_values(value, shapes, lsi, loc)
    out = module.output_proj(da.weighted_sum(sampled, weights))
    # the module's fused core sums in another order: equal up to float rounding
    torch.testing.assert_close(out, module(query, ref, x, shapes, lsi), atol=1e-6, rtol=0)
    # a custom product hook receives equal shapes and replaces the elementwise product
    seen = []

    def product(a, b):
        seen.append((a.shape, b.shape))
        return a * b

    torch.testing.assert_close(da.weighted_sum(sampled, weights, product=product), da.weighted_sum(sampled, weights))
    assert seen and seen[0][0] == seen[0][1]
    # sample_values is linear in value
    v2 = torch.randn_like(value)
    torch.testing.assert_close(da.sample_values(2 * value - 3 * v2, shapes, lsi, loc),
                               2 * sampled - 3 * da.sample_values(v2, shapes, lsi, loc), atol=1e-5, rtol=0)


def test_vmap_batched_grads_and_gradients_match_grid_sample():
    shapes = torch.tensor([[5, 4], [2, 3]])
    g = torch.Generator().manual_seed(4)
    loc = torch.rand(1, 6, 2, 2, 3, 2, generator=g) * 1.2 - 0.1
    values = torch.randn(3, 1, 26, 2, 8, generator=g)
    batched = torch.func.vmap(lambda v: da.sample_values(v, shapes, None, loc))(values)
    looped = torch.stack([da.sample_values(v, shapes, None, loc) for v in values])
    torch.testing.assert_close(batched, looped, atol=0, rtol=0)
    # is_grads_batched (a vmapped backward, as the LRP engine uses) equals one backward per row
    v = values[0].clone().requires_grad_(True)
    w = torch.rand(1, 6, 2, 2, 3, generator=g).requires_grad_(True)
    out = da.weighted_sum(da.sample_values(v, shapes, None, loc), w)
    rows = torch.randn(4, *out.shape, generator=g)
    grads = torch.autograd.grad(out, (v, w), grad_outputs=rows, is_grads_batched=True, retain_graph=True)
    for i in range(4):
        single = torch.autograd.grad(out, (v, w), grad_outputs=rows[i], retain_graph=True)
        torch.testing.assert_close(grads[0][i], single[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(grads[1][i], single[1], atol=1e-6, rtol=0)
    # gradients w.r.t. value and locations equal grid_sample's
    v = values[0].clone().requires_grad_(True)
    loc_g = loc.clone().requires_grad_(True)
    w = torch.rand(1, 6, 2, 2, 3, generator=g)
    da.ms_deform_attn_core(v, shapes, None, loc_g, w).square().sum().backward()
    v_ref = values[0].clone().requires_grad_(True)
    loc_ref = loc.clone().requires_grad_(True)
    _grid_sample_core(v_ref, shapes, loc_ref, w).square().sum().backward()
    torch.testing.assert_close(v.grad, v_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loc_g.grad, loc_ref.grad, atol=1e-4, rtol=1e-4)


def test_fused_core_and_sparse_inference_core_equal_the_decomposition_with_gradients():
    """With autograd on (gather + bmm) and off (sparse matrix): the same values as sample_values +
    weighted_sum, and on the autograd path the same gradients w.r.t. value, locations and weights,
    also under a vmapped backward (is_grads_batched)."""
    shapes = torch.tensor([[5, 4], [2, 3]])
    g = torch.Generator().manual_seed(7)
    value = torch.randn(2, 26, 2, 8, generator=g, dtype=torch.float64)
    loc = torch.rand(2, 6, 2, 2, 3, 2, generator=g, dtype=torch.float64) * 1.2 - 0.1
    w = torch.rand(2, 6, 2, 2, 3, generator=g, dtype=torch.float64)
    inputs = [t.clone().requires_grad_(True) for t in (value, loc, w)]
    ref = da.weighted_sum(da.sample_values(inputs[0], shapes, None, inputs[1]), inputs[2])
    fused_inputs = [t.clone().requires_grad_(True) for t in (value, loc, w)]
    fused = da.ms_deform_attn_core(*fused_inputs[:1], shapes, None, *fused_inputs[1:])
    torch.testing.assert_close(fused, ref, atol=1e-12, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(da.ms_deform_attn_core(value, shapes, None, loc, w), ref.detach(),
                                   atol=1e-12, rtol=0)
    rows = torch.randn(3, *ref.shape, generator=g, dtype=torch.float64)
    expected = torch.autograd.grad(ref, inputs, rows[0], retain_graph=True)
    got = torch.autograd.grad(fused, fused_inputs, rows[0], retain_graph=True)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    batched = torch.autograd.grad(fused, fused_inputs[0], rows, is_grads_batched=True, retain_graph=True)[0]
    for i in range(3):
        single = torch.autograd.grad(ref, inputs[0], rows[i], retain_graph=True)[0]
        torch.testing.assert_close(batched[i], single, atol=1e-12, rtol=0)


def test_sparse_core_with_constant_weights_has_the_value_gradient_also_batched():
    """The LRP value path (locations and weights constant): the sparse matrix and its transpose give the
    decomposition's value and value gradient, one backward per row or all rows vmapped."""
    shapes = torch.tensor([[5, 4], [2, 3]])
    g = torch.Generator().manual_seed(11)
    value = torch.randn(2, 26, 2, 8, generator=g, dtype=torch.float64)
    loc = torch.rand(2, 6, 2, 2, 3, 2, generator=g, dtype=torch.float64) * 1.2 - 0.1
    w = torch.rand(2, 6, 2, 2, 3, generator=g, dtype=torch.float64)
    v_ref = value.clone().requires_grad_(True)
    ref = da.weighted_sum(da.sample_values(v_ref, shapes, None, loc), w)
    v = value.clone().requires_grad_(True)
    out = da.ms_deform_attn_core(v, shapes, None, loc, w)
    assert "SparseMatmul" in type(out.grad_fn.next_functions[0][0]).__name__  # the sparse path is the one tested
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    rows = torch.randn(4, *ref.shape, generator=g, dtype=torch.float64)
    batched = torch.autograd.grad(out, v, rows, is_grads_batched=True, retain_graph=True)[0]
    for i in range(4):
        expected = torch.autograd.grad(ref, v_ref, rows[i], retain_graph=True)[0]
        torch.testing.assert_close(torch.autograd.grad(out, v, rows[i], retain_graph=True)[0], expected,
                                   atol=1e-12, rtol=0)
        torch.testing.assert_close(batched[i], expected, atol=1e-12, rtol=0)


def test_constant_corner_table_is_the_per_level_corners_bit_for_bit():
    """The sparse path's (level, point, corner) rows and weights, built per level without autograd, are
    exactly the per-level bilinear corners × attention weights — for samples inside, on the border,
    outside every side, at integer and half-pixel positions, in float32 and float64."""
    shapes = [(5, 4), (2, 3), (1, 1)]
    starts = [0, 20, 26]
    g = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.float64):
        value = torch.zeros(3, 27, 2, 4, dtype=dtype)
        loc = torch.rand(3, 7, 2, 3, 4, 2, generator=g, dtype=dtype) * 1.6 - 0.3  # some outside the map
        loc[0, 0, 0, 0] = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.5 / 4, 0.5 / 5], [1.25, -0.25]], dtype=dtype)
        w = torch.rand(3, 7, 2, 3, 4, generator=g, dtype=dtype)
        rows, weights = da._constant_corners(value, shapes, starts, loc, w)
        per_level = da._weighted_corners(value, shapes, starts, loc, w)
        expected_rows = torch.cat([r for r, _ in per_level], -1).reshape(rows.shape)
        expected_weights = torch.cat([x for _, x in per_level], -1).reshape(weights.shape)
        assert torch.equal(rows.long(), expected_rows)
        assert torch.equal(weights, expected_weights)
        assert (weights == 0).any() and (weights > 0).any()  # both outside and inside corners were exercised
        # rows index the (batch, head, token) table: each row's nonzero corners stay in its own batch/head block
        block = rows.long() // 27
        n_idx = torch.arange(3).view(3, 1, 1).expand(3, 7, 2).reshape(-1, 1)
        h_idx = torch.arange(2).view(1, 1, 2).expand(3, 7, 2).reshape(-1, 1)
        assert torch.equal(block, (n_idx * 2 + h_idx).expand_as(block))
