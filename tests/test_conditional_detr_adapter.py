"""The engine on Hugging Face Conditional DETR through its adapter (its own decoder attention kernels).

A tiny random ``ConditionalDetrForObjectDetection`` (transformers ResNet backbone) in float64; proofs as in
test_detr_adapter.py.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from maskdino_lrp.adapters import find_adapter  # noqa: E402
from maskdino_lrp.adapters.conditional_detr import ConditionalDetrAdapter  # noqa: E402
from maskdino_lrp.lrp.explainer import LRP  # noqa: E402
from conftest import zero_additive_constants
from hf_checks import (CUT_STOPS, QUERIES, assert_batched_equals_single, assert_conserves, assert_gradient_times_input,
                       assert_kernels_reproduce_the_forward, assert_untouched_by_explaining, logits_under_hooks,
                       random_image, randomise, tiny_resnet)


def tiny_conditional_detr(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.ConditionalDetrConfig(
        use_timm_backbone=False, backbone_config=tiny_resnet(transformers), use_pretrained_backbone=False, d_model=32,
        encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
        decoder_ffn_dim=48, num_queries=8, num_labels=4)
    return randomise(transformers.ConditionalDetrForObjectDetection(config).eval().double())


@pytest.fixture(scope="module")
def image():
    return random_image()


def plain_outputs(model, image):
    with torch.no_grad():
        return model(pixel_values=ConditionalDetrAdapter().prepare(model, image).tensor)


def test_adapter_is_found_and_its_kernels_reproduce_the_forward(image):
    model = tiny_conditional_detr()
    assert isinstance(find_adapter(model), ConditionalDetrAdapter)
    assert_kernels_reproduce_the_forward(model, lambda: plain_outputs(model, image))


def test_zero_bias_conservation_with_attention_as_constant(image):
    model = tiny_conditional_detr()
    zero_additive_constants(model)
    target_logits = plain_outputs(model, image).logits[0]
    expl = LRP(model, composite="conservative").explain(image, queries=QUERIES, stops=CUT_STOPS)
    assert_conserves(expl, target_logits[QUERIES, expl.labels], CUT_STOPS)


def test_gradient_composite_is_autograd_gradient_times_input(image):
    """The conditional spatial query (the anchors' sine embedding scaled by ``query_scale`` of the content, from
    the second layer on) is booked as positional, so every composite takes it as a constant: the reference is
    autograd's gradient × input through transformers' forward with that input detached."""
    model = tiny_conditional_detr(1)
    expl = LRP(model, composite="gradient").explain(image, queries=QUERIES, stops=["pixels"])

    def detach_spatial_query(_m, args, kwargs):
        return args, {**kwargs, "query_sine_embed": kwargs["query_sine_embed"].detach()}

    handles = [layer.encoder_attn.register_forward_pre_hook(detach_spatial_query, with_kwargs=True)
               for layer in model.model.decoder.layers]
    x = ConditionalDetrAdapter().prepare(model, image).tensor.clone().requires_grad_(True)
    assert_gradient_times_input(expl, x, logits_under_hooks(model, x, handles), QUERIES, atol_of_max=1e-9)


def test_model_bit_identical_after_explaining_also_after_an_exception_and_batched_equals_single(image):
    model = tiny_conditional_detr(2)
    assert_untouched_by_explaining(
        model, lambda: plain_outputs(model, image).logits,
        lambda: assert_batched_equals_single(LRP(model, composite="default", batch_mode="vmap", chunk_size=2), image,
                                             QUERIES, ["pixels", "decoder_layers"]))
