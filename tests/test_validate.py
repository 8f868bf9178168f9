"""validate on broken run folders: each way a run folder can be incomplete or silently wrong fails (exit 1,
one line per problem). One real run of the tiny preset (random weights) is made per module and copied."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from maskdino_lrp.analysis.validate import validate
from maskdino_lrp.cli import main


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """Two images explained by the runner (csv + npz: the cross-checks need both)."""
    from PIL import Image

    from maskdino_lrp.analysis.runner import BatchExplainer, LRPOptions
    from maskdino_lrp.data.shapes import generate_sample

    images = tmp_path_factory.mktemp("images")
    for i in range(2):
        Image.fromarray(generate_sample(3, i).image).save(images / f"img{i}.png")
    out = tmp_path_factory.mktemp("run") / "out"
    runner = BatchExplainer("tiny", out, queries="topk:2", options=LRPOptions(chunk_size=2), formats=("csv", "npz"),
                            progress=False, report=False)
    counts = runner.run_all([images])
    assert counts["done"] == 2
    return out


@pytest.fixture
def run(run_folder, tmp_path) -> Path:
    return Path(shutil.copytree(run_folder, tmp_path / "run"))


def failures(path: Path, **kw) -> list[tuple[str, str, str]]:
    result = validate(path, **kw)
    return [(c.name, c.file, c.message) for c in result.failures]


def assert_fails(path: Path, name: str, fragment: str = "", **kw) -> None:
    failed = failures(path, **kw)
    assert any(n == name and fragment in m for n, _, m in failed), failed


def test_a_good_run_passes(run):
    result = validate(run)
    assert result.ok, result.table(failed_only=True)
    names = {c.name for c in result.checks}
    assert {"token layout", "raw = npz", "raw sum = metadata", "layer sums = npz", "cut pixels = npz", "run finished",
            "no temporary files", "outputs match sources", "one folder per image"} <= names


def _one_image(run: Path) -> Path:
    return sorted(p for p in run.iterdir() if p.is_dir())[0]


def _csv(run: Path, stop: str = "encoder_input") -> Path:
    return sorted(_one_image(run).glob(f"q*_tokens_{stop}.csv"))[0]


# ----------------------------------------------------------------------------- killed / incomplete runs
def test_partial_image_folder_fails(run):
    folder = _one_image(run)
    (folder / "summary.json").unlink()
    failed = failures(run)
    assert any(n == "image folder complete" and "interrupted" in m for n, _, m in failed), failed
    assert any(n == "finished images complete" for n, _, _ in failed), failed


def test_leftover_temp_file_fails(run):
    (_one_image(run) / ".q001_meta.json.abc123.tmp").write_text("{")
    assert_fails(run, "no temporary files", ".q001_meta.json.abc123.tmp")


def test_unfinished_run_fails(run):
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["finished"] = False
    manifest["total"] = 5
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert_fails(run, "run finished", "2 of 5")


def test_deleted_manifest_fails(run):
    (run / "manifest.json").unlink()
    assert_fails(run, "manifest present", "no manifest.json")


def test_manifest_lists_a_missing_folder(run):
    shutil.rmtree(_one_image(run))
    assert_fails(run, "finished images complete", "no folder")


def test_extra_unlisted_folder_fails(run):
    folder = _one_image(run)
    shutil.copytree(folder, run / "stray.png")
    assert_fails(run, "listed in manifest", "stray.png")


def test_two_images_in_one_folder_fail(run):
    manifest = json.loads((run / "manifest.json").read_text())
    records = list(manifest["images"].values())
    records[1]["output"] = records[0]["output"]
    (run / "manifest.json").write_text(json.dumps(manifest))
    failed = failures(run)
    assert any(n == "one folder per image" for n, _, _ in failed), failed
    assert any(n == "outputs match sources" for n, _, _ in failed), failed


def test_queries_differing_from_the_summary_fail(run):
    manifest = json.loads((run / "manifest.json").read_text())
    next(iter(manifest["images"].values()))["queries"] = [0, 1, 2]
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert_fails(run, "queries match summaries", "manifest [0, 1, 2]")


def test_stale_lock_fails(run):
    from maskdino_lrp.analysis.runner import LOCK

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (run / LOCK).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    assert_fails(run, "no run in progress", "killed")


# ----------------------------------------------------------------------------- files that disagree
def test_self_consistent_csv_edit_fails(run):
    """Scale one token's raw value and renormalise the relevance column: the CSV alone still passes."""
    path = _csv(run)
    lines = path.read_text().splitlines()
    rows = [line.split(",") for line in lines[1:]]
    raw = np.array([float(r[4]) for r in rows])
    raw[3] *= 1.5
    rel = raw / raw.sum()
    for r, a, b in zip(rows, rel, raw):
        r[3], r[4] = f"{a:.12g}", f"{b:.9g}"
    path.write_text("\n".join([lines[0]] + [",".join(r) for r in rows]) + "\n")
    assert validate(path).ok  # self-consistent on its own
    failed = failures(run)
    assert any(n == "raw = npz" and "line 5" in m for n, _, m in failed), failed
    assert any(n == "raw sum = metadata" for n, _, _ in failed), failed


