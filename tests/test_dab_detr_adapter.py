"""The engine on Hugging Face DAB-DETR through its adapter (anchor-box queries, projected decoder attention).

A tiny random ``DabDetrForObjectDetection`` (transformers ResNet backbone, ReLU activations) in float64. DAB-DETR
creates its decoder queries with ``torch.zeros`` in the default dtype, so the tests run with float64 as the
default dtype (restored afterwards). Its attentions take the softmax in float32 whatever the model's dtype, the
kernels in float64: plain and LRP forwards agree to float32 rounding (``SOFTMAX_TOL``), and the references that
the proofs compare with (the target value, autograd's gradient) carry that rounding. Proofs as in
test_detr_adapter.py.
"""
import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from maskdino_lrp.adapters import find_adapter  # noqa: E402
from maskdino_lrp.adapters.dab_detr import DabDetrAdapter  # noqa: E402
from maskdino_lrp.lrp.engine import EngineError, lrp_mode  # noqa: E402
from maskdino_lrp.lrp.explainer import LRP  # noqa: E402
from conftest import zero_additive_constants

QUERIES = [0, 3, 5]
CUT_STOPS = ["pixels", "backbone", "encoder_input", "memory"]
SOFTMAX_TOL = 1e-6


@pytest.fixture(autouse=True)
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def tiny_dab_detr(seed: int = 0, activation: str = "relu") -> torch.nn.Module:
    torch.manual_seed(seed)
    backbone = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                                         layer_type="basic", out_features=["stage2", "stage3", "stage4"])
    config = transformers.DabDetrConfig(
        use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, hidden_size=32,
        encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
        decoder_ffn_dim=48, num_queries=8, num_labels=4, activation_function=activation)
    model = transformers.DabDetrForObjectDetection(config).eval().double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3) if name.endswith("bias") else p.mul_(1.0 + 0.5 * torch.rand_like(p))
        model.model.query_refpoint_embeddings.weight.normal_(0.0, 1.0)  # distinct anchor boxes per query
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
        return model(pixel_values=DabDetrAdapter().prepare(model, image).tensor)


def test_adapter_is_found_its_kernels_reproduce_the_forward_and_prelu_is_refused(image):
    model = tiny_dab_detr()
    assert isinstance(find_adapter(model), DabDetrAdapter)
    reference = plain_outputs(model, image)
    for composite in ("default", "conservative", "gradient"):
        with lrp_mode(model, composite):
            out = plain_outputs(model, image)
        assert torch.allclose(out.logits, reference.logits, rtol=0, atol=SOFTMAX_TOL), composite
        assert torch.allclose(out.pred_boxes, reference.pred_boxes, rtol=0, atol=SOFTMAX_TOL), composite
    with pytest.raises(EngineError, match="activation_function='relu'"):
        LRP(tiny_dab_detr(activation="prelu"))


def test_zero_bias_conservation_with_attention_as_constant(image):
    """The anchor boxes' sine embeddings and their projections are booked where the attentions read them."""
    model = tiny_dab_detr()
    zero_additive_constants(model)
    target_logits = plain_outputs(model, image).logits[0]
    expl = LRP(model, composite="conservative").explain(image, queries=QUERIES, stops=CUT_STOPS)
    target = target_logits[QUERIES, expl.labels]
    assert torch.allclose(expl.target_values, target, rtol=SOFTMAX_TOL, atol=0)
    assert set(expl.conservation) == set(CUT_STOPS)
    for cut, row in expl.conservation.items():
        assert torch.all(row["bias"] == 0), cut
        rel = (((row["total"] + row["embeddings"] + row["positional"]) - target).abs() / target.abs()).max().item()
        assert rel < 1e-5, f"cut {cut} conserves only to {rel:.2e}"
    # under AttnLRP the queries' and keys' positional inputs take relevance: the ledger books it
    expl = LRP(model, composite="default").explain(image, queries=QUERIES, stops=["pixels"])
    assert (expl.conservation["pixels"]["positional"].abs() > 0).all()


def test_gradient_composite_is_autograd_gradient_times_input(image, monkeypatch):
    """The positional inputs (the encoder's sine positions scaled by ``query_scale`` of the content; the decoder's
    anchor sine embeddings scaled by the content, and their projections) are booked, so every composite takes them
    as constants: the reference is autograd's gradient × input through transformers' forward with those inputs
    detached (and its softmax in float64, as the kernels compute it)."""
    import transformers.models.dab_detr.modeling_dab_detr as modeling

    from maskdino_lrp.adapters.dab_detr import _POSITIONAL_INPUTS

    model = tiny_dab_detr(1)
    expl = LRP(model, composite="gradient").explain(image, queries=QUERIES, stops=["pixels"])
    softmax = torch.nn.functional.softmax
    monkeypatch.setattr(modeling.nn.functional, "softmax", lambda t, dim=-1, dtype=None: softmax(t, dim))
    handles = [m.register_forward_pre_hook(lambda _m, args: (args[0].detach(),) + args[1:])
               for name, m in model.model.decoder.named_modules() if name.rsplit(".", 1)[-1] in _POSITIONAL_INPUTS]
    handles += [layer.self_attn.register_forward_pre_hook(
        lambda _m, args, kwargs: (args, {**kwargs, "object_queries": kwargs["object_queries"].detach()}),
        with_kwargs=True) for layer in model.model.encoder.layers]
    try:
        x = DabDetrAdapter().prepare(model, image).tensor.clone().requires_grad_(True)
        logits = model(pixel_values=x).logits[0]
    finally:
        for handle in handles:
            handle.remove()
    for row, q in enumerate(QUERIES):
        (g,) = torch.autograd.grad(logits[q, expl.labels[row]], x, retain_graph=True)
        reference = (x * g).detach().sum(1)[0]
        assert torch.allclose(expl.relevance["pixels"][row], reference, rtol=1e-9, atol=1e-9 * reference.abs().max())


def test_model_bit_identical_after_explaining_also_after_an_exception_and_batched_equals_single(image):
    model = tiny_dab_detr(2)
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
