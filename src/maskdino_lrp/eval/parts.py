"""The resumable store of a run: one JSON file per evaluated image, guarded by the run's settings."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_bytes
from .settings import EvalSettings

__all__ = ["PartStore", "write_text"]


def write_text(path: Path, data: str | bytes) -> None:
    """Write atomically (temporary file in the same folder, then rename): readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data.encode() if isinstance(data, str) else data)


class PartStore:
    """One JSON file per evaluated image under ``folder``: a run that dies resumes where it stopped, and
    shards of one run (``--shard i/n``) write side by side. ``settings.json`` there guards against
    mixing runs whose settings differ (the number of images may grow: more images extend a run)."""

    _IGNORED = ("n_images", "batch_size")  # neither changes a number

    def __init__(self, folder: Path, settings: EvalSettings):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        fingerprint = {k: v for k, v in asdict(settings).items() if k not in self._IGNORED}
        fingerprint = json.loads(json.dumps(fingerprint, default=str))
        stamp = folder / "settings.json"
        if stamp.is_file():
            previous = {k: v for k, v in json.loads(stamp.read_text()).items() if k not in self._IGNORED}
            # a setting added in a later version counts with its default where an older run lacks it
            defaults = json.loads(json.dumps(asdict(EvalSettings()), default=str))
            changed = sorted(k for k in set(previous) | set(fingerprint)
                             if previous.get(k, defaults.get(k)) != fingerprint.get(k, defaults.get(k)))
            if changed:
                raise ValueError(f"{folder.parent} holds a run with other settings ({', '.join(changed)} differ); "
                                 "use a new --out folder, or delete it to start over")
        else:
            write_text(stamp, json.dumps(fingerprint, indent=2))

    def _path(self, index: int) -> Path:
        return self.folder / f"image-{index:06d}.json"

    def has(self, index: int) -> bool:
        """Whether image ``index`` is done."""
        return self._path(index).is_file()

    def write(self, index: int, part: dict[str, Any]) -> None:
        """Store image ``index``'s results."""
        write_text(self._path(index), json.dumps(part))

    def read(self, index: int) -> dict[str, Any]:
        """Image ``index``'s results."""
        return json.loads(self._path(index).read_text())
