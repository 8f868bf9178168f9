"""Box explanations that reach the pixels: the connected reference-box chain, edge and refinement targets.

Tiny preset in float64 with every additive constant zeroed and the conservative composite (AH attention,
deformable value path, ε = 1e-9): pixels + booked constants must equal the target a plain forward computes
(1e-5 relative, as the other conservation tests). The box head's last layer starts at zero (official init):
it is re-drawn so that every layer's refinement counts. Both initial-box modes are covered: "bitmask" (the
tiny preset's: the box of the thresholded interim mask is the anchor) and "no" (two-stage proposals: the
token's grid anchor plus the box head on the selected encoder token).
"""
import contextlib

import numpy as np
import pytest
import torch

from maskdino_lrp import build_model
from maskdino_lrp.adapters.maskdino import MaskDINOAdapter
from maskdino_lrp.analysis.render import box_marks, render_pixels
from maskdino_lrp.lrp.explainer import LRP
from maskdino_lrp.lrp.targets import TargetError, get_target
from maskdino_lrp.model.decoder import inverse_sigmoid
from conftest import zero_additive_constants
from hf_checks import random_image, tiny_resnet

QUERIES = [0, 2, 5]
BOX_TARGETS = ["box:cx", "box:cy", "box:w", "box:h", "box:x1", "box:y1", "box:x2", "box:y2"]


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)


def tiny_model(init: str = "bitmask", layers: int = 2, zero_constants: bool = True):
    torch.manual_seed(0)
    model = build_model("tiny", overrides={"MODEL.MaskDINO.INITIALIZE_BOX_TYPE": init,
                                           "MODEL.MaskDINO.DEC_LAYERS": layers}).double()
    if zero_constants:
        zero_additive_constants(model)
    with torch.no_grad():  # official init: the box head's last layer is zero, every refinement would be 0
        model.sem_seg_head.predictor._bbox_embed.layers[-1].weight.normal_(0.0, 0.3)
    return model


def plain_boxes(model, image) -> torch.Tensor:
    with torch.no_grad():
        return model(model.prepare(image).tensor)["pred_boxes"][0]


def edge(boxes: torch.Tensor, name: str) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return {"x1": cx - w / 2, "y1": cy - h / 2, "x2": cx + w / 2, "y2": cy + h / 2}[name]


@contextlib.contextmanager
def session_of(model, image, adapter=None):
    session = LRP(model, composite="conservative", adapter=adapter).prepare(image)
    try:
        yield session
    finally:
        session.cleanup()


# ----------------------------------------------------------------------------- conservation
@pytest.mark.parametrize("init", ["bitmask", "no"])
def test_box_targets_conserve_and_reach_the_pixels(image, init):
    """Property 1 for every box target with the chain connected: pixels + ledger == the plain forward's value."""
    model = tiny_model(init)
    boxes = plain_boxes(model, image)[QUERIES]
    references = {f"box:{c}": boxes[:, i] for i, c in enumerate(("cx", "cy", "w", "h"))}
    references.update({f"box:{e}": edge(boxes, e) for e in ("x1", "y1", "x2", "y2")})
    with session_of(model, image) as session:
        for target in BOX_TARGETS:
            expl = session.backward(QUERIES, target, ["pixels", "memory"])
            assert torch.allclose(expl.target_values, references[target], rtol=1e-12, atol=1e-14), target
            for cut, row in expl.conservation.items():
                assert torch.all(row["bias"].abs() < 1e-12), (target, cut)
                accounted = row["total"] + row["embeddings"] + row["positional"]
                rel = ((accounted - row["target"]).abs() / row["target"].abs()).max().item()
                assert rel < 1e-5, f"{init} {target}: cut {cut} conserves only to {rel:.2e}"
            # the chain is connected: the image content placed the box, not only the anchor
            pixels = expl.conservation["pixels"]["total"]
            assert torch.all(pixels.abs() > 1e-3 * expl.target_values.abs()), (target, pixels)
            assert torch.all(expl.relevance["pixels"].flatten(1).abs().sum(1) > 0)


