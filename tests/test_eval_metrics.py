"""Explanation-quality metrics on hand-made maps with answers computed by hand (no model needed)."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from maskdino_lrp.eval import metrics as M


def _square_mask(shape=(10, 10), rows=(2, 5), cols=(3, 7)):
    m = np.zeros(shape, bool)
    m[rows[0]:rows[1], cols[0]:cols[1]] = True
    return m  # 3 x 4 = 12 pixels of 100


# ----------------------------------------------------------------------------- localisation
def test_map_equal_to_mask_scores_one():
    mask = _square_mask()
    e = mask.astype(float)
    assert M.relevance_mass_accuracy(e, mask) == 1.0
    assert M.relevance_rank_accuracy(e, mask) == 1.0
    assert M.pointing_game(e, mask) == 1.0
    assert M.energy_pointing_game(e, (3, 2, 7, 5)) == 1.0  # the tight box (exclusive right/bottom)
    assert M.leak_to_other_objects(e, mask, np.zeros((1, 10, 10), bool)) == 0.0


def test_uniform_map_scores_the_area_fraction():
    mask = _square_mask()
    e = np.full((10, 10), 0.3)
    assert M.relevance_mass_accuracy(e, mask) == pytest.approx(12 / 100, abs=1e-12)
    # ties are resolved in expectation, so the constant map scores exactly the area fraction
    assert M.relevance_rank_accuracy(e, mask) == pytest.approx(12 / 100, abs=1e-12)
    assert M.pointing_game(e, mask) == pytest.approx(12 / 100, abs=1e-12)
    assert M.energy_pointing_game(e, (0, 0, 5, 10)) == pytest.approx(0.5, abs=1e-12)


def test_mass_accuracy_counts_positive_relevance_only():
    mask = _square_mask()
    e = np.where(mask, 1.0, -5.0)
    assert M.relevance_mass_accuracy(e, mask) == 1.0
    e = np.where(mask, 1.0, 0.0)
    e[0, 0] = 4.0  # 12 inside, 4 outside
    assert M.relevance_mass_accuracy(e, mask) == pytest.approx(12 / 16)
    assert math.isnan(M.relevance_mass_accuracy(-np.ones((10, 10)), mask))  # no positive relevance


def test_mass_accuracy_with_a_tolerance_counts_the_ring_around_the_mask():
    mask = _square_mask()  # rows 2..4, cols 3..6
    e = np.zeros((10, 10))
    e[3, 4] = 2.0  # inside
    e[3, 7] = 1.0  # 1 px right of the mask
    e[5, 7] = 1.0  # diagonal to (4, 6): √2 px
    e[9, 9] = 4.0  # far: distance to (4, 6) = √34
    assert M.relevance_mass_accuracy(e, mask) == pytest.approx(2 / 8)
    assert M.relevance_mass_accuracy(e, mask, tolerance=1) == pytest.approx(3 / 8)
    assert M.relevance_mass_accuracy(e, mask, tolerance=1.5) == pytest.approx(4 / 8)
    assert M.relevance_mass_accuracy(e, mask, tolerance=6) == pytest.approx(8 / 8)


def test_rank_accuracy_by_hand_with_partial_ties():
    mask = np.zeros((2, 4), bool)
    mask[0, :2] = True  # K = 2
    e = np.array([[3.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    # top-1 is (0,0) (inside); the second slot is one of five tied pixels, one of them inside: 1/5
    assert M.relevance_rank_accuracy(e, mask) == pytest.approx((1 + 1 / 5) / 2)
    e = np.array([[3.0, 2.0, 5.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert M.relevance_rank_accuracy(e, mask) == pytest.approx(0.5)  # top-2 = (0,2), (0,0)


def test_pointing_game_hit_miss_and_tolerance():
    mask = _square_mask()  # rows 2..4, cols 3..6
    e = np.zeros((10, 10))
    e[3, 4] = 1.0
    assert M.pointing_game(e, mask) == 1.0
    e = np.zeros((10, 10))
    e[3, 7] = 1.0  # one pixel right of the mask
    assert M.pointing_game(e, mask) == 0.0
    assert M.pointing_game(e, mask, tolerance=1) == 1.0
    e = np.zeros((10, 10))
    e[8, 8] = 1.0  # distance to (4, 6): sqrt(16 + 4) ≈ 4.5
    assert M.pointing_game(e, mask, tolerance=2) == 0.0
    assert M.pointing_game(e, mask, tolerance=4.5) == 1.0
    e = np.zeros((10, 10))
    e[3, 4] = e[9, 9] = 1.0  # two tied maxima, one inside: expected hit rate 1/2
    assert M.pointing_game(e, mask) == 0.5


def test_energy_pointing_game_of_a_box():
    e = np.zeros((6, 6))
    e[1:3, 1:3] = 1.0  # 4 inside the box below
    e[5, 5] = 2.0  # 2 outside
    e[0, 0] = -3.0  # negative: ignored
    assert M.energy_pointing_game(e, (1, 1, 3, 3)) == pytest.approx(4 / 6)
    # a pixel belongs to the box when its centre does: (1.4, 1.4, 3.4, 3.4) holds centres 1.5 and 2.5 only
    assert M.box_mask((1.4, 1.4, 3.4, 3.4), (6, 6)).sum() == 4
    assert M.box_mask((1.4, 1.4, 3.6, 3.6), (6, 6)).sum() == 9  # centre 3.5 is inside too


def test_leak_to_other_objects():
    own = np.zeros((4, 4), bool)
    own[0, :2] = True
    other = np.zeros((4, 4), bool)
    other[3, :] = True
    other[0, 0] = True  # overlap with the explained object: not leak
    e = np.zeros((4, 4))
    e[own] = 1.0  # 2
    e[3, :] = 0.5  # 2 on the other object
    e[2, 2] = 1.0  # background
    assert M.leak_to_other_objects(e, own, other[None]) == pytest.approx(2 / 5)
    assert M.leak_to_other_objects(e, own, np.zeros((0, 4, 4), bool)) == 0.0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="does not match"):
        M.relevance_mass_accuracy(np.ones((4, 4)), np.ones((5, 5), bool))


def test_conservation_and_rank_correlation():
    assert M.conservation_error(0.9, 1.0) == pytest.approx(0.1)
    assert M.conservation_error(-1.2, -1.0) == pytest.approx(0.2)
    a = np.arange(16.0).reshape(4, 4)
    assert M.rank_correlation(a, a ** 3) == pytest.approx(1.0)
    assert M.rank_correlation(a, -a) == pytest.approx(-1.0)
    assert math.isnan(M.rank_correlation(a, np.ones((4, 4))))


# ----------------------------------------------------------------------------- perturbation curves
def _linear_model(weights):
    """f(x) = Σ_p w_p · x_p over one channel: the score of a batch (B, 1, H, W)."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    return lambda batch: (batch[:, 0].double() * w).flatten(1).sum(1)


