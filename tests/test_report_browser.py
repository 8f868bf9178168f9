"""``report.html`` in a real browser: headless Chromium loads the report of a small run.

No console errors, every image loaded (``naturalWidth > 0``), the enlarged view opens, and a
screenshot is saved as a CI artifact (``ci-artifacts/report.png`` in the repository root, ignored by
git). Chromium is driven over ``--remote-debugging-pipe`` (the DevTools protocol as NUL-separated JSON
on file descriptors 3 and 4): no websocket, no selenium / playwright, nothing to download.

Skips when Chromium is absent, unless ``CI`` is set: then it fails (``.ci/run`` installs Chromium).
"""
from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "ci-artifacts"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chromium() -> str | None:
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() or shutil.which(explicit) else None
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="module")
def chromium_path() -> str:
    path = find_chromium()
    if path is None:
        reason = ("Chromium not found (looked for " + ", ".join(BROWSERS) + " and $CHROMIUM); "
                  "install it with: apt-get install chromium")
        if _in_ci():
            pytest.fail(reason + " — CI is set, so the report's browser test may not be skipped")
        pytest.skip(reason)
    return path


class DevToolsPipe:
    """A minimal DevTools-protocol client over Chromium's ``--remote-debugging-pipe``."""

    def __init__(self, executable: str, profile: Path, timeout: float = 60.0):
        self.timeout = timeout
        to_chrome_r, self._write = os.pipe()
        self._read, from_chrome_w = os.pipe()
        args = [executable, "--headless=new", "--remote-debugging-pipe", "--disable-gpu", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--disable-dev-shm-usage",
                "--hide-scrollbars", f"--user-data-dir={profile}", "--window-size=1280,900", "about:blank"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to run its sandbox as root (CI containers)

        def child_fds():  # the pipe ends become fds 3 (commands in) and 4 (replies out) in Chromium
            a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, close_fds=False, preexec_fn=child_fds)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply from Chromium")
            ready, _, _ = select.select([self._read], [], [], left)
            if ready:
                chunk = os.read(self._read, 1 << 20)
                if not chunk:
                    err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""
                    raise RuntimeError(f"Chromium closed the pipe: {err[-2000:]}")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._write, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, session: str | None = None) -> dict:
        deadline = time.monotonic() + self.timeout
        for i, event in enumerate(self.events):
            if event.get("method") == method and (session is None or event.get("sessionId") == session):
                return self.events.pop(i)
        while True:
            event = self._message(deadline)
            if event.get("method") == method and (session is None or event.get("sessionId") == session):
                return event
            self.events.append(event)

    def close(self) -> None:
        try:
            os.write(self._write, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._read, self._write):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.proc.stderr:
            self.proc.stderr.close()


def _problems(events: list[dict]) -> list[str]:
    """Console errors, uncaught exceptions and failed loads among the page's events."""
    out = []
    for e in events:
        method, p = e.get("method"), e.get("params", {})
        if method == "Runtime.exceptionThrown":
            out.append("exception: " + json.dumps(p.get("exceptionDetails", {}))[:300])
        elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console.error: " + json.dumps(p.get("args", []))[:300])
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            entry = p["entry"]
            out.append(f"log error ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}")
        elif method == "Network.loadingFailed":
            out.append(f"failed load: {p.get('errorText')}")
    return out


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """A small real run on the command line (tiny preset, two images, one of them too small: a failure)."""
    from PIL import Image

    from maskdino_lrp.data.shapes import ShapesConfig, generate_sample

    root = tmp_path_factory.mktemp("browser")
    images = root / "images"
    images.mkdir()
    sample = generate_sample(5, 0, ShapesConfig(image_size=160))
    Image.fromarray(sample.image).save(images / "shapes one.png")
    Image.fromarray(np.asarray(Image.fromarray(sample.image).resize((200, 130)))).save(images / "wide.png")
    Image.fromarray(sample.image[:20, :20]).save(images / "too small.png")
    out = root / "run"
    cmd = [sys.executable, "-m", "maskdino_lrp.cli", "explain", str(images), "--config", "tiny", "--out", str(out),
           "--queries", "topk:2", "--stops", "pixels,encoder_input,memory", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert (out / "report.html").is_file(), proc.stderr[-2000:]
    return out


def test_report_loads_in_chromium_without_errors(chromium_path, small_run, tmp_path):
    report = small_run / "report.html"
    browser = DevToolsPipe(chromium_path, tmp_path / "profile")
    try:
        page = next(t for t in browser.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        session = browser.send("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Emulation.setDeviceMetricsOverride",
                     {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=session)
        browser.send("Page.navigate", {"url": report.as_uri()}, session=session)
        browser.wait_for("Page.loadEventFired", session=session)
        images = browser.send("Runtime.evaluate", {"returnByValue": True, "expression": """
            Array.from(document.images).map(i => ({src: i.getAttribute('src'), complete: i.complete,
                                                  width: i.naturalWidth, height: i.naturalHeight}))
        """}, session=session)["result"]["value"]
        layout = browser.send("Runtime.evaluate", {"returnByValue": True, "expression": """
            ({width: Math.max(document.documentElement.scrollWidth, 1280),
              height: Math.min(document.documentElement.scrollHeight, 8000),
              text: document.body.innerText})
        """}, session=session)["result"]["value"]
        ARTIFACTS.mkdir(exist_ok=True)
        shot = browser.send("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": layout["width"], "height": layout["height"], "scale": 1}},
            session=session)
        (ARTIFACTS / "report.png").write_bytes(base64.b64decode(shot["data"]))
        # the enlarged view: following a thumbnail's link shows its overlay
        browser.send("Runtime.evaluate", {"expression": "document.querySelector('.thumb a').click()"}, session=session)
        shown = browser.send("Runtime.evaluate", {"returnByValue": True, "expression": """
            (() => { const v = document.querySelector(location.hash);
                     return v ? getComputedStyle(v).display : 'no ' + location.hash; })()
        """}, session=session)["result"]["value"]
        shot = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)
        (ARTIFACTS / "report-enlarged.png").write_bytes(base64.b64decode(shot["data"]))
        time.sleep(0.2)
        browser.send("Runtime.evaluate", {"expression": "1"}, session=session)  # drain late events
        problems = _problems(browser.events)
    finally:
        browser.close()
    assert not problems, "\n".join(problems)
    assert len(images) >= 4, images  # two explained images × two queries
    broken = [i for i in images if not (i["complete"] and i["width"] > 0 and i["height"] > 0)]
    assert not broken, f"images that did not load: {broken}"
    assert shown == "flex", shown
    text = layout["text"]
    assert "Conservation" in text and "too small.png" in text  # the legend, and the failed image (its source)
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000