def test_swapped_rows_fail(run):
    path = _csv(run, "memory")
    lines = path.read_text().splitlines()
    lines[2], lines[9] = lines[9], lines[2]
    path.write_text("\n".join(lines) + "\n")
    assert validate(path).ok  # sums are unchanged
    assert_fails(run, "token layout", "rows out of place from line 3")


def test_layers_csv_edit_fails(run):
    path = sorted(_one_image(run).glob("q*_layers.csv"))[0]
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("pixels,"):
            parts = line.split(",")
            parts[3] = str(float(parts[3]) * 2 + 1)
            lines[i] = ",".join(parts)
    path.write_text("\n".join(lines) + "\n")
    assert_fails(run, "layer sums = npz", "pixels")


def test_truncated_npz_fails(run):
    path = sorted(_one_image(run).glob("q*_relevance.npz"))[0]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_fails(run, "readable", "truncated")


def test_edited_npz_fails_against_the_metadata(run):
    path = sorted(_one_image(run).glob("q*_relevance.npz"))[0]
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["pixels"] = arrays["pixels"] * 3
    np.savez(path, **arrays)
    assert_fails(run, "cut pixels = npz")


def test_max_residual_checks_the_share_it_names(tmp_path):
    """--max-residual bounds |residual| / max(|target|, |relevance at the cut|), computed from the figures."""
    from test_analysis import make_explanation

    from maskdino_lrp.analysis.export import save_explanation

    save_explanation(make_explanation(k=1, residual=0.3), tmp_path, "x", formats=("csv", "npz"))
    meta = json.loads((tmp_path / "x" / "q003_meta.json").read_text())
    row = meta["conservation"]["pixels"]
    share = abs(row["residual"]) / max(abs(row["target"]), abs(row["total"]))
    assert validate(tmp_path, max_residual=share * 1.01).ok
    assert_fails(tmp_path, "conservation pixels", f"{share:.3g} >", max_residual=share * 0.99)
    row["residual_share"] = 0.0  # a stored figure that disagrees is not trusted
    (tmp_path / "x" / "q003_meta.json").write_text(json.dumps(meta))
    assert_fails(tmp_path, "conservation pixels", max_residual=share * 0.99)


def test_cli_prints_one_line_per_problem(run, capsys):
    (run / "manifest.json").unlink()
    (_one_image(run) / ".x.json.abc.tmp").write_text("")
    assert main(["validate", str(run)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("FAILED") and "2 failed" in out[-1]
    fails = [line for line in out if " FAIL " in line]
    assert len(fails) == 2 and any("manifest" in line for line in fails) and any(".tmp" in line for line in fails)


# ----------------------------------------------------------------------------- a run killed for real
@pytest.mark.slow
def test_killed_run_fails_validation_until_resumed(tmp_path):
    from PIL import Image

    from maskdino_lrp.data.shapes import generate_sample

    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.fromarray(generate_sample(5, i).image).save(images / f"s{i}.png")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "maskdino_lrp.cli", "explain", str(images), "--config", "tiny", "--out", str(out),
           "--queries", "topk:2", "--threads", "1", "--no-progress", "--formats", "csv,npz"]
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    killed = False
    try:
        while child.poll() is None and time.monotonic() < deadline:
            try:
                manifest = json.loads((out / "manifest.json").read_text())
            except (OSError, ValueError):
                manifest = {}
            if any(r.get("status") == "done" for r in manifest.get("images", {}).values()):
                child.send_signal(signal.SIGKILL)
                killed = True
                break
            time.sleep(0.01)
    finally:
        if child.poll() is None and not killed:
            child.kill()
        child.wait(timeout=60)
    if not killed or len(json.loads((out / "manifest.json").read_text())["images"]) == 4:
        pytest.skip("the run finished before it could be killed")
    failed = failures(out)
    assert any(n == "no run in progress" and "killed" in m for n, _, m in failed), failed
    assert any(n == "run finished" for n, _, _ in failed), failed
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "took over the lock" in resumed.stderr
    assert validate(out).ok, validate(out).table(failed_only=True)
