"""Mixed-precision meta-training (``trainer.precision``).

``bf16`` runs every meta-training step under ``torch.autocast`` to bfloat16: convolutions and matrix products in
bfloat16, reductions, losses and BatchNorm statistics in float32, weights, gradients and the optimiser in float32.
bfloat16 keeps float32's exponent range, so no loss scaling is needed. It pays on CPUs with AVX512-BF16 or AMX
and on CUDA GPUs from Ampere on. Validation and the final test stay in float32, so scores compare across
precisions.
"""
from __future__ import annotations

import contextlib

import torch

from metacli.config_schema import PRECISIONS


def training_precision(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context a meta-training step runs in for ``trainer.precision``."""
    if precision not in PRECISIONS:
        raise ValueError(f"trainer.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def current_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """This thread's autocast state on ``device``, to enter again in a worker thread (autocast is per thread)."""
    return torch.autocast(device.type, dtype=torch.get_autocast_dtype(device.type),
                          enabled=torch.is_autocast_enabled(device.type))
