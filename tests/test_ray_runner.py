"""Explaining on Ray workers (a local Ray, 2 CPUs, 2 workers, the shipped demo model): the same files as a
single-process run, byte for byte; workers killed mid-image lose and duplicate nothing (an image that keeps
killing workers is recorded as failed, and a rerun redoes it); a driver killed mid-run leaves a folder the
same command resumes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from maskdino_lrp.analysis.distributed import explain_on_ray  # noqa: E402
from maskdino_lrp.analysis.runner import BatchExplainer  # noqa: E402
from maskdino_lrp.analysis.validate import validate  # noqa: E402
from maskdino_lrp.distributed import WorkerPool  # noqa: E402
from maskdino_lrp.model.checkpoint import shipped_weights  # noqa: E402

CLI = [sys.executable, "-m", "maskdino_lrp.cli"]
N = 6
QUERIES = "topk:2"
TIMING = ("timing", "meta", "seconds", "updated")  # wall-clock figures: the only fields allowed to differ


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (the runs join it instead of starting their own)."""
    from maskdino_lrp.distributed import ray_session

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with ray_session(num_cpus=2) as session:
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]  # Ray installed its own
        yield session
    # Ray's handlers must not outlive the session (a later SIGTERM would go to a dead Ray driver)
    assert {sig: signal.getsignal(sig) for sig in before} == before


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Six generated images listed in a COCO annotation file, and their single-process explanation."""
    from PIL import Image

    from maskdino_lrp.data.shapes import ShapesConfig, generate_sample

    root = tmp_path_factory.mktemp("ray")
    (root / "images").mkdir()
    for i in range(N):  # 96 px: small enough that Ray's own costs show, not the model's
        Image.fromarray(generate_sample(7, i, ShapesConfig(image_size=96)).image).save(root / "images" / f"img_{i}.png")
    ann = root / "images" / "val.json"
    ann.write_text(json.dumps({"images": [{"id": 900 + i, "file_name": f"img_{i}.png"} for i in range(N)]}))
    reference = root / "reference"
    counts = _runner(reference).run_all([ann])
    assert counts["done"] == N, counts
    return ann, reference


def _runner(out: Path) -> BatchExplainer:
    return BatchExplainer("demo", out, checkpoint=shipped_weights("demo"), queries=QUERIES, progress=False)


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def _without_timing(value):
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


def assert_same_outputs(out: Path, reference: Path, check_ids: bool = True) -> None:
    """Every file of the reference run is there and nothing else; CSVs, arrays and PNGs byte-identical,
    JSON equal but for wall-clock times; the manifest lists each image once, done."""
    assert _files(out) == _files(reference)
    for name in sorted(_files(reference)):
        if name.endswith((".csv", ".npz", ".png")):
            assert (out / name).read_bytes() == (reference / name).read_bytes(), name
        elif name.endswith(".json") and name != "manifest.json":
            assert _without_timing(json.loads((out / name).read_text())) == \
                _without_timing(json.loads((reference / name).read_text())), name
    manifest, ref = (json.loads((f / "manifest.json").read_text())["images"] for f in (out, reference))
    assert sorted(manifest) == sorted(ref) and all(r["status"] == "done" for r in manifest.values())
    assert {k: r["output"] for k, r in manifest.items()} == {k: r["output"] for k, r in ref.items()}
    if check_ids:
        assert {k: r["image_id"] for k, r in manifest.items()} == {f"img_{i}.png": 900 + i for i in range(N)}
    assert validate(out).ok, validate(out).table(failed_only=True)


def test_two_workers_write_what_one_process_writes(local_ray, data):
    ann, reference = data
    out = reference.parent / "two_workers"
    counts = explain_on_ray(_runner(out), [ann], workers=2)
    assert (counts["done"], counts["failed"], counts["queries"]) == (N, 0, 2 * N), counts
    assert_same_outputs(out, reference)
    again = explain_on_ray(_runner(out), [ann], workers=2)  # a rerun of a finished run: nothing to do
    assert (again["done"], again["skipped"]) == (0, N)


def _kill_on(victims: dict[str, set[int]], killed: list[str]):
    """WorkerPool.submit that, on the listed attempts at each victim image, kills its worker a moment after
    it started on it (ray.kill on the actor: the image is half done)."""
    real = WorkerPool.submit
    seen: dict[str, int] = {}

    def submit(self, item, *args):
        real(self, item, *args)
        key = item[0].key
        seen[key] = seen.get(key, 0) + 1
        if seen[key] in victims.get(key, ()):
            slot = next(s for s, it in self._running.values() if it is item)
            time.sleep(0.5)
            ray.kill(self.actors[slot], no_restart=True)
            killed.append(key)

    return submit


def test_killed_workers_lose_and_duplicate_nothing(local_ray, data, monkeypatch):
    ann, reference = data
    out = reference.parent / "killed_workers"
    killed: list[str] = []
    # img_1's worker is killed once: a fresh worker redoes it; img_4's twice: with two attempts allowed it is
    # recorded as failed, with the reason
    monkeypatch.setattr(WorkerPool, "submit", _kill_on({"img_1.png": {1}, "img_4.png": {1, 2}}, killed))
    counts = explain_on_ray(_runner(out), [ann], workers=2, max_attempts=2)
    assert sorted(killed) == ["img_1.png", "img_4.png", "img_4.png"]
    assert (counts["done"], counts["failed"]) == (N - 1, 1), counts
    images = json.loads((out / "manifest.json").read_text())["images"]
    assert len(images) == N and images["img_1.png"]["status"] == "done"
    record = images["img_4.png"]
    assert record["status"] == "failed" and "died 2 time(s)" in record["error"] and record["image_id"] == 904
    assert not (out / "img_4.png").exists()
    # the same command again redoes img_4 alone (one torch thread, as the reference: CPU kernels may round
    # differently with another thread count)
    monkeypatch.undo()
    counts = explain_on_ray(_runner(out), [ann], workers=1, threads=1)
    assert (counts["done"], counts["skipped"], counts["failed"]) == (1, N - 1, 0), counts
    assert_same_outputs(out, reference)


@pytest.mark.slow
def test_killed_driver_resumes(data, tmp_path):
    """The driver (a CLI process) is SIGKILLed once an image is done; the same command finishes the run."""
    ann, reference = data
    out = tmp_path / "out"
    cmd = [*CLI, "explain", str(ann.parent), "--config", "demo", "--queries", QUERIES, "--out", str(out),
           "--workers", "2", "--no-progress"]
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                             start_new_session=True)
    done_at_kill = None
    try:
        deadline = time.monotonic() + 240
        while child.poll() is None and time.monotonic() < deadline:
            try:
                images = json.loads((out / "manifest.json").read_text()).get("images", {})
            except (OSError, ValueError):
                images = {}
            if any(r.get("status") == "done" for r in images.values()):
                child.send_signal(signal.SIGKILL)
                done_at_kill = sum(r.get("status") == "done" for r in images.values())
                break
            time.sleep(0.05)
    finally:
        if child.poll() is None and done_at_kill is None:
            child.kill()
        child.wait(timeout=60)
        try:  # Ray's helper processes outlive a killed driver: end them (they are in its session)
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert done_at_kill is not None, "the run never finished an image"
    if done_at_kill == N:
        pytest.skip("the run finished every image before it could be killed")
    assert not (out / "report.html").exists()
    resumed = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400, start_new_session=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{done_at_kill} already done" in resumed.stdout, resumed.stdout
    # the reference listed the images through the COCO file (ids in its JSON); the folder run has none
    for name in sorted(_files(reference)):
        if name.endswith((".csv", ".npz", ".png")) and not name.startswith("dataset_explanations"):
            assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert _files(out) == _files(reference)
    assert validate(out).ok, validate(out).table(failed_only=True)


def test_evaluate_on_two_workers_fills_the_same_store(local_ray, tmp_path):
    """evaluate(workers=2) writes the parts one process writes (timings aside) into the run's one store,
    resuming it: an image already there is not evaluated again."""
    from maskdino_lrp.eval.run import evaluate

    kwargs = dict(methods=["random", "gradient"], steps=2, progress=False, image_size=96, score_threshold=0.0,
                  iou_threshold=0.0, require_class=False, max_pairs_per_image=1, randomisation=False,
                  max_fraction=0.5, replacements=["blur"], seed=0)
    one = evaluate("demo", None, n_images=3, out_dir=tmp_path / "one", **kwargs)
    out = tmp_path / "ray"
    evaluate("demo", None, n_images=1, out_dir=out, **kwargs)
    first = (out / "parts" / "image-000000.json").read_bytes()
    two = evaluate("demo", None, n_images=3, out_dir=out, workers=2, **kwargs)
    assert (out / "parts" / "image-000000.json").read_bytes() == first  # resumed, not redone
    assert two["n_images_done"] == 3 and two["n_pairs"] == one["n_pairs"] > 0
    cost = ("seconds", "peak_memory_mib")  # measured per run, not results

    def results(value):
        if isinstance(value, dict):
            return {k: results(v) for k, v in value.items() if not k.endswith(cost)}
        return [results(v) for v in value] if isinstance(value, list) else value

    for i in range(3):
        name = f"image-{i:06d}.json"
        mine, ref = (json.loads((f / "parts" / name).read_text()) for f in (out, tmp_path / "one"))
        assert results(mine) == results(ref), name
    table = lambda result: {(m, k): (e.mean, e.n) for m, row in result["table"].items()  # noqa: E731
                            for k, e in row.items() if k not in cost}
    assert table(two) == table(one)


def test_worker_copy_has_no_model_and_asks_for_the_gpu_ray_gives(tmp_path):
    """What workers get: the runner without its model, bars or report; cuda:N becomes cuda (a Ray GPU
    worker sees only the GPU it was given), the driver's runner unchanged."""
    from maskdino_lrp.analysis.distributed import _worker_copy
    from maskdino_lrp.analysis.runner import LRPOptions

    runner = BatchExplainer("tiny", tmp_path, options=LRPOptions(device="cuda:3"), progress=True)
    _ = runner.model
    clone = _worker_copy(runner)
    assert clone._model is None and clone._lrp is None and not clone.progress and not clone.report
    assert clone.options.device == "cuda" and runner.options.device == "cuda:3" and runner._model is not None
    assert clone.settings == runner.settings
    assert _worker_copy(BatchExplainer("tiny", tmp_path)).options.device == "cpu"
