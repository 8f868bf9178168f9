"""The engine on Hugging Face Mask2Former through its adapter: conservation for the instance (class, mask),
semantic and panoptic targets, gradient parity, restoration, batching.

A tiny random ``Mask2FormerForUniversalSegmentation`` (transformers ResNet or Swin backbone, no pretrained
weights) in float64. Tolerances: the conservative composite's ε = 1e-9 stabilisers (and the identity rule's, in the
semantic and panoptic targets) leave residuals of order 1e-8 … 1e-6 relative; 1e-5 is asserted as the brief asks.
"""
import contextlib
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")

from maskdino_lrp.adapters import find_adapter  # noqa: E402
from maskdino_lrp.adapters.mask2former import Mask2FormerAdapter  # noqa: E402
from maskdino_lrp.lrp.composites import get_composite  # noqa: E402
from maskdino_lrp.lrp.explainer import LRP  # noqa: E402
from maskdino_lrp.lrp.targets import TargetError  # noqa: E402
from conftest import randomise_deformable_heads, zero_additive_constants
from hf_checks import (CUT_STOPS, assert_batched_equals_single, assert_biases_absorbed, assert_conserves,
                       assert_encoder_only_conserves, assert_untouched_by_explaining, random_image, randomise,
                       tiny_resnet, write_images)

# transformers warns that it validated Mask2Former with Swin backbones only; the ResNet one builds and runs
logging.getLogger("transformers").setLevel(logging.ERROR)


def tiny_config(backbone: str = "resnet", **extra) -> "transformers.Mask2FormerConfig":
    stages = ["stage1", "stage2", "stage3", "stage4"]
    if backbone == "swin":  # two blocks in the first stages: the second one's windows are shifted
        backbone = transformers.SwinConfig(embed_dim=16, depths=[2, 2, 1, 1], num_heads=[1, 2, 2, 4], window_size=4,
                                           out_features=stages)
    else:
        backbone = tiny_resnet(transformers, out_features=stages)
    return transformers.Mask2FormerConfig(backbone_config=backbone, use_pretrained_backbone=False, feature_size=32,
                                          mask_feature_size=32, hidden_dim=32, num_attention_heads=4, encoder_layers=2,
                                          decoder_layers=3, dim_feedforward=48, encoder_feedforward_dim=48,
                                          num_queries=8, num_labels=4, **extra)


def tiny_mask2former(seed: int = 0, backbone: str = "resnet") -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomise(transformers.Mask2FormerForUniversalSegmentation(tiny_config(backbone)).eval().double())


@pytest.fixture(scope="module")
def image():
    return random_image()


def plain_outputs(model, image):
    with torch.no_grad():
        out = model(pixel_values=Mask2FormerAdapter().prepare(model, image).tensor)
    return out.class_queries_logits[0], out.masks_queries_logits[0]


@contextlib.contextmanager
def cross_attention_masks(model):
    """The boolean masks the decoder's masked cross-attentions receive (True: not attended), one per layer."""
    masks = []
    handles = [layer.cross_attn.register_forward_pre_hook(lambda _m, _a, kw: masks.append(kw["attn_mask"]),
                                                          with_kwargs=True)
               for layer in model.model.transformer_module.decoder.layers]
    try:
        yield masks
    finally:
        for handle in handles:
            handle.remove()


def reference_target(target, logits, masks, queries, labels):
    """The explained value from a plain forward's outputs, computed here without the targets module."""
    probs, sig = logits.softmax(-1)[:, :-1], masks.sigmoid()
    values = []
    for q, c in zip(queries, labels):
        if target == "class":
            values.append(logits[q, c])
        elif target == "mask":
            values.append(masks[q][masks[q] > 0].sum())
        elif target == "semantic":  # class c's score over the pixels where it wins the semantic map
            score = torch.einsum("qc,qhw->chw", probs, sig)
            values.append(score[c][score.argmax(0) == c].sum())
        else:  # panoptic: the query's class × mask probability over the pixels it wins
            owner = (probs.max(-1).values[:, None, None] * sig).argmax(0)
            values.append((probs[q, c] * sig[q])[owner == q].sum())
    return torch.stack(values)


def test_adapter_is_found_and_classifies_the_modules():
    model = tiny_mask2former()
    adapter = find_adapter(model)
    assert isinstance(adapter, Mask2FormerAdapter)
    assert isinstance(find_adapter(model.model.transformer_module.decoder.layers[0]), Mask2FormerAdapter)
    assert len(adapter.batchnorm_pairs(model)) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    decoder = model.model.transformer_module.decoder
    assert adapter.module_kind("", decoder.layers[0].self_attn) == "mha"
    assert adapter.module_kind("", decoder.mask_predictor) == "product"
    assert adapter.pixel_layer(model) is model.model.pixel_level_module.encoder.embedder.embedder.convolution
    with pytest.raises(ValueError, match="Mask2FormerForUniversalSegmentation"):
        adapter.check(decoder)


