"""The proofs every Hugging Face adapter's tests run, written once: tiny random models, conservation at the cuts,
the gradient composite against autograd, the model untouched after explaining, batched against one at a time.

A family's test file builds its tiny config and states its own tolerances where they differ from these defaults
(float64 sums of a few thousand terms agree to ~1e-12; the conservative composite's ε = 1e-9 stabiliser leaves
a residual of order ε per layer, so 1e-5 relative is asserted at the cuts).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import numpy as np
import pytest
import torch

from maskdino_lrp.lrp.engine import lrp_mode
from maskdino_lrp.lrp.explainer import LRP
from conftest import zero_additive_constants

QUERIES = [0, 3, 5]
CUT_STOPS = ["pixels", "backbone", "encoder_input", "memory"]


def tiny_resnet(transformers, **overrides):
    """The tiny transformers ResNet backbone (three output stages) the DETR-family tests build on."""
    settings = dict(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], layer_type="basic",
                    out_features=["stage2", "stage3", "stage4"])
    return transformers.ResNetConfig(**{**settings, **overrides})


def random_image(shape: tuple[int, ...] = (96, 80, 3), seed: int = 0) -> np.ndarray:
    """A random uint8 RGB image."""
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def randomise_parameters(model: torch.nn.Module, heads: Sequence[str] = ()) -> None:
    """transformers initialises biases trivially: draw them, scale every weight by 1 + 0.5·U(0, 1), and draw the
    weights whose name contains one of ``heads`` (zero-initialised sampling heads) from N(0, 0.05)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.3)
            elif any(h in name for h in heads):
                p.normal_(0.0, 0.05)
            else:
                p.mul_(1.0 + 0.5 * torch.rand_like(p))


def randomise_norm_statistics(model: torch.nn.Module) -> None:
    """Non-trivial running statistics and shifts for every batch norm, so that folding them is tested."""
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "running_mean"):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)


def randomise(model: torch.nn.Module, heads: Sequence[str] = ()) -> torch.nn.Module:
    """:func:`randomise_parameters` then :func:`randomise_norm_statistics`; returns the model."""
    randomise_parameters(model, heads)
    randomise_norm_statistics(model)
    return model


def assert_conserves(expl, target: torch.Tensor, cuts: Sequence[str], target_rtol: float = 1e-12,
                     tol: float = 1e-5) -> None:
    """Bias-free model: at every cut, relevance + booked embeddings and positions = the plain forward's target."""
    assert torch.allclose(expl.target_values, target, rtol=target_rtol, atol=0)
    assert set(expl.conservation) == set(cuts)
    for cut, row in expl.conservation.items():
        assert torch.all(row["bias"] == 0), cut
        accounted = row["total"] + row["embeddings"] + row["positional"]
        rel = ((accounted - target).abs() / target.abs()).max().item()
        assert rel < tol, f"cut {cut} conserves only to {rel:.2e}"


def assert_gradient_times_input(expl, x: torch.Tensor, logits: torch.Tensor, queries: Sequence[int],
                                rtol: float = 1e-9, atol: float = 1e-12, atol_of_max: float | None = None) -> None:
    """The gradient composite's pixel relevance per query = autograd's (x · ∂logit/∂x) summed over channels
    (``logits`` (Q, C) computed from ``x``; ``atol_of_max``: the absolute tolerance as a share of the largest
    reference value instead of ``atol``)."""
    for row, q in enumerate(queries):
        (g,) = torch.autograd.grad(logits[q, expl.labels[row]], x, retain_graph=True)
        reference = (x * g).detach().sum(1)[0]
        tolerance = atol if atol_of_max is None else atol_of_max * reference.abs().max()
        assert torch.allclose(expl.relevance["pixels"][row], reference, rtol=rtol, atol=tolerance)