def test_deletion_and_insertion_of_a_linear_model_by_hand():
    w = np.array([[4.0, 3.0], [2.0, 1.0]])
    image = torch.ones(1, 2, 2, dtype=torch.float64)
    neutral = torch.zeros_like(image)
    score = _linear_model(w)
    relevance = w * (image[0].numpy() - neutral[0].numpy())  # exact contributions
    deletion = M.perturbation_curve(score, image, neutral, relevance, steps=4, mode="deletion")
    insertion = M.perturbation_curve(score, image, neutral, relevance, steps=4, mode="insertion")
    np.testing.assert_allclose(deletion, [10, 6, 3, 1, 0])
    np.testing.assert_allclose(insertion, [0, 4, 7, 9, 10])
    assert M.area_under_curve(deletion) == pytest.approx(0.25 * (10 / 2 + 6 + 3 + 1 + 0))
    assert M.area_under_curve(insertion) == pytest.approx(0.25 * (0 + 4 + 7 + 9 + 10 / 2))
    assert M.aopc(deletion, k=2) == pytest.approx((0 + 4 + 7) / 3)
    # the relevance order gives the fastest drop: every other order has at least its deletion AUC
    rng = np.random.default_rng(0)
    best = M.area_under_curve(deletion)
    for _ in range(20):
        other = M.perturbation_curve(score, image, neutral, rng.random((2, 2)), steps=4)
        assert M.area_under_curve(other) >= best - 1e-12
    reverse = M.perturbation_curve(score, image, neutral, -relevance, steps=4)
    np.testing.assert_allclose(reverse, [10, 9, 7, 4, 0])
    # stopping at half of the pixels in two steps: the first three points; AUC = mean height over [0, 0.5]
    half = M.perturbation_curve(score, image, neutral, relevance, steps=2, max_fraction=0.5, endpoints=(10.0, 0.0))
    np.testing.assert_allclose(half, [10, 6, 3])
    x = M.perturbation_fractions(2, 0.5)
    np.testing.assert_allclose(x, [0, 0.25, 0.5])
    assert M.area_under_curve(half, x) == pytest.approx((0.25 * (10 + 6) / 2 + 0.25 * (6 + 3) / 2) / 0.5)
    with pytest.raises(ValueError, match="max_fraction"):
        M.perturbation_fractions(4, 1.5)