@pytest.mark.parametrize("backbone", ["resnet", "swin"])
def test_lrp_forward_computes_the_plain_values(image, backbone):
    """Rules change only the backward: logits and masks, and the masked-attention selections thresholded from
    each layer's predicted masks, are those of the untouched model."""
    model = tiny_mask2former(5, backbone)
    zero_additive_constants(model)  # (with biases, this tiny model's masks select every key)
    with cross_attention_masks(model) as plain_selection:
        logits, masks = plain_outputs(model, image)
    with cross_attention_masks(model) as lrp_selection:
        session = LRP(model, composite="default").prepare(image)
    assert all(0 < m.float().mean() < 1 for m in plain_selection)  # the masks select: some keys, not all
    assert len(lrp_selection) == len(plain_selection)
    assert all(torch.equal(a, b) for a, b in zip(lrp_selection, plain_selection))
    assert torch.allclose(session.outputs["pred_logits"][0], logits, rtol=1e-12, atol=1e-12)
    assert torch.allclose(session.outputs["pred_masks"][0], masks, rtol=1e-12, atol=1e-12)
    session.cleanup()


@pytest.mark.parametrize("backbone", ["resnet", "swin"])
@pytest.mark.parametrize("target", ["class", "mask", "semantic", "panoptic"])
def test_zero_bias_conservation_with_attention_as_constant(image, target, backbone):
    """Pixels + booked constants = the explained target of a plain forward of the untouched model, at every cut."""
    model = tiny_mask2former(backbone=backbone)
    zero_additive_constants(model)
    logits, masks = plain_outputs(model, image)
    queries = "topk:3"
    if target == "panoptic":  # queries that own pixels (a random model's segments: often one query owns all)
        probs = logits.softmax(-1)[:, :-1]
        owner = (probs.max(-1).values[:, None, None] * masks.sigmoid()).argmax(0)
        queries = owner.unique().tolist()[:3]
    with cross_attention_masks(model) as selection:
        expl = LRP(model, composite="conservative").explain(image, queries=queries, target=target, stops=CUT_STOPS)
    assert any(m.any() for m in selection)  # the masked attention masks something
    queries, labels = expl.queries.tolist(), expl.labels.tolist()
    reference = reference_target(target, logits, masks, queries, labels)
    assert (reference.abs() > 0).all()
    assert_conserves(expl, reference, CUT_STOPS, target_rtol=1e-10)
    assert expl.relevance["pixels"].abs().sum() > 0
    assert expl.relevance["memory"].shape == (len(queries), sum(lv.size for lv in expl.levels))


def test_mask_product_takes_the_product_rule(image):
    """The mask logits are a product of two variable tensors (mask embeddings × pixel embeddings): with the
    plain gradient for it, both sides get the whole relevance and the pixels receive about twice the target."""
    model = tiny_mask2former()
    zero_additive_constants(model)
    plain_product = get_composite("conservative").with_rules("plain-product", product="gradient")
    expl = LRP(model, composite=plain_product).explain(image, queries="topk:2", target="mask", stops=["pixels"])
    row = expl.conservation["pixels"]
    accounted = row["total"] + row["embeddings"] + row["positional"]
    assert ((accounted / row["target"]) > 1.5).all()


@pytest.mark.parametrize("backbone", ["resnet", "swin"])
def test_biases_absorb_what_the_ledger_says_at_every_cut(image, backbone):
    """With biases, each cut conserves once its downstream biases are counted (a cut that booked an upstream
    bias, or missed a downstream one, would leave a residual)."""
    lrp = LRP(tiny_mask2former(backbone=backbone), composite="conservative")
    expl = lrp.explain(image, queries="topk:3", stops=CUT_STOPS)
    assert_biases_absorbed(expl)


