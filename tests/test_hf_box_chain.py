"""Box explanations of the Hugging Face adapters: box logits, and the connected reference chain of the families
that refine boxes from top-k proposals (two-stage Deformable DETR with box refinement, RT-DETR).

Tiny random models in float64; conservation tests zero every additive constant and use the conservative
composite: pixels + booked constants must equal the target a plain forward computes (1e-5 relative).
"""
import contextlib

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import zero_additive_constants  # noqa: E402
from maskdino_lrp.adapters.deformable_detr import DeformableDetrAdapter  # noqa: E402
from maskdino_lrp.adapters.rtdetr import RTDetrAdapter, RTDetrV2Adapter  # noqa: E402
from maskdino_lrp.lrp.explainer import LRP  # noqa: E402
from maskdino_lrp.lrp.targets import TargetError  # noqa: E402
from test_deformable_detr_adapter import tiny_deformable_detr  # noqa: E402
from test_rtdetr_adapter import tiny_rtdetr  # noqa: E402

QUERIES = [0, 2, 5]
FAMILIES = ["deformable_detr", "rt_detr"]


def build(family: str, zero_constants: bool = True):
    if family == "deformable_detr":
        model, adapter = tiny_deformable_detr("two_stage"), DeformableDetrAdapter
    elif family == "rt_detr_v2":
        model, adapter = tiny_rtdetr("v2"), RTDetrV2Adapter
    else:
        model, adapter = tiny_rtdetr(), RTDetrAdapter
    if zero_constants:
        zero_additive_constants(model)
    return model, adapter


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)  # RT-DETR: multiples of 32


def inverse_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return torch.log(x / (1 - x))


def plain(model, adapter, image):
    with torch.no_grad():
        return model(pixel_values=adapter.prepare(model, image).tensor)


@contextlib.contextmanager
def session_of(model, image, adapter, composite="conservative"):
    session = LRP(model, composite=composite, adapter=adapter).prepare(image)
    try:
        yield session
    finally:
        session.cleanup()


def assert_conserves(expl, label, scale=None):
    """Pixels + booked constants == the target, relative to |target| (or ``scale``: for a sum whose summands
    may cancel, the sum of their absolute values)."""
    for cut, row in expl.conservation.items():
        assert torch.all(row["bias"] == 0), (label, cut)
        accounted = row["total"] + row["embeddings"] + row["positional"]
        rel = ((accounted - row["target"]).abs() / (row["target"].abs() if scale is None else scale)).max().item()
        assert rel < 1e-5, f"{label}: cut {cut} conserves only to {rel:.2e}"


# ----------------------------------------------------------------------------- conservation
@pytest.mark.parametrize("family", FAMILIES + ["rt_detr_v2"])
def test_box_and_refinement_targets_conserve_through_the_chain(image, family):
    """box:cx/w and an edge equal the plain forward's box and conserve; the refinements add up, on the booked
    anchor, to the final box's inverse sigmoid (checked against the plain forward) and conserve too."""
    model, cls = build(family)
    adapter = cls()
    boxes = plain(model, adapter, image).pred_boxes[0]
    with session_of(model, image, adapter) as session:
        out = session.outputs
        assert torch.equal(out["box_logits"].sigmoid(), out["pred_boxes"])
        steps = out["box_refinements"]
        assert list(steps) == ["proposal", "0", "1"]
        total = (out["box_anchor"] + sum(steps.values()))[0].detach()
        assert torch.allclose(total, inverse_sigmoid(boxes), atol=1e-9, rtol=0)
        q = torch.tensor(QUERIES)
        references = {"box:cx": boxes[q, 0], "box:w": boxes[q, 2], "box:x1": boxes[q, 0] - boxes[q, 2] / 2,
                      "refine:cx": sum(s[0, q, 0] for s in steps.values()).detach(),
                      "refine:cx:proposal": steps["proposal"][0, q, 0].detach(),
                      "refine:h:1": steps["1"][0, q, 3].detach()}
        for target, reference in references.items():
            expl = session.backward(QUERIES, target, ["pixels", "memory"])
            assert torch.allclose(expl.target_values, reference, rtol=1e-10, atol=1e-12), target
            scale = sum(s[0, q, 0].abs() for s in steps.values()).detach() if target == "refine:cx" else None
            assert_conserves(expl, f"{family} {target}", scale)
            assert torch.all(expl.conservation["pixels"]["total"].abs() > 0), target
        # the anchor is booked once, as positional, and takes part of the box's relevance
        anchors = [e for e in session.state.ledger.entries if e.name == "model.box_anchor"]
        assert len(anchors) == 1 and anchors[0].category == "positional"
        (grad,) = torch.autograd.grad(out["box_logits"][0, q, 0].sum(), anchors[0].tensor, retain_graph=True)
        assert grad.abs().sum() > 0  # the final box reads the anchor through the connected chain


@pytest.mark.parametrize("family", FAMILIES)
def test_the_chain_reaches_the_proposal_heads_only_when_connected(image, family):
    """Connected, the final box depends on the proposal's box head (transformers detaches it twice on the way);
    cut (box_chain=False), it does not, the model's detached references are booked as positional, and box
    targets still conserve; the pixels' share of the box's relevance is larger connected."""
    model, cls = build(family)
    shares = {}
    for chain in (True, False):
        with session_of(model, image, cls(box_chain=chain)) as session:
            proposal = session.records.tensors["proposal_deltas"]
            (grad,) = torch.autograd.grad(session.outputs["box_logits"][0, QUERIES].sum(), proposal,
                                          retain_graph=True, allow_unused=True)
            assert (grad is not None and bool(grad.abs().sum() > 0)) is chain
            names = {e.name for e in session.state.ledger.entries}
            assert ("model.decoder.box_reference" in names) is not chain
            expl = session.backward(QUERIES, "box:cx", ["pixels", "memory"])
            assert_conserves(expl, f"{family} box:cx chain={chain}")
            row = expl.conservation["pixels"]
            shares[chain] = (row["total"].abs() / (row["total"].abs() + row["positional"].abs())).mean().item()
    assert shares[True] > shares[False]  # connected, more of the box is the image's


