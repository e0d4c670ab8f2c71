"""Opt-in wall-clock breakdown of a meta-training step by phase, for ``scripts/bench.py``.

Off by default (``phase`` is then a no-op with no device synchronisation); ``timed_phases`` switches it on.
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch

_active: dict[str, float] | None = None
_device: torch.device | None = None
_lock = threading.Lock()  # tasks may be timed from several threads


def _sync() -> None:
    if _device is not None and _device.type == "cuda":
        torch.cuda.synchronize(_device)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Add the time spent inside to ``name`` while :func:`timed_phases` is active."""
    if _active is None:
        yield
        return
    _sync()
    start = time.perf_counter()
    try:
        yield
    finally:
        _sync()
        with _lock:
            _active[name] += time.perf_counter() - start


@contextmanager
def timed_phases(device: torch.device) -> Iterator[dict[str, float]]:
    """Collect seconds per phase (nested phases count in both) into the yielded dict."""
    global _active, _device
    _active, _device = defaultdict(float), device
    try:
        yield _active
    finally:
        _active, _device = None, None


@contextmanager
def parallel_phases() -> Iterator[None]:
    """Phases timed inside concurrent tasks overlap, so their sums are scaled to the region's wall time."""
    if _active is None:
        yield
        return
    before = dict(_active)
    _sync()
    start = time.perf_counter()
    yield
    _sync()
    wall = time.perf_counter() - start
    added = {name: _active[name] - before.get(name, 0.0) for name in _active}
    total = sum(added.values())
    for name, seconds in added.items():
        _active[name] = before.get(name, 0.0) + (seconds * wall / total if total else 0.0)


@contextmanager
def untimed() -> Iterator[None]:
    """No phase is timed inside (a CUDA graph capture may not synchronise the device)."""
    global _active
    saved, _active = _active, None
    try:
        yield
    finally:
        _active = saved
