"""A checkpoint that does not fit is refused (one line, before any image) unless a partial load is asked for;
training-only extras stay a report; random weights are said on stderr, in summary.json and in report.html."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from maskdino_lrp import build_model, load_weights
from maskdino_lrp.cli import main
from maskdino_lrp.model.checkpoint import CheckpointError, load_checkpoint, shipped_weights
from maskdino_lrp.model.config import PRESET_DIR

CLI = [sys.executable, "-m", "maskdino_lrp.cli"]


@pytest.fixture(scope="module")
def tiny_state():
    torch.manual_seed(0)
    return build_model("tiny").state_dict()


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    from PIL import Image

    from maskdino_lrp.data.shapes import generate_sample

    path = tmp_path_factory.mktemp("img") / "shapes.png"
    Image.fromarray(generate_sample(3, 0).image).save(path)
    return path


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


# ----------------------------------------------------------------------------- library
def test_checkpoint_matching_no_key_is_refused(tiny_state, tmp_path):
    path = tmp_path / "renamed.pth"
    torch.save({"model": {"detector." + k: v for k, v in tiny_state.items()}}, path)
    torch.manual_seed(1)
    with pytest.raises(CheckpointError) as info:
        build_model("tiny", checkpoint=path)
    message = _one_line(str(info.value))
    total = len(tiny_state)
    assert f"matches 0 of {total} model keys" in message and f"{total} missing" in message
    assert "backbone.stem.conv1.weight" in message and f"… {total - 3} more" in message
    assert "--partial-load" in message and "strict=False" in message
    assert info.value.report is not None and len(info.value.report.missing) == total


def test_wrong_shapes_are_refused_and_the_model_is_untouched(tiny_state, tmp_path):
    torch.manual_seed(2)
    other = build_model("tiny", overrides={"MODEL.SEM_SEG_HEAD.NUM_CLASSES": 7})
    torch.manual_seed(3)
    model = build_model("tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_weights(model, other.state_dict())
    message = _one_line(str(info.value))
    assert "3 with another shape" in message
    assert "class_embed.weight: checkpoint [7, 256] vs model [4, 256]" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.random_weights


def test_partial_load_is_asked_for_and_reported_once(tiny_state, tmp_path, caplog):
    head_only = {k: v for k, v in tiny_state.items() if not k.startswith("backbone.")}
    torch.manual_seed(4)
    with caplog.at_level(logging.WARNING, logger="maskdino_lrp"):
        model = build_model("tiny", checkpoint=head_only, strict=False)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "partial load" in warnings[0].getMessage()
    assert "missing (backbone." in warnings[0].getMessage()
    assert torch.equal(model.state_dict()["sem_seg_head.predictor.class_embed.weight"],
                       tiny_state["sem_seg_head.predictor.class_embed.weight"])
    info = model.weights_info()
    assert info["random_weights"] is False and "missing" in info["partial_load"]


def test_training_only_extras_are_a_report_not_an_error(tiny_state, tmp_path):
    path = tmp_path / "model_final.pth"
    torch.save({"model": {**tiny_state, "criterion.empty_weight": torch.ones(5)}, "iteration": 90000,
                "optimizer": {"state": {}, "param_groups": []}}, path)
    torch.manual_seed(5)
    model = build_model("tiny", checkpoint=path)
    report = model.load_report
    assert report.ok and "criterion.empty_weight" in report.ignored
    assert "criterion.*" in str(report)
    assert model.weights_info() == {"weights": str(path), "random_weights": False}


def test_load_checkpoint_is_strict_unless_told(tiny_state):
    torch.manual_seed(6)
    model = build_model("tiny")
    partial = {k: v for k, v in tiny_state.items() if k.startswith("backbone.")}
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(model, partial)
    assert not load_checkpoint(model, partial, strict=False).ok


def test_shipped_weights_belong_to_presets():
    assert shipped_weights("demo") is not None and shipped_weights("demo").name == "demo.safetensors"
    assert shipped_weights(PRESET_DIR / "demo.yaml") == shipped_weights("demo")
    assert shipped_weights("tiny") is None and shipped_weights("maskdino_r50_3s_coco") is None
    assert shipped_weights({"MODEL": {}}) is None and shipped_weights("no_such_preset") is None


def test_report_html_shows_a_random_weights_banner(tmp_path):
    from maskdino_lrp.analysis.render import write_report

    for name, random in (("a.png", True), ("b.png", False)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(
            {"image": name, "num_queries": 0, "queries": [], "files": [], "random_weights": random,
             "weights": "random initialisation" if random else "model.pth"}))
    html = write_report(tmp_path).read_text()
    assert 'id="random-weights-banner"' in html and "RANDOM WEIGHTS" in html and "(1 of 2 image(s))" in html
    (tmp_path / "a.png" / "summary.json").write_text(json.dumps(
        {"image": "a.png", "num_queries": 0, "queries": [], "files": [], "random_weights": False,
         "weights": "m.pth"}))
    assert "random-weights-banner" not in write_report(tmp_path).read_text()


# ----------------------------------------------------------------------------- command line
def _explain(image: Path, out: Path, *extra: str) -> list[str]:
    return ["explain", str(image), "--out", str(out), "--queries", "topk:1", "--stops", "pixels", "--formats", "csv",
            "--no-progress", "--threads", "1", *extra]


@pytest.mark.parametrize("kind", ["no_key", "shape"])
def test_cli_refuses_a_bad_checkpoint_once_before_any_image(tiny_state, image, tmp_path, capsys, kind):
    path = tmp_path / "bad.pth"
    if kind == "no_key":
        torch.save({"model": {"x." + k: v for k, v in tiny_state.items()}}, path)
    else:
        torch.manual_seed(7)
        torch.save({"model": build_model("tiny", overrides={"MODEL.SEM_SEG_HEAD.NUM_CLASSES": 9}).state_dict()}, path)
    out = tmp_path / "out"
    code = main(_explain(image, out, "--config", "tiny", "--checkpoint", str(path)))
    assert code == 2
    err = capsys.readouterr().err
    line = _one_line(err)
    assert line.startswith("maskdino-lrp: error: checkpoint ") and "bad.pth" in line and "--partial-load" in line
    assert "Traceback" not in err
    assert not (out / "manifest.json").exists() and not (out / "shapes.png").exists()


@pytest.mark.slow
def test_cli_partial_load_runs_and_says_so(tiny_state, image, tmp_path):
    path = tmp_path / "head.pth"
    torch.save({"model": {k: v for k, v in tiny_state.items() if not k.startswith("backbone.")}}, path)
    out = tmp_path / "out"
    proc = subprocess.run([*CLI, *_explain(image, out, "--config", "tiny", "--checkpoint", str(path),
                                            "--partial-load")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [l for l in proc.stderr.splitlines() if "partial load" in l]
    assert len(warnings) == 1 and warnings[0].startswith("maskdino-lrp: warning: ")
    summary = json.loads((out / "shapes.png" / "summary.json").read_text())
    assert summary["random_weights"] is False and "missing" in summary["partial_load"]
    assert "PARTIAL CHECKPOINT LOAD" in (out / "report.html").read_text()


@pytest.mark.slow
def test_cli_random_weights_are_said_everywhere(image, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([*CLI, *_explain(image, out, "--config", "tiny")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "random weights" in proc.stderr and "maskdino-lrp: warning: no checkpoint" in proc.stderr
    summary = json.loads((out / "shapes.png" / "summary.json").read_text())
    assert summary["random_weights"] is True and summary["weights"] == "random initialisation"
    assert 'id="random-weights-banner"' in (out / "report.html").read_text()


@pytest.mark.slow
def test_cli_demo_preset_uses_its_shipped_weights(image, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([*CLI, *_explain(image, out, "--config", "demo")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "random weights" not in proc.stderr
    summary = json.loads((out / "shapes.png" / "summary.json").read_text())
    assert summary["random_weights"] is False and summary["weights"] == str(shipped_weights("demo"))
    assert "random-weights-banner" not in (out / "report.html").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["checkpoint"] == str(shipped_weights("demo"))
    assert np.isfinite(summary["queries"][0]["score"])
