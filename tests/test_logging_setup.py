"""-v / LOGLEVEL configure this tool's loggers only (no third-party noise); a bad LOGLEVEL is one warning line."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from maskdino_lrp.cli import main
from maskdino_lrp.logsetup import configure, configured, parse_level

CLI = [sys.executable, "-m", "maskdino_lrp.cli"]


def _env(**values: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LOGLEVEL"}
    env.update(values)
    return env


@pytest.mark.parametrize("text,level", [("DEBUG", logging.DEBUG), ("debug", logging.DEBUG), ("Info", logging.INFO),
                                        ("warn", logging.WARNING), ("ERROR", logging.ERROR), ("10", 10),
                                        ("", None), (None, None)])
def test_parse_level_accepts_names_and_numbers(text, level):
    assert parse_level(text) == (level, None)


@pytest.mark.parametrize("text", ["bogus", "verbose", "DEBUG2"])
def test_parse_level_complains_in_one_line(text):
    level, complaint = parse_level(text)
    assert level is None and f"LOGLEVEL={text!r} is not a log level" in complaint and "using WARNING" in complaint


def test_debug_shows_our_messages_not_third_party_ones(capsys):
    root_level = logging.getLogger().level
    with configured(verbose=1):
        logging.getLogger("maskdino_lrp.model.image").debug("our debug line")
        logging.getLogger("matplotlib.font_manager").debug("findfont: scoring noise")
        logging.getLogger("PIL.PngImagePlugin").debug("STREAM b'IHDR' 16 13")
    err = capsys.readouterr().err
    assert "our debug line" in err and "maskdino_lrp.model.image DEBUG" in err
    assert "findfont" not in err and "STREAM" not in err
    assert logging.getLogger().level == root_level  # the root logger is never touched


def test_warnings_read_as_the_tool_and_state_is_restored(capsys):
    logger = logging.getLogger("maskdino_lrp")
    before = (list(logger.handlers), logger.level, logger.propagate)
    with configured():
        logging.getLogger("maskdino_lrp.x").info("not shown at the default level")
        logging.getLogger("maskdino_lrp.x").warning("something to know")
    assert (list(logger.handlers), logger.level, logger.propagate) == before
    err = capsys.readouterr().err
    assert err == "maskdino-lrp: warning: something to know\n"


def test_configure_twice_keeps_one_handler(capsys):
    with configured():
        configure(verbose=1)
        configure()
        logging.getLogger("maskdino_lrp").warning("once")
    assert capsys.readouterr().err.count("once") == 1


def test_bad_loglevel_in_process_is_a_warning(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LOGLEVEL", "bogus")
    assert main(["validate", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "LOGLEVEL='bogus' is not a log level" in err or "maskdino-lrp: error: " in err


def test_bad_loglevel_is_one_warning_line_not_a_traceback(tmp_path):
    proc = subprocess.run([*CLI, "estimate", "--config", "tiny", "--image-size", "160", "--queries", "2",
                           "--gflops", "10"], capture_output=True, text=True, timeout=120, env=_env(LOGLEVEL="bogus"))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("maskdino-lrp: warning: LOGLEVEL='bogus'"), proc.stderr
    proc = subprocess.run([sys.executable, "-c", "import maskdino_lrp"], capture_output=True, text=True, timeout=120,
                          env=_env(LOGLEVEL="bogus"))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [l for l in proc.stderr.strip().splitlines() if "LOGLEVEL" in l]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["-v", "LOGLEVEL=DEBUG"])
def test_verbose_explain_has_no_font_or_png_chunk_noise(tmp_path, how):
    from PIL import Image

    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image)
    args = ["explain", str(image), "--config", "tiny", "--out", str(tmp_path / "o"), "--queries", "topk:1",
            "--stops", "pixels", "--no-progress", "--threads", "1"]
    env = _env(LOGLEVEL="DEBUG") if how.startswith("LOGLEVEL") else _env()
    proc = subprocess.run([*CLI, *(["-v"] if how == "-v" else []), *args], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "maskdino_lrp.analysis.runner DEBUG: memory after" in proc.stderr
    for noise in ("matplotlib", "font_manager", "PngImagePlugin", "STREAM b'", "PIL."):
        assert noise not in proc.stderr, noise
