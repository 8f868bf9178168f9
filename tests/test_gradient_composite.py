"""The deformable attention under the ``gradient`` rule is autograd's; under the LRP rules it is what it was.

The ``gradient`` rule keeps the query, the sampling offsets and the attention weights connected, so its
backward through one deformable attention module is that of the module's own forward (our ``MSDeformAttn``;
transformers' ``DeformableDetrMultiscaleDeformableAttention``, which samples with ``grid_sample``) for reference
points that are constants, as every supported model makes them (it detaches its reference boxes; the kernels
take them as positional inputs, also where an adapter connects the box chain for box targets). The other
deformable rules keep the sampling locations as constants: their relevance is ``torch.equal`` to that of an
explicit composition that detaches the locations, on the tiny MaskDINO and a tiny Deformable DETR.
Whole-model proofs (gradient composite = autograd gradient × input with random offset and weight heads) sit in
each adapter's test file.
"""
import numpy as np
import pytest
import torch

from maskdino_lrp import build_model
from maskdino_lrp.adapters import hf_deformable, maskdino as maskdino_adapter
from maskdino_lrp.adapters.maskdino import MaskDINOAdapter
from maskdino_lrp.lrp.engine import lrp_mode
from maskdino_lrp.lrp.explainer import LRP
from maskdino_lrp.lrp.rules import Rule, rule_names
from maskdino_lrp.model import deform_attn as da
from maskdino_lrp.model.deform_attn import MSDeformAttn
from conftest import randomise_deformable_heads

STOPS = ["pixels", "encoder_input", "memory"]


def _inputs(n_levels: int, ref_dim: int, d_model: int = 16, len_q: int = 5, seed: int = 0):
    torch.manual_seed(seed)
    shapes = torch.tensor([[6, 5], [3, 3], [2, 1]][:n_levels])
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    query = torch.randn(1, len_q, d_model, dtype=torch.float64)
    source = torch.randn(1, int(shapes.prod(1).sum()), d_model, dtype=torch.float64)
    ref = torch.rand(1, len_q, n_levels, ref_dim, dtype=torch.float64) * 0.8 + 0.1
    return query, source, ref, shapes, starts


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], seed: int = 1) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    return list(torch.autograd.grad(out, inputs, torch.randn_like(out)))


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_msdeformattn_under_the_gradient_rule_has_its_own_gradient(ref_dim):
    """Gradients w.r.t. the query and the input tokens equal the module's plain backward; the reference points
    take none (positional)."""
    module = MSDeformAttn(d_model=16, n_levels=3, n_heads=2, n_points=2).double()
    assert randomise_deformable_heads(module, std=0.3) == 2
    query, source, ref, shapes, starts = _inputs(3, ref_dim)
    leaves = [t.clone().requires_grad_(True) for t in (query, source)]
    expected = _grads(module(leaves[0], ref, leaves[1], shapes, starts), leaves)
    assert all(g.abs().max() > 0 for g in expected)
    leaves = [t.clone().requires_grad_(True) for t in (query, source, ref)]
    with torch.enable_grad(), lrp_mode(module, "gradient", adapter=MaskDINOAdapter()):
        out = module(leaves[0], leaves[2], leaves[1], shapes, starts)
    assert torch.autograd.grad(out.sum(), leaves[2], allow_unused=True, retain_graph=True)[0] is None
    got = _grads(out, leaves[:2])
    for name, g, e in zip(("query", "input"), got, expected):
        assert torch.allclose(g, e, rtol=1e-12, atol=1e-14), name


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_transformers_deformable_attention_under_the_gradient_rule_has_its_own_gradient(ref_dim):
    """Against transformers' own forward (grid_sample): gradients w.r.t. the hidden states, the encoder states
    and the position embeddings, for constant reference points."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.deformable_detr import modeling_deformable_detr as hf

    config = transformers.DeformableDetrConfig(d_model=16, num_feature_levels=3, encoder_attention_heads=2)
    module = hf.DeformableDetrMultiscaleDeformableAttention(config, num_heads=2, n_points=2).double().eval()
    assert randomise_deformable_heads(module, std=0.3) == 2
    query, source, ref, shapes, starts = _inputs(3, ref_dim)
    pos = torch.randn_like(query)

    def run(forward):
        leaves = [t.clone().requires_grad_(True) for t in (query, source, pos)]
        out = forward(hidden_states=leaves[0], encoder_hidden_states=leaves[1], position_embeddings=leaves[2],
                      reference_points=ref, spatial_shapes=shapes, spatial_shapes_list=shapes.tolist(),
                      level_start_index=starts)[0]
        return _grads(out, leaves)

    expected = run(module)
    assert all(g.abs().max() > 0 for g in expected)
    kernel = hf_deformable.deformable_kernel(module, Rule("gradient").deformable(), lambda _s, t, _c="bias": t)
    got = run(kernel)
    for name, g, e in zip(("hidden states", "encoder states", "position embeddings"), got, expected):
        assert torch.allclose(g, e, rtol=1e-9, atol=1e-12), name


def test_only_the_gradient_rule_connects_the_sampling_locations():
    for name in rule_names("deform_attn"):
        assert Rule(name).deformable().plain == (name == "gradient"), name


def _locations_detached(module, steps, query, reference_points, value, spatial_shapes, level_start_index,
                        locations=None):
    """The deformable composition with the sampling locations always constant (the LRP rules' positional
    treatment), written out as the reference for the rules that must not see them."""
    place = locations or da.sampling_locations
    offsets, logits = da.sampling_offsets_and_logits(module, query if steps.query_relevance else query.detach())
    where = place(module, reference_points, offsets, spatial_shapes).detach()
    weights = da.attention_softmax(module, logits)
    weights = weights.detach() if steps.constant_weights else weights
    if steps.product is not None:
        sampled = da.sample_values(value, spatial_shapes, level_start_index, where)
        return da.weighted_sum(sampled, weights, product=steps.product), weights
    return da.ms_deform_attn_core(value, spatial_shapes, level_start_index, where, weights), weights


def _maskdino():
    torch.manual_seed(0)
    model = build_model("tiny").double()
    randomise_deformable_heads(model)
    return model, np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8), [0, 3]


def _deformable_detr():
    pytest.importorskip("transformers")
    from test_deformable_detr_adapter import tiny_deformable_detr

    return tiny_deformable_detr("two_stage"), np.random.default_rng(0).integers(0, 256, (96, 80, 3), np.uint8), [0, 5]


@pytest.mark.parametrize("build", [_maskdino, _deformable_detr], ids=["maskdino", "deformable_detr"])
def test_lrp_rules_keep_the_sampling_locations_constant(build, monkeypatch):
    """default (AttnLRP), conservative and deform-query: relevance torch.equal to the explicit reference; the
    gradient composite differs from it (the samples move with the image: the reference is not vacuous)."""
    model, image, queries = build()
    composites = ("default", "conservative", "deform-query", "gradient")
    engine = {c: LRP(model, composite=c).explain(image, queries=queries, stops=STOPS).relevance for c in composites}
    monkeypatch.setattr(hf_deformable, "deform_under_steps", _locations_detached)
    monkeypatch.setattr(maskdino_adapter, "deform_under_steps", _locations_detached)
    for composite in composites:
        reference = LRP(model, composite=composite).explain(image, queries=queries, stops=STOPS).relevance
        same = all(torch.equal(engine[composite][s], reference[s]) for s in STOPS)
        assert same == (composite != "gradient"), composite
