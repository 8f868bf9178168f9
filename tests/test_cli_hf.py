"""``maskdino-lrp explain --hf DIR``: tiny random Hugging Face DETR and Deformable DETR models saved with
``save_pretrained`` are explained by the same runner as MaskDINO (outputs, summary.json, report.html, resume)
and validate; the loader picks the Auto class by the folder's model_type."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from maskdino_lrp.cli import main  # noqa: E402
from hf_checks import label_settings, tiny_resnet, write_images


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny random DetrForObjectDetection (transformers ResNet backbone, no timm) saved to a folder."""
    import torch

    torch.manual_seed(0)
    backbone = tiny_resnet(transformers)
    config = transformers.DetrConfig(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False,
                                     d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                                     decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
                                     num_queries=6, **label_settings())
    folder = tmp_path_factory.mktemp("detr")
    transformers.DetrForObjectDetection(config).save_pretrained(folder)
    # the processor's resize applies: shortest edge 40 (longest at most 60)
    transformers.DetrImageProcessor(size={"shortest_edge": 40, "longest_edge": 60}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def deformable_dir(tmp_path_factory) -> Path:
    """A tiny random two-stage DeformableDetrForObjectDetection saved to a folder."""
    import torch

    torch.manual_seed(0)
    backbone = tiny_resnet(transformers)
    config = transformers.DeformableDetrConfig(
        use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, d_model=32,
        encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
        decoder_ffn_dim=48, num_queries=6, two_stage_num_proposals=6, num_feature_levels=3, encoder_n_points=2,
        decoder_n_points=2, with_box_refine=True, two_stage=True, **label_settings())
    folder = tmp_path_factory.mktemp("deformable_detr")
    transformers.DeformableDetrForObjectDetection(config).save_pretrained(folder)
    transformers.DeformableDetrImageProcessor(size={"shortest_edge": 40, "longest_edge": 60}).save_pretrained(folder)
    return folder


def _save_tiny(folder: Path, family: str) -> Path:
    """A tiny random Conditional DETR, DAB-DETR or YOLOS with its image processor, saved to ``folder``."""
    import torch

    torch.manual_seed(0)
    labels = label_settings()
    backbone = tiny_resnet(transformers)
    detr_like = dict(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False,
                     encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
                     encoder_ffn_dim=48, decoder_ffn_dim=48, num_queries=6, **labels)
    if family == "conditional_detr":
        model = transformers.ConditionalDetrForObjectDetection(transformers.ConditionalDetrConfig(d_model=32, **detr_like))
    elif family == "dab_detr":
        model = transformers.DabDetrForObjectDetection(
            transformers.DabDetrConfig(hidden_size=32, activation_function="relu", **detr_like))
    else:
        model = transformers.YolosForObjectDetection(transformers.YolosConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, image_size=[64, 48],
            patch_size=16, num_detection_tokens=6, **labels))
    model.save_pretrained(folder)
    transformers.DetrImageProcessorPil(size={"shortest_edge": 40, "longest_edge": 60}).save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("family,stops", [("conditional_detr", ["pixels", "encoder_input", "memory"]),
                                          ("dab_detr", ["pixels", "encoder_input", "memory"]),
                                          ("yolos", ["pixels", "encoder_input"])])
def test_explain_hf_other_detr_family_models(family, stops, images, tmp_path, capsys):
    """Without --stops, the model's own default stops (YOLOS has no memory) are kept and recorded."""
    folder = _save_tiny(tmp_path / family, family)
    out = tmp_path / "run"
    args = ["explain", str(images), "--hf", str(folder), "--out", str(out), "--queries", "topk:1", "--no-progress",
            "--composite", "conservative"]
    assert main(args) == 0
    assert "2 image(s) explained (2 queries)" in capsys.readouterr().out
    summary = json.loads((out / "img0.png" / "summary.json").read_text())
    assert summary["model_class"] == type_name(family)
    assert json.loads((out / "manifest.json").read_text())["settings"]["stops"] == stops
    meta = json.loads((out / "img0.png" / f"q{summary['queries'][0]['query']:03d}_meta.json").read_text())
    assert meta["stops"] == stops
    assert main(["validate", str(out)]) == 0


