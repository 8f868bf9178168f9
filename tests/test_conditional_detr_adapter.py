"""The engine on Hugging Face Conditional DETR through its adapter (its own decoder attention kernels).

A tiny random ``ConditionalDetrForObjectDetection`` (transformers ResNet backbone) in float64; proofs as in
test_detr_adapter.py.
"""
import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from maskdino_lrp.adapters import find_adapter  # noqa: E402
from maskdino_lrp.adapters.conditional_detr import ConditionalDetrAdapter  # noqa: E402
from maskdino_lrp.lrp.engine import lrp_mode  # noqa: E402
from maskdino_lrp.lrp.explainer import LRP  # noqa: E402
from conftest import zero_additive_constants

QUERIES = [0, 3, 5]
CUT_STOPS = ["pixels", "backbone", "encoder_input", "memory"]


def tiny_conditional_detr(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    backbone = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                                         layer_type="basic", out_features=["stage2", "stage3", "stage4"])
    config = transformers.ConditionalDetrConfig(
        use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, d_model=32,
        encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
        decoder_ffn_dim=48, num_queries=8, num_labels=4)
    model = transformers.ConditionalDetrForObjectDetection(config).eval().double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3) if name.endswith("bias") else p.mul_(1.0 + 0.5 * torch.rand_like(p))
        for m in model.modules():
            if hasattr(m, "running_mean"):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (96, 80, 3), dtype=np.uint8)


def plain_outputs(model, image):
    with torch.no_grad():
        return model(pixel_values=ConditionalDetrAdapter().prepare(model, image).tensor)


def test_adapter_is_found_and_its_kernels_reproduce_the_forward(image):
    model = tiny_conditional_detr()
    assert isinstance(find_adapter(model), ConditionalDetrAdapter)
    reference = plain_outputs(model, image)
    for composite in ("default", "conservative", "gradient"):
        with lrp_mode(model, composite):
            out = plain_outputs(model, image)
        assert torch.allclose(out.logits, reference.logits, rtol=0, atol=1e-12), composite
        assert torch.allclose(out.pred_boxes, reference.pred_boxes, rtol=0, atol=1e-12), composite


def test_zero_bias_conservation_with_attention_as_constant(image):
    model = tiny_conditional_detr()
    zero_additive_constants(model)
    target_logits = plain_outputs(model, image).logits[0]
    expl = LRP(model, composite="conservative").explain(image, queries=QUERIES, stops=CUT_STOPS)
    target = target_logits[QUERIES, expl.labels]
    assert torch.allclose(expl.target_values, target, rtol=1e-12, atol=0)
    assert set(expl.conservation) == set(CUT_STOPS)
    for cut, row in expl.conservation.items():
        assert torch.all(row["bias"] == 0), cut
        rel = (((row["total"] + row["embeddings"] + row["positional"]) - target).abs() / target.abs()).max().item()
        assert rel < 1e-5, f"cut {cut} conserves only to {rel:.2e}"


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
    try:
        x = ConditionalDetrAdapter().prepare(model, image).tensor.clone().requires_grad_(True)
        logits = model(pixel_values=x).logits[0]
    finally:
        for handle in handles:
            handle.remove()
    for row, q in enumerate(QUERIES):
        (g,) = torch.autograd.grad(logits[q, expl.labels[row]], x, retain_graph=True)
        reference = (x * g).detach().sum(1)[0]
        assert torch.allclose(expl.relevance["pixels"][row], reference, rtol=1e-9, atol=1e-9 * reference.abs().max())


def test_model_bit_identical_after_explaining_also_after_an_exception_and_batched_equals_single(image):
    model = tiny_conditional_detr(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = plain_outputs(model, image).logits
    with pytest.raises(RuntimeError, match="boom"):
        with lrp_mode(model, "default"):
            plain_outputs(model, image)
            raise RuntimeError("boom")
    lrp = LRP(model, composite="default", batch_mode="vmap", chunk_size=2)
    session = lrp.prepare(image)
    batched = session.backward(QUERIES, "class", ["pixels", "decoder_layers"])
    lrp.batch_mode = "loop"
    for row, q in enumerate(QUERIES):
        single = session.backward([q], "class", ["pixels", "decoder_layers"])
        for key, rel in batched.relevance.items():
            assert torch.allclose(rel[row], single.relevance[key][0], rtol=1e-9, atol=1e-12), key
    session.cleanup()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert torch.equal(plain_outputs(model, image).logits, reference)
