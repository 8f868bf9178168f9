"""The LRP engine on the whole MaskDINO (tiny preset): conservation, batching, layout, restoration, errors."""
import numpy as np
import pytest
import torch
from torch import nn

from maskdino_lrp import build_model
from maskdino_lrp.lrp.composites import RuleError
from maskdino_lrp.lrp.engine import EngineError, lrp_mode
from maskdino_lrp.lrp.explainer import LRP
from maskdino_lrp.lrp.targets import TargetError
from maskdino_lrp.model.deform_attn import MSDeformAttn
from conftest import randomise_deformable_heads, zero_additive_constants

ALL_STOPS = ["pixels", "backbone", "encoder_input", "encoder_layers", "memory", "mask_features", "query_init",
             "decoder_layers"]


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def model64():
    torch.manual_seed(0)
    model = build_model("tiny").double()
    zero_additive_constants(model)
    with torch.no_grad():  # LayerNorm weights of 1 would make the embedding target sum to exactly 0
        model.sem_seg_head.predictor.decoder_norm.weight.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("target", ["class", "mask", "embedding"])
def test_exact_conservation_whole_model(model64, image, target):
    """Property 1: zero biases, ε≈0, AH-rule, deformable value path → Σ R = target at every complete cut."""
    expl = LRP(model64, composite="conservative").explain(image, queries=[0, 3, 7], target=target, stops=ALL_STOPS)
    assert set(expl.conservation) == {"pixels", "backbone", "memory"}
    for cut, row in expl.conservation.items():
        assert torch.all(row["bias"].abs() < 1e-12), cut
        rel = (row["residual"].abs() / row["target"].abs()).max().item()
        assert rel < 1e-5, f"{target}: cut {cut} conserves only to {rel:.2e}"
        accounted = row["total"] + row["embeddings"] + row["positional"]
        assert torch.allclose(accounted, row["target"], rtol=1e-5)


def test_default_composite_reports_what_it_does_not_conserve(image):
    torch.manual_seed(0)
    model = build_model("tiny")
    expl = LRP(model).explain(image, queries="topk:2", stops=["pixels"])
    row = expl.conservation["pixels"]
    recomposed = row["total"] + row["bias"] + row["embeddings"] + row["positional"] + row["residual"]
    assert torch.allclose(recomposed, row["target"], atol=1e-5)
    assert torch.isfinite(expl.relevance["pixels"]).all()
    assert row["bias"].abs().sum() > 0  # random-init biases do absorb relevance


def test_explain_without_stops_keeps_maskdinos_default(model64, image):
    """MaskDINO's default stops are its adapter's, unchanged: pixels, encoder_input, memory."""
    lrp = LRP(model64, composite="conservative")
    assert lrp.adapter.default_stops == ("pixels", "encoder_input", "memory")
    default = lrp.explain(image, queries=[0])
    explicit = lrp.explain(image, queries=[0], stops=["pixels", "encoder_input", "memory"])
    assert set(default.relevance) == set(explicit.relevance) and "memory" in default.relevance
    assert all(torch.equal(default.relevance[k], explicit.relevance[k]) for k in explicit.relevance)


@pytest.mark.parametrize("batch_mode", ["vmap", "loop"])
def test_batched_equals_one_at_a_time(model64, image, batch_mode):
    lrp = LRP(model64, composite="default", chunk_size=2, batch_mode=batch_mode)
    session = lrp.prepare(image)
    batched = session.backward([1, 4, 6], "class", ["pixels", "memory", "decoder_layers"])
    lrp.batch_mode = "loop"  # one plain backward per query: the independent reference
    for row, q in enumerate([1, 4, 6]):
        single = session.backward([q], "class", ["pixels", "memory", "decoder_layers"])
        for stop, rel in batched.relevance.items():
            assert torch.allclose(rel[row], single.relevance[stop][0], atol=1e-10, rtol=1e-8), stop
    session.cleanup()


