"""Decode once, then load a uint8 tensor file: the cache behind every real dataset."""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch

from metacli.data.base import ClassImages

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def cache_path(cache_dir: Path, dataset: str, split: str, resolution: int) -> Path:
    return Path(cache_dir) / f"{dataset}-{split}-{resolution}px-v{CACHE_VERSION}.pt"


def cached_split(cache_dir: Path, dataset: str, split: str, resolution: int,
                 build: Callable[[], ClassImages]) -> ClassImages:
    """Load ``dataset/split/resolution`` from the cache, building and saving it atomically when absent or unreadable."""
    path = cache_path(cache_dir, dataset, split, resolution)
    if path.exists():
        try:
            blob = torch.load(path, weights_only=True)
            return ClassImages(images=blob["images"], class_names=list(blob["class_names"]))
        except Exception as exc:  # a half-written or stale cache is rebuilt, never trusted
            log.warning("rebuilding unreadable cache %s (%s)", path, exc)
    data = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.close(fd)
        torch.save({"images": data.images, "class_names": data.class_names}, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        # A read-only cache dir costs a re-decode next time, not a failed run.
        log.warning("could not write cache %s (%s); set METACLI_CACHE to a writable folder", path, exc)
    return data
