"""Segment recomputation (lrp/recompute.py): the same relevance as keeping the forward graph, for less of it."""
import numpy as np
import pytest
import torch

from maskdino_lrp.lrp import LRP
from maskdino_lrp.lrp import recompute as rc
from maskdino_lrp.lrp.engine import EngineError, Ledger
from maskdino_lrp.model.maskdino import build_model
from test_swin_lrp import SMALL

ALL_ENCODER = ("pixels", "backbone", "encoder_input", "encoder_layers", "memory")
STOP_SETS = [("pixels",), ALL_ENCODER, ("encoder_layers", "memory", "mask_features", "decoder_layers")]


def tiny(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return build_model("tiny").to(dtype)


def swin(dtype=torch.float64, seed=7):
    torch.manual_seed(seed)
    return build_model("maskdino_swint_coco", overrides=SMALL).to(dtype)


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(3).integers(0, 256, (60, 90, 3), dtype=np.uint8)


def _both(model, image, target, stops, composite="default", **kw):
    kept = LRP(model, composite=composite, **kw).explain(image, queries="topk:2", target=target, stops=stops)
    recomputed = LRP(model, composite=composite, recompute=True, **kw).explain(
        image, queries="topk:2", target=target, stops=stops)
    return kept, recomputed


def _assert_identical(kept, recomputed):
    assert kept.relevance.keys() == recomputed.relevance.keys()
    for key in kept.relevance:
        assert torch.equal(kept.relevance[key], recomputed.relevance[key]), key
    for cut, row in kept.conservation.items():  # the ledger books the same entries, with the same relevance
        for name, value in row.items():
            assert torch.equal(value, recomputed.conservation[cut][name]), (cut, name)


@pytest.mark.parametrize("target, stops", [("class", STOP_SETS[0]), ("class", STOP_SETS[2]), ("mask", STOP_SETS[1])])
def test_tiny_identical_float64(image, target, stops):
    model = tiny()
    _assert_identical(*_both(model, image, target, stops))
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("target, stops, composite", [("class", ALL_ENCODER, "default"),
                                                      ("class", STOP_SETS[2], "conservative"),
                                                      ("mask", ALL_ENCODER, "conservative")])
def test_swin_identical_float64(image, target, stops, composite):
    """Window attention books its bias and shift mask inside each recomputed block: same ledger, same relevance."""
    _assert_identical(*_both(swin(), image, target, stops, composite))


def test_float32_within_1e5_and_vmap(image):
    for model in (tiny(torch.float32), swin(torch.float32)):
        for batch_mode in ("loop", "vmap"):
            kept, recomputed = _both(model, image, "class", ALL_ENCODER, batch_mode=batch_mode)
            for key, r in kept.relevance.items():
                scale = r.abs().max().clamp_min(1e-30)
                assert ((r - recomputed.relevance[key]).abs().max() / scale) <= 1e-5, (batch_mode, key)


def test_session_backward_twice_and_propagate(image):
    """Every backward recomputes what it crosses: a second backward and the encoder-only mode agree too."""
    model = swin()
    sessions = [LRP(model, recompute=flag).prepare(image) for flag in (False, True)]
    for target in ("class", "mask"):
        kept, recomputed = (s.backward("topk:1", target, ALL_ENCODER) for s in sessions)
        _assert_identical(kept, recomputed)
    seed = torch.rand(1, kept.relevance["encoder_layer0"].shape[1], dtype=torch.float64)
    a, b = (s.propagate(seed, ("pixels", "encoder_input"), retain_graph=False) for s in sessions)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_keeps_less_and_recomputes(image, monkeypatch):
    """The graph outside the segments keeps a fraction of the bytes; each backward replays every segment it
    crosses under the forward's rules."""
    model = swin()
    replays = []
    original = rc._replaying

    def counting(root, snapshot, ledger):
        replays.append(root)
        return original(root, snapshot, ledger)

    monkeypatch.setattr(rc, "_replaying", counting)
    kept_bytes = {}
    for flag in (False, True):
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        lrp = LRP(model, recompute=flag)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            session = lrp.prepare(image)  # inside a segment, checkpoint's own hooks take the tensors
        kept_bytes[flag] = sum(saved)
        session.backward("topk:1", "class", ("pixels",), retain_graph=False)
    assert kept_bytes[True] < 0.65 * kept_bytes[False]  # 0.58 here: the small head keeps the rest
    segments = {model.get_submodule(n) for n in LRP(model, recompute=True).segments}
    assert set(replays) == segments and len(replays) == len(segments)


def test_replay_is_what_makes_it_exact(image, monkeypatch):
    """Without reinstalling the forward's rules the recompute computes something else (guards the test above)."""
    model = swin()
    kept = LRP(model).explain(image, queries="topk:1", stops=("pixels",))
    monkeypatch.setattr(rc, "_apply", lambda state: None)
    try:
        recomputed = LRP(model, recompute=True).explain(image, queries="topk:1", stops=("pixels",))
    except Exception:  # torch's determinism check: other saved tensors
        return
    assert not torch.equal(kept.relevance["pixels"], recomputed.relevance["pixels"])


def test_stop_inside_a_segment(image):
    """Stops recorded inside a segment are refused with one line; a stop that is a segment's output works."""
    model = tiny()
    encoder = "sem_seg_head.pixel_decoder.transformer.encoder"
    with pytest.raises(EngineError, match=r"cannot recompute segment .*encoder'.*forward hooks"):
        LRP(model, recompute=[encoder]).explain(image, queries="topk:1", stops=("memory",))
    kept = LRP(model).explain(image, queries="topk:1", stops=ALL_ENCODER)
    stages = LRP(model, recompute=["backbone.res2", "backbone.res4", encoder + ".layers.0"]).explain(
        image, queries="topk:1", stops=ALL_ENCODER)
    _assert_identical(kept, stages)


def test_refusals():
    model = tiny()
    with pytest.raises(EngineError, match="no module 'backbone.res9'"):
        with rc.recompute_segments(model, ["backbone.res9"], Ledger()):
            pass
    with pytest.raises(EngineError, match="'backbone.res2' and 'backbone.res2.0' overlap"):
        with rc.recompute_segments(model, ["backbone.res2.0", "backbone.res2"], Ledger()):
            pass
    with pytest.raises(EngineError, match="declares no segments"):
        rc.segment_names(True, [])
    assert rc.segment_names(False, ["a"]) == [] and rc.segment_names("a, b", []) == ["a", "b"]
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_adapter_declares_blocks_and_layers():
    names = LRP(swin(), recompute=True).segments
    assert sum(".blocks." in n for n in names) == 8 and sum(n.endswith(".downsample") for n in names) == 3
    assert sum(".encoder.layers." in n for n in names) == 1


@pytest.mark.parametrize("config, overrides", [("tiny", None), ("maskdino_swint_coco", SMALL)], ids=["resnet", "swin"])
def test_estimate_counts_what_the_segments_keep(config, overrides):
    """The estimate's recomputed case keeps each segment's input: its count equals the inputs the real model's
    blocks and encoder layers receive (the position encoding is one tensor shared by the layers)."""
    from maskdino_lrp.adapters.maskdino import MaskDINOAdapter
    from maskdino_lrp.analysis.estimate import _segment_counts, estimate, model_shapes

    torch.manual_seed(0)
    model = build_model(config, overrides=overrides)
    seen = {"backbone": 0, "encoder": 0, "pos": set()}

    def count(name):
        def hook(_m, args):
            part = "backbone" if name.startswith("backbone.") else "encoder"
            seen[part] += args[0].numel()
            if part == "encoder":
                seen["pos"].add((args[1].data_ptr(), args[1].numel()))
        return hook

    for name in MaskDINOAdapter().segments(model):
        model.get_submodule(name).register_forward_pre_hook(count(name))
    image = np.zeros((60, 90, 3), dtype=np.uint8)
    with torch.no_grad():
        model(model.prepare(image).tensor)
    segments = _segment_counts(model_shapes(config, (60, 90), overrides, count_parameters=False))
    assert seen["backbone"] == segments["inputs"]
    assert len(seen["pos"]) == 1
    assert seen["encoder"] + next(iter(seen["pos"]))[1] == segments["encoder_inputs"]
    kept, recomputed = (estimate(config, (60, 90), 1, overrides=overrides, gflops=1.0, recompute=flag)
                        for flag in (False, True))
    assert recomputed.forward_bytes < kept.forward_bytes and recomputed.recompute_bytes > 0
    assert recomputed.seconds_per_target > kept.seconds_per_target


def test_cli_and_runner_pass_recompute_on(tmp_path, capsys):
    from maskdino_lrp.analysis.runner import BatchExplainer, LRPOptions
    from maskdino_lrp.cli import main

    assert main(["estimate", "--config", "tiny", "--image-size", "64", "--queries", "1", "--gflops", "1",
                 "--recompute"]) == 0
    assert "segments recomputed" in capsys.readouterr().out
    runner = BatchExplainer("tiny", tmp_path / "out", options=LRPOptions(recompute=True), formats=("csv",),
                            progress=False)
    assert runner.lrp.segments == LRP(runner.model, recompute=True).segments != []
