"""Decode once, then load a uint8 tensor file: the cache behind every real dataset.

A cache file carries the shape of its images and a SHA-256 of their bytes and class names, checked on every load:
a file whose bytes were altered, zeroed or cut short is rebuilt from the source with a warning, never trained on.
That catches corruption; it cannot stop someone who may write the cache dir, so the dir is created private to the
user (mode 700).
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable

import torch

from metacli.data.base import ClassImages
from metacli.reliability.atomic import replacing

log = logging.getLogger(__name__)

CACHE_VERSION = 2


def cache_path(cache_dir: Path, dataset: str, split: str, resolution: int) -> Path:
    return Path(cache_dir) / f"{dataset}-{split}-{resolution}px-v{CACHE_VERSION}.pt"


def content_digest(images: torch.Tensor, class_names: list[str]) -> str:
    digest = hashlib.sha256()
    digest.update(repr((tuple(images.shape), str(images.dtype), list(class_names))).encode())
    digest.update(memoryview(images.contiguous().view(-1).numpy()))
    return digest.hexdigest()


def _verified(blob: object) -> ClassImages:
    """The images of a loaded cache file, or ValueError saying why it cannot be trusted."""
    if not isinstance(blob, dict) or not {"images", "class_names", "shape", "sha256"} <= blob.keys():
        raise ValueError("not a metacli cache file")
    images, names = blob["images"], list(blob["class_names"])
    if not isinstance(images, torch.Tensor) or list(images.shape) != list(blob["shape"]):
        raise ValueError(f"its images are not of the recorded shape {blob['shape']}")
    if content_digest(images, names) != blob["sha256"]:
        raise ValueError("its content does not match its digest")
    return ClassImages(images=images, class_names=names)


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) readable and writable by the user alone; an existing dir is kept."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def cached_split(cache_dir: Path, dataset: str, split: str, resolution: int,
                 build: Callable[[], ClassImages]) -> ClassImages:
    """Load ``dataset/split/resolution`` from the cache, building and saving it atomically when absent, unreadable
    or not matching its digest."""
    path = cache_path(cache_dir, dataset, split, resolution)
    if path.exists():
        try:
            return _verified(torch.load(path, weights_only=True))
        except Exception as exc:  # a half-written, damaged or stale cache is rebuilt, never trusted
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.warning("rebuilding the cache %s: %s", path, reason)
    data = build()
    try:
        private_dir(path.parent)
        with replacing(path) as handle:  # streamed: a second copy of a large split in memory could exhaust it
            torch.save({"images": data.images, "class_names": data.class_names, "shape": list(data.images.shape),
                        "sha256": content_digest(data.images, data.class_names)}, handle)
    except (OSError, RuntimeError) as exc:  # torch's writer reports a failed write (a full disk) as RuntimeError
        # A read-only or full cache dir costs a re-decode next time, not a failed run.
        log.warning("could not write cache %s (%s); set METACLI_CACHE to a writable folder", path, exc)
    return data