@pytest.mark.parametrize("target,backbone,seed", [("class", "resnet", 1), ("mask", "resnet", 1), ("mask", "swin", 0)])
def test_gradient_composite_is_autograd_gradient_times_input(image, target, backbone, seed):
    """With the pixel decoder's offset and weight heads random (non-zero), the samples move with the image; the
    gradient rule keeps the sampling locations and attention weights connected, as autograd does. (Swin: seed 0,
    whose masks have positive pixels; with none the mask target and its gradient would be zero.)"""
    model = tiny_mask2former(seed, backbone)
    assert randomise_deformable_heads(model) == 2 * len(model.model.pixel_level_module.decoder.encoder.layers)
    queries = [0, 3, 5]
    expl = LRP(model, composite="gradient").explain(image, queries=queries, target=target, stops=["pixels"])
    x = Mask2FormerAdapter().prepare(model, image).tensor.clone().requires_grad_(True)
    out = model(pixel_values=x)
    logits, masks = out.class_queries_logits[0], out.masks_queries_logits[0]
    for row, q in enumerate(queries):
        value = logits[q, expl.labels[row]] if target == "class" else (masks[q] * (masks[q] > 0).detach()).sum()
        (g,) = torch.autograd.grad(value, x, retain_graph=True)
        reference = (x * g).detach().sum(1)[0]
        assert reference.abs().max() > 0
        assert torch.allclose(expl.relevance["pixels"][row], reference, rtol=1e-9, atol=1e-12)


def test_model_bit_identical_after_explaining_also_after_an_exception(image):
    model = tiny_mask2former(2)
    assert_untouched_by_explaining(
        model, lambda: plain_outputs(model, image),
        lambda: LRP(model).explain(image, queries="topk:2", target="semantic",
                                   stops=["pixels", "mask_features", "decoder_layers"]),
        adapter=Mask2FormerAdapter(), patched=("forward", "equation"))


def test_batched_equals_one_query_at_a_time(image):
    model = tiny_mask2former(3)
    lrp = LRP(model, composite="default", batch_mode="vmap", chunk_size=2)
    assert_batched_equals_single(lrp, image, [0, 3, 5], ["pixels", "encoder_layers", "decoder_layers"], target="mask")


def test_swin_input_padded_to_the_patch_size():
    """An image whose sides are not multiples of Swin's patch size: padded as Swin pads it (same outputs as the
    model on the unpadded tensor), the relevance map cropped to the image, the padding's share reported."""
    model = tiny_mask2former(6, "swin")
    zero_additive_constants(model)
    image = random_image((90, 78, 3), seed=1)
    prepared = Mask2FormerAdapter().prepare(model, image)
    assert tuple(prepared.tensor.shape[-2:]) == (92, 80) and prepared.resized_size == (90, 78)
    with torch.no_grad():
        unpadded = model(pixel_values=prepared.tensor[..., :90, :78]).class_queries_logits[0]
    expl = LRP(model, composite="conservative").explain(image, queries="topk:2", stops=["pixels"])
    assert torch.allclose(expl.target_values, unpadded[expl.queries, expl.labels], rtol=1e-12, atol=0)
    row = expl.conservation["pixels"]
    rel = ((row["total"] + row["embeddings"] + row["positional"] - row["target"]).abs() / row["target"].abs()).max()
    assert rel < 1e-5 and expl.relevance["pixels"].shape == (2, 90, 78)
    LRP(model).explain(image, queries="topk:1", stops=["pixels"])  # the default composite's z^B on the padded input


