"""Every random number generator a run draws from, captured into a checkpoint and restored from it, so that a
resumed run continues bit-for-bit, on the CPU and on CUDA."""
from __future__ import annotations

import random

import numpy as np
import torch


#: What :func:`capture_rng` returns, by type: a checkpoint's states are checked against it before a resume.
STATE = {"episodes": torch.Tensor, "torch": torch.Tensor, "cuda": list, "python": list, "numpy": dict}
NUMPY_STATE = {"kind": str, "keys": torch.Tensor, "position": int, "has_gauss": int, "gauss": float}


def capture_rng(episodes: torch.Generator) -> dict:
    """The states of Python's, NumPy's and torch's generators (CUDA's too, when present) and of ``episodes``."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {"episodes": episodes.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": list(random.getstate()),
            # Plain types and a tensor, because checkpoints are read with weights_only=True.
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)}}


def restore_rng(state: dict, episodes: torch.Generator) -> None:
    """Restore what :func:`capture_rng` captured. Generator states are CPU byte tensors whatever device they
    describe, but a checkpoint loaded onto the training device (``map_location="cuda"``) brings them there."""
    episodes.set_state(state["episodes"].cpu())
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([cuda.cpu() for cuda in state["cuda"]])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["gauss"]))
