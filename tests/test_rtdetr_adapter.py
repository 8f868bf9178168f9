"""The engine on Hugging Face RT-DETR (v1 and v2) through its adapters: conservation, gradient parity, restoration.

Tiny random ``RTDetrForObjectDetection`` / ``RTDetrV2ForObjectDetection`` models (transformers RT-DETR ResNet
body, hybrid encoder, deformable decoder) in float64. transformers initialises batch-norm scales near 0.01,
which makes every signal vanish after a few layers; the weights are redrawn with unit gain and non-trivial
norms and biases, so every term counts. Tolerances: the conservative composite's ε = 1e-9 stabilisers leave
a residual of order ε per layer; 1e-5 relative is asserted, as for DETR.
"""
import contextlib
import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from maskdino_lrp.adapters import find_adapter  # noqa: E402
from maskdino_lrp.adapters.rtdetr import RTDetrAdapter, RTDetrV2Adapter  # noqa: E402
from maskdino_lrp.lrp.engine import EngineError, lrp_mode  # noqa: E402
from maskdino_lrp.lrp.explainer import LRP  # noqa: E402
from conftest import zero_additive_constants
from hf_checks import (CUT_STOPS, assert_batched_equals_single, assert_biases_absorbed, assert_conserves,
                       assert_encoder_only_conserves, assert_gradient_times_input, assert_untouched_by_explaining,
                       label_settings, random_image, write_images)

QUERIES = [0, 2, 4]
VERSIONS = ["v1", "v2"]


def tiny_rtdetr(version: str = "v1", seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    backbone = transformers.RTDetrResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                                               layer_type="basic", out_features=["stage2", "stage3", "stage4"])
    settings = dict(backbone_config=backbone, use_pretrained_backbone=False, encoder_hidden_dim=16,
                    encoder_in_channels=[16, 24, 32], encoder_ffn_dim=24, encoder_attention_heads=2, d_model=16,
                    decoder_in_channels=[16, 16, 16], decoder_ffn_dim=24, decoder_layers=2, decoder_attention_heads=2,
                    decoder_n_points=2, num_queries=6, num_labels=3, num_denoising=0)
    settings.update(overrides)
    if version == "v1":
        model = transformers.RTDetrForObjectDetection(transformers.RTDetrConfig(**settings))
    else:
        model = transformers.RTDetrV2ForObjectDetection(transformers.RTDetrV2Config(**settings))
    model = model.eval().double()
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                weight.normal_(0.0, weight[0].numel() ** -0.5)
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.3)
            elif hasattr(module, "running_mean") or isinstance(module, torch.nn.LayerNorm):
                weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
                if hasattr(module, "running_mean"):
                    module.running_mean.normal_(0.0, 0.1)
                    module.running_var.uniform_(0.5, 1.5)
    model.lrp_preprocess = {"rescale_factor": 1 / 255, "image_mean": (0.0,) * 3, "image_std": (1.0,) * 3}  # no resize
    return model


@pytest.fixture(scope="module")
def image():
    return random_image((64, 96, 3))  # multiples of RT-DETR's stride 32


def plain_outputs(model, image):
    with torch.no_grad():
        return model(pixel_values=find_adapter(model).prepare(model, image).tensor)


@pytest.mark.parametrize("version,cls", [("v1", RTDetrAdapter), ("v2", RTDetrV2Adapter)])
def test_adapter_is_found_and_folds_every_batch_norm(version, cls):
    model = tiny_rtdetr(version)
    adapter = find_adapter(model)
    assert type(adapter) is cls
    assert type(find_adapter(model.model.decoder.layers[0])) is cls
    norms = [m for m in model.modules() if hasattr(m, "running_mean")]
    assert {id(n) for _, n in adapter.batchnorm_pairs(model)} == {id(n) for n in norms}
    kinds = {type(m).__name__: adapter.module_kind("", m) for m in model.modules()}
    assert kinds["SiLUActivation"] == kinds["GELUActivation"] == "elementwise"


def test_without_a_processor_config_the_image_is_prepared_as_rt_detr_s_processor_does(image):
    """640x640, pixels in [0, 1] (RTDetrImageProcessor's defaults), not the ImageNet normalisation of DETR's."""
    from PIL import Image

    model = tiny_rtdetr("v1")
    del model.lrp_preprocess
    adapter = RTDetrAdapter()
    x = adapter.prepare(model, image).tensor
    expected = np.asarray(Image.fromarray(image).resize((640, 640), Image.BILINEAR)).transpose(2, 0, 1) / 255.0
    assert x.shape == (1, 3, 640, 640) and torch.allclose(x[0], torch.from_numpy(expected), rtol=0, atol=1e-12)
    low, high = adapter.input_bounds(model, x)
    assert torch.all(low == 0) and torch.all(high == 1)
    assert "lrp_preprocess" not in model.__dict__  # the defaults are not left on the model


