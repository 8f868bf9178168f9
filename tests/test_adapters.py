"""Adapters: detection, the MaskDINO adapter's declarations, canonizers, and an engine that names no model."""
import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from maskdino_lrp import build_model
from maskdino_lrp.adapters import Adapter, StopTensor, find_adapter, get_adapter
from maskdino_lrp.adapters.maskdino import MaskDINOAdapter
from maskdino_lrp.lrp import BatchNormFold, LedgerEntry
from maskdino_lrp.lrp.engine import EngineError, lrp_mode
from maskdino_lrp.lrp.explainer import LRP
from maskdino_lrp.model.backbone import FrozenBatchNorm2d
from maskdino_lrp.model.deform_attn import MSDeformAttn

LRP_DIR = Path(__file__).resolve().parents[1] / "src" / "maskdino_lrp" / "lrp"


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("tiny").double()


def test_lrp_package_imports_no_model_and_no_adapter():
    """``lrp/`` names no model: no import of ``maskdino_lrp.model`` or of a concrete adapter at module level."""
    for path in LRP_DIR.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only: the engine finds adapters lazily
            if isinstance(node, ast.ImportFrom):
                target = ("." * node.level) + (node.module or "")
                assert not target.lstrip(".").startswith(("model", "adapters")), (path.name, target)
                assert "maskdino_lrp.model" not in target and "maskdino_lrp.adapters" not in target, path.name


def test_adapter_is_found_from_the_model_or_its_parts(model):
    assert isinstance(find_adapter(model), MaskDINOAdapter)
    assert isinstance(find_adapter(model.sem_seg_head.pixel_decoder.transformer.encoder.layers[0]), MaskDINOAdapter)
    assert find_adapter(nn.Sequential(nn.Linear(2, 2))) is None
    assert isinstance(get_adapter("maskdino"), MaskDINOAdapter)
    with pytest.raises(ValueError, match="unknown adapter 'yolo'"):
        get_adapter("yolo")


def test_explicit_adapter_gives_the_same_explanation(model, image):
    found = LRP(model, composite="default").explain(image, queries=[0, 3], stops=["pixels", "memory"])
    given = LRP(model, composite="default", adapter=MaskDINOAdapter()).explain(image, queries=[0, 3],
                                                                               stops=["pixels", "memory"])
    assert found.stops == given.stops
    for key in found.relevance:
        assert torch.equal(found.relevance[key], given.relevance[key]), key
    with pytest.raises(EngineError, match="not a model the engine recognises.*MaskDINO layout"):
        LRP(nn.Linear(2, 2), adapter=MaskDINOAdapter())


def test_ledger_and_stop_records_are_typed(model, image):
    lrp = LRP(model, composite="conservative")
    session = lrp.prepare(image)
    entries = session.state.ledger.entries
    assert entries and all(isinstance(e, LedgerEntry) for e in entries)
    assert {e.category for e in entries} == {"bias", "embeddings", "positional"}
    adapter = lrp.adapter
    memory = adapter.stop_tensors(session.records, "memory", session.levels)
    levels = [r.level for r in memory if r.key == "memory"]
    assert levels == list(range(len(session.levels)))  # one map per encoder level, in the encoder's order
    assert all(isinstance(r, StopTensor) for r in memory)
    expl = session.backward([1], "class", ["memory"], retain_graph=False)
    assert expl.relevance["memory"].shape == (1, sum(lv.size for lv in session.levels))
    session.cleanup()
    with pytest.raises(ValueError, match="layout must be one of"):
        StopTensor("memory", "memory", torch.zeros(1), "grid")


def test_batchnorm_fold_is_exact_while_applied_and_restores_the_same_objects():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, bias=False).double()
    norm = FrozenBatchNorm2d(4).double()
    with torch.no_grad():
        for buf in (norm.weight, norm.bias, norm.running_mean):
            buf.normal_()
        norm.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    reference = norm(conv(x))
    weight, buffers = conv.weight, dict(norm.named_buffers())
    fold = BatchNormFold([(conv, norm)])
    with pytest.raises(RuntimeError, match="boom"):
        with fold:
            assert conv.bias is not None and torch.equal(norm(reference), reference)  # the norm is the identity
            assert torch.allclose(norm(conv(x)), reference, rtol=1e-12, atol=1e-12)
            raise RuntimeError("boom")
    assert conv.weight is weight and conv.bias is None
    assert all(buffers[k] is v for k, v in norm.named_buffers()) and norm.eps == 1e-5
    assert torch.equal(norm(conv(x)), reference)
    with pytest.raises(ValueError, match="cannot fold"):
        BatchNormFold([(conv, nn.ReLU())])


def test_bare_deformable_attention_needs_an_adapter_kernel():
    m = MSDeformAttn(d_model=8, n_levels=1, n_heads=1, n_points=1)
    with pytest.raises(EngineError, match="no adapter computes it"):
        with lrp_mode(m, "conservative", adapter=Adapter()):
            pass
    assert "forward" not in m.__dict__  # restored after the refusal
    with lrp_mode(m, "conservative"):  # found: MaskDINO's adapter computes MSDeformAttn
        assert "forward" in m.__dict__


def test_conv_subclass_with_its_own_forward_needs_an_epilogue():
    class Scaled(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(EngineError, match="overrides Conv2d.forward.*conv_epilogue"):
        with lrp_mode(nn.Sequential(Scaled(1, 1, 1)), "default"):
            pass


def test_group_patterns_follow_the_adapter():
    """The presets' ``@backbone`` is wherever the adapter says the CNN body is."""

    class Elsewhere(Adapter):
        groups = {"backbone": ("body.*",)}

    net = nn.Sequential()
    net.add_module("body", nn.Sequential(nn.Conv2d(1, 1, 1)))
    net.add_module("backbone", nn.Sequential(nn.Conv2d(1, 1, 1)))
    with lrp_mode(net, "default", adapter=Elsewhere()) as state:
        assert state.rules["body.0"].name == "zplus" and state.rules["backbone.0"].name == "epsilon"
    with lrp_mode(net, "default", adapter=Adapter()) as state:
        assert state.rules["body.0"].name == "epsilon" and state.rules["backbone.0"].name == "zplus"
