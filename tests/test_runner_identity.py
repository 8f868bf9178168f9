"""The runner's bookkeeping: output names stable per source, the manifest keyed by source, changed files
redone, version-1 manifests taken over, skipped files reported, and one run per folder (real subprocesses).

Most tests replace the LRP by a stub that writes a summary (the bookkeeping is what is tested); the
end-to-end ones run the tiny preset through the command line."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from maskdino_lrp.analysis import runner as runner_mod
from maskdino_lrp.analysis.export import atomic_write_json
from maskdino_lrp.analysis.runner import (LOCK, BatchExplainer, ImageResult, RunError, RunLock, collect_sources,
                                          iter_images, output_name)
from maskdino_lrp.analysis.validate import validate

CLI = [sys.executable, "-m", "maskdino_lrp.cli"]


def png(path: Path, seed: int = 0, size: int = 64) -> Path:
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


class StubRunner(BatchExplainer):
    """A BatchExplainer whose 'explanation' is a summary naming the source (and its bytes' first value)."""

    explained: list[str]

    def explain_image(self, name, path, key=None):
        self.explained.append(str(path))
        folder = self.out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        summary = {"image": name, "source": str(path), "source_key": key, "files": [], "queries": [{"query": 0}],
                   "bytes": Path(path).stat().st_size}
        atomic_write_json(folder / "summary.json", summary)
        return ImageResult(name, str(path), "done", [0], 0.0, summary=summary, key=key)


def stub(out: Path) -> StubRunner:
    r = StubRunner("tiny", out, queries="topk:1", formats=("csv",), progress=False, report=False)
    r.explained = []
    return r


def outcome(r: StubRunner, inputs) -> dict[str, tuple[str, str]]:
    """{source path: (status, output name)}"""
    return {Path(x.source).name: (x.status, x.name) for x in r.run(inputs)}


# ----------------------------------------------------------------------------- names
def test_output_names_are_readable_and_unambiguous():
    assert output_name("a_b.png") == "a_b.png"
    assert output_name("sub/b.png") == "sub__b.png"
    assert output_name("中文 图片.png").startswith("中文_图片-") and output_name("中文.png") == "中文.png"
    assert output_name("Ünïcödé.jpg") == "Ünïcödé.jpg"
    spaced = output_name("a b.png")
    assert spaced.startswith("a_b-") and spaced.endswith(".png") and spaced != "a_b.png"
    # keys that would flatten to the same name: at most one keeps the readable form
    for keys in (["sub/a.png", "sub__a.png"], ["x_/b.png", "x/_b.png"], ["a b.png", "a_b.png", "a?b.png"]):
        names = [output_name(k) for k in keys]
        assert len(set(names)) == len(names), names
    long = "é" * 300 + ".png"
    assert len(output_name(long).encode()) <= 150 and output_name(long) == output_name(long)
    assert output_name("a_b.png", hashed=True) != "a_b.png"


def test_names_do_not_depend_on_other_files(tmp_path):
    png(tmp_path / "a_b.png")
    before = dict(iter_images([tmp_path]))
    png(tmp_path / "a b.png", 1)  # sorts first
    png(tmp_path / "0.png", 2)
    after = {name: path for name, path in iter_images([tmp_path])}
    for name, path in before.items():
        assert after[name] == path


def test_gif_and_other_pil_formats_are_found_and_the_rest_reported(tmp_path, caplog):
    from PIL import Image

    png(tmp_path / "a.png")
    Image.new("P", (40, 40)).save(tmp_path / "anim.gif")
    Image.new("RGB", (40, 40)).save(tmp_path / "b.ppm")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "data.json").write_text("{}")
    with caplog.at_level(logging.DEBUG, logger="maskdino_lrp"):
        sources, skipped = collect_sources([tmp_path])
        runner_mod.report_skipped(skipped)
    assert [s.key for s in sources] == ["a.png", "anim.gif", "b.ppm"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 2 file(s)" in warnings[0]
    debug = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)
    assert "notes.txt" in debug and "data.json" in debug