# ----------------------------------------------------------------------------- what must not change
@pytest.mark.parametrize("family", FAMILIES)
def test_class_explanations_do_not_change(image, family):
    """The references reach the queries only as detached sampling locations and through booked position
    inputs: connecting the chain leaves class relevance bit for bit as the cut chain gives it."""
    model, cls = build(family, zero_constants=False)
    stops = ["pixels", "backbone", "encoder_input", "memory", "decoder_layers"]
    connected = LRP(model, composite="default", adapter=cls()).explain(image, QUERIES, "class", stops)
    cut = LRP(model, composite="default", adapter=cls(box_chain=False)).explain(image, QUERIES, "class", stops)
    assert torch.equal(connected.target_values, cut.target_values)
    assert connected.relevance.keys() == cut.relevance.keys()
    for key in connected.relevance:
        assert torch.equal(connected.relevance[key], cut.relevance[key]), key


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_forward_is_unchanged_after_explaining(image, family):
    """Explaining leaves the model as it was: the same outputs bit for bit, no patched method left on it, and
    its own detaches in force again (the final box does not depend on the proposal head in a plain forward)."""
    model, cls = build(family, zero_constants=False)
    adapter = cls()
    x = adapter.prepare(model, image).tensor
    before = model(pixel_values=x)
    LRP(model, adapter=adapter).explain(image, QUERIES, "box:cx", ["pixels"])
    assert not {"gen_encoder_output_proposals", "generate_anchors"} & set(model.model.__dict__)
    seen = {}
    head = model.model.decoder.bbox_embed[-1] if family == "deformable_detr" else model.model.enc_bbox_head
    handle = head.register_forward_hook(lambda _m, _a, out: seen.setdefault("proposal", out))
    try:
        after = model(pixel_values=x)
    finally:
        handle.remove()
    for key in ("logits", "pred_boxes"):
        assert torch.equal(getattr(before, key), getattr(after, key)), key
    (grad,) = torch.autograd.grad(after.pred_boxes.sum(), seen["proposal"], allow_unused=True)
    assert grad is None or torch.all(grad == 0)


# ----------------------------------------------------------------------------- other families
def test_single_stage_refinement_connects_but_has_no_refinement_targets(image):
    """Single-stage Deformable DETR with box refinement: its chain starts at a learned reference (no constant
    anchor); box targets conserve with the chain connected, refine:* is refused with one line."""
    model = tiny_deformable_detr("refine")
    zero_additive_constants(model)
    boxes = plain(model, DeformableDetrAdapter(), image).pred_boxes[0]
    with session_of(model, image, DeformableDetrAdapter()) as session:
        assert "box_refinements" not in session.outputs
        expl = session.backward(QUERIES, "box:y2", ["pixels", "memory"])
        q = torch.tensor(QUERIES)
        assert torch.allclose(expl.target_values, boxes[q, 1] + boxes[q, 3] / 2, rtol=1e-10, atol=1e-12)
        assert_conserves(expl, "refine box:y2")
        with pytest.raises(TargetError, match="reports no box refinements"):
            session.backward(QUERIES, "refine:cx", ["pixels"])


@pytest.mark.parametrize("family", ["conditional_detr", "dab_detr", "yolos"])
def test_direct_regression_box_targets_conserve(image, family):
    """Families whose box is their head's output plus, at most, a reference added in place: ``box_logits`` gives
    ``pred_boxes`` bit for bit through the sigmoid, and a centre and an edge conserve (zero biases, float64)."""
    from maskdino_lrp.adapters.conditional_detr import ConditionalDetrAdapter
    from maskdino_lrp.adapters.dab_detr import DabDetrAdapter
    from maskdino_lrp.adapters.yolos import YolosAdapter
    from test_conditional_detr_adapter import tiny_conditional_detr
    from test_dab_detr_adapter import tiny_dab_detr
    from test_yolos_adapter import tiny_yolos

    build, adapter = {"conditional_detr": (tiny_conditional_detr, ConditionalDetrAdapter),
                      "dab_detr": (tiny_dab_detr, DabDetrAdapter), "yolos": (tiny_yolos, YolosAdapter)}[family]
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # DAB-DETR makes its decoder queries in the default dtype
    try:
        model = build()
        zero_additive_constants(model)
        boxes = plain(model, adapter(), image).pred_boxes[0]
        with session_of(model, image, adapter()) as session:
            assert torch.equal(session.outputs["box_logits"].sigmoid(), session.outputs["pred_boxes"])
            q = torch.tensor(QUERIES)
            for target, reference in (("box:cx", boxes[q, 0]), ("box:x2", boxes[q, 0] + boxes[q, 2] / 2)):
                expl = session.backward(QUERIES, target, ["pixels"])
                assert torch.allclose(expl.target_values, reference, rtol=1e-6, atol=0), target
                assert_conserves(expl, f"{family} {target}")
    finally:
        torch.set_default_dtype(default)