def test_curve_on_a_larger_linear_model_beats_random_and_known_endpoints_match():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(8, 8))
    image = torch.as_tensor(rng.random((1, 8, 8)))
    neutral = M.mean_replacement(image)
    score = _linear_model(w)
    relevance = w * (image[0].numpy() - neutral[0].numpy())
    ours = M.perturbation_curve(score, image, neutral, relevance, steps=16, batch_size=5)
    random = M.perturbation_curve(score, image, neutral, rng.random((8, 8)), steps=16)
    assert M.area_under_curve(ours) < M.area_under_curve(random)
    ends = score(torch.stack([image, neutral])).numpy()
    shortcut = M.perturbation_curve(score, image, neutral, relevance, steps=16, endpoints=(ends[0], ends[1]))
    np.testing.assert_allclose(shortcut, ours)


def test_perturbed_images_and_score_columns():
    image = torch.arange(4.0).view(1, 2, 2) + 10
    neutral = torch.zeros(1, 2, 2)
    order = np.array([3, 0, 1, 2])
    batch = M.perturbed_images(image, neutral, order, [0, 2, 4], "deletion")
    np.testing.assert_array_equal(batch[1, 0].numpy(), [[0, 11], [12, 0]])
    batch = M.perturbed_images(image, neutral, order, [1], "insertion")
    np.testing.assert_array_equal(batch[0, 0].numpy(), [[0, 0], [0, 13]])
    two = lambda b: torch.stack([b.flatten(1).sum(1), -b.flatten(1).sum(1)], 1)  # noqa: E731
    curve = M.perturbation_curve(two, image, neutral, np.ones((2, 2)), steps=2)
    assert curve.shape == (3, 2)
    np.testing.assert_allclose(curve[:, 0], -curve[:, 1])


def test_relevance_order_is_descending_with_seeded_ties():
    e = np.array([[0.0, 5.0], [5.0, 1.0]])
    order = M.relevance_order(e, seed=3)
    assert set(order[:2]) == {1, 2} and list(order[2:]) == [3, 0]
    np.testing.assert_array_equal(order, M.relevance_order(e, seed=3))


def test_pool_to_tokens_sums_each_footprint_by_hand():
    e = torch.arange(1.0, 13.0).view(3, 4)  # a 3×4 map in a 4×4 padded input: the last row is padding
    tokens = M.pool_to_tokens(e, [(1, 1), (2, 2)], (4, 4))
    np.testing.assert_allclose(tokens.numpy(), [78.0, 1 + 2 + 5 + 6, 3 + 4 + 7 + 8, 9 + 10, 11 + 12])


def test_level_balanced_order_takes_every_level_alike():
    shapes = [(1, 2), (2, 4)]  # 2 coarse tokens, 8 fine tokens
    relevance = np.array([0.0, 9.0] + [8, 7, 6, 5, 4, 3, 2, 1.0])
    order = M.level_balanced_order(relevance, shapes)
    # the first half of the order holds the better coarse token and the better half of the fine tokens
    assert sorted(order[:5].tolist()) == [1, 2, 3, 4, 5]
    assert order[0] in (1, 2) and set(order[5:].tolist()) == {0, 6, 7, 8, 9}
    with pytest.raises(ValueError, match="cover 10 tokens"):
        M.level_balanced_order(np.zeros(11), shapes)


def test_replacements():
    image = torch.rand(3, 12, 10)
    mean = M.mean_replacement(image)
    torch.testing.assert_close(mean[:, 5, 5], image.mean((1, 2)))
    flat = torch.full((3, 12, 10), 7.0)
    torch.testing.assert_close(M.blur_replacement(flat, sigma=2.0), flat)
    blurred = M.blur_replacement(image, sigma=2.0)
    assert blurred.shape == image.shape and blurred.std() < image.std()


