"""The LSTM meta-learner's update (:meth:`~metacli.algorithms.lstm_meta_learner.LSTMMetaLearner.update`) as one
native kernel, for float32 on the CPU.

Why: each update runs a 20-unit LSTM and two gates over every one of the learner's coordinates (112,261 for the
Conv4 on Omniglot). In PyTorch operations every step of that is a pass over ``[80, n]`` or ``[20, n]`` tensors far
larger than the caches, so the update was bound by memory traffic, not arithmetic (figures in
docs/performance.md). The kernel takes the coordinates in blocks small enough to stay in cache and does all of an
update's arithmetic on a block before the next; its backward recomputes a block's forward instead of storing the
gates. Same maths, float32 rounding aside (``tests/test_lstm_meta_learner.py`` compares values and gradients).
Its backward is not differentiable in turn: the learner never needs second derivatives of its update.

Compiled on first use (:mod:`metacli.models.kernels.native`); where that fails, the learner keeps its PyTorch
operations.
"""
from __future__ import annotations

import platform
from pathlib import Path

import torch

from metacli.models.kernels.native import NativeKernels

# The activations call glibc's vector maths library where there is one (see the source).
_VECTOR_MATHS = ("-lmvec",) if platform.machine() == "x86_64" and platform.libc_ver()[0] == "glibc" else ()
_kernels = NativeKernels(Path(__file__).with_name("coordinate_lstm.cpp"), "the native coordinate-wise LSTM kernel",
                         "first use of the LSTM meta-learner here", "the LSTM meta-learner uses PyTorch operations",
                         extra_ldflags=_VECTOR_MATHS)


def disabled():
    """The PyTorch operations while inside (for the FLOP counter, and to compare the two)."""
    return _kernels.disabled()


def applies(*tensors: torch.Tensor) -> bool:
    """Whether the kernel can take an update of these tensors: float32 on the CPU, no ``torch.func`` transform."""
    return (all(t.dtype == torch.float32 and t.device.type == "cpu"
                and not torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)
            and _kernels.usable())


def update(preprocessed_grad: torch.Tensor, grad: torch.Tensor, cell: torch.Tensor, h: torch.Tensor | None,
           c: torch.Tensor | None, forget: torch.Tensor, input_: torch.Tensor, shared: torch.Tensor,
           weight_in: torch.Tensor, weight_hh: torch.Tensor, forget_weight: torch.Tensor, forget_bias: torch.Tensor,
           input_weight: torch.Tensor, input_bias: torch.Tensor) -> list[torch.Tensor]:
    """``[c_t, h_t, c_t of the first layer, f_t, i_t]``; shapes and meanings as in the learner's ``update``, with
    coordinates last (``preprocessed_grad`` is ``[2, n]``, ``h`` and ``c`` ``[hidden, n]`` or ``None`` at the first
    update, the gates ``[n]``) and the gates' weights flat."""
    empty = cell.new_empty(0)
    tensors = (preprocessed_grad, grad, cell, empty if h is None else h, empty if c is None else c, forget, input_,
               shared, weight_in, weight_hh, forget_weight, forget_bias, input_weight, input_bias)
    return _kernels.module().update(*(t.contiguous() for t in tensors))
