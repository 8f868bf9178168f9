"""Data sets as inputs (COCO annotation files, text files of paths) and the data-set summary, on the shipped
demo model in one process; the summary's figures are checked against the raw .npz arrays and layer CSVs."""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from maskdino_lrp.analysis.datasets import coco_images, path_list
from maskdino_lrp.analysis.runner import BatchExplainer, collect_sources
from maskdino_lrp.analysis.summary import CLASSES, EXPLANATIONS
from maskdino_lrp.analysis.validate import validate
from maskdino_lrp.cli import main
from maskdino_lrp.model.checkpoint import shipped_weights


def _shapes(folder: Path, n: int, seed: int = 7) -> list[Path]:
    from PIL import Image

    from maskdino_lrp.data.shapes import generate_sample

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img_{i}.png"
        Image.fromarray(generate_sample(seed, i).image).save(path)
        paths.append(path)
    return paths


def _coco(path: Path, file_names: list[str], first_id: int = 500) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [{"id": first_id + 7 * i, "file_name": f, "width": 160, "height": 160} for i, f in enumerate(file_names)]
    path.write_text(json.dumps({"images": images, "annotations": [], "categories": []}))
    return path


def _runner(out: Path, **kw) -> BatchExplainer:
    return BatchExplainer("demo", out, checkpoint=shipped_weights("demo"), queries="topk:2", formats=("csv", "npz"),
                          progress=False, **kw)


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def coco_run(tmp_path_factory):
    """Three images in the COCO layout (annotations/instances_val.json → val/), explained in one process."""
    root = tmp_path_factory.mktemp("coco")
    _shapes(root / "val", 3)
    ann = _coco(root / "annotations" / "instances_val.json", ["img_2.png", "img_0.png", "img_1.png"])
    out = root / "out"
    counts = _runner(out).run_all([ann])
    assert counts["done"] == 3 and counts["failed"] == 0, counts
    return ann, out


def test_coco_annotation_file_keeps_image_ids(coco_run):
    ann, out = coco_run
    ids = dict(coco_images(ann))
    assert ids == {"img_2.png": 500, "img_0.png": 507, "img_1.png": 514}
    manifest = json.loads((out / "manifest.json").read_text())
    assert {k: r["image_id"] for k, r in manifest["images"].items()} == ids
    for name, image_id in ids.items():  # named as the image found in its folder would be
        assert json.loads((out / name / "summary.json").read_text())["image_id"] == image_id
    rows = _read_csv(out / EXPLANATIONS)
    assert {r["source_key"]: int(r["image_id"]) for r in rows} == ids
    assert validate(out).ok, validate(out).table(failed_only=True)


def test_dataset_summary_against_the_raw_arrays(coco_run):
    """Every explanation is one index row; the per-class level shares and layer fractions equal what the
    .npz arrays (per level: its slice of the raw token relevance over the total) and the layer CSVs give."""
    _, out = coco_run
    metas = sorted(out.glob("*/q*_meta.json"))
    rows = _read_csv(out / EXPLANATIONS)
    assert len(rows) == len(metas) == 6
    assert [r["source_key"] for r in rows] == sorted(r["source_key"] for r in rows)
    by_class: dict[str, list[dict]] = {}
    for path in metas:
        meta = json.loads(path.read_text())
        with np.load(path.parent / meta["files"]["npz"]) as arrays:
            raw = {stop: np.asarray(arrays[stop], dtype=np.float64) for stop in ("encoder_input",)}
        layers = {r["stop"]: float(r["sum"]) for r in _read_csv(path.parent / meta["files"]["layers"])}
        shares = {lv["name"]: raw["encoder_input"][lv["start"]:lv["start"] + lv["height"] * lv["width"]].sum()
                  / raw["encoder_input"].sum() for lv in meta["levels"]}
        by_class.setdefault(meta["class"], []).append({"shares": shares, "memory": layers["memory"],
                                                       "target": meta["target_value"]})
        row = next(r for r in rows if r["image"] == path.parent.name and int(r["query"]) == meta["query"])
        assert row["class"] == meta["class"] and float(row["target_value"]) == pytest.approx(meta["target_value"])
    table = {r["class"]: r for r in _read_csv(out / CLASSES)}
    assert set(table) == set(by_class)
    for name, group in by_class.items():
        assert int(table[name]["explanations"]) == len(group)
        for level in group[0]["shares"]:
            expected = np.mean([g["shares"][level] for g in group])
            assert float(table[name][f"share:encoder_input:{level}"]) == pytest.approx(expected, rel=1e-6, abs=1e-8)
        expected = sum(g["memory"] for g in group) / sum(g["target"] for g in group)
        assert float(table[name]["fraction:memory"]) == pytest.approx(expected, rel=1e-6)