def test_the_same_key_from_two_inputs_is_refused(tmp_path):
    png(tmp_path / "x" / "a.png")
    png(tmp_path / "y" / "a.png", 1)
    with pytest.raises(RunError, match="would share the output of 'a.png'.*common folder"):
        collect_sources([tmp_path / "x", tmp_path / "y"])
    sources, _ = collect_sources([tmp_path])  # their common folder: distinct keys
    assert [s.key for s in sources] == ["x/a.png", "y/a.png"]
    sources, _ = collect_sources([tmp_path / "x", tmp_path / "x" / "a.png"])  # the same file twice: once
    assert len(sources) == 1


# ----------------------------------------------------------------------------- resuming
def test_a_new_file_sorting_first_does_not_take_a_finished_name(tmp_path):
    """The bug: 'a b.png' added later sorted before 'a_b.png', inherited its name and was reported done."""
    images, out = tmp_path / "images", tmp_path / "out"
    png(images / "a_b.png")
    png(images / "中文.png", 1)
    first = outcome(stub(out), [images])
    assert first == {"a_b.png": ("done", "a_b.png"), "中文.png": ("done", "中文.png")}
    png(images / "a b.png", 2)
    png(images / "日本.png", 3)
    r = stub(out)
    second = outcome(r, [images])
    assert second["a_b.png"] == ("skipped", "a_b.png") and second["中文.png"] == ("skipped", "中文.png")
    assert second["a b.png"][0] == "done" and second["a b.png"][1].startswith("a_b-")
    assert second["日本.png"] == ("done", "日本.png")
    assert sorted(Path(p).name for p in r.explained) == ["a b.png", "日本.png"]  # nothing explained twice
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["version"] == 2 and manifest["finished"] is True and manifest["total"] == 4
    assert sorted(manifest["images"]) == ["a b.png", "a_b.png", "中文.png", "日本.png"]
    for key, rec in manifest["images"].items():
        summary = json.loads((out / rec["output"] / "summary.json").read_text())
        assert summary["source_key"] == key and {"size", "mtime_ns", "sha1"} <= set(rec)