def test_noise_and_zero_replacements_and_names():
    image = torch.rand(3, 40, 30) * torch.tensor([10.0, 100.0, 255.0]).view(3, 1, 1)
    noise = M.noise_replacement(image, seed=4)
    low, high = image.amin((1, 2)), image.amax((1, 2))
    assert ((noise >= low.view(3, 1, 1)) & (noise <= high.view(3, 1, 1))).all()
    # uniform over [min, max]: the mean is the mid-range (1200 pixels per channel: SE ≈ 0.8 % of the range)
    torch.testing.assert_close(noise.mean((1, 2)), (low + high) / 2, rtol=0.05, atol=0.0)
    torch.testing.assert_close(noise, M.noise_replacement(image, seed=4))  # seeded
    assert not torch.equal(noise, M.noise_replacement(image, seed=5))
    assert torch.equal(M.zero_replacement(image), torch.zeros_like(image))
    assert set(M.REPLACEMENTS) >= {"mean", "blur", "noise", "zero"}
    for name in M.REPLACEMENTS:
        assert M.make_replacement(name, 2.0, seed=1)(image).shape == image.shape
    with pytest.raises(ValueError, match="replacement must be one of"):
        M.make_replacement("sepia")
    with pytest.raises(ValueError, match="sigma"):
        M.blur_replacement(image, 0.0)


def test_constant_image_is_its_own_neutral_except_for_zero():
    """On a constant image mean, blur and noise replace every pixel by itself: no curve can move."""
    flat = torch.full((3, 8, 8), 42.0)
    for name in ("mean", "blur", "noise"):
        torch.testing.assert_close(M.make_replacement(name, 2.0)(flat), flat)
    assert M.make_replacement("zero")(flat).abs().sum() == 0


def test_token_neutral_applies_the_replacement_per_level():
    shapes = [(4, 4), (2, 2)]  # strides 8 and 16 of a 32 × 32 padded input
    tokens = torch.randn(20, 5)
    mean = M.token_neutral(tokens, shapes, (32, 32), "mean")
    torch.testing.assert_close(mean[:16], tokens[:16].mean(0, keepdim=True).expand(16, 5))
    torch.testing.assert_close(mean[16:], tokens[16:].mean(0, keepdim=True).expand(4, 5))
    assert torch.equal(M.token_neutral(tokens, shapes, (32, 32), "zero"), torch.zeros_like(tokens))
    # blur's σ is in pixels: σ = 16 px is 2 tokens at stride 8 and 1 token at stride 16
    blurred = M.token_neutral(tokens, shapes, (32, 32), "blur", blur_sigma=16.0)
    grid0 = tokens[:16].t().reshape(5, 4, 4)
    torch.testing.assert_close(blurred[:16], M.blur_replacement(grid0, 2.0).reshape(5, 16).t())
    grid1 = tokens[16:].t().reshape(5, 2, 2)
    torch.testing.assert_close(blurred[16:], M.blur_replacement(grid1, 1.0).reshape(5, 4).t())
    with pytest.raises(ValueError, match="cover 20 tokens"):
        M.token_neutral(torch.randn(21, 5), shapes, (32, 32), "mean")


def _probe(score, image, neutral):
    from maskdino_lrp.eval.curves import CurveProbe

    return CurveProbe("pixels", "zero", score, image, neutral)


def test_srg_of_a_linear_model_by_hand():
    """Score = Σ w·x with x = 1, neutral 0: MIF removes 4, 3, 2, 1 → 10, 6, 3, 1, 0; LIF removes 1, 2, 3, 4
    → 10, 9, 7, 4, 0. AUC(MIF) = 0.25·(5 + 6 + 3 + 1) = 3.75, AUC(LIF) = 0.25·(5 + 9 + 7 + 4) = 6.25, SRG = 2.5."""
    from maskdino_lrp.eval.curves import curve_counts

    w = np.array([[4.0, 3.0], [2.0, 1.0]])
    image = torch.ones(1, 2, 2, dtype=torch.float64)
    probe = _probe(_linear_model(w), image, torch.zeros_like(image))
    counts = curve_counts(4, 4, 1.0)
    curves = probe.curves({"right": M.relevance_order(w), "reversed": M.relevance_order(-w)}, counts, batch_size=3)
    np.testing.assert_allclose(curves["right"]["deletion"][:, 0], [10, 6, 3, 1, 0])
    np.testing.assert_allclose(curves["right"]["lif"][:, 0], [10, 9, 7, 4, 0])
    np.testing.assert_allclose(curves["right"]["insertion"][:, 0], [0, 4, 7, 9, 10])
    x = M.perturbation_fractions(4)
    row = probe.metrics(curves["right"], x, 2, {"deletion": 5.0, "insertion": 5.0})
    assert row["deletion_auc"] == pytest.approx(3.75) and row["lif_auc"] == pytest.approx(6.25)
    assert row["srg"] == pytest.approx(2.5) == M.symmetric_relevance_gain(6.25, 3.75)
    assert row["deletion_gap"] == pytest.approx(1.25) and row["insertion_gap"] == pytest.approx(6.25 - 5.0)
    # the reversed order swaps MIF and LIF: SRG flips sign
    assert probe.metrics(curves["reversed"], x, 2, None)["srg"] == pytest.approx(-2.5)
    # LIF's images are insertion's (full range), start and neutral are shared, and the reversed order's
    # deletion images are the right order's insertion images (and vice versa): 2 + 2 kinds × 3 counts
    assert probe.forwards == 2 + 2 * 3