def test_every_model_type_names_an_adapter_whose_default_stops_it_has():
    from maskdino_lrp.adapters import get_adapter
    from maskdino_lrp.cli import HF_ADAPTERS, HF_AUTO_CLASSES

    assert set(HF_ADAPTERS) == set(HF_AUTO_CLASSES)
    for name in HF_ADAPTERS.values():
        adapter = get_adapter(name)
        assert adapter.default_stops and set(adapter.default_stops) <= set(adapter.stops), name


def type_name(family: str) -> str:
    return {"conditional_detr": "ConditionalDetrForObjectDetection", "dab_detr": "DabDetrForObjectDetection",
            "yolos": "YolosForObjectDetection"}[family]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("images"))


@pytest.mark.parametrize("family,model_class", [("hf_dir", "DetrForObjectDetection"),
                                                ("deformable_dir", "DeformableDetrForObjectDetection")])
def test_explain_hf_resume_validate(family, model_class, request, images, tmp_path, capsys):
    hf_dir = request.getfixturevalue(family)
    out = tmp_path / "run"
    # the conservative composite: the default's AttnLRP attention leaves about half of a random DETR's class
    # logit in the memory cut's residual (through the decoder's first cross-attention), validate's bound
    args = ["explain", str(images), "--hf", str(hf_dir), "--out", str(out), "--queries", "topk:1", "--no-progress",
            "--composite", "conservative"]
    assert main(args) == 0
    assert "2 image(s) explained (2 queries)" in capsys.readouterr().out
    for name in ("img0.png", "img1.png"):
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["weights"] == f"hf:{hf_dir}"
        assert summary["model_class"] == model_class
        assert len(summary["queries"]) == 1
        meta = json.loads((out / name / f"q{summary['queries'][0]['query']:03d}_meta.json").read_text())
        assert meta["class"] in ("cat", "dog", "bird")  # from the config's id2label
        assert meta["mask_rle"] is None  # detectors without masks
        assert meta["image_size"] == [64, 48] and meta["input_size"] == [53, 40]  # resized as the processor says
    assert (out / "report.html").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["config"] == f"hf:{hf_dir}" and manifest["finished"]
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.parent != out}

    assert main(args) == 0  # resumed: nothing recomputed
    assert "0 image(s) explained (0 queries), 2 already done" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.parent != out} == mtimes

    assert main(["validate", str(out)]) == 0


@pytest.mark.parametrize("make,fragment", [
    (lambda tmp: tmp / "missing", "no such folder"),
    (lambda tmp: tmp, "not a Hugging Face model folder"),
])
def test_bad_hf_folder(make, fragment, images, tmp_path, capsys):
    code = main(["explain", str(images), "--hf", str(make(tmp_path)), "--out", str(tmp_path / "run")])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("maskdino-lrp: error: --hf ") and fragment in lines[0], lines
    assert not (tmp_path / "run").exists()  # refused before the output folder is made


def test_hf_and_config_exclusive(hf_dir, images, tmp_path, capsys):
    code = main(["explain", str(images), "--hf", str(hf_dir), "--config", "tiny", "--out", str(tmp_path / "run")])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "not allowed with argument" in lines[0], lines


def one_line_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("maskdino-lrp: error: ") and "Traceback" not in lines[0], lines
    return lines[0]


def test_hf_folder_without_weights(hf_dir, images, tmp_path, capsys):
    folder = tmp_path / "config-only"
    folder.mkdir()
    (folder / "config.json").write_text((hf_dir / "config.json").read_text())
    assert main(["explain", str(images), "--hf", str(folder), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "cannot load a detr model" in one_line_error(capsys)


def test_hf_folder_of_a_model_type_without_adapter(hf_dir, images, tmp_path, capsys):
    folder = tmp_path / "grounding-dino"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "grounding-dino"}))
    assert main(["explain", str(images), "--hf", str(folder), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    line = one_line_error(capsys)
    assert "model_type 'grounding-dino' is not one maskdino-lrp explains" in line and "deformable_detr" in line
    assert not (tmp_path / "run").exists()


def test_hf_without_transformers(hf_dir, images, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # import transformers → ImportError
    assert main(["explain", str(images), "--hf", str(hf_dir), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "pip install maskdino-lrp[hf]" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_hf_refuses_checkpoint(hf_dir, images, tmp_path, capsys):
    code = main(["explain", str(images), "--hf", str(hf_dir), "--checkpoint", "x.pth", "--out", str(tmp_path / "r")])
    assert code == 2
    assert "--checkpoint does not apply to --hf" in one_line_error(capsys)