@pytest.mark.parametrize("init", ["bitmask", "no"])
def test_refinements_add_up_to_the_box_and_conserve(image, init):
    """anchor + Σ stages == inverse_sigmoid(plain box) (independent of LRP); each refinement target conserves with
    nothing on the positional line: a refinement is all content."""
    model = tiny_model(init)
    boxes = plain_boxes(model, image)
    with session_of(model, image) as session:
        steps = session.outputs["box_refinements"]
        expected = (["proposal"] if init == "no" else []) + ["0", "1"]
        assert list(steps) == expected
        total = session.outputs["box_anchor"][0] + sum(s[0] for s in steps.values())
        logits = inverse_sigmoid(boxes)
        inside = logits.abs() < 11  # where the inverse sigmoid clamps, the round trip is not exact
        assert inside.float().mean() > 0.9
        assert torch.allclose(total.detach()[inside], logits[inside], atol=1e-9, rtol=0)
        for target, reference in [("refine:cx", sum(s[0, QUERIES, 0] for s in steps.values())),
                                  ("refine:h:1", steps["1"][0, QUERIES, 3])] \
                + ([("refine:w:proposal", steps["proposal"][0, QUERIES, 2])] if init == "no" else []):
            expl = session.backward(QUERIES, target, ["pixels", "memory"])
            assert torch.equal(expl.target_values, reference.detach())
            for cut, row in expl.conservation.items():
                assert torch.all(row["positional"] == 0), (target, cut)
                rel = ((row["total"] + row["embeddings"] - row["target"]).abs() / row["target"].abs()).max().item()
                assert rel < 1e-5, f"{init} {target}: cut {cut} conserves only to {rel:.2e}"
        with pytest.raises(TargetError, match="no refinement stage '7'.*stages: " + ", ".join(expected)):
            session.backward(QUERIES, "refine:cx:7", ["pixels"])
        # the split of a box coordinate b = σ(u), u = anchor + Σ stages, under the identity rule: each summand
        # s gets s · b / u (closed form); the anchor's share is what the ledger books as positional
        anchors = [e for e in session.state.ledger.entries if e.name == "sem_seg_head.predictor.box_anchor"]
        assert len(anchors) == 1  # the anchor the chain starts from, booked once
        anchor = anchors[0]
        queries = torch.tensor(QUERIES)
        for c, name in ((0, "cx"), (2, "w")):
            value = get_target(f"box:{name}")[1](session.outputs, queries, queries)
            (grad,) = torch.autograd.grad(value.sum(), anchor.tensor, retain_graph=True)
            booked = (anchor.tensor.double() * grad).detach()[0, QUERIES].sum(-1)  # proposals are float32, as official
            u = logits[QUERIES, c]
            assert torch.allclose(booked, anchor.tensor.detach().double()[0, QUERIES, c] * boxes[QUERIES, c] / u,
                                  rtol=1e-6, atol=1e-12), name


# ----------------------------------------------------------------------------- what must not change
@pytest.mark.parametrize("target, composite", [("class", "default"), ("mask", "default"), ("class", "deform-query")])
def test_class_and_mask_explanations_do_not_change(image, target, composite):
    """The chain feeds later layers only through positional inputs (sine query embedding: booked; sampling
    locations: constant, also when relevance flows through the attention weights), so connecting it must leave
    class and mask relevance bit for bit as they were."""
    model = tiny_model(zero_constants=False)
    stops = ["pixels", "backbone", "encoder_input", "memory", "query_init", "decoder_layers"]
    connected = LRP(model, composite=composite).explain(image, QUERIES, target, stops)
    cut = LRP(model, composite=composite, adapter=MaskDINOAdapter(box_chain=False)).explain(image, QUERIES, target,
                                                                                             stops)
    assert torch.equal(connected.target_values, cut.target_values)
    assert connected.relevance.keys() == cut.relevance.keys()
    for key in connected.relevance:
        assert torch.equal(connected.relevance[key], cut.relevance[key]), key
    for name, row in connected.conservation.items():
        for column, value in row.items():
            assert torch.equal(value, cut.conservation[name][column]), (name, column)