def test_relevance_only_where_the_graph_allows(model64, image):
    """The class head of query q reads only q's final state: the last decoder layer's relevance sits on q alone."""
    expl = LRP(model64, composite="conservative").explain(image, queries=[5], target="class", stops=["decoder_layers"])
    last = expl.relevance[f"decoder_layer{len(model64.sem_seg_head.predictor.decoder.layers) - 1}"][0]
    others = torch.cat([last[:5], last[6:]])
    assert last[5].abs() > 0 and torch.all(others == 0)
    # layouts: encoder (B, T, C) tokens and decoder (T, B, C) queries both reduce to one value per token
    assert last.shape == (model64.num_queries,)


def test_model_restored_bit_identically_also_after_an_exception(image):
    torch.manual_seed(1)
    model = build_model("tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = model.prepare(image).tensor
    with torch.no_grad():
        ref = model(x)["pred_logits"].clone()
    with pytest.raises(RuntimeError, match="boom"):
        with lrp_mode(model, "default"):
            model(x)
            raise RuntimeError("boom")
    LRP(model).explain(image, queries=[0], stops=["pixels"])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert model.sem_seg_head.predictor.detach_query_content is True
    with torch.no_grad():
        assert torch.equal(model(x)["pred_logits"], ref)


def _single_deform(location_xy, width=4, height=4):
    """One head, one level, one point sampling at ``location_xy`` (normalised); identity projections."""
    m = MSDeformAttn(d_model=8, n_levels=1, n_heads=1, n_points=1)
    with torch.no_grad():
        for lin in (m.value_proj, m.output_proj):
            lin.weight.copy_(torch.eye(8))
            lin.bias.zero_()
        m.sampling_offsets.weight.zero_()
        m.sampling_offsets.bias.zero_()
    ref = torch.tensor(location_xy, dtype=torch.float32).view(1, 1, 1, 2)
    shapes = torch.tensor([[height, width]])
    return m, ref, shapes


@pytest.mark.parametrize("loc,expected", [
    ((1.5 / 4, 2.5 / 4), {(2, 1): 1.0}),  # a pixel centre: one token
    ((2.0 / 4, 2.0 / 4), {(1, 1): 0.25, (1, 2): 0.25, (2, 1): 0.25, (2, 2): 0.25}),  # a corner: four
])
def test_deformable_value_path_splats_bilinearly(loc, expected):
    """Properties 5 and 6: relevance lands on the bilinear corners in proportion, untouched tokens get zero."""
    m, ref, shapes = _single_deform(loc)
    value = torch.ones(1, 16, 8, requires_grad=True)
    query = torch.randn(1, 1, 8)
    with lrp_mode(m, "conservative"):
        out = m(query, ref, value, shapes, torch.tensor([0]))
    (g,) = torch.autograd.grad(out.sum(), value)
    r = (value.detach() * g).sum(-1).view(4, 4)
    total = out.sum().item()
    for (y, x), share in expected.items():
        assert r[y, x].item() == pytest.approx(share * total, rel=1e-6)
    mask = torch.ones(4, 4, dtype=torch.bool)
    for y, x in expected:
        mask[y, x] = False
    assert torch.all(r[mask] == 0)


def test_bad_requests_name_the_problem(image):
    torch.manual_seed(0)
    model = build_model("tiny")
    lrp = LRP(model)
    with pytest.raises(TargetError, match="query index 99 is out of range"):
        lrp.explain(image, queries=[99])
    with pytest.raises(TargetError, match="unknown target 'logit'"):
        lrp.explain(image, queries=[0], target="logit")
    with pytest.raises(EngineError, match="unknown stop 'tokens'"):
        lrp.explain(image, queries=[0], stops=["tokens"])
    with pytest.raises(RuleError, match="unknown composite 'best'"):
        LRP(model, composite="best")
    with pytest.raises(EngineError, match="not a model the engine recognises"):
        LRP(nn.Linear(3, 3))


def _capture_call(model, module, image):
    """(args, kwargs) of the first call of ``module`` during a forward of ``model`` on ``image``."""
    seen = {}

    def hook(_m, args, kwargs):
        seen.setdefault("call", (args, kwargs))

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(model.prepare(image).tensor)
    handle.remove()
    return seen["call"]


def test_exact_conservation_one_encoder_layer(model64, image):
    layer = model64.sem_seg_head.pixel_decoder.transformer.encoder.layers[0]
    args, kwargs = _capture_call(model64, layer, image)
    src = (args[0] if args else kwargs.pop("src")).clone().requires_grad_(True)
    args = args[1:] if args else ()
    with lrp_mode(layer, "conservative") as state:
        out = layer(src, *args, **kwargs)
    (g,) = torch.autograd.grad(out.sum(), src)  # R_out = out
    assert state.ledger.entries  # biases were tracked (all zero here)
    assert (src.detach() * g).sum().item() == pytest.approx(out.sum().item(), rel=1e-6)


def test_exact_conservation_one_decoder_layer(model64, image):
    """Query path and memory path together carry all of a decoder layer's output relevance."""
    layer = model64.sem_seg_head.predictor.decoder.layers[0]
    _, kwargs = _capture_call(model64, layer, image)
    tgt = kwargs["tgt"].clone().requires_grad_(True)
    memory = kwargs["memory"].clone().requires_grad_(True)
    kwargs = {**kwargs, "tgt": tgt, "memory": memory}
    with lrp_mode(layer, "conservative"):
        out = layer(**kwargs)
    g_tgt, g_mem = torch.autograd.grad(out.sum(), [tgt, memory])
    r_query = (tgt.detach() * g_tgt).sum().item()
    r_memory = (memory.detach() * g_mem).sum().item()
    assert r_query + r_memory == pytest.approx(out.sum().item(), rel=1e-6)
    assert r_memory != 0 and r_query != 0


def test_decoder_only_then_encoder_only_is_the_whole_path(model64, image):
    """The prototype's which_module flow: decoder-only relevance at the memory, then encoder-only to the input."""
    lrp = LRP(model64, composite="conservative")
    session = lrp.prepare(image)
    whole = session.backward([2], "class", ["encoder_input", "encoder_layers", "memory"])
    last = f"encoder_layer{len(model64.sem_seg_head.pixel_decoder.transformer.encoder.layers) - 1}"
    # the decoder-only part: relevance at the encoder output equals the whole run's relevance there
    enc_out = whole.relevance[last]
    # encoder-only: propagate that token relevance back; conservation through the (bias-free) encoder
    back = session.propagate(enc_out, stops=["encoder_input"])
    assert back["encoder_input"].sum().item() == pytest.approx(enc_out.sum().item(), rel=1e-6)
    with pytest.raises(EngineError, match="must be"):
        session.propagate(enc_out[:, :5])
    session.cleanup()


def test_box_target_accounts_the_reference_box_as_positional(model64, image):
    """box = sigmoid(delta + inverse_sigmoid(reference)): the reference's share is positional, not residual."""
    expl = LRP(model64, composite="conservative").explain(image, queries=[0, 2], target="box:cx", stops=["pixels"])
    row = expl.conservation["pixels"]
    assert torch.all(row["positional"].abs() > 0)
    assert torch.allclose(row["total"] + row["embeddings"] + row["positional"], row["target"], rtol=1e-5)


@pytest.mark.parametrize("batch_mode", ["vmap", "loop"])
def test_gradient_composite_is_plain_gradient_times_input(image, batch_mode):
    """With every rule set to 'gradient' the engine must reproduce autograd's gradient × input exactly (float64).
    The deformable attentions' offset and weight heads are random (non-zero): the samples move with the image."""
    torch.manual_seed(0)
    model = build_model("tiny").double()
    assert randomise_deformable_heads(model) == 2 * sum(isinstance(m, MSDeformAttn) for m in model.modules())
    expl = LRP(model, composite="gradient", batch_mode=batch_mode).explain(image, queries=[0, 3], stops=["pixels"])
    x = model.prepare(image).tensor.clone().requires_grad_(True)
    model.sem_seg_head.predictor.detach_query_content = False  # as in LRP mode: the selected content is connected
    try:
        out = model(x)
        for row, q in enumerate([0, 3]):
            (g,) = torch.autograd.grad(out["pred_logits"][0, q, expl.labels[row]], x, retain_graph=True)
            reference = (x * g).detach().sum(1)[0]
            assert reference.abs().max() > 0
            assert torch.allclose(expl.relevance["pixels"][row], reference, rtol=1e-9, atol=1e-12)
    finally:
        model.sem_seg_head.predictor.detach_query_content = True