def assert_untouched_by_explaining(model: torch.nn.Module, plain: Callable[[], torch.Tensor | tuple],
                                   explain: Callable[[], object], adapter=None,
                                   patched: Sequence[str] = ("forward",)) -> None:
    """After an exception inside ``lrp_mode`` and after ``explain()``, the model's state, ``requires_grad`` flags
    and forward are bit for bit as before, no instance attribute of ``patched`` and no hook left behind
    (``plain()``: the untouched model's output, a tensor or a tuple of them)."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    reference = plain()
    with pytest.raises(RuntimeError, match="boom"):
        with lrp_mode(model, "default", adapter=adapter):
            plain()
            raise RuntimeError("boom")
    explain()
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not any(name in m.__dict__ for m in model.modules() for name in patched)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    again = plain()
    if isinstance(reference, torch.Tensor):
        assert torch.equal(again, reference)
    else:
        assert len(again) == len(reference) and all(torch.equal(a, b) for a, b in zip(again, reference))


def assert_batched_equals_single(lrp, image, queries: Sequence[int], stops: Sequence[str], target: str = "class",
                                 rtol: float = 1e-9, atol: float = 1e-12) -> None:
    """One vmapped backward of all ``queries`` gives each query's relevance of a backward of that query alone
    (``lrp`` built with ``batch_mode="vmap"``)."""
    session = lrp.prepare(image)
    batched = session.backward(queries, target, list(stops))
    lrp.batch_mode = "loop"
    for row, q in enumerate(queries):
        single = session.backward([q], target, list(stops))
        for key, rel in batched.relevance.items():
            assert torch.allclose(rel[row], single.relevance[key][0], rtol=rtol, atol=atol), key
    session.cleanup()


def assert_biases_absorbed(expl, tol: float = 1e-5) -> None:
    """With biases, every cut still conserves once its downstream biases are counted (and they matter: each is
    over 1e-3 of the target), so a cut that booked an upstream bias, or missed a downstream one, fails."""
    for cut, row in expl.conservation.items():
        assert (row["bias"].abs() > 1e-3 * row["target"].abs()).all(), cut
        rel = (row["residual"].abs() / row["target"].abs()).max().item()
        assert rel < tol, f"cut {cut}: residual {rel:.2e}"


def assert_kernels_reproduce_the_forward(model: torch.nn.Module, plain: Callable[[], object], atol: float = 1e-12,
                                         fields: Sequence[str] = ("logits", "pred_boxes")) -> None:
    """Under each composite's kernels (``lrp_mode``) the model's output ``fields`` equal its plain forward's."""
    reference = plain()
    for composite in ("default", "conservative", "gradient"):
        with lrp_mode(model, composite):
            out = plain()
        for field in fields:
            assert torch.allclose(getattr(out, field), getattr(reference, field), rtol=0, atol=atol), composite


LABELS = {0: "cat", 1: "dog", 2: "bird"}


def label_settings(labels: dict[int, str] = LABELS) -> dict:
    """The config entries naming a tiny model's classes (``id2label``, ``label2id``, ``num_labels``)."""
    return {"id2label": dict(labels), "label2id": {v: k for k, v in labels.items()}, "num_labels": len(labels)}


def write_images(folder, names: Sequence[str] = ("img0.png", "img1.png"), shape: tuple[int, ...] = (64, 48, 3),
                 seed: int = 0):
    """Random RGB images saved as PNGs under ``folder`` (created), one generator drawing them in turn."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / name)
    return folder


def logits_under_hooks(model: torch.nn.Module, x: torch.Tensor, handles: Sequence) -> torch.Tensor:
    """The model's class logits (Q, C) for ``pixel_values=x`` with the given hooks (e.g. detaching the inputs the
    adapter books as positional), which are removed afterwards."""
    try:
        return model(pixel_values=x).logits[0]
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def encoder_only_checked(model: torch.nn.Module, image, queries=(2,)) -> Iterator[tuple]:
    """With the additive constants zeroed and the conservative composite, ``Session.propagate`` from the memory's
    relevance back to the encoder input keeps its sum (1e-6 relative); yields ``(session, memory relevance)``
    for further checks and cleans the session up."""
    zero_additive_constants(model)
    session = LRP(model, composite="conservative").prepare(image)
    try:
        memory = session.backward(queries if isinstance(queries, str) else list(queries), "class",
                                  ["memory"]).relevance["memory"]
        back = session.propagate(memory, stops=["encoder_input"])
        assert back["encoder_input"].sum().item() == pytest.approx(memory.sum().item(), rel=1e-6)
        yield session, memory
    finally:
        session.cleanup()


def assert_encoder_only_conserves(model: torch.nn.Module, image, queries=(2,)) -> None:
    """:func:`encoder_only_checked` without further checks."""
    with encoder_only_checked(model, image, queries):
        pass


def plain_logits(model: torch.nn.Module, adapter, image) -> torch.Tensor:
    """The untouched model's class logits (Q, C) for ``image`` as ``adapter`` prepares it."""
    with torch.no_grad():
        return model(pixel_values=adapter.prepare(model, image).tensor).logits[0]