def test_pool_to_patches_sums_each_square_by_hand_and_cuts_the_edge():
    e = torch.arange(25, dtype=torch.float64).reshape(5, 5)
    pooled = M.pool_to_patches(e, 2)
    # squares of 2 × 2 from the top left; the last row and column of squares hold what the edge leaves
    expected = [[0 + 1 + 5 + 6, 2 + 3 + 7 + 8, 4 + 9],
                [10 + 11 + 15 + 16, 12 + 13 + 17 + 18, 14 + 19],
                [20 + 21, 22 + 23, 24]]
    np.testing.assert_array_equal(pooled.numpy(), expected)
    assert float(pooled.sum()) == float(e.sum())


def test_patch_srg_of_a_linear_model_by_hand():
    """The pixel test's numbers with 2 × 2 squares: each square's weights sum to 4, 3, 2 or 1, so the squares'
    curves are the single pixels' (MIF 10, 6, 3, 1, 0; LIF 10, 9, 7, 4, 0; SRG 2.5), under the patch_ names."""
    from maskdino_lrp.eval.curves import CurveProbe, curve_counts

    w = np.kron(np.array([[4.0, 3.0], [2.0, 1.0]]), np.ones((2, 2))) / 4  # (4, 4), constant on each square
    rng = np.random.default_rng(0)
    w_pixels = w + rng.normal(scale=0.01, size=w.shape) * (1 - np.eye(4))  # the ranking inside a square is free
    w_pixels -= (M.pool_to_patches(w_pixels, 2).numpy() - M.pool_to_patches(w, 2).numpy()).repeat(2, 0).repeat(2, 1) / 4
    image = torch.ones(1, 4, 4, dtype=torch.float64)
    probe = CurveProbe("patches", "zero", _linear_model(w), image, torch.zeros_like(image), patch=2)
    assert probe.size == 4 and probe.grid == (2, 2)
    order = probe.order(torch.as_tensor(w_pixels), None, seed=0)
    np.testing.assert_array_equal(order, [0, 1, 2, 3])
    curves = probe.curves({"right": order}, curve_counts(4, 4, 1.0))
    np.testing.assert_allclose(curves["right"]["deletion"][:, 0], [10, 6, 3, 1, 0])
    np.testing.assert_allclose(curves["right"]["lif"][:, 0], [10, 9, 7, 4, 0])
    row = probe.metrics(curves["right"], M.perturbation_fractions(4), 2, None)
    assert row["patch_srg"] == pytest.approx(2.5) and row["patch_deletion_auc"] == pytest.approx(3.75)
    assert "srg" not in row and "deletion_auc_fixed_query" not in row


def test_patches_cut_by_the_edge_replace_only_the_image():
    """5 × 5 pixels in squares of 2: 3 × 3 patches; the corner patch is one pixel, the edge ones two."""
    from maskdino_lrp.eval.curves import CurveProbe

    image = torch.arange(25, dtype=torch.float64).reshape(1, 5, 5) + 1
    seen = []

    def score(batch):
        seen.append(batch.clone())
        return batch.flatten(1).sum(1)

    probe = CurveProbe("patches", "zero", score, image, torch.zeros_like(image), patch=2)
    assert probe.grid == (3, 3)
    order = np.array([8, 5, 0, 1, 2, 3, 4, 6, 7])  # corner, right edge, then the rest
    probe.curves({"o": order}, np.array([0, 1, 2, 9]), modes=("deletion",))
    by_zeros = {int((x == 0).sum()): x[0] for x in torch.cat(seen)}
    assert sorted(by_zeros) == [0, 1, 3, 25]  # the image, one patch, two patches, all removed
    assert by_zeros[1][4, 4] == 0
    assert by_zeros[3][2:4, 4].eq(0).all() and by_zeros[3][4, 4] == 0
    # with squares of 1 the patches unit is the pixel unit
    pixels = CurveProbe("pixels", "zero", lambda b: b.flatten(1).sum(1), image, torch.zeros_like(image))
    ones = CurveProbe("patches", "zero", lambda b: b.flatten(1).sum(1), image, torch.zeros_like(image), patch=1)
    o = M.relevance_order(np.random.default_rng(1).random((5, 5)))
    counts = np.array([0, 5, 10, 25])
    a, b = pixels.curves({"o": o}, counts), ones.curves({"o": o}, counts)
    for mode in a["o"]:
        np.testing.assert_array_equal(a["o"][mode], b["o"][mode])