def test_path_list_keys_and_resolution(tmp_path):
    images = _shapes(tmp_path / "data" / "imgs", 2)
    other = _shapes(tmp_path / "elsewhere", 1, seed=3)[0]
    listing = tmp_path / "data" / "list.txt"
    listing.write_text(f"# the validation split\nimgs/img_1.png\n\n  imgs/./img_0.png  \n{other}\n")
    assert path_list(listing) == [("imgs/img_1.png", tmp_path / "data" / "imgs" / "img_1.png"),
                                  ("imgs/img_0.png", tmp_path / "data" / "imgs" / "./img_0.png"), ("img_0.png", other)]
    sources, _ = collect_sources([listing])
    assert [(s.key, s.name) for s in sources] == [("imgs/img_1.png", "imgs__img_1.png"),
                                                  ("imgs/img_0.png", "imgs__img_0.png"), ("img_0.png", "img_0.png")]
    assert [s.path.resolve() for s in sources] == [images[1].resolve(), images[0].resolve(), other.resolve()]


def test_text_list_through_the_cli_without_ray(tmp_path):
    """A .txt list through the command line; without --workers Ray is never imported."""
    _shapes(tmp_path / "imgs", 2)
    listing = tmp_path / "list.txt"
    listing.write_text("imgs/img_0.png\nimgs/img_1.png\n")
    out = tmp_path / "out"
    code = (f"import sys; from maskdino_lrp.cli import main; rc = main(['explain', {str(listing)!r}, '--config', "
            f"'demo', '--queries', 'topk:1', '--formats', 'csv', '--no-progress', '--out', {str(out)!r}]); "
            "print('ray imported:', 'ray' in sys.modules); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ray imported: False" in proc.stdout and "2 image(s) explained" in proc.stdout
    assert sorted(json.loads((out / "manifest.json").read_text())["images"]) == ["imgs/img_0.png", "imgs/img_1.png"]
    assert len(_read_csv(out / EXPLANATIONS)) == 2


@pytest.mark.parametrize("case,fragments", [
    ("missing", ["1 of the 2 images", "img_9.png", "--image-root"]),
    ("not_coco", ["not a COCO annotation file", "'images'"]),
    ("no_root", ["are not under", "--image-root DIR"]),
    ("empty_list", ["lists no images"]),
])
def test_bad_data_set_files_are_one_line_errors(tmp_path, capsys, case, fragments):
    _shapes(tmp_path / "val", 1)
    if case == "missing":
        data = _coco(tmp_path / "ann.json", ["img_0.png", "img_9.png"])
        extra = ["--image-root", str(tmp_path / "val")]
    elif case == "not_coco":
        data, extra = tmp_path / "x.json", []
        data.write_text(json.dumps({"annotations": []}))
    elif case == "no_root":
        data, extra = _coco(tmp_path / "sub" / "ann.json", ["img_0.png"]), []
    else:
        data, extra = tmp_path / "list.txt", []
        data.write_text("# nothing yet\n")
    code = main(["explain", str(data), *extra, "--config", "demo", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("maskdino-lrp: error: "), err
    for fragment in fragments:
        assert fragment in err[0], (fragment, err[0])
    assert not (tmp_path / "out").exists()


def test_workers_without_ray_is_one_line_error(tmp_path, capsys, monkeypatch):
    image = _shapes(tmp_path / "imgs", 1)[0]
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: import ray raises ImportError
    code = main(["explain", str(image), "--config", "demo", "--workers", "2", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "need Ray: pip install maskdino-lrp[ray]" in err[0], err
    assert not (tmp_path / "out").exists()


def test_npz_bytes_do_not_depend_on_the_time(monkeypatch):
    """np.savez stamps each member with the current time; the exported .npz does not (same arrays, same
    bytes, any day), and reads back exactly."""
    import time

    from maskdino_lrp.analysis.export import _npz_bytes

    arrays = {"pixels": np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32),
              "detection_mask_rle": np.array("abc"), "channels:memory": np.arange(6, dtype=np.float64)}
    first = _npz_bytes(arrays)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 86400 * 3)
    assert _npz_bytes(arrays) == first
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # the reference: what np.savez writes, read the same way
    with np.load(io.BytesIO(first)) as mine, np.load(io.BytesIO(buf.getvalue())) as ref:
        assert sorted(mine.files) == sorted(ref.files)
        for key in ref.files:
            assert mine[key].dtype == ref[key].dtype
            np.testing.assert_array_equal(mine[key], ref[key])
    assert all(i.date_time == (1980, 1, 1, 0, 0, 0) for i in zipfile.ZipFile(io.BytesIO(first)).infolist())
