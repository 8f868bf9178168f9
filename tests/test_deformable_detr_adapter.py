"""The engine on Hugging Face Deformable DETR through its adapter: single-stage, box refinement, two-stage.

Tiny random ``DeformableDetrForObjectDetection`` models (transformers ResNet backbone, three backbone levels
plus one extra, no timm, no pretrained weights) in float64, with every weight, bias and norm statistic
randomised (transformers initialises the offset and attention-weight heads to zero: those are randomised
too, so the samples move with the image). Tolerances as in test_detr_adapter.py.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from maskdino_lrp.adapters import find_adapter  # noqa: E402
from maskdino_lrp.adapters.deformable_detr import DeformableDetrAdapter  # noqa: E402
from maskdino_lrp.adapters.hf_deformable import deformable_kernel, is_deformable  # noqa: E402
from maskdino_lrp.lrp.explainer import LRP  # noqa: E402
from maskdino_lrp.lrp.rules import Rule  # noqa: E402
from conftest import zero_additive_constants
from hf_checks import (CUT_STOPS, QUERIES, assert_batched_equals_single, assert_biases_absorbed, assert_conserves,
                       assert_encoder_only_conserves, assert_gradient_times_input, assert_untouched_by_explaining,
                       plain_logits, random_image, randomise, tiny_resnet)

VARIANTS = {"single": {}, "refine": {"with_box_refine": True},
            "two_stage": {"with_box_refine": True, "two_stage": True}}


def tiny_deformable_detr(variant: str = "single", seed: int = 0) -> torch.nn.Module:
    """A tiny random Deformable DETR, its sampling-offset and attention-weight heads non-zero."""
    torch.manual_seed(seed)
    config = transformers.DeformableDetrConfig(
        use_timm_backbone=False, backbone_config=tiny_resnet(transformers), use_pretrained_backbone=False, d_model=32,
        encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
        decoder_ffn_dim=48, num_queries=8, two_stage_num_proposals=8, num_labels=4, num_feature_levels=4,
        encoder_n_points=2, decoder_n_points=2, **VARIANTS[variant])
    return randomise(transformers.DeformableDetrForObjectDetection(config).eval().double(),
                     heads=("sampling_offsets.weight", "attention_weights.weight"))


@pytest.fixture(scope="module")
def image():
    return random_image()


def test_adapter_is_found_and_the_kernel_reproduces_the_forward(image):
    """The deformable kernel under each deformable rule gives transformers' own outputs (float64)."""
    model = tiny_deformable_detr("two_stage")
    adapter = find_adapter(model)
    assert isinstance(adapter, DeformableDetrAdapter)
    assert isinstance(find_adapter(model.model.encoder.layers[0]), DeformableDetrAdapter)
    assert len(adapter.batchnorm_pairs(model)) == sum(type(m).__name__.endswith("FrozenBatchNorm2d")
                                                      for m in model.modules())
    x = adapter.prepare(model, image).tensor
    reference = model(pixel_values=x)
    modules = [m for m in model.modules() if is_deformable(m)]
    assert len(modules) == 4
    for rule in ("value", "value+query", "gradient"):
        try:
            for m in modules:
                m.forward = deformable_kernel(m, Rule(rule).deformable(), lambda _s, t, _c="bias": t)
            with torch.no_grad():
                out = model(pixel_values=x)
        finally:
            for m in modules:
                m.__dict__.pop("forward", None)
        assert torch.allclose(out.logits, reference.logits, rtol=0, atol=1e-12), rule
        assert torch.allclose(out.pred_boxes, reference.pred_boxes, rtol=0, atol=1e-12), rule


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_zero_bias_conservation_with_attention_as_constant(image, variant):
    """Pixels + booked constants = the explained logit of a plain forward of the untouched model, at every cut."""
    model = tiny_deformable_detr(variant)
    zero_additive_constants(model)
    adapter = DeformableDetrAdapter()
    reference = plain_logits(model, adapter, image)
    expl = LRP(model, composite="conservative").explain(image, queries=QUERIES, target="class", stops=CUT_STOPS)
    target = reference[QUERIES, expl.labels]
    assert_conserves(expl, target, CUT_STOPS)
    # the query content: a learned embedding (single-stage), the proposals' sine embedding (two-stage)
    booked = expl.conservation["pixels"]["positional" if variant == "two_stage" else "embeddings"]
    assert (booked.abs() > 1e-3 * target.abs()).all()
    assert expl.relevance["memory"].shape == (3, sum(lv.size for lv in expl.levels)) and len(expl.levels) == 4


def test_biases_absorb_what_the_ledger_says_at_every_cut(image):
    expl = LRP(tiny_deformable_detr("refine"), composite="conservative").explain(image, queries=QUERIES,
                                                                                 stops=CUT_STOPS)
    assert_biases_absorbed(expl)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradient_composite_is_autograd_gradient_times_input(image, variant):
    """With random (non-zero) offset and weight heads the samples move with the image; the gradient rule keeps
    the sampling locations and attention weights connected, so the composite is autograd's gradient × input."""
    model = tiny_deformable_detr(variant, seed=1)
    adapter = DeformableDetrAdapter()
    expl = LRP(model, composite="gradient").explain(image, queries=QUERIES, stops=["pixels"])
    x = adapter.prepare(model, image).tensor.clone().requires_grad_(True)
    assert_gradient_times_input(expl, x, model(pixel_values=x).logits[0], QUERIES)


def test_model_bit_identical_after_explaining_also_after_an_exception(image):
    model = tiny_deformable_detr("two_stage", seed=2)
    assert_untouched_by_explaining(
        model, lambda: plain_logits(model, DeformableDetrAdapter(), image),
        lambda: LRP(model).explain(image, queries=[1], stops=["pixels", "backbone", "decoder_layers"]))


def test_batched_equals_one_query_at_a_time(image):
    model = tiny_deformable_detr("refine", seed=3)
    lrp = LRP(model, composite="deform-query", batch_mode="vmap", chunk_size=2)
    assert_batched_equals_single(lrp, image, QUERIES, ["pixels", "encoder_layers"])


def test_encoder_only_mode_goes_from_the_memory_to_the_encoder_input(image):
    assert_encoder_only_conserves(tiny_deformable_detr("single", seed=4), image)