def test_curve_probe_scores_equal_inputs_of_different_orders_once():
    """An input is identified by what it replaces: two orders that rank alike share every image; orders
    that agree only on the first elements share only those steps; known scores are not run again."""
    from maskdino_lrp.eval.curves import curve_counts

    rng = np.random.default_rng(4)
    w = rng.normal(size=(4, 5))
    image = torch.as_tensor(rng.random((1, 4, 5)))
    order = M.relevance_order(w)
    counts = curve_counts(20, 4, 1.0)  # 0, 5, 10, 15, 20
    alone = _probe(_linear_model(w), image, torch.zeros_like(image))
    reference = alone.curves({"a": order}, counts)
    assert alone.forwards == 2 + 2 * 3
    twins = _probe(_linear_model(w), image, torch.zeros_like(image))
    curves = twins.curves({"a": order, "b": order.copy()}, counts)
    assert twins.forwards == alone.forwards
    apart = _probe(_linear_model(w), image, torch.zeros_like(image))
    apart.by_content = False  # the reference path: each order its own inputs, the same curves
    separate = apart.curves({"a": order, "b": order.copy()}, counts)
    assert apart.forwards == 2 + 2 * 2 * 3
    for mode in ("deletion", "insertion", "lif"):
        np.testing.assert_array_equal(curves["b"][mode], reference["a"][mode])
        np.testing.assert_allclose(separate["b"][mode], curves["b"][mode], rtol=1e-12)
    # the same first 5 elements in another order, the rest shuffled: at 25 % both delete (and both insert)
    # the same set, so those two images are shared
    partial = np.concatenate([order[:5][::-1], rng.permutation(order[5:])])
    probe = _probe(_linear_model(w), image, torch.zeros_like(image))
    probe.curves({"a": order, "c": partial}, counts)
    assert probe.forwards == 2 + 2 * 3 + (2 * 3 - 2)
    # known start and neutral scores are used, not recomputed
    known = _probe(_linear_model(w), image, torch.zeros_like(image))
    known.known = {("start",): np.array([123.0]), ("neutral",): np.array([-1.0])}
    got = known.curves({"a": order}, counts)
    assert known.forwards == 2 * 3
    assert got["a"]["deletion"][0, 0] == 123.0 and got["a"]["deletion"][-1, 0] == -1.0
    np.testing.assert_array_equal(got["a"]["deletion"][1:-1], reference["a"]["deletion"][1:-1])


def test_curve_probe_agrees_with_the_one_curve_reference():
    """Batched, deduplicated curves = perturbation_curve per order and mode (LIF = deletion of the reversed
    order), also over part of the range, where LIF needs its own images."""
    from maskdino_lrp.eval.curves import curve_counts

    rng = np.random.default_rng(2)
    w = rng.normal(size=(6, 5))
    image = torch.as_tensor(rng.random((1, 6, 5)))
    for name in ("mean", "noise", "zero"):
        neutral = M.make_replacement(name, seed=1)(image)
        orders = {f"o{i}": M.relevance_order(rng.random((6, 5))) for i in range(3)}
        for steps, fraction in ((10, 1.0), (4, 0.4)):
            probe = _probe(_linear_model(w), image, neutral)
            curves = probe.curves(orders, curve_counts(30, steps, fraction), batch_size=7)
            for key, order in orders.items():
                for mode, o, m in (("deletion", order, "deletion"), ("insertion", order, "insertion"),
                                   ("lif", order[::-1], "deletion")):
                    expected = M.perturbation_curve(_linear_model(w), image, neutral, None, steps, m, order=o,
                                                    max_fraction=fraction)
                    np.testing.assert_allclose(curves[key][mode][:, 0], expected, err_msg=f"{name} {mode} {fraction}")


