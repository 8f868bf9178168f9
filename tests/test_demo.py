"""The shipped demo model: its accuracy on fresh images (computed here), and the demo main job end to end."""
import json
import subprocess
import sys

import pytest
import torch

from maskdino_lrp.analysis.validate import validate
from maskdino_lrp.data.coco import evaluate_detections
from maskdino_lrp.data.shapes import ShapesConfig, generate_sample
from maskdino_lrp.demo import WEIGHTS, load_demo_model

EVAL_SEED = 424242  # never used in training (training uses seed 0, its validation 12345)


@pytest.mark.slow
def test_shipped_demo_model_reaches_the_accuracy_bars():
    assert WEIGHTS.is_file(), f"the demo weights {WEIGHTS} are missing"
    assert WEIGHTS.stat().st_size <= 15 * 2**20
    torch.manual_seed(0)
    model, trained = load_demo_model()
    assert trained
    shapes = ShapesConfig(image_size=model.min_size_test)
    samples, predictions = [], []
    for i in range(100):
        sample = generate_sample(EVAL_SEED, i, shapes)
        det = model.predict(sample.image)
        samples.append(sample)
        predictions.append({"scores": det.scores, "labels": det.labels, "boxes": det.boxes, "masks": det.masks})
    ap = evaluate_detections(samples, predictions)
    print(json.dumps(ap))
    assert ap["box_AP50"] >= 0.8, ap
    assert ap["mask_AP50"] >= 0.7, ap


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "maskdino_lrp.cli", "demo", "--out", str(out), "--seed", "3"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "detections on a" in proc.stdout and "conservation" in proc.stdout
    assert (out / "report.html").is_file() and (out / "shapes_seed3.png").is_file()
    result = validate(out)
    assert result.ok, result.table()
