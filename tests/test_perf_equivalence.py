"""Memory optimisations of the LRP forward leave relevance unchanged (fp32, 1e-5 relative).

The reference is the same engine with the optimisation switched off (``engine.compact_saves`` replaced by a
context that does nothing: torch's own autograd records), run on the same model and image.
"""
import contextlib

import numpy as np
import pytest
import torch

from maskdino_lrp import build_model
from maskdino_lrp.bench import count_saved
from maskdino_lrp.lrp import engine, explainer
from maskdino_lrp.lrp.explainer import LRP

STOPS = ("pixels", "backbone", "encoder_input", "encoder_layers", "memory", "mask_features", "query_init",
         "decoder_layers")


@contextlib.contextmanager
def plain_records(monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(engine, "compact_saves", contextlib.nullcontext)
        m.setattr(explainer, "compact_saves", contextlib.nullcontext)
        yield


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.fixture(scope="module", params=[("tiny", 96), ("demo", 128)], ids=["tiny", "demo"])
def case(request):
    config, size = request.param
    torch.manual_seed(0)
    model = build_model(config).eval()
    image = np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return model, image


@pytest.mark.parametrize("composite,batch_mode", [("default", "loop"), ("default", "vmap"), ("gradient", "loop"),
                                                  ("conservative", "vmap"), ("deform-query", "loop")])
def test_compact_records_give_the_same_relevance(case, composite, batch_mode, monkeypatch):
    model, image = case
    lrp = LRP(model, composite=composite, batch_mode=batch_mode, chunk_size=2)
    fast = lrp.explain(image, queries=[0, 1, 4], stops=STOPS)
    with plain_records(monkeypatch):
        reference = lrp.explain(image, queries=[0, 1, 4], stops=STOPS)
    assert fast.relevance.keys() == reference.relevance.keys()
    for key, ref in reference.relevance.items():
        if ref.abs().max() < 1e-6:  # a stop the target does not reach (float noise only)
            assert fast.relevance[key].abs().max() < 1e-6, key
            continue
        assert _relative(fast.relevance[key], ref) < 1e-5, key
    for cut, row in reference.conservation.items():
        for name, value in row.items():
            assert torch.allclose(fast.conservation[cut][name], value, rtol=1e-5, atol=1e-6), (cut, name)


def test_compact_records_save_less(case, monkeypatch):
    """Convolution inputs and ReLU outputs are no longer kept: fewer saved bytes in the conv kinds and in total."""
    model, image = case
    device, dtype = torch.device("cpu"), torch.float32
    fast = count_saved(model, image, device, dtype, lrp=True)
    with plain_records(monkeypatch):
        reference = count_saved(model, image, device, dtype, lrp=True)
    assert fast["conv"] < 0.8 * reference["conv"]
    assert sum(fast.values()) < 0.85 * sum(reference.values())


def test_frozen_model_explains_as_the_unfrozen_one(case):
    """A model frozen by requires_grad_(False) gives the same explanation (the ledger's embeddings included)."""
    model, image = case
    reference = LRP(model).explain(image, queries=[0, 2], stops=("pixels",))
    flags = [p.requires_grad for p in model.parameters()]
    try:
        model.requires_grad_(False)
        frozen = LRP(model).explain(image, queries=[0, 2], stops=("pixels",))
        assert not any(p.requires_grad for p in model.parameters())
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    assert torch.equal(frozen.relevance["pixels"], reference.relevance["pixels"])
    assert torch.equal(frozen.conservation["pixels"]["embeddings"], reference.conservation["pixels"]["embeddings"])


def test_trimmed_heap_changes_nothing_but_memory(case):
    """trim_heap=True: the same relevance, and no hook left behind."""
    from torch.nn.modules import module as nn_module

    model, image = case
    reference = LRP(model).explain(image, queries=[0, 3], stops=("pixels", "memory"))
    hooks = len(nn_module._global_forward_hooks)
    trimmed = LRP(model, trim_heap=True).explain(image, queries=[0, 3], stops=("pixels", "memory"))
    assert len(nn_module._global_forward_hooks) == hooks
    for key, value in reference.relevance.items():
        assert torch.equal(trimmed.relevance[key], value), key


def test_trimmed_heap_trims_once_per_module_call(monkeypatch):
    calls = []
    monkeypatch.setattr(engine, "_malloc_trim", lambda: calls.append)
    layer = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
    with engine.trimmed_heap():
        layer(torch.ones(1, 3))
    layer(torch.ones(1, 3))
    assert calls == [0, 0, 0]  # Linear, ReLU, Sequential; nothing after the context