def test_srg_is_zero_on_a_constant_image_for_every_order_and_replacement():
    from maskdino_lrp.eval.curves import curve_counts

    w = np.random.default_rng(3).normal(size=(5, 5))
    flat = torch.full((1, 5, 5), 3.0, dtype=torch.float64)
    for name in ("mean", "blur", "noise"):
        probe = _probe(_linear_model(w), flat, M.make_replacement(name, 1.0, seed=2)(flat))
        curves = probe.curves({"w": M.relevance_order(w), "-w": M.relevance_order(-w)}, curve_counts(25, 5, 1.0))
        for by_mode in curves.values():
            row = probe.metrics(by_mode, M.perturbation_fractions(5), 2, None)
            assert row["srg"] == pytest.approx(0.0, abs=1e-12), name


def test_curve_counts_are_mirror_symmetric_over_the_whole_range():
    from maskdino_lrp.eval.curves import curve_counts

    counts = curve_counts(525, 20, 1.0)  # 525 × 10 % = 52.5: plain rounding gives 52 and 472, not 473
    assert counts[0] == 0 and counts[-1] == 525 and counts[10] in (262, 263)
    mirrored = 525 - counts[::-1]
    np.testing.assert_array_equal(np.delete(counts, 10), np.delete(mirrored, 10))  # odd n: the middle cannot be
    assert np.all(np.abs(counts - M.perturbation_fractions(20) * 525) <= 0.5 + 1e-9)
    assert np.all(np.diff(counts) > 0)
    np.testing.assert_array_equal(curve_counts(30, 4, 0.4), [0, 3, 6, 9, 12])  # part of the range: plain rounding
    # so on 525 elements, 20 steps: LIF costs one forward per order beyond insertion's (the middle point)
    from maskdino_lrp.eval.curves import CurveProbe

    probe = CurveProbe("tokens", "mean", lambda b: b.flatten(1).sum(1), torch.ones(1, 1, 525), torch.zeros(1, 1, 525))
    rng = np.random.default_rng(0)
    probe.curves({"a": rng.permutation(525), "b": rng.permutation(525)}, counts)
    assert probe.forwards == 2 + 2 * (2 * 19 + 1)


def test_curve_probe_rejects_an_order_of_the_wrong_size():
    image = torch.ones(1, 2, 2)
    with pytest.raises(ValueError, match="has 3 elements"):
        _probe(_linear_model(np.ones((2, 2))), image, image).curves({"x": np.arange(3)}, np.array([0, 1]))


def test_box_iou_cxcywh():
    a = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.6, 0.5, 0.2, 0.2], [0.9, 0.9, 0.1, 0.1]])
    iou = M.box_iou_cxcywh(a, torch.tensor([0.5, 0.5, 0.2, 0.2]))
    torch.testing.assert_close(iou, torch.tensor([1.0, 0.02 / 0.06, 0.0]))


# ----------------------------------------------------------------------------- statistics
def test_t_interval_of_a_known_sample():
    est = M.mean_ci([1, 2, 3, 4, 5])
    # mean 3, s = sqrt(2.5), t_{0.975, 4} = 2.776445: half-width 2.776445 * sqrt(2.5) / sqrt(5)
    half = 2.776445 * math.sqrt(2.5) / math.sqrt(5)
    assert (est.mean, est.n) == (3.0, 5)
    assert est.low == pytest.approx(3 - half, abs=1e-5) and est.high == pytest.approx(3 + half, abs=1e-5)
    est = M.mean_ci([2.0, 2.0, 2.0, float("nan")])
    assert (est.mean, est.low, est.high, est.n) == (2.0, 2.0, 2.0, 3)
    one = M.mean_ci([4.0])
    assert one.mean == 4.0 and math.isnan(one.low) and one.n == 1
    assert M.mean_ci([]).n == 0


def test_bootstrap_agrees_with_t_on_a_normal_sample():
    values = np.random.default_rng(0).normal(1.0, 2.0, size=400)
    t, boot = M.mean_ci(values), M.bootstrap_ci(values, n_resamples=4000, seed=1)
    assert boot.mean == pytest.approx(t.mean)
    assert boot.low == pytest.approx(t.low, abs=0.04) and boot.high == pytest.approx(t.high, abs=0.04)


