"""The maskdino-lrp command line: help, error paths (one line, exit 2, no traceback), and end to end on
the tiny preset (random weights): explain → validate, and a run killed mid-way then resumed."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from maskdino_lrp.cli import main

CLI = [sys.executable, "-m", "maskdino_lrp.cli"]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Four generated shapes images (160×160) in a folder."""
    from PIL import Image

    from maskdino_lrp.data.shapes import generate_sample

    folder = tmp_path_factory.mktemp("images")
    for i in range(4):
        Image.fromarray(generate_sample(7, i).image).save(folder / f"shapes_{i}.png")
    return folder


def assert_one_line_error(capsys, code: int, *fragments: str) -> str:
    assert code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("maskdino-lrp: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- help
@pytest.mark.parametrize("command,expected", [
    ([], ["explain", "validate", "estimate", "bench", "demo", "--verbose"]),
    (["explain"], ["IMAGES", "--config", "--checkpoint", "--queries", "topk:N", "thr:0.5", "--target", "--stops",
                   "--composite", "--chunk-size", "--out", "resumes"]),
    (["validate"], ["PATH", "--tolerance", "--max-residual"]),
    (["estimate"], ["--config", "--image-size", "--queries", "--memory-budget"]),
    (["demo"], ["--out"]),
])
def test_help(command, expected, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for word in expected:
        assert word in out, word


def test_bench_help_is_the_benchmarks(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    assert "maskdino-lrp bench" in capsys.readouterr().out


@pytest.mark.parametrize("module,argv", [("bench", ["bench"]), ("demo", ["demo", "--out", "x"])])
def test_missing_optional_commands_fail_clearly(module, argv, monkeypatch, capsys):
    import importlib

    real = importlib.import_module

    def fake(name, *a, **kw):
        if name == f"maskdino_lrp.{module}":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *a, **kw)

    monkeypatch.setattr(importlib, "import_module", fake)
    assert_one_line_error(capsys, main(argv), "not available", f"maskdino_lrp.{module}")


# ----------------------------------------------------------------------------- error paths
def test_error_unreadable_image(tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert_one_line_error(capsys, main(["explain", str(bad), "--config", "tiny", "--out", str(tmp_path / "o")]),
                          "cannot read image", "bad.png")


def test_error_missing_image_and_empty_folder(tmp_path, capsys):
    assert_one_line_error(capsys, main(["explain", str(tmp_path / "nope.png"), "--config", "tiny", "--out",
                                        str(tmp_path / "o")]), "image file not found")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    assert_one_line_error(capsys, main(["explain", str(tmp_path / "empty"), "--config", "tiny", "--out",
                                        str(tmp_path / "o")]), "no images found in folder")


def test_error_missing_checkpoint(images, tmp_path, capsys):
    assert_one_line_error(capsys, main(["explain", str(images), "--config", "tiny", "--checkpoint",
                                        str(tmp_path / "model.pth"), "--out", str(tmp_path / "o")]),
                          "checkpoint not found")


def test_error_unwritable_output(images, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_one_line_error(capsys, main(["explain", str(images), "--config", "tiny", "--out", str(blocker / "out")]),
                          "not writable")


@pytest.mark.parametrize("option,value,fragment", [
    ("--queries", "top5", "does not parse"),
    ("--queries", "thr:2", "threshold"),
    ("--config", "no_such_preset", "neither a file nor a preset"),
    ("--target", "colour", "unknown target"),
    ("--stops", "pixels,nowhere", "unknown stop 'nowhere'"),
    ("--composite", "magic", "unknown composite"),
    ("--formats", "csv,gif", "unknown output format 'gif'"),
    ("--chunk-size", "0", "positive integer"),
])
def test_error_bad_options(images, tmp_path, capsys, option, value, fragment):
    argv = ["explain", str(images), "--config", "tiny", "--out", str(tmp_path / "o"), option, value]
    assert_one_line_error(capsys, main(argv), fragment)
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_error_bad_config_file(images, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("MODEL:\n  MaskDINO:\n    DEC_LAYRS: 3\n")
    assert_one_line_error(capsys, main(["explain", str(images), "--config", str(cfg), "--out", str(tmp_path / "o")]),
                          "unknown config key", "DEC_LAYERS")


def test_error_usage(capsys):
    assert_one_line_error(capsys, main(["explain", "x.png", "--config", "tiny"]), "--out")
    assert_one_line_error(capsys, main(["frobnicate"]), "invalid choice")
    assert_one_line_error(capsys, main(["estimate", "--config", "tiny", "--image-size", "big", "--queries", "3"]),
                          "--image-size")


def test_verbose_shows_the_traceback(tmp_path, capsys):
    code = main(["-v", "explain", str(tmp_path / "nope.png"), "--config", "tiny", "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("maskdino-lrp: error: ")


def test_console_error_is_one_line_without_traceback(tmp_path):
    proc = run_cli("explain", str(tmp_path), "--config", "no_such_preset", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("maskdino-lrp: error: ") and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- estimate / validate
def test_estimate_command(capsys):
    assert main(["estimate", "--config", "tiny", "--image-size", "160", "--queries", "5", "--memory-budget", "2",
                 "--gflops", "10"]) == 0
    out = capsys.readouterr().out
    assert "encoder tokens    336" in out and "recommended chunk size 5" in out
    assert main(["estimate", "--config", "tiny", "--image-size", "320x160", "--queries", "2", "--json",
                 "--gflops", "10"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["shapes"]["input_size"] == [64, 128]  # MAX_SIZE_TEST 128 caps the long side and data["total_bytes"] > 0
    assert_one_line_error(capsys, main(["estimate", "--config", "nope", "--image-size", "160", "--queries", "5"]),
                          "neither a file nor a preset")


def test_validate_command_errors(tmp_path, capsys):
    assert_one_line_error(capsys, main(["validate", str(tmp_path / "missing")]), "does not exist")
    bad = tmp_path / "x_tokens_memory.csv"
    bad.write_text("level,y,x,relevance,raw\nstride8,0,0,0.5,1\nstride8,0,1,0.25,1\n")
    assert main(["validate", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "relevance sums to 0.75" in out and "x_tokens_memory.csv" in out


# ----------------------------------------------------------------------------- end to end (tiny, random weights)
def explain_cmd(inputs: list[Path], out: Path, *extra: str) -> list[str]:
    return ["explain", *map(str, inputs), "--config", "tiny", "--out", str(out), "--queries", "topk:2",
            "--threads", "1", "--no-progress", *extra]


@pytest.mark.slow
def test_explain_two_images_then_validate(images, tmp_path, capsys):
    out = tmp_path / "run"
    proc = run_cli(*explain_cmd([images / "shapes_0.png", images / "shapes_1.png"], out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 image(s) explained (4 queries)" in proc.stdout
    for name in ("shapes_0.png", "shapes_1.png"):
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["num_queries"] == 2 and summary["target"] == "class"
        assert all((out / name / f).is_file() for f in summary["files"]) and "image.png" in summary["files"]
    assert main(["validate", str(out)]) == 0
    assert "OK:" in capsys.readouterr().out
    from test_analysis import check_report

    check_report(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["images"]) == ["shapes_0.png", "shapes_1.png"]
    assert manifest["settings"]["stops"] == ["pixels", "encoder_input", "memory"]  # without --stops: MaskDINO's


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_outputs(images, tmp_path):
    reference = tmp_path / "reference"
    proc = run_cli(*explain_cmd([images], reference))
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "killed"
    child = subprocess.Popen([*CLI, *explain_cmd([images], out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done_at_kill = None
    deadline = time.monotonic() + 240
    try:
        while child.poll() is None and time.monotonic() < deadline:
            try:
                manifest = json.loads((out / "manifest.json").read_text())
            except (OSError, ValueError):
                manifest = {}
            done = [n for n, r in manifest.get("images", {}).items() if r.get("status") == "done"]
            if done:
                child.send_signal(signal.SIGKILL)
                done_at_kill = len(done)
                break
            time.sleep(0.01)
    finally:
        if child.poll() is None and done_at_kill is None:
            child.kill()
        child.wait(timeout=60)
        child.stderr.close()
    assert done_at_kill is not None, "the run never finished an image"
    assert child.returncode == -signal.SIGKILL
    if done_at_kill == 4:
        pytest.skip("the run finished all images before it could be killed")
    assert not (out / "report.html").exists()

    resumed = run_cli(*explain_cmd([images], out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{4 - done_at_kill} image(s) explained" in resumed.stdout
    assert f"{done_at_kill} already done" in resumed.stdout

    assert _files(out) == _files(reference)
    assert not [f for f in _files(out) if f.endswith(".tmp")]
    csvs = sorted(f for f in _files(reference) if f.endswith(".csv"))
    # images × queries × (tokens encoder_input, tokens memory, layers), and the data-set summary's two tables
    assert len([f for f in csvs if "/" in f]) == 4 * 2 * 3 and len(csvs) == 4 * 2 * 3 + 2
    for name in csvs:
        assert (out / name).read_text() == (reference / name).read_text(), name
    for name in sorted(f for f in _files(reference) if f.endswith(".npz")):
        with np.load(out / name) as a, np.load(reference / name) as b:
            assert sorted(a.files) == sorted(b.files)
            for key in a.files:
                np.testing.assert_array_equal(a[key], b[key])
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(r["status"] == "done" for r in manifest["images"].values()) and len(manifest["images"]) == 4
    assert main(["validate", str(out)]) == 0
