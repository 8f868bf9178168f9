"""The main job: detect and explain objects in a freshly generated shapes image with the shipped demo model."""
from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

WEIGHTS = Path(__file__).resolve().parent / "weights" / "demo.safetensors"
DEMO_STOPS = ("pixels", "encoder_input", "encoder_layers", "memory", "query_init", "decoder_layers")


def load_demo_model(weights: str | Path | None = None):
    """The demo preset with its shipped weights (random weights, with a warning, if they are absent)."""
    from . import build_model

    path = Path(weights) if weights else WEIGHTS
    if path.is_file():
        return build_model("demo", checkpoint=path, strict=True), True
    log.warning("demo weights %s not found: using random weights (torch seed 0); the explanations say nothing "
                "about a trained model", path)
    import torch

    torch.manual_seed(0)  # the same random model every time
    return build_model("demo"), False


def run(out_dir: str | Path = "demo-output", seed: int | None = None, top: int = 3,
        weights: str | Path | None = None, composite: str = "default", device: str = "cpu",
        dtype: str = "float32") -> Path:
    """Generate an image, detect, explain the top detections, write overlays, CSVs and report.html.

    ``device`` / ``dtype``: where and in which precision the explanation runs (see :class:`~maskdino_lrp.lrp.LRP`).
    """
    from PIL import Image

    from .analysis.export import save_explanation
    from .analysis.render import write_report
    from .data.shapes import ShapesConfig, generate_sample
    from .lrp import LRP

    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if seed is None:
        seed = int(time.time()) % 1_000_000
    model, trained = load_demo_model(weights)
    sample = generate_sample(seed, 0, ShapesConfig(image_size=model.min_size_test))
    image_name = f"shapes_seed{seed}"
    Image.fromarray(sample.image).save(out / f"{image_name}.png")
    truth = ", ".join(sample.class_names[c] for c in sample.classes.tolist())
    print(f"image: {out / (image_name + '.png')} (seed {seed}; ground truth: {truth})")
    detections = model.predict(sample.image)
    print(detections if len(detections) <= 8 else "\n".join(str(detections).splitlines()[:9]))
    lrp = LRP(model, composite=composite, device=device, dtype=None if dtype == "float32" else dtype)
    expl = lrp.explain(sample.image, queries=f"topk:{top}", target="class", stops=DEMO_STOPS)
    save_explanation(expl, out, image_name, extra=model.weights_info())  # random_weights in summary.json and report
    report = write_report(out)
    print("\nconservation (target = relevance at the cut + bias + embeddings + positional + residual):")
    print(expl.conservation_table())
    print(f"\nwrote {out}/ (report: {report}) in {time.perf_counter() - start:.1f} s"
          + ("" if trained else "  [random weights: train or ship weights/demo.safetensors]"))
    return out