def test_the_processor_output_is_explained_as_it_is():
    """RTDetrImageProcessor's own output (pixels in [0, 1]): explained as given, shown as the processor's image."""
    model = tiny_rtdetr("v1")
    del model.lrp_preprocess
    photo = np.random.default_rng(2).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    processor = getattr(transformers, "RTDetrImageProcessorPil", transformers.RTDetrImageProcessor)
    x = processor(size={"height": 64, "width": 96})(images=photo, return_tensors="pt")["pixel_values"].double()
    expl = LRP(model, composite="conservative").explain({"pixel_values": x}, queries=[0, 1], stops=["pixels"])
    with torch.no_grad():
        logits = model(pixel_values=x).logits[0]
    assert torch.allclose(expl.target_values, logits[[0, 1], expl.labels], rtol=1e-12, atol=0)
    assert np.array_equal(expl.image, (x[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


@pytest.mark.parametrize("version", VERSIONS)
def test_zero_bias_conservation_with_attention_as_constant(image, version):
    """Pixels + booked constants = the explained logit of a plain forward of the untouched model, at every cut."""
    model = tiny_rtdetr(version)
    zero_additive_constants(model)
    reference = plain_outputs(model, image).logits[0]
    expl = LRP(model, composite="conservative").explain(image, queries=QUERIES, target="class", stops=CUT_STOPS)
    assert_conserves(expl, reference[QUERIES, expl.labels], CUT_STOPS)
    tokens = sum(level.size for level in expl.levels)
    assert expl.relevance["memory"].shape == expl.relevance["encoder_input"].shape == (3, tokens)
    assert expl.relevance["pixels"].shape == (3, 64, 96) and expl.relevance["pixels"].abs().sum() > 0


@pytest.mark.parametrize("version", VERSIONS)
def test_biases_absorb_what_the_ledger_says_at_every_cut(image, version):
    """With biases, each cut conserves once the biases downstream of it are counted: a cut that booked an upstream
    bias, or missed a downstream one (the backbone's later stages, the query head), would leave a residual."""
    expl = LRP(tiny_rtdetr(version), composite="conservative").explain(image, queries=QUERIES, stops=CUT_STOPS)
    assert_biases_absorbed(expl)


class _Unconnected(RTDetrAdapter):
    def connect(self, model):
        return contextlib.nullcontext()


def test_the_detached_query_content_must_be_connected(image):
    """The decoder's queries start from the top-k memory tokens, which RT-DETR detaches: left detached, most of
    the logit's relevance never reaches the memory; connected, the forward values are unchanged."""
    model = tiny_rtdetr("v1")
    zero_additive_constants(model)
    adapter = RTDetrAdapter()
    x = adapter.prepare(model, image).tensor
    with torch.no_grad(), adapter.connect(model):
        assert torch.equal(model(pixel_values=x).logits, plain_outputs(model, image).logits)
    expl = LRP(model, composite="conservative", adapter=_Unconnected()).explain(image, queries=QUERIES,
                                                                               stops=["pixels", "memory"])
    lost = (expl.conservation["memory"]["residual"] / expl.conservation["memory"]["target"]).abs()
    assert (lost > 0.1).all(), lost


def test_queries_that_are_not_the_selected_tokens_are_refused(image):
    """connect reconnects only what the model detached: decoder queries that differ from the top-k tokens'
    content (here shifted by a hook, as learned or denoising queries would be) are an error, not silently replaced."""
    model = tiny_rtdetr("v1")
    handle = model.model.decoder.register_forward_pre_hook(
        lambda _m, args, kwargs: (args, {**kwargs, "inputs_embeds": kwargs["inputs_embeds"] + 1.0}), with_kwargs=True)
    try:
        with pytest.raises(EngineError, match="not the top-k memory tokens' content"):
            LRP(model).explain(image, queries=[0])
    finally:
        handle.remove()


@pytest.mark.parametrize("version,batch_mode", [("v1", "vmap"), ("v1", "loop"), ("v2", "loop")])
def test_gradient_composite_is_autograd_gradient_times_input(image, version, batch_mode):
    """Against autograd through the model's own modules, with the query content connected as the adapter does and
    the model's own detaches of its reference boxes (the kernels take reference points as positional). The offset
    and weight heads are random (non-zero): the samples move with the image, and the gradient rule keeps the
    sampling offsets and attention weights connected."""
    model = tiny_rtdetr(version, seed=1)
    assert all(m.sampling_offsets.weight.abs().min() > 0 and m.attention_weights.weight.abs().min() > 0
               for m in model.modules() if hasattr(m, "sampling_offsets"))
    adapter = find_adapter(model)
    adapter.box_chain = False  # for the reference forward: the query content connected, the box chain as is
    expl = LRP(model, composite="gradient", batch_mode=batch_mode).explain(image, queries=QUERIES, stops=["pixels"])
    # a batch of two copies: torch 2.13's CPU batch-norm backward (eval) is wrong for a batch of one whose
    # gradient arrives channels-last with a stray batch stride, as RT-DETR's flattened memory sends it
    x = adapter.prepare(model, image).tensor.expand(2, -1, -1, -1).clone().requires_grad_(True)
    with adapter.connect(model):
        logits = model(pixel_values=x).logits[0]
    assert_gradient_times_input(expl, x, logits, QUERIES)  # the first copy's relevance


@pytest.mark.parametrize("composite", ["conservative", "default", "deform-query"])
def test_rule_forwards_compute_what_the_model_computes(image, composite):
    """Under every rule the kernels give the model's own values; v2 with a non-default offset scale and point count
    (the default v1 placement would sample elsewhere)."""
    model = tiny_rtdetr("v2", decoder_offset_scale=0.3, decoder_n_points=3)
    reference = plain_outputs(model, image)
    x = RTDetrV2Adapter().prepare(model, image).tensor
    with torch.enable_grad(), lrp_mode(model, composite, adapter=RTDetrV2Adapter()):
        out = model(pixel_values=x)
    assert torch.allclose(out.logits, reference.logits, rtol=0, atol=1e-12)
    assert torch.allclose(out.pred_boxes, reference.pred_boxes, rtol=0, atol=1e-12)


def test_v2_discrete_sampling_is_refused():
    model = tiny_rtdetr("v2", decoder_method="discrete")
    with pytest.raises(EngineError, match="decoder_method='discrete' is not supported"):
        LRP(model)


def test_model_bit_identical_after_explaining_also_after_an_exception(image):
    model = tiny_rtdetr("v2", seed=2)
    assert_untouched_by_explaining(
        model, lambda: plain_outputs(model, image).logits,
        lambda: LRP(model).explain(image, queries=[1], stops=["pixels", "backbone", "query_init", "decoder_layers"]))


def test_batched_equals_one_query_at_a_time(image):
    model = tiny_rtdetr("v1", seed=3)
    lrp = LRP(model, composite="default", batch_mode="vmap", chunk_size=2)
    assert_batched_equals_single(lrp, image, QUERIES, ["pixels", "encoder_layers", "query_init"])


def test_encoder_only_mode_goes_from_the_memory_to_the_encoder_input(image):
    """Session.propagate from the memory tokens back through the (bias-free, attention-constant) hybrid encoder."""
    assert_encoder_only_conserves(tiny_rtdetr("v1", seed=4), image)


@pytest.mark.parametrize("version", VERSIONS)
def test_explain_hf_cli_end_to_end(version, tmp_path, capsys):
    """``maskdino-lrp explain IMAGES --hf DIR`` on a saved tiny RT-DETR with its processor config: outputs,
    report, and ``validate`` passes."""
    from maskdino_lrp.cli import main

    folder = tmp_path / "model"
    model = tiny_rtdetr(version).float()
    labels = label_settings()
    model.config.id2label, model.config.label2id = labels["id2label"], labels["label2id"]
    model.save_pretrained(folder)
    # RT-DETR's processor resizes to a fixed size and does not normalise
    transformers.RTDetrImageProcessor(size={"height": 64, "width": 96}).save_pretrained(folder)
    images = write_images(tmp_path / "images", ["a.png"], (50, 70, 3), seed=1)
    out = tmp_path / "run"
    args = ["explain", str(images), "--hf", str(folder), "--out", str(out), "--queries", "topk:2", "--no-progress",
            "--composite", "conservative"]
    assert main(args) == 0
    assert "1 image(s) explained (2 queries)" in capsys.readouterr().out
    summary = json.loads((out / "a.png" / "summary.json").read_text())
    assert summary["model_class"] == type(model).__name__ and len(summary["queries"]) == 2
    meta = json.loads((out / "a.png" / f"q{summary['queries'][0]['query']:03d}_meta.json").read_text())
    assert meta["class"] in ("cat", "dog", "bird")
    assert meta["image_size"] == [50, 70] and meta["input_size"] == [64, 96]  # resized as the processor says
    assert (out / "report.html").is_file()
    assert main(["validate", str(out)]) == 0