def test_cut_chain_books_the_reference_as_positional(image):
    """box_chain=False is the previous behaviour: each layer's input box is positional, only the last layer's
    delta reaches the pixels; connected, the pixels get more of the box."""
    model = tiny_model()
    shares = {}
    for chain in (False, True):
        with session_of(model, image, MaskDINOAdapter(box_chain=chain)) as session:
            expl = session.backward(QUERIES, "box:cx", ["pixels"])
            names = [e.name for e in session.state.ledger.entries]
            assert ("sem_seg_head.predictor.box_reference" in names) is not chain
            row = expl.conservation["pixels"]
            rel = ((row["total"] + row["positional"] - row["target"]).abs() / row["target"].abs()).max().item()
            assert rel < 1e-5
            shares[chain] = (row["total"].abs() / (row["total"].abs() + row["positional"].abs())).mean().item()
    assert shares[True] > shares[False]


def test_plain_forward_and_official_detach_are_unchanged(image):
    """The flags change no value; with the official flags a layer's box is detached from the layers before the
    previous one (so training sees the official graph), and connected it is not."""
    model = tiny_model("no", layers=3, zero_constants=False)
    predictor = model.sem_seg_head.predictor
    x = model.prepare(image).tensor
    seen = {}
    handles = [predictor.proposal_delta.register_forward_hook(lambda _m, _a, out: seen.__setitem__("proposal", out)),
               predictor.decoder.box_delta.register_forward_hook(
                   lambda _m, _a, out: seen.setdefault("chain", []).append(out))]
    outputs, grads = {}, {}
    try:
        for detach in (True, False):
            predictor.detach_reference = predictor.decoder.detach_reference = detach
            seen.clear()
            out = model(x)
            outputs[detach] = out
            grads[detach] = torch.autograd.grad(out["pred_boxes"].sum(), [seen["proposal"], seen["chain"][0]],
                                                allow_unused=True)
    finally:
        predictor.detach_reference = predictor.decoder.detach_reference = True
        for h in handles:
            h.remove()
    for key in ("pred_logits", "pred_boxes", "pred_masks"):
        assert torch.equal(outputs[True][key], outputs[False][key]), key
    # official: the last box reads layer 1's box undetached, nothing before it
    assert all(g is None or torch.all(g == 0) for g in grads[True])
    assert all(g is not None and g.abs().sum() > 0 for g in grads[False])


# ----------------------------------------------------------------------------- names, errors, overlay
def test_target_names_and_errors():
    assert get_target("box:x1")[0] == "box:x1" and get_target("refine:w")[0] == "refine:w"
    assert get_target("refine:cy:proposal")[0] == "refine:cy:proposal"
    with pytest.raises(TargetError, match="unknown target 'refine:x1'.*refine:<coord>:<stage>"):
        get_target("refine:x1")
    with pytest.raises(TargetError, match="reports no box refinements.*box:x1"):
        get_target("refine:cx")[1]({"pred_boxes": torch.zeros(1, 3, 4)}, torch.tensor([0]), torch.tensor([0]))


def test_box_marks_name_the_explained_part():
    box = (10.0, 20.0, 50.0, 80.0)
    assert box_marks("box:x1", box) == [((10.0, 20.0), (10.0, 80.0))]
    assert box_marks("box:y2", box) == [((10.0, 80.0), (50.0, 80.0))]
    assert box_marks("box:cx", box) == [((30.0, 20.0), (30.0, 80.0))]
    assert box_marks("refine:w:1", box) == [((10.0, 50.0), (50.0, 50.0))]
    assert box_marks("box", box) == [] and box_marks("class", box) == [] and box_marks("box:x1", None) == []


