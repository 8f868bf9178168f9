"""The overlays and ``report.html``: nothing cut off, padding marked, legend, enlargeable thumbnails,
class names (COCO's 80 for 80-class models, the demo's shape names)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from maskdino_lrp.analysis.export import save_explanation
from maskdino_lrp.analysis.render import (_padding_patches, display_size, render_pixels, render_tokens,
                                          write_report)
from maskdino_lrp.lrp.explanation import Level
from maskdino_lrp.model.class_names import COCO_CLASS_NAMES, default_class_names
from maskdino_lrp.model.masks import CompactMask

from test_analysis import make_explanation


def _border_is_blank(path, width: int = 2) -> bool:
    """True if the outermost ``width`` pixels of a PNG are all background (nothing drawn touches an edge)."""
    a = np.asarray(Image.open(path).convert("RGB")).astype(int)
    border = np.concatenate([a[:width].reshape(-1, 3), a[-width:].reshape(-1, 3),
                             a[:, :width].reshape(-1, 3), a[:, -width:].reshape(-1, 3)])
    return bool((border >= 250).all())


@pytest.mark.parametrize("size", [(32, 48), (400, 60), (60, 500)])
def test_overlays_cut_nothing_off(tmp_path, size):
    """Titles, colour-bar labels and legends lie inside the PNG (a blank margin on every side); a tall
    image used to lose its title and colour-bar label at the figure's edges."""
    h, w = size
    expl = make_explanation()
    expl.image = np.zeros((h, w, 3), np.uint8)
    expl.relevance["pixels"] = torch.rand(len(expl), h, w) * 1e-5
    for d in expl.detections:
        d["mask"] = np.zeros((h, w), bool)
    expl.input_size = (30, 40)  # 32×48 levels: the bottom and right are padding (legend below the maps)
    for k in range(len(expl)):
        render_pixels(expl, k, tmp_path / f"p{k}.png")
        render_tokens(expl, "memory", k, tmp_path / f"t{k}.png")
        assert _border_is_blank(tmp_path / f"p{k}.png"), f"pixel overlay {k} is cut off"
        assert _border_is_blank(tmp_path / f"t{k}.png"), f"token map {k} is cut off"


def test_padding_is_marked_on_token_maps():
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.add_subplot(1, 1, 1)
    lv = Level("stride8", 8, 4, 6, 0)  # covers 32×48 input pixels
    assert not _padding_patches(ax, lv, (32, 48))  # no padding: nothing marked
    assert _padding_patches(ax, lv, (20, 36))  # 20 rows, 36 columns of image: the rest is padding
    right, bottom = ax.patches
    # the image's edge in token coordinates: pixel 36 is token 4.5, drawn at 4.5 - 0.5
    assert right.get_x() == pytest.approx(36 / 8 - 0.5) and right.get_width() == pytest.approx(6 - 36 / 8)
    assert bottom.get_y() == pytest.approx(20 / 8 - 0.5) and bottom.get_height() == pytest.approx(4 - 20 / 8)
    assert right.get_hatch() and bottom.get_hatch()


def test_pixel_overlay_of_a_large_image_is_bounded(tmp_path):
    """The overlay is drawn from the model-input map at a bounded size, whatever the photo's size."""
    expl = make_explanation(k=1)
    h, w = 3000, 4500
    expl.image = np.zeros((h, w, 3), np.uint8)
    mask = np.zeros((h, w), bool)
    mask[1000:2000, 1500:3000] = True
    expl.detections[0]["mask"] = CompactMask.from_array(mask)
    expl.detections[0]["box"] = [1500.0, 1000.0, 3000.0, 2000.0]
    render_pixels(expl, 0, tmp_path / "big.png")
    with Image.open(tmp_path / "big.png") as im:
        assert max(im.size) < 1000
    assert display_size(h, w, 1024) == (683, 1024) and display_size(100, 150, 1024) == (100, 150)


def test_report_has_a_legend_and_enlargeable_thumbnails(tmp_path):
    save_explanation(make_explanation(residual=0.05), tmp_path, "ok")
    save_explanation(make_explanation(residual=0.9), tmp_path, "bad")
    text = write_report(tmp_path, max_residual=0.5).read_text()
    assert 'class="legend"' in text and "swatch ok" in text and "swatch bad" in text and "≤ 0.5" in text
    assert re.search(r'<td class="num ok">5\.00e-02</td>', text)
    assert re.search(r'<td class="num bad">9\.00e-01</td>', text)
    views = re.findall(r'<a href="#(view-\d+)"', text)
    assert len(views) == 4 and all(f'id="{v}"' in text for v in views)  # each thumbnail opens enlarged
    assert ".lightbox:target" in text


def test_class_names_coco_and_demo():
    assert len(COCO_CLASS_NAMES) == 80 and COCO_CLASS_NAMES[0] == "person" and COCO_CLASS_NAMES[-1] == "toothbrush"
    assert default_class_names([], 80) == list(COCO_CLASS_NAMES)
    assert default_class_names(["a", "b"], 80) == ["a", "b"]  # configured names win
    assert default_class_names([], 4) == []  # no names: the label index is shown
    from maskdino_lrp import build_model
    from maskdino_lrp.model.config import load_config

    assert load_config("maskdino_r50_3s_coco")["MODEL"]["SEM_SEG_HEAD"]["NUM_CLASSES"] == 80
    torch.manual_seed(0)
    demo = build_model("demo")
    assert demo.class_names == ["circle", "square", "triangle", "star"]