def synthetic_outputs(seed: int = 0) -> dict:
    """Mask-classification outputs with distinct regions: 5 queries, 3 classes + no-object, 6×5 masks."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, 5, 4, generator=g, dtype=torch.float64)
    masks = torch.randn(1, 5, 6, 5, generator=g, dtype=torch.float64)
    for q in range(5):  # query q: class q mod 3, mask on column q
        logits[0, q, q % 3] += 4.0
        masks[0, q, :, q] += 6.0
    return {"pred_logits": logits.requires_grad_(True), "pred_masks": masks.requires_grad_(True),
            "class_activation": "softmax"}


@pytest.mark.parametrize("target", ["semantic", "panoptic"])
def test_segmentation_targets_are_exact_and_linearised_conservatively(target):
    """On outputs with several regions: the value is the semantic / panoptic score recomputed independently,
    and gradient × input at the logits (class and mask) sums to it: the linearisation loses nothing."""
    from maskdino_lrp.lrp.targets import get_target

    outputs = synthetic_outputs()
    logits, masks = outputs["pred_logits"][0].detach(), outputs["pred_masks"][0].detach()
    probs = logits.softmax(-1)[:, :-1]
    owner = (probs.max(-1).values[:, None, None] * masks.sigmoid()).argmax(0)
    semantic = torch.einsum("qc,qhw->chw", probs, masks.sigmoid()).argmax(0)
    assert owner.unique().numel() >= 3 and semantic.unique().numel() >= 2  # the regions differ
    queries = owner.unique()[:3]
    labels = probs[queries].argmax(-1)
    values = get_target(target)[1](outputs, queries, labels)
    assert torch.allclose(values, reference_target(target, logits, masks, queries.tolist(), labels.tolist()),
                          rtol=1e-12, atol=0)
    for k in range(len(queries)):
        g_logits, g_masks = torch.autograd.grad(values[k], [outputs["pred_logits"], outputs["pred_masks"]],
                                                retain_graph=True)
        relevance = (g_logits * logits).sum() + (g_masks * masks).sum()
        assert relevance.item() == pytest.approx(values[k].item(), rel=1e-7)
        # half to the class logits (only the explained class's), half to the mask logits
        assert (g_logits * logits).sum().item() == pytest.approx(values[k].item() / 2, rel=1e-7)


def test_segmentation_targets_need_the_class_activation():
    from maskdino_lrp.lrp.targets import get_target

    outputs = synthetic_outputs()
    del outputs["class_activation"]
    with pytest.raises(TargetError, match="class_activation"):
        get_target("semantic")[1](outputs, torch.tensor([0]), torch.tensor([0]))


@pytest.mark.parametrize("backbone", ["resnet", "swin"])
def test_recompute_gives_the_same_relevance(image, backbone):
    """LRP(recompute=True) recomputes the backbone blocks and the encoder layers (the adapter's segments) in the
    backward: the same relevance, bit for bit, as keeping their forward graph."""
    model = tiny_mask2former(7, backbone)
    stops = ["pixels", "backbone", "memory"]
    kept = LRP(model).explain(image, queries="topk:2", target="mask", stops=stops)
    again = LRP(model, recompute=True).explain(image, queries="topk:2", target="mask", stops=stops)
    assert kept.relevance.keys() == again.relevance.keys()
    assert all(torch.equal(kept.relevance[k], again.relevance[k]) for k in kept.relevance)
    segments = Mask2FormerAdapter().segments(model)
    assert any(name.startswith("model.pixel_level_module.decoder.encoder.layers.") for name in segments)
    assert any(name.startswith("model.pixel_level_module.encoder.") for name in segments)


def test_segmentation_targets_refuse_the_no_object_class(image):
    model = tiny_mask2former()
    logits, _ = plain_outputs(model, image)
    with torch.no_grad():  # make query 0 predict "no object"
        model.class_predictor.bias[-1] += logits[0].max() - logits[0, -1] + 10.0
    with pytest.raises(TargetError, match="no object"):
        LRP(model).explain(image, queries=[0], target="semantic", stops=["pixels"])


def test_encoder_only_mode_goes_from_the_memory_to_the_encoder_input(image):
    """Session.propagate through the adapter: the (bias-free, value-rule) deformable encoder conserves."""
    assert_encoder_only_conserves(tiny_mask2former(4), image, queries="topk:1")


@pytest.mark.slow  # three runs and two validations: about 15 s on a loaded 2-core machine
def test_explain_hf_end_to_end_with_masks_resume_and_validate(tmp_path, capsys):
    """``maskdino-lrp explain IMAGES --hf DIR`` on a saved tiny Mask2Former: outputs with masks, report, resume,
    validate; the semantic target through the same command."""
    import json

    from maskdino_lrp.cli import main

    torch.manual_seed(0)
    labels = {0: "sky", 1: "road", 2: "car", 3: "tree"}
    config = tiny_config(id2label=labels, label2id={v: k for k, v in labels.items()})
    folder = tmp_path / "m2f"
    transformers.Mask2FormerForUniversalSegmentation(config).save_pretrained(folder)
    transformers.Mask2FormerImageProcessorPil(size={"shortest_edge": 40, "longest_edge": 60}).save_pretrained(folder)
    images = write_images(tmp_path / "images")
    out = tmp_path / "run"
    args = ["explain", str(images), "--hf", str(folder), "--out", str(out), "--queries", "topk:2", "--no-progress",
            "--composite", "conservative"]
    assert main(args) == 0
    assert "2 image(s) explained (4 queries)" in capsys.readouterr().out
    for name in ("img0.png", "img1.png"):
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["model_class"] == "Mask2FormerForUniversalSegmentation"
        meta = json.loads((out / name / f"q{summary['queries'][0]['query']:03d}_meta.json").read_text())
        assert meta["class"] in labels.values()
        assert meta["mask_rle"] is not None  # the query's mask, at the photo's size
        assert meta["image_size"] == [64, 48] and meta["input_size"] == [53, 40]
    assert (out / "report.html").is_file()
    assert main(args) == 0  # resumed: nothing recomputed
    assert "0 image(s) explained (0 queries), 2 already done" in capsys.readouterr().out
    assert main(["validate", str(out)]) == 0

    semantic = tmp_path / "semantic"
    assert main(args[:5] + [str(semantic)] + args[6:] + ["--target", "semantic"]) == 0
    assert main(["validate", str(semantic)]) == 0