def test_a_changed_file_is_explained_again(tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    png(images / "a.png")
    png(images / "b.png", 1)
    outcome(stub(out), [images])
    os.utime(images / "a.png", ns=(1, 1))  # touched, same bytes: still done
    png(images / "b.png", 7, size=80)  # new content
    r = stub(out)
    again = outcome(r, [images])
    assert again == {"a.png": ("skipped", "a.png"), "b.png": ("done", "b.png")}
    summary = json.loads((out / "b.png" / "summary.json").read_text())
    assert summary["bytes"] == (images / "b.png").stat().st_size


def test_an_output_folder_of_another_source_is_never_reused(tmp_path):
    """A folder whose summary names another source (say, a case-insensitive twin) keeps its files."""
    images, out = tmp_path / "images", tmp_path / "out"
    png(images / "a.png")
    folder = out / "a.png"
    folder.mkdir(parents=True)
    atomic_write_json(folder / "summary.json", {"source_key": "A.png", "source": "elsewhere/A.png"})
    result = outcome(stub(out), [images])
    assert result["a.png"][1] == output_name("a.png", hashed=True)
    assert json.loads((folder / "summary.json").read_text())["source_key"] == "A.png"


def test_version1_manifest_is_taken_over_by_source(tmp_path, monkeypatch):
    """A folder written by the old runner: outputs named by position ('png' for '中文.png')."""
    monkeypatch.chdir(tmp_path)
    images, out = Path("images"), Path("out")
    png(images / "a_b.png")
    png(images / "中文.png", 1)
    r = stub(out)
    settings = r.settings
    old = {"a_b.png": "images/a_b.png", "png": "images/中文.png"}
    for name, source in old.items():
        (out / name).mkdir(parents=True)
        atomic_write_json(out / name / "summary.json", {"image": name, "source": source, "files": []})
    atomic_write_json(out / "manifest.json", {"version": 1, "settings": settings, "images": {
        name: {"status": "done", "source": source, "output": name, "queries": [0]} for name, source in old.items()}})
    png(images / "a b.png", 2)
    result = outcome(r, [images])
    assert result["a_b.png"] == ("skipped", "a_b.png") and result["中文.png"] == ("skipped", "png")
    assert result["a b.png"][0] == "done" and result["a b.png"][1] != "a_b.png"
    assert [Path(p).name for p in r.explained] == ["a b.png"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["version"] == 2 and manifest["images"]["中文.png"]["output"] == "png"
    assert not manifest.get("legacy")
    assert outcome(stub(out), [images]) == {k: ("skipped", v[1]) for k, v in result.items()}


def test_newer_manifest_is_refused(tmp_path):
    r = stub(tmp_path / "out")
    (tmp_path / "out").mkdir()
    atomic_write_json(tmp_path / "out" / "manifest.json", {"version": 99, "settings": r.settings, "images": {}})
    with pytest.raises(RunError, match="manifest version 99"):
        r.load_manifest()


def test_progress_inside_an_image(tmp_path, caplog):
    """The forward and every backward pass are reported (log lines; the bar uses the same calls)."""
    from maskdino_lrp.analysis.runner import LRPOptions

    r = BatchExplainer("tiny", tmp_path / "out", queries="0,1,2", options=LRPOptions(chunk_size=1), formats=("csv",),
                       progress=False, report=False)
    with caplog.at_level(logging.DEBUG, logger="maskdino_lrp.analysis.runner"):
        results = list(r.run([png(tmp_path / "a.png", size=96)]))
    assert [x.status for x in results] == ["done"]
    messages = [rec.getMessage() for rec in caplog.records]
    assert any("a.png: LRP forward" in m for m in messages)
    assert any("backward for 3 target(s) in 3 pass(es)" in m for m in messages)
    passes = [m for m in messages if "backward pass" in m]
    assert [m.split("backward pass ")[1].split(" ")[0] for m in passes] == ["1/3", "2/3", "3/3"]


# ----------------------------------------------------------------------------- the lock
_HOLD = r"""
import sys, time
from maskdino_lrp.analysis.runner import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _holder(folder: Path) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.parametrize("use_flock", [True, False])
def test_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path, monkeypatch, use_flock):
    monkeypatch.setattr(RunLock, "use_flock", use_flock)
    out = tmp_path / "out"
    holder = _holder(out)
    try:
        owner = json.loads((out / LOCK).read_text())
        assert owner["pid"] == holder.pid and owner["host"] == socket.gethostname()
        with pytest.raises(RunError, match=f"in use by another run \\(pid {holder.pid} on "):
            RunLock(out).acquire()
        with pytest.raises(RunError, match="in use by another run"):
            list(stub(out).run([png(tmp_path / "a.png")]))
        assert not (out / "manifest.json").exists()  # refused before anything was written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / LOCK).exists()  # a killed owner leaves its file
    lock = RunLock(out).acquire()
    try:
        assert lock.taken_over["pid"] == holder.pid
        assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not (out / LOCK).exists()


def _explain(images: Path, out: Path, *extra: str) -> list[str]:
    return [*CLI, "explain", str(images), "--config", "tiny", "--out", str(out), "--queries", "topk:1",
            "--threads", "1", "--no-progress", "--formats", "csv", *extra]


@pytest.mark.slow
def test_two_runs_into_one_folder(tmp_path):
    """Two runs started together into one folder: one explains every image, the other refuses in one line
    naming the owner; the manifest lists every image once (before the lock: 6 of 11 were listed)."""
    images, out = tmp_path / "images", tmp_path / "out"
    from PIL import Image

    from maskdino_lrp.data.shapes import generate_sample

    images.mkdir()
    n = 16
    for i in range(n):
        Image.fromarray(generate_sample(11, i).image).save(images / f"img {i}.png")
    procs = [subprocess.Popen(_explain(images, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.pid, p.returncode, *p.communicate(timeout=600)) for p in procs]
    results = [(pid, p.returncode, o, e) for (pid, _, o, e), p in zip(results, procs)]
    winners = [r for r in results if r[1] == 0]
    losers = [r for r in results if r[1] != 0]
    assert len(winners) == 1 and len(losers) == 1, [(r[1], r[3][-500:]) for r in results]
    pid, code, stdout, stderr = losers[0]
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("maskdino-lrp: error: ") and "in use by another run" in lines[-1], stderr
    assert f"pid {winners[0][0]}" in lines[-1] and "Traceback" not in stderr
    assert f"{n} image(s) explained" in winners[0][2]
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["images"]) == n and all(r["status"] == "done" for r in manifest["images"].values())
    assert not (out / LOCK).exists()
    assert validate(out).ok, validate(out).table(failed_only=True)