def test_paired_difference():
    np.testing.assert_allclose(M.paired_difference([3, 2, np.nan], [1, 2, 0]), [2, 0, np.nan])
    with pytest.raises(ValueError):
        M.paired_difference([1, 2], [1])


def test_hungarian_matching_of_detections():
    from maskdino_lrp.eval.matching import match_detections

    det = SimpleNamespace(
        query_indices=torch.tensor([4, 7, 4, 9]), labels=torch.tensor([1, 0, 2, 0]),
        scores=torch.tensor([0.9, 0.8, 0.7, 0.1]),
        boxes=torch.tensor([[0, 0, 10, 10], [0, 0, 9, 10], [20, 20, 30, 30], [20, 20, 30, 30.0]]))
    gt_boxes = np.array([[0, 0, 10, 10], [20, 20, 30, 30.0]])
    # query 4 is kept once (label 1); it and query 7 compete for object 0; object 1 has only a 0.1 detection
    pairs = match_detections(det, gt_boxes, np.array([0, 0]), require_class=False)
    assert [(p.query, p.gt) for p in pairs] == [(4, 0)]
    pairs = match_detections(det, gt_boxes, np.array([0, 0]), require_class=True)
    assert [(p.query, p.label, p.gt) for p in pairs] == [(7, 0, 0)]
    pairs = match_detections(det, gt_boxes, np.array([1, 0]), score_threshold=0.0, require_class=True)
    assert sorted((p.query, p.gt) for p in pairs) == [(4, 0), (9, 1)]


def test_paired_comparison_by_hand():
    from maskdino_lrp.eval.stats import paired_comparison

    records = []
    for image, (ours, theirs) in enumerate([(0.1, 0.3), (0.2, 0.3), (0.3, 0.6)]):
        records.append({"method": "lrp-default", "image": image, "query": 5, "deletion_auc": ours, "mass_accuracy": 0.5})
        records.append({"method": "gradient", "image": image, "query": 5, "deletion_auc": theirs, "mass_accuracy": 0.7})
    records.append({"method": "gradient", "image": 9, "query": 1, "deletion_auc": 0.0})  # unpaired: ignored
    paired = paired_comparison(records, "lrp-default", ["lrp-default", "gradient"], keys=("deletion_auc", "mass_accuracy"))
    assert list(paired) == ["gradient"]
    deletion = paired["gradient"]["deletion_auc"]  # lower is better: advantage = theirs − ours = 0.2, 0.1, 0.3
    assert deletion.n == 3 and deletion.mean == pytest.approx(0.2)
    expected = M.mean_ci([0.2, 0.1, 0.3])
    assert (deletion.low, deletion.high) == pytest.approx((expected.low, expected.high))
    assert paired["gradient"]["mass_accuracy"].mean == pytest.approx(-0.2)  # higher is better: ours − theirs


def test_rank_stability_by_hand():
    """SRG means: under mean a > b > c, under blur c > a > b: a moves 1, b moves 1, c moves 2; τ = −1/3."""
    from maskdino_lrp.eval.stats import rank_stability

    def est(v):
        return M.Estimate(v, v - 0.1, v + 0.1, 5)

    srg = {"a": (0.3, 0.2), "b": (0.2, 0.1), "c": (0.1, 0.5)}
    table = {m: {"srg@mean": est(x), "srg@blur": est(y)} for m, (x, y) in srg.items()}
    found = rank_stability(table, ["mean", "blur"], metrics=("srg",))["srg"]
    assert found["ranks"] == {"a": {"mean": 1, "blur": 2}, "b": {"mean": 2, "blur": 3}, "c": {"mean": 3, "blur": 1}}
    assert found["spread"] == {"a": 1, "b": 1, "c": 2}
    # pairs (a,b) concordant, (a,c) and (b,c) discordant: τ = (1 − 2) / 3
    assert found["kendall"][("mean", "blur")] == pytest.approx(-1 / 3)
    # lower-is-better metrics rank the smallest first; ties share their mean rank
    table = {m: {"deletion_auc@mean": est(v), "deletion_auc@zero": est(v)} for m, v in (("a", 0.2), ("b", 0.2), ("c", 0.1))}
    found = rank_stability(table, ["mean", "zero"], metrics=("deletion_auc",))["deletion_auc"]
    assert found["ranks"]["c"] == {"mean": 1, "zero": 1} and found["ranks"]["a"]["mean"] == 2.5
    assert set(found["spread"].values()) == {0}
