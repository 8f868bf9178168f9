"""Data sets given as files: a COCO annotation file or a text file of image paths.

- A ``.json`` file is read as a COCO annotation file: the images of its ``images`` list, in that order,
  each keyed by its ``file_name`` (so outputs are named as they would be for that image found in the
  image folder) and carrying its ``id`` into its summary and manifest record. The images are looked up
  under ``image_root`` if given, else beside the file, else in the COCO layout
  ``annotations/instances_val2017.json`` → ``val2017/``.
- A ``.txt`` / ``.lst`` file lists one image path per line (blank lines and ``#`` comments ignored); a
  relative path is relative to the list file's folder and is the image's key, an absolute one is keyed
  by its file name (like an image given by name).
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from .runner import RunError, Source

COCO_SUFFIXES = (".json",)
LIST_SUFFIXES = (".txt", ".lst")

__all__ = ["is_list_file", "list_file_sources", "check_list_file", "coco_images", "path_list"]


def is_list_file(path: Path) -> bool:
    """Whether ``path`` names a data-set file (COCO ``.json`` or a ``.txt`` / ``.lst`` path list), not an image."""
    return path.suffix.lower() in COCO_SUFFIXES + LIST_SUFFIXES and not path.is_dir()


def _stamp(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_mtime_ns, st.st_size


@lru_cache(maxsize=8)
def _coco_entries(stamp: tuple[str, int, int]) -> tuple[tuple[str, int | str], ...]:
    path = Path(stamp[0])
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot read the COCO annotation file {path}: {exc}") from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise RunError(f"{path} is not a COCO annotation file (no 'images' list); give images, folders, a COCO "
                       "annotation .json or a .txt list of paths")
    entries = []
    for i, image in enumerate(images):
        if not isinstance(image, dict) or not isinstance(image.get("file_name"), str) or "id" not in image:
            raise RunError(f"{path}: images[{i}] has no 'file_name' and 'id'; every COCO image entry needs both")
        entries.append((Path(image["file_name"]).as_posix(), image["id"]))
    return tuple(entries)


def coco_images(path: str | os.PathLike) -> list[tuple[str, int | str]]:
    """(file_name, id) of every image a COCO annotation file lists, in its order."""
    return list(_coco_entries(_stamp(Path(path))))


def _root_candidates(path: Path, image_root: str | os.PathLike | None) -> list[Path]:
    if image_root is not None:
        return [Path(image_root)]
    split = path.stem
    for prefix in ("instances_", "image_info_", "person_keypoints_", "captions_", "panoptic_"):
        if split.startswith(prefix):
            split = split[len(prefix):]
    return [path.parent, path.parent.parent / split, path.parent / split]


def _coco_root(path: Path, image_root: str | os.PathLike | None, entries) -> Path:
    candidates = _root_candidates(path, image_root)
    if not entries:
        return candidates[0]
    first = entries[0][0]
    for root in candidates:
        if (root / first).is_file():
            return root
    where = " or ".join(str(c) for c in candidates)
    raise RunError(f"the images of {path} are not under {where} (looked for {first}); give their folder with "
                   "--image-root DIR")


def path_list(path: str | os.PathLike) -> list[tuple[str, Path]]:
    """(key, path) of every image a text file lists (see the module docstring)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RunError(f"cannot read the list of images {path}: {exc}") from None
    out = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        item = Path(line)
        if item.is_absolute():
            out.append((item.name, item))
        else:
            out.append((Path(os.path.normpath(line)).as_posix(), path.parent / item))
    return out


def list_file_sources(path: Path, image_root: str | os.PathLike | None = None) -> Iterator[Source]:
    """The images a COCO annotation file or a path list names, as :class:`~.runner.Source` (see above)."""
    if path.suffix.lower() in COCO_SUFFIXES:
        entries = coco_images(path)
        root = _coco_root(path, image_root, entries)
        for file_name, image_id in entries:
            yield Source(file_name, root / file_name, image_id)
    else:
        for key, image in path_list(path):
            yield Source(key, image)


def check_list_file(path: Path, image_root: str | os.PathLike | None = None) -> None:
    """RunError unless the file lists at least one image and every listed image exists."""
    sources = list(list_file_sources(path, image_root))
    if not sources:
        raise RunError(f"{path} lists no images")
    missing = [s.path for s in sources if not s.path.is_file()]
    if missing:
        hint = "; give their folder with --image-root DIR" if path.suffix.lower() in COCO_SUFFIXES else ""
        raise RunError(f"{len(missing)} of the {len(sources)} images {path} lists are missing (first: {missing[0]})"
                       f"{hint}")
