"""Export, validation, rendering, report and estimate: on a hand-built Explanation (fast), plus the
runner and the memory estimate on the tiny preset."""
from __future__ import annotations

import csv
import json
import math
import os
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from maskdino_lrp.analysis.estimate import model_shapes
from maskdino_lrp.analysis.export import (explanation_to_csv, load_detection_mask, plot_explanation,
                                          remove_stale_temp_files, save_explanation, token_relevance)
from maskdino_lrp.fileio import atomic_open, atomic_write_text
from maskdino_lrp.analysis.render import write_report
from maskdino_lrp.analysis.validate import distribution_statistics, validate
from maskdino_lrp.lrp.explanation import Explanation, Level


# ----------------------------------------------------------------------------- a fake explanation
def make_explanation(k: int = 2, seed: int = 0, residual: float = 0.05) -> Explanation:
    """Two levels (2×3 at stride 16, 4×6 at stride 8: 30 tokens), a 32×48 image, every kind of stop."""
    g = torch.Generator().manual_seed(seed)
    levels = [Level("stride16", 16, 2, 3, 0), Level("stride8", 8, 4, 6, 6)]
    t = sum(lv.size for lv in levels)
    h, w = 32, 48
    rnd = lambda *shape: torch.rand(*shape, generator=g) - 0.3  # mostly positive: sums far from 0
    relevance = {
        "pixels": rnd(k, h, w) / (h * w),
        "encoder_input": rnd(k, t),
        "encoder_layer0": rnd(k, t),
        "memory@0": rnd(k, 6),
        "memory@1": rnd(k, 24),
        "lateral0": rnd(k, 8, 12) * 0.01,
        "query_init": rnd(k, 10),
        "decoder_layer0": rnd(k, 10),
    }
    targets = torch.linspace(1.0, 2.0, k)
    total = relevance["pixels"].flatten(1).sum(1)
    bias = torch.full((k,), 0.1)
    zero = torch.zeros(k)
    res = targets * residual

    def cut(total):
        return {"target": targets, "total": total, "bias": bias, "embeddings": zero, "positional": targets - total - bias - res,
                "residual": res}

    mem_total = relevance["memory@0"].sum(1) + relevance["memory@1"].sum(1) + relevance["lateral0"].flatten(1).sum(1)
    image = (np.arange(h * w * 3).reshape(h, w, 3) % 256).astype(np.uint8)
    detections = []
    for i in range(k):
        mask = np.zeros((h, w), bool)
        mask[5 + i: 20, 10: 30 + i] = True
        detections.append({"query": 3 + 4 * i, "label": i % 4, "class": ["circle", "square", "triangle", "star"][i % 4],
                           "class_score": 0.9 - 0.1 * i, "score": 0.8 - 0.1 * i, "box": [10.0, 5.0 + i, 30.0 + i, 20.0],
                           "mask": mask})
    return Explanation(
        queries=torch.tensor([d["query"] for d in detections]), labels=torch.tensor([d["label"] for d in detections]),
        target="class", target_values=targets, relevance=relevance, levels=levels,
        conservation={"pixels": cut(total), "memory": cut(mem_total)}, detections=detections, image=image,
        input_size=(h, w), composite="default", meta={"forward_seconds": 0.1, "backward_seconds": 0.2},
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One image written with every format (PNG rendering is the slow part: do it once)."""
    out = tmp_path_factory.mktemp("run")
    expl = make_explanation()
    summary = save_explanation(expl, out, "img one.png", source="/data/img one.png")
    write_report(out)
    return out, expl, summary


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def no_temp_files(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- export
def test_token_relevance_assembles_memory_from_levels():
    expl = make_explanation()
    tokens = token_relevance(expl)
    assert list(tokens) == ["encoder_input", "encoder_layer0", "memory"]
    assert torch.equal(tokens["memory"], torch.cat([expl.relevance["memory@0"], expl.relevance["memory@1"]], 1))


def test_save_writes_every_file_and_the_summary(saved):
    out, expl, summary = saved
    folder = out / "img_one.png"  # the name is made file-system safe
    assert (folder / "summary.json").is_file()
    assert summary["num_queries"] == 2 and summary["source"] == "/data/img one.png"
    for name in summary["files"]:
        assert (folder / name).is_file(), name
    names = {p.name for p in folder.iterdir()}
    for q in ("q003", "q007"):
        for suffix in ("_meta.json", "_layers.csv", "_relevance.npz", "_pixels.png", "_tokens_encoder_input.csv",
                       "_tokens_encoder_layer0.csv", "_tokens_memory.csv", "_tokens_memory.png"):
            assert q + suffix in names
    assert (folder / "q003_pixels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not no_temp_files(out)


def test_token_csv_sums_to_one_and_keeps_raw(saved):
    out, expl, _ = saved
    header, rows = read_csv(out / "img_one.png" / "q007_tokens_memory.csv")
    assert header == ["level", "y", "x", "relevance", "raw"]
    assert len(rows) == 30
    assert [r[0] for r in rows[:6]] == ["stride16"] * 6 and rows[6][:3] == ["stride8", "0", "0"]
    assert rows[8][:3] == ["stride8", "0", "2"] and rows[-1][:3] == ["stride8", "3", "5"]
    rel = np.array([float(r[3]) for r in rows])
    raw = np.array([float(r[4]) for r in rows], dtype=np.float32)
    assert abs(rel.sum() - 1) < 1e-9
    expected = torch.cat([expl.relevance["memory@0"][1], expl.relevance["memory@1"][1]]).numpy()
    np.testing.assert_array_equal(raw, expected)  # float32 written with 9 digits: exact round trip
    np.testing.assert_allclose(rel, expected / expected.astype(np.float64).sum(), rtol=1e-9)


def test_layers_csv_has_every_stop_and_the_target(saved):
    out, expl, _ = saved
    header, rows = read_csv(out / "img_one.png" / "q003_layers.csv")
    assert header[:4] == ["stop", "kind", "elements", "sum"]
    by_stop = {r[0]: r for r in rows}
    assert float(by_stop["target"][3]) == pytest.approx(1.0)
    for key in ("pixels", "encoder_input", "encoder_layer0", "memory@0", "memory@1", "lateral0", "query_init",
                "decoder_layer0", "memory"):
        assert key in by_stop, key
    assert float(by_stop["decoder_layer0"][3]) == pytest.approx(float(expl.relevance["decoder_layer0"][0].sum()), rel=1e-6)
    assert by_stop["memory"][1] == "cut"
    assert float(by_stop["memory"][3]) == pytest.approx(float(expl.conservation["memory"]["total"][0]), rel=1e-6)


def test_npz_round_trip_and_metadata(saved):
    out, expl, _ = saved
    folder = out / "img_one.png"
    with np.load(folder / "q007_relevance.npz") as data:
        for key, value in expl.relevance.items():
            np.testing.assert_array_equal(data[key], value[1].numpy())
        # the detection's mask is stored as COCO RLE at the image size and decodes to exactly the mask
        assert "detection_mask" not in data.files and data["detection_mask_size"].tolist() == [32, 48]
    np.testing.assert_array_equal(load_detection_mask(folder / "q007_relevance.npz"), expl.detections[1]["mask"])
    np.testing.assert_array_equal(load_detection_mask(folder / "q007_meta.json"), expl.detections[1]["mask"])
    meta = json.loads((folder / "q007_meta.json").read_text())
    assert meta["query"] == 7 and meta["class"] == "square" and meta["composite"] == "default"
    assert meta["box"] == [10.0, 6.0, 31.0, 20.0] and meta["score"] == pytest.approx(0.7)
    assert meta["target_value"] == pytest.approx(2.0)
    assert set(meta["conservation"]) == {"pixels", "memory"}
    assert meta["conservation"]["pixels"]["relative_error"] == pytest.approx(0.05)
    assert [lv["name"] for lv in meta["levels"]] == ["stride16", "stride8"]


def test_atomic_write_leaves_no_temp_file_on_error(tmp_path):
    target = tmp_path / "a.csv"
    atomic_write_text(target, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_open(target, "w") as f:
            f.write("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["a.csv"]


def test_stale_temp_files_are_removed(tmp_path):
    (tmp_path / ".manifest.json.abc123.tmp").write_text("x")
    (tmp_path / "keep.tmp").write_text("x")  # not one of ours: no leading dot
    removed = remove_stale_temp_files(tmp_path)
    assert [p.name for p in removed] == [".manifest.json.abc123.tmp"]
    assert os.listdir(tmp_path) == ["keep.tmp"]


def test_formats_subset_and_bad_format(tmp_path):
    expl = make_explanation(k=1)
    summary = save_explanation(expl, tmp_path, "x", formats="csv")
    names = sorted(p.name for p in (tmp_path / "x").iterdir())
    assert not any(n.endswith((".png", ".npz")) for n in names)
    assert "summary.json" in names and summary["formats"] == ["csv"]
    from maskdino_lrp.analysis.export import ExportError

    with pytest.raises(ExportError, match="unknown output format 'gif'"):
        save_explanation(expl, tmp_path, "y", formats=["gif"])


def test_channel_relevance_and_float64_go_to_the_npz(tmp_path):
    expl = make_explanation(k=1)
    expl.relevance = {key: v.double() for key, v in expl.relevance.items()}
    expl.channel_relevance = {"encoder_input": torch.rand(1, 30, 4, dtype=torch.float64)}
    save_explanation(expl, tmp_path, "x", formats=("csv", "npz"))
    with np.load(tmp_path / "x" / "q003_relevance.npz") as data:
        assert data["channels:encoder_input"].shape == (30, 4) and data["pixels"].dtype == np.float64
    header, rows = read_csv(tmp_path / "x" / "q003_tokens_encoder_input.csv")
    raw = np.array([float(r[4]) for r in rows])
    np.testing.assert_array_equal(raw, expl.relevance["encoder_input"][0].numpy())  # 17 digits: exact
    assert json.loads((tmp_path / "x" / "q003_meta.json").read_text())["dtype"] == "float64"


def test_to_csv_and_plot(tmp_path):
    expl = make_explanation()
    path = explanation_to_csv(expl, tmp_path / "all.csv")
    header, rows = read_csv(path)
    assert header == ["query", "stop", "level", "y", "x", "relevance", "raw"]
    assert len(rows) == 2 * 3 * 30
    result = validate(path)
    assert result.ok, result.table(failed_only=True)
    png = plot_explanation(expl, tmp_path / "p.png", k=1)
    assert png.read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- validate
def test_validate_passes_on_good_output(saved):
    out, _, _ = saved
    result = validate(out)
    assert result.ok, result.table(failed_only=True)
    names = {c.name for c in result.checks}
    assert {"sums to 1", "finite", "entropy", "top1pct_share", "conservation pixels", "files exist"} <= names
    assert len(result.statistics) == 6  # 2 queries × 3 token stops


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_validate_fails_on_a_corrupt_csv(saved, tmp_path):
    out = _copy_run(saved[0], tmp_path / "run")
    csv_path = out / "img_one.png" / "q003_tokens_encoder_input.csv"
    lines = csv_path.read_text().splitlines()
    parts = lines[5].split(",")
    parts[3] = str(float(parts[3]) + 0.25)
    lines[5] = ",".join(parts)
    csv_path.write_text("\n".join(lines) + "\n")
    result = validate(out)
    assert not result.ok
    failed = result.failures
    assert {c.file for c in failed} == {"img_one.png/q003_tokens_encoder_input.csv"}
    sums = [c for c in failed if c.name == "sums to 1"]
    assert sums and "sums to 1.25" in sums[0].message
    single = validate(csv_path)  # the CSV alone
    assert not single.ok and any("sums to 1.25" in c.message for c in single.failures)


def test_validate_fails_on_nan(saved, tmp_path):
    out = _copy_run(saved[0], tmp_path / "run")
    csv_path = out / "img_one.png" / "q007_tokens_memory.csv"
    lines = csv_path.read_text().splitlines()
    lines[3] = "stride16,0,2,nan,nan"
    csv_path.write_text("\n".join(lines) + "\n")
    result = validate(out)
    assert not result.ok
    msgs = [c.message for c in result.failures if c.name == "finite"]
    assert msgs and "NaN/Inf" in msgs[0] and "line 4" in msgs[0]


def test_validate_fails_on_nan_relevance_and_bad_conservation(tmp_path):
    expl = make_explanation(k=1, residual=0.9)
    expl.relevance["encoder_input"][0, 4] = float("nan")
    save_explanation(expl, tmp_path, "bad", formats=("csv", "npz"))
    result = validate(tmp_path, max_residual=0.5)
    failed = {(c.name, c.file.split("/")[-1]) for c in result.failures}
    assert ("finite", "q003_tokens_encoder_input.csv") in failed
    assert ("finite", "q003_relevance.npz") in failed
    assert ("conservation pixels", "q003_meta.json") in failed
    msg = next(c.message for c in result.failures if c.name == "conservation pixels")
    assert "0.9 > 0.5" in msg


def test_validate_fails_on_missing_file_and_empty_folder(saved, tmp_path):
    out = _copy_run(saved[0], tmp_path / "run")
    (out / "img_one.png" / "q003_relevance.npz").unlink()
    result = validate(out)
    missing = [c for c in result.failures if c.name == "files exist"]
    assert missing and "q003_relevance.npz" in missing[0].message
    (tmp_path / "empty").mkdir()
    empty = validate(tmp_path / "empty")
    assert not empty.ok and "no explanation files" in empty.failures[0].message
    with pytest.raises(FileNotFoundError):
        validate(tmp_path / "nope")


def test_distribution_statistics():
    uniform = distribution_statistics(np.ones(200))
    assert uniform["normalised_entropy"] == pytest.approx(1.0)
    assert uniform["top1pct_share"] == pytest.approx(2 / 200)
    assert uniform["positive_mass"] == 1.0 and uniform["negative_mass"] == 0.0
    peaked = distribution_statistics(np.array([0.0] * 99 + [-3.0]))
    assert peaked["entropy"] == 0.0 and peaked["top1pct_share"] == 1.0 and peaked["negative_mass"] == 1.0
    mixed = distribution_statistics(np.array([3.0, -1.0]))
    assert mixed["positive_mass"] == pytest.approx(0.75) and mixed["negative_mass"] == pytest.approx(0.25)
    assert math.isnan(distribution_statistics(np.zeros(5))["entropy"])


# ----------------------------------------------------------------------------- report
class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("href", "src") and value:
                self.links.append(value)


def check_report(run_dir: Path) -> _Links:
    from urllib.parse import unquote

    text = (run_dir / "report.html").read_text()
    parser = _Links()
    parser.feed(text)
    parser.close()
    assert "table" in parser.tags and "img" in parser.tags
    assert parser.links
    for link in parser.links:
        if link.startswith("#"):  # in-page: an enlarged view (or "#_", which closes it)
            assert link == "#_" or f'id="{link[1:]}"' in text, link
            continue
        assert "://" not in link and not link.startswith("/"), link  # relative only: opens from disk
        assert (run_dir / unquote(link)).is_file(), link
    return parser


def test_report_links_resolve(saved):
    out, _, _ = saved
    parser = check_report(out)
    assert any(link.endswith("q003_pixels.png") for link in parser.links)
    text = (out / "report.html").read_text()
    for column in ("class", "score", "target", "rel. error (pixels)", "rel. error (memory)"):
        assert column in text


def test_report_lists_failed_images(tmp_path):
    save_explanation(make_explanation(k=1), tmp_path, "a", formats=("csv",))
    (tmp_path / "manifest.json").write_text(json.dumps({"settings": {"queries": "topk:1"}, "images": {
        "a": {"status": "done", "output": "a"}, "b.png": {"status": "failed", "source": "x/b.png",
                                                         "error": "ImageError: <cannot read>"}}}))
    write_report(tmp_path)
    text = (tmp_path / "report.html").read_text()
    assert "Failed images" in text and "ImageError: &lt;cannot read&gt;" in text
    check = validate(tmp_path)
    assert check.ok
    assert any(c.name == "failed images" and "b.png" in c.message for c in check.checks)


# ----------------------------------------------------------------------------- estimate
def test_model_shapes_follow_the_config():
    s = model_shapes("maskdino_r50_3s_coco", 800, count_parameters=False)
    assert s.input_size == (800, 800) and s.padded_size == (800, 800)
    assert s.tokens == 13125  # 100² + 50² + 25², as the preset documents
    assert [lv["name"] for lv in s.levels] == ["stride32", "stride16", "stride8"]
    assert (s.enc_layers, s.dec_layers, s.queries, s.hidden, s.heads) == (6, 9, 300, 256, 8)
    assert s.mask_size == (200, 200)
    wide = model_shapes("maskdino_r50_3s_coco", (480, 640), count_parameters=False)
    assert wide.input_size == (800, 1067) and wide.padded_size == (800, 1088)
    tiny = model_shapes("tiny", 160, overrides={"MODEL.SEM_SEG_HEAD.TOTAL_NUM_FEATURE_LEVELS": 4})
    assert tiny.input_size == (128, 128) and tiny.tokens == 16 * 16 + 8 * 8 + 4 * 4 + 2 * 2
    from maskdino_lrp import build_model

    model = build_model("tiny")
    expected = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    assert model_shapes("tiny", 128).parameters == expected


# the estimate's structure and a measured run: tests/test_estimate.py; figures: benchmarks/estimate_vs_measured.py


# ----------------------------------------------------------------------------- runner (tiny model)
@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory):
    from PIL import Image

    from maskdino_lrp.data.shapes import generate_sample

    folder = tmp_path_factory.mktemp("images")
    (folder / "sub").mkdir()
    for i, rel in enumerate(["a.png", "sub/b.png"]):
        Image.fromarray(generate_sample(0, i).image).save(folder / rel)
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("ignored")
    return folder


def test_runner_skips_bad_images_and_resumes(tiny_images, tmp_path, capsys):
    from maskdino_lrp.analysis.runner import BatchExplainer, LRPOptions, iter_images

    assert [name for name, _ in iter_images([tiny_images])] == ["a.png", "broken.png", "sub__b.png"]
    out = tmp_path / "run"
    opts = LRPOptions(chunk_size=2, memory_budget_gb=4.0)
    runner = BatchExplainer("tiny", out, queries="topk:2", options=opts, formats=("csv",), progress=False)
    results = list(runner.run([tiny_images]))
    assert [r.status for r in results] == ["done", "failed", "done"]
    assert "broken.png" in capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["images"]["broken.png"]["status"] == "failed"
    assert "cannot read image" in manifest["images"]["broken.png"]["error"]
    assert manifest["images"]["a.png"]["status"] == "done" and len(manifest["images"]["a.png"]["queries"]) == 2
    assert (out / "report.html").is_file() and not (out / "broken.png").exists()
    assert validate(out).ok
    before = (out / "a.png" / "summary.json").stat().st_mtime_ns
    again = BatchExplainer("tiny", out, queries="topk:2", options=opts, formats=("csv",), progress=False)
    statuses = [r.status for r in again.run([tiny_images])]
    assert statuses == ["skipped", "failed", "skipped"]  # a failed image is retried, finished ones are not
    assert (out / "a.png" / "summary.json").stat().st_mtime_ns == before
    from maskdino_lrp.analysis.runner import RunError

    other = BatchExplainer("tiny", out, queries="topk:3", formats=("csv",), progress=False)
    with pytest.raises(RunError, match="other settings .*queries"):
        list(other.run([tiny_images]))


def test_lrp_options_validate():
    from maskdino_lrp.analysis.runner import LRPOptions, RunError

    assert LRPOptions(stops="pixels, memory").stops == ("pixels", "memory")
    with pytest.raises(RunError, match="unknown stop"):
        LRPOptions(stops=("pixels", "elsewhere"))
    assert LRPOptions(dtype="bfloat16").dtype == "bfloat16"
    with pytest.raises(RunError, match="dtype"):
        LRPOptions(dtype="int8")
    with pytest.raises(RunError, match="chunk size"):
        LRPOptions(chunk_size=0)
