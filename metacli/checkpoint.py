"""Checkpoints: written atomically (temp file, then rename) and read back with ``weights_only=True``."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from metacli.errors import CheckpointError

LAST, BEST = "last.pt", "best.pt"


def save_checkpoint(payload: dict, path: Path) -> None:
    """Write ``payload`` so that ``path`` is always either the old or the new complete file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint without unpickling arbitrary objects; a bad file is a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: train first, or point at a run dir that has {path.name}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable metacli checkpoint ({type(exc).__name__}); "
                              "use another run dir or retrain") from exc
    if not isinstance(payload, dict) or "learner" not in payload:
        raise CheckpointError(f"{path} is not a metacli checkpoint (no learner state); use another run dir or retrain")
    return payload
