"""The engine on Hugging Face YOLOS through its adapter (a ViT encoder: patches, [CLS] and detection tokens).

A tiny random ``YolosForObjectDetection`` in float64 (every weight, bias and token randomised: transformers
initialises the tokens and position embeddings to zero). Proofs as in test_detr_adapter.py; the ViT's GELU is
transformers' own module, which the HF adapters give the identity rule.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from maskdino_lrp.adapters import find_adapter  # noqa: E402
from maskdino_lrp.adapters.yolos import YolosAdapter  # noqa: E402
from maskdino_lrp.lrp.engine import lrp_mode  # noqa: E402
from maskdino_lrp.lrp.explainer import LRP  # noqa: E402
from conftest import zero_additive_constants
from hf_checks import (QUERIES, assert_batched_equals_single, assert_conserves, assert_gradient_times_input,
                       assert_untouched_by_explaining, random_image)

CUT_STOPS = ["pixels", "patch_embeddings", "encoder_input"]


def tiny_yolos(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.YolosConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                      image_size=[64, 48], patch_size=16, num_detection_tokens=6, num_labels=4)
    model = transformers.YolosForObjectDetection(config).eval().double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.3)
            elif p.abs().max() == 0:  # tokens and position embeddings
                p.normal_(0.0, 0.5)
            else:
                p.mul_(1.0 + 0.5 * torch.rand_like(p))
    return model


@pytest.fixture(scope="module")
def image():
    return random_image()


def plain_logits(model, image):
    with torch.no_grad():
        return model(pixel_values=YolosAdapter().prepare(model, image).tensor).logits[0]


def test_adapter_is_found_and_reproduces_the_forward(image):
    model = tiny_yolos()
    adapter = find_adapter(model)
    assert isinstance(adapter, YolosAdapter)
    assert adapter.pixel_layer(model) is model.vit.embeddings.patch_embeddings.projection
    reference = plain_logits(model, image)
    for composite in ("default", "conservative", "gradient"):
        with lrp_mode(model, composite):
            assert torch.allclose(plain_logits(model, image), reference, rtol=0, atol=1e-12), composite


def test_zero_bias_conservation_with_attention_as_constant(image):
    """Pixels + the learned tokens and position embeddings (booked parameters) = the explained logit."""
    model = tiny_yolos()
    zero_additive_constants(model)
    reference = plain_logits(model, image)
    expl = LRP(model, composite="conservative").explain(image, queries=QUERIES, stops=CUT_STOPS)
    target = reference[QUERIES, expl.labels]
    assert_conserves(expl, target, CUT_STOPS)
    for cut, row in expl.conservation.items():  # the tokens carry part of it
        assert (row["embeddings"].abs() > 1e-3 * target.abs()).all(), cut
    (level,) = expl.levels  # the patch tokens, after [CLS]
    assert (level.start, level.size) == (1, 30) and expl.relevance["encoder_input"].shape == (3, 1 + 30 + 6)
    patches = expl.relevance["encoder_input"][0, 1:31]
    assert torch.equal(expl.token_maps("encoder_input", 0)[level.name].flatten(), patches)


def test_gradient_composite_is_autograd_gradient_times_input(image):
    model = tiny_yolos(1)
    expl = LRP(model, composite="gradient").explain(image, queries=QUERIES, stops=["pixels"])
    x = YolosAdapter().prepare(model, image).tensor.clone().requires_grad_(True)
    assert_gradient_times_input(expl, x, model(pixel_values=x).logits[0], QUERIES, atol_of_max=1e-9)


def test_explain_without_stops_keeps_the_adapters_default_stops(image):
    """YOLOS has no memory: explain() without stops keeps the adapter's default_stops, as if asked for them."""
    assert YolosAdapter.default_stops == ("pixels", "encoder_input")
    lrp = LRP(tiny_yolos(3), composite="conservative")
    default = lrp.explain(image, queries=[0])
    explicit = lrp.explain(image, queries=[0], stops=["pixels", "encoder_input"])
    assert set(default.relevance) == set(explicit.relevance) and {"pixels", "encoder_input"} <= set(default.relevance)
    assert all(torch.equal(default.relevance[k], explicit.relevance[k]) for k in explicit.relevance)
    session = lrp.prepare(image)
    try:
        assert set(session.backward([0]).relevance) == set(explicit.relevance)
    finally:
        session.cleanup()


def test_model_bit_identical_after_explaining_also_after_an_exception_and_batched_equals_single(image):
    model = tiny_yolos(2)
    assert_untouched_by_explaining(
        model, lambda: plain_logits(model, image),
        lambda: assert_batched_equals_single(LRP(model, composite="default", batch_mode="vmap", chunk_size=2), image,
                                             QUERIES, ["pixels", "encoder_layers"]))