def test_overlay_of_a_box_target_marks_the_edge(image, tmp_path):
    model = tiny_model(zero_constants=False).float()
    expl = LRP(model).explain(image, [0], "box:x1", ["pixels"])
    path = render_pixels(expl, 0, tmp_path / "x1.png")
    from PIL import Image

    drawn = np.asarray(Image.open(path).convert("RGB")).astype(int)
    magenta = (drawn[..., 0] > 200) & (drawn[..., 1] < 60) & (drawn[..., 2] > 200)
    assert magenta.sum() > 20  # the marked edge is drawn


# ----------------------------------------------------------------------------- DETR (direct regression)
transformers = pytest.importorskip("transformers")


def tiny_detr():
    torch.manual_seed(0)
    config = transformers.DetrConfig(use_timm_backbone=False, backbone_config=tiny_resnet(transformers),
                                     use_pretrained_backbone=False,
                                     d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4,
                                     decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
                                     num_queries=8, num_labels=4)
    model = transformers.DetrForObjectDetection(config).eval().double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("bias"):
                p.mul_(1.0 + 0.5 * torch.rand_like(p))
    zero_additive_constants(model)
    return model


@pytest.mark.parametrize("target", ["box:cx", "box:w", "box:x1", "box:y2"])
def test_detr_box_targets_conserve_exactly(target):
    """DETR regresses its box directly from the decoder output: nothing to connect. Its sigmoid is a function the
    engine gives no rule; the adapter's ``box_logits`` (the box head's output) let the target take it under the
    identity rule, so the relevance is the box itself: pixels + booked constants == the plain forward's value."""
    from maskdino_lrp.adapters.detr import DetrAdapter

    model = tiny_detr()
    image = random_image(seed=1)
    queries = [0, 3, 5]
    adapter = DetrAdapter()
    with torch.no_grad():
        boxes = model(pixel_values=adapter.prepare(model, image).tensor).pred_boxes[0, queries]
    coefficients = {"box:cx": (1.0, 0.0), "box:w": (0.0, 1.0), "box:x1": (1.0, -0.5), "box:y2": (1.0, 0.5)}[target]
    pair = (0, 2) if target in ("box:cx", "box:w", "box:x1") else (1, 3)
    value = sum(c * boxes[:, i] for c, i in zip(coefficients, pair))
    session = LRP(model, composite="conservative", adapter=adapter).prepare(image)
    try:
        assert torch.equal(session.outputs["box_logits"].sigmoid(), session.outputs["pred_boxes"])
        expl = session.backward(queries, target, ["pixels", "memory"])
    finally:
        session.cleanup()
    assert torch.allclose(expl.target_values, value, rtol=1e-12, atol=1e-14)
    for cut, row in expl.conservation.items():
        assert torch.all(row["bias"] == 0), cut
        accounted = row["total"] + row["embeddings"] + row["positional"]
        rel = ((accounted - value).abs() / value.abs()).max().item()
        assert rel < 1e-5, f"{target}: cut {cut} conserves only to {rel:.2e}"
    assert torch.all(expl.conservation["pixels"]["total"].abs() > 0)


def test_cli_lists_and_checks_the_box_targets(tmp_path, capsys):
    """--target help names the edges and refinements; a malformed refinement is refused before any model."""
    from maskdino_lrp.cli import main

    with pytest.raises(SystemExit):
        main(["explain", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    assert "box:x1" in text and "refine:cx" in text and "refine:<coord>:<stage>" in text
    image = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(image)
    code = main(["explain", str(image), "--config", "tiny", "--target", "refine:x1", "--out", str(tmp_path / "out")])
    assert code != 0 and not (tmp_path / "out").exists()
    assert "unknown target 'refine:x1'" in capsys.readouterr().err
