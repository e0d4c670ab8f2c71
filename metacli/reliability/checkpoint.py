"""Checkpoints that are atomic, verified, and safe to load.

A checkpoint file is ``torch.save`` of ``{"format", "sha256", "payload"}``: the payload is the serialised state
as a uint8 tensor and ``sha256`` its digest, so a truncated or altered file is detected on load rather than
resumed from. Files are written to a temp file, fsynced, then renamed over the old one, whose previous version is
kept as ``<name>.prev``: a kill at any moment leaves at least one complete, verified checkpoint. Everything is read
with ``weights_only=True``, so loading a checkpoint can never run code.
"""
from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import torch

from metacli.errors import CheckpointError
from metacli.reliability import rng
from metacli.reliability.atomic import replace_file
# The checkpoint names, for callers.
from metacli.reliability.run_dir import BEST, CHECKPOINTS, LAST, previous  # noqa: F401

log = logging.getLogger(__name__)

FORMAT = "metacli-checkpoint-1"
#: What a payload holds, and of which type: a file that differs is refused before any of it is used.
# No optimiser state where the learner has no optimiser (a random policy, MAML-RL's own trust-region step).
PAYLOAD = {"learner": dict, "optimizer": (dict, type(None)), "scheduler": (dict, type(None)), "step": int,
           "best_val": float, "best_step": (int, type(None)), "skipped": int, "rng": dict, "origin": dict}
ORIGIN = {"algo": str, "backbone": (str, type(None)), "dataset": dict, "task": dict}
#: Fields added after the first checkpoints: checked where present.
LATER = {"wall_seconds": (int, float)}


def save_checkpoint(payload: dict, *paths: Path) -> None:
    """Write ``payload`` to each of ``paths`` (serialised once), keeping the version each replaces as
    ``<path>.prev``.

    A failed write (disk full, read-only dir) leaves that path's existing files untouched and raises a one-line
    CheckpointError.
    """
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getbuffer()
    wrapped = io.BytesIO()
    torch.save({"format": FORMAT, "sha256": hashlib.sha256(data).hexdigest(),
                "payload": torch.frombuffer(bytearray(data), dtype=torch.uint8)}, wrapped)
    for path in paths:
        _write_atomically(wrapped.getbuffer(), Path(path))


def _write_atomically(data: memoryview, path: Path) -> None:
    try:
        replace_file(path, data, keep_previous=previous(path))
    except OSError as exc:
        raise CheckpointError(f"could not write the checkpoint {path} ({exc.strerror or exc}); the previous "
                              f"checkpoint is intact: free disk space or fix the permissions of {path.parent}, then "
                              "rerun with trainer.resume=true") from exc


def _unreadable(path: Path, exc: Exception) -> CheckpointError:
    return CheckpointError(f"{path} is not a readable metacli checkpoint ({type(exc).__name__}): it is truncated or "
                           "not a checkpoint; use another run dir or retrain")


def _field_problem(fields: dict, where: dict) -> str | None:
    for key, kind in fields.items():
        if key not in where:
            return f"no {key!r}"
        if isinstance(where[key], bool) or not isinstance(where[key], kind):
            return f"{key!r} is a {type(where[key]).__name__}"
    return None


def _structure_problem(payload: object) -> str | None:
    """What is missing or of the wrong type in a verified payload, or None."""
    if not isinstance(payload, dict):
        return f"a {type(payload).__name__} instead of a dict"
    # Each check runs only once the one before has found its part a dict.
    problem = (_field_problem(PAYLOAD, payload) or _field_problem(ORIGIN, payload["origin"])
               or _field_problem(rng.STATE, payload["rng"]) or _field_problem(rng.NUMPY_STATE, payload["rng"]["numpy"])
               or _field_problem({key: kind for key, kind in LATER.items() if key in payload}, payload))
    if problem is not None:
        return problem
    if len(payload["rng"]["python"]) != 3:
        return "'python' is not a generator state"
    odd = [key for key, value in payload["learner"].items() if not isinstance(value, torch.Tensor)]
    return f"learner entry {odd[0]!r} is not a tensor" if odd else None


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Load and verify one checkpoint; a missing, corrupt, foreign or incomplete file is a one-line
    CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: train first, or point at a run dir that has {path.name}")
    try:
        wrapped = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _unreadable(path, exc) from exc
    if not isinstance(wrapped, dict) or wrapped.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a metacli checkpoint (no {FORMAT} header); use another run dir or "
                              "retrain")
    blob, digest = wrapped.get("payload"), wrapped.get("sha256")
    if not (isinstance(blob, torch.Tensor) and blob.dtype == torch.uint8 and blob.dim() == 1
            and isinstance(digest, str)):
        raise CheckpointError(f"{path} has a {FORMAT} header but no payload and checksum; use "
                              f"{previous(path).name} or another run dir")
    data = blob.numpy().tobytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(f"{path} is corrupt (its checksum does not match); use {previous(path).name} or "
                              "another run dir")
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:
        raise _unreadable(path, exc) from exc
    problem = _structure_problem(payload)
    if problem is not None:
        raise CheckpointError(f"{path} is not a complete metacli checkpoint ({problem}): it was written by an older "
                              "metacli or altered; use another run dir or retrain")
    return payload


def origin(cfg, dataset) -> dict:
    """What a checkpoint was trained on: algorithm, backbone, dataset and task shape (``cfg`` composed for
    ``dataset``)."""
    return {"algo": cfg.algo._target_, "backbone": cfg.backbone._target_ if cfg.get("backbone") else None,
            "dataset": dataset.describe(),
            "task": {key: cfg.task[key] for key in cfg.task}}


def check_origin(state: dict, expected: dict, path: Path, fix: str) -> None:
    """Refuse, in one line naming both sides, a checkpoint trained with another algorithm, backbone or dataset
    than ``expected`` (an :func:`origin`). The task shape may differ: evaluation may change it."""
    for key in ("algo", "backbone", "dataset"):
        if state["origin"][key] != expected[key]:
            raise CheckpointError(f"{path} was trained with {key} {_show(state['origin'][key])}, not "
                                  f"{_show(expected[key])}: {fix}")


def _show(value) -> str:
    return ", ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else str(value)


def load_latest_good(path: Path, map_location: str | torch.device = "cpu") -> dict | None:
    """The newest checkpoint among ``path`` and ``<path>.prev`` that verifies, or None when neither exists.

    Falling back is logged as a warning; when both exist and neither verifies, the first problem is raised.
    """
    path = Path(path)
    candidates = [p for p in (path, previous(path)) if p.is_file()]
    problems = []
    for candidate in candidates:
        try:
            state = load_checkpoint(candidate, map_location)
        except CheckpointError as exc:
            problems.append(exc)
            continue
        if problems:
            log.warning("%s; resuming from the previous good checkpoint %s (step %d)", problems[0], candidate,
                        state["step"])
        return state
    if problems:
        raise problems[0]
    return None
