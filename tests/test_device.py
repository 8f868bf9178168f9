"""device= / dtype= of the explainer and the CLI, on this CPU-only machine: an explicit device, reduced precision
(bfloat16 / float16 under autocast: finite relevance, the conservation report shows the cost), float64."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskdino_lrp import build_model
from maskdino_lrp.cli import main
from maskdino_lrp.lrp.engine import EngineError
from maskdino_lrp.lrp.explainer import LRP

SRC = Path(__file__).resolve().parents[1] / "src" / "maskdino_lrp"


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(1).integers(0, 256, (96, 96, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("tiny").eval()


@pytest.fixture(scope="module")
def reference(model, image):
    return LRP(model).explain(image, queries=[0, 1], stops=("pixels", "memory"))


def test_explicit_cpu_device_is_the_default(model, image, reference):
    expl = LRP(model, device="cpu", dtype="float32").explain(image, queries=[0, 1], stops=("pixels", "memory"))
    for key, value in reference.relevance.items():
        assert torch.equal(expl.relevance[key], value), key


def test_float16_runs_in_float16(model, image):
    """float16 runs (forward under autocast, the relevance returned as float32); its range (max 65504) is too
    small for the rules' ratios on this model, so its relevance may hold inf: bfloat16 is the reduced precision
    to use (README)."""
    expl = LRP(model, device="cpu", dtype="float16").explain(image, queries=[0], stops=("pixels",))
    assert expl.relevance["pixels"].dtype == torch.float32
    assert expl.target_values.dtype == torch.float16


def test_bfloat16_is_finite_and_reports_its_cost(model, image, reference):
    dtype = "bfloat16"
    expl = LRP(model, device="cpu", dtype=dtype).explain(image, queries=[0, 1], stops=("pixels", "memory"))
    assert next(model.parameters()).dtype == torch.float32  # autocast: the weights are not converted
    pixels, ref = expl.relevance["pixels"], reference.relevance["pixels"]
    assert pixels.dtype == torch.float32 and torch.isfinite(pixels).all()
    cosine = torch.nn.functional.cosine_similarity(pixels.flatten(1), ref.flatten(1)).min().item()
    assert cosine > 0.5, f"{dtype} relevance unrelated to float32's (cosine {cosine:.2f})"
    for cut, row in expl.conservation.items():
        for name, value in row.items():
            assert torch.isfinite(value).all(), (cut, name)
        recomposed = row["total"] + row["bias"] + row["embeddings"] + row["positional"] + row["residual"]
        assert torch.allclose(recomposed.float(), row["target"].float(), atol=1e-2), cut
    # the reduced-precision target is the logit of a reduced-precision forward: close to float32's, not equal
    assert torch.allclose(expl.target_values.float(), reference.target_values, atol=0.1, rtol=0.05)


def test_float64_converts_the_model(image):
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    expl = LRP(model, dtype="float64").explain(image, queries=[0], stops=("pixels",))
    assert next(model.parameters()).dtype == torch.float64
    assert expl.relevance["pixels"].dtype == torch.float64


def test_unknown_dtype_is_one_clear_error(model):
    with pytest.raises(EngineError, match="unknown dtype 'float8'"):
        LRP(model, dtype="float8")


def test_the_engine_hot_path_never_leaves_the_device():
    """No host copies in the engine before export: the same code runs on a GPU."""
    for path in [*sorted((SRC / "lrp").glob("*.py")), SRC / "model" / "deform_attn.py"]:
        text = path.read_text()
        found = re.findall(r"\.(cpu|numpy)\(\)", text)
        assert not found, f"{path.name} calls .{found[0]}()"


def test_cli_explain_with_device_and_bfloat16(tmp_path, image):
    path = tmp_path / "image.png"
    Image.fromarray(image).save(path)
    out = tmp_path / "out"
    assert main(["explain", str(path), "--config", "tiny", "--out", str(out), "--queries", "topk:1",
                 "--device", "cpu", "--dtype", "bfloat16", "--no-progress", "--formats", "csv"]) == 0
    assert main(["validate", str(out)]) == 0
