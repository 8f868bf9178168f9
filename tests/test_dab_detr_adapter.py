"""The engine on Hugging Face DAB-DETR through its adapter (anchor-box queries, projected decoder attention).

A tiny random ``DabDetrForObjectDetection`` (transformers ResNet backbone, ReLU activations) in float64. DAB-DETR
creates its decoder queries with ``torch.zeros`` in the default dtype, so the tests run with float64 as the
default dtype (restored afterwards). Its attentions take the softmax in float32 whatever the model's dtype, the
kernels in float64: plain and LRP forwards agree to float32 rounding (``SOFTMAX_TOL``), and the references that
the proofs compare with (the target value, autograd's gradient) carry that rounding. Proofs as in
test_detr_adapter.py.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from maskdino_lrp.adapters import find_adapter  # noqa: E402
from maskdino_lrp.adapters.dab_detr import DabDetrAdapter  # noqa: E402
from maskdino_lrp.lrp.engine import EngineError  # noqa: E402
from maskdino_lrp.lrp.explainer import LRP  # noqa: E402
from conftest import zero_additive_constants
from hf_checks import (CUT_STOPS, QUERIES, assert_batched_equals_single, assert_conserves, assert_gradient_times_input,
                       assert_kernels_reproduce_the_forward, assert_untouched_by_explaining, logits_under_hooks,
                       random_image, randomise_norm_statistics, randomise_parameters, tiny_resnet)

SOFTMAX_TOL = 1e-6


@pytest.fixture(autouse=True)
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def tiny_dab_detr(seed: int = 0, activation: str = "relu") -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.DabDetrConfig(
        use_timm_backbone=False, backbone_config=tiny_resnet(transformers), use_pretrained_backbone=False,
        hidden_size=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=48, decoder_ffn_dim=48, num_queries=8, num_labels=4, activation_function=activation)
    model = transformers.DabDetrForObjectDetection(config).eval().double()
    randomise_parameters(model)
    with torch.no_grad():
        model.model.query_refpoint_embeddings.weight.normal_(0.0, 1.0)  # distinct anchor boxes per query
    randomise_norm_statistics(model)
    return model


@pytest.fixture(scope="module")
def image():
    return random_image()


def plain_outputs(model, image):
    with torch.no_grad():
        return model(pixel_values=DabDetrAdapter().prepare(model, image).tensor)


def test_adapter_is_found_its_kernels_reproduce_the_forward_and_prelu_is_refused(image):
    model = tiny_dab_detr()
    assert isinstance(find_adapter(model), DabDetrAdapter)
    assert_kernels_reproduce_the_forward(model, lambda: plain_outputs(model, image), atol=SOFTMAX_TOL)
    with pytest.raises(EngineError, match="activation_function='relu'"):
        LRP(tiny_dab_detr(activation="prelu"))


def test_zero_bias_conservation_with_attention_as_constant(image):
    """The anchor boxes' sine embeddings and their projections are booked where the attentions read them."""
    model = tiny_dab_detr()
    zero_additive_constants(model)
    target_logits = plain_outputs(model, image).logits[0]
    expl = LRP(model, composite="conservative").explain(image, queries=QUERIES, stops=CUT_STOPS)
    assert_conserves(expl, target_logits[QUERIES, expl.labels], CUT_STOPS, target_rtol=SOFTMAX_TOL)
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
    x = DabDetrAdapter().prepare(model, image).tensor.clone().requires_grad_(True)
    assert_gradient_times_input(expl, x, logits_under_hooks(model, x, handles), QUERIES, atol_of_max=1e-9)


def test_model_bit_identical_after_explaining_also_after_an_exception_and_batched_equals_single(image):
    model = tiny_dab_detr(2)
    assert_untouched_by_explaining(
        model, lambda: plain_outputs(model, image).logits,
        lambda: assert_batched_equals_single(LRP(model, composite="default", batch_mode="vmap", chunk_size=2), image,
                                             QUERIES, ["pixels", "decoder_layers"]))
