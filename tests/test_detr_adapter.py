"""The engine on Hugging Face DETR through its adapter: conservation, gradient parity, restoration.

A tiny random ``DetrForObjectDetection`` (transformers ResNet backbone, no timm, no pretrained weights) in
float64. Tolerances: float64 sums of a few thousand terms agree to ~1e-12; the conservative composite's
ε = 1e-9 stabiliser leaves a residual of order ε per layer, so 1e-5 relative is asserted as the brief asks.
"""
import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from maskdino_lrp.adapters import find_adapter  # noqa: E402
from maskdino_lrp.adapters.detr import DetrAdapter  # noqa: E402
from maskdino_lrp.lrp.explainer import LRP  # noqa: E402
from conftest import zero_additive_constants
from hf_checks import (CUT_STOPS, QUERIES, assert_batched_equals_single, assert_biases_absorbed, assert_conserves,
                       assert_gradient_times_input, assert_untouched_by_explaining, encoder_only_checked, plain_logits,
                       random_image, randomise, tiny_resnet)


def tiny_detr(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.DetrConfig(use_timm_backbone=False, backbone_config=tiny_resnet(transformers),
                                     use_pretrained_backbone=False,
                                     d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                     decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
                                     num_queries=8, num_labels=4)
    return randomise(transformers.DetrForObjectDetection(config).eval().double())


@pytest.fixture(scope="module")
def image():
    return random_image()


def test_adapter_is_found_and_offers_its_stops():
    model = tiny_detr()
    adapter = find_adapter(model)
    assert isinstance(adapter, DetrAdapter)
    assert isinstance(find_adapter(model.model.encoder.layers[0]), DetrAdapter)
    pairs = adapter.batchnorm_pairs(model)
    assert len(pairs) == sum(type(m).__name__ == "DetrFrozenBatchNorm2d" for m in model.modules())


def test_zero_bias_conservation_with_attention_as_constant(image):
    """Pixels + booked constants = the explained logit of a plain forward of the untouched model (property 1)."""
    model = tiny_detr()
    zero_additive_constants(model)
    adapter = DetrAdapter()
    reference = plain_logits(model, adapter, image)
    expl = LRP(model, composite="conservative").explain(image, queries=QUERIES, target="class", stops=CUT_STOPS)
    assert_conserves(expl, reference[QUERIES, expl.labels], CUT_STOPS)
    assert expl.relevance["pixels"].abs().sum() > 0 and expl.relevance["memory"].shape == (3, expl.levels[0].size)


def test_biases_absorb_what_the_ledger_says_at_every_cut(image):
    """With biases, the conservative composite still conserves once each cut's downstream biases are counted:
    a cut that booked an upstream bias, or missed a downstream one, would leave a residual."""
    expl = LRP(tiny_detr(), composite="conservative").explain(image, queries=QUERIES, stops=CUT_STOPS)
    assert_biases_absorbed(expl)


@pytest.mark.parametrize("batch_mode", ["vmap", "loop"])
def test_gradient_composite_is_autograd_gradient_times_input(image, batch_mode):
    model = tiny_detr(1)
    adapter = DetrAdapter()
    expl = LRP(model, composite="gradient", batch_mode=batch_mode).explain(image, queries=QUERIES, stops=["pixels"])
    x = adapter.prepare(model, image).tensor.clone().requires_grad_(True)
    assert_gradient_times_input(expl, x, model(pixel_values=x).logits[0], QUERIES)


def test_model_bit_identical_after_explaining_also_after_an_exception(image):
    model = tiny_detr(2)
    assert_untouched_by_explaining(
        model, lambda: plain_logits(model, DetrAdapter(), image),
        lambda: LRP(model).explain(image, queries=[1], stops=["pixels", "backbone", "decoder_layers"]))


def test_batched_equals_one_query_at_a_time(image):
    model = tiny_detr(3)
    lrp = LRP(model, composite="default", batch_mode="vmap", chunk_size=2)
    assert_batched_equals_single(lrp, image, QUERIES, ["pixels", "encoder_layers"])


def test_encoder_only_mode_goes_from_the_memory_to_the_encoder_input(image):
    """Session.propagate through the adapter: the (bias-free, attention-constant) encoder conserves."""
    with encoder_only_checked(tiny_detr(4), image) as (session, memory):
        with pytest.raises(ValueError, match="towards the input"):
            session.propagate(memory, stops=["decoder_layers"])


def test_default_composite_residual_is_the_first_cross_attention_softmax(image):
    """Why the default composite leaves about half of a random DETR's class logit as residual at the memory cut.

    DETR's decoder queries start at zero, so the whole target passes through the first decoder layer's
    cross-attention (no residual stream bypasses it). AttnLRP's uniform rule gives half of that attention's
    output relevance to the attention probabilities, and the softmax rule passes back Σ_i (x_i − x̄) R_i (x the
    logits, x̄ their attention-weighted mean): only what co-varies with the logits, nothing when they are all
    equal. Closed form: with zero query position embeddings (all logits 0) and AttnLRP at that module only (AH
    elsewhere), the residual is exactly half of the relevance at layer 0's output. With the model as it is, the
    default's residual is still about that half, and the AH rule at that one module removes it.
    """
    from dataclasses import replace

    from maskdino_lrp.lrp.composites import get_composite
    from maskdino_lrp.lrp.rules import Rule

    first_cross = "model.decoder.layers.0.encoder_attn"
    stops = ["memory", "decoder_layers"]
    model = tiny_detr()
    zero_additive_constants(model)

    def residual_and_half_layer0(composite):
        expl = LRP(model, composite=composite).explain(image, queries=QUERIES, stops=stops)
        return expl.conservation["memory"]["residual"], 0.5 * expl.relevance["decoder_layer0"].sum(-1), expl

    default = get_composite("default")
    residual, half, expl = residual_and_half_layer0(default)
    target = expl.conservation["memory"]["target"]
    assert ((residual - half).abs() / half.abs()).max() < 0.02
    assert (residual.abs() > 0.3 * target.abs()).all()
    fixed, _, _ = residual_and_half_layer0(replace(default, by_name=default.by_name + [(first_cross, Rule("ah"))]))
    assert (fixed.abs() < 0.02 * residual.abs()).all()

    with torch.no_grad():
        model.model.query_position_embeddings.weight.zero_()
    only_there = replace(get_composite("conservative"), by_name=[(first_cross, Rule("attnlrp"))])
    residual, half, _ = residual_and_half_layer0(only_there)
    assert torch.allclose(residual, half, rtol=1e-6, atol=0)


def test_the_models_own_processor_output_is_an_input(image):
    """``processor(images=...)`` output explains the same as the image itself (same pixels, same relevance)."""
    from maskdino_lrp.lrp.engine import EngineError

    model = tiny_detr(5)
    processor = transformers.DetrImageProcessorPil(do_resize=False)
    features = processor(images=image, return_tensors="pt")
    lrp = LRP(model, composite="conservative")
    from_processor = lrp.explain(features, queries=[1, 4], stops=["pixels"])
    from_image = lrp.explain(image, queries=[1, 4], stops=["pixels"])
    assert torch.allclose(from_processor.relevance["pixels"], from_image.relevance["pixels"], rtol=1e-5, atol=1e-9)
    assert from_processor.image.shape == image.shape and np.abs(from_processor.image.astype(int) - image).max() <= 1
    with pytest.raises(EngineError, match="one image's processor output"):
        lrp.explain({"pixel_values": torch.cat([features["pixel_values"]] * 2)}, queries=[0])
