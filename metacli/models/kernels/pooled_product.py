"""The max-pool Conv4's first block (convolution, BatchNorm, 2x2 max-pooling, ReLU) as one native kernel.

Why: the first convolution of the max-pool Conv4 writes a 64x28x28 activation for each 28x28 Omniglot image, four
times the pooled output. Even as :mod:`metacli.models.kernels.patch_conv`'s single product, writing it, pooling it
(with int64 indices) and zero-filling and scattering its gradient took about a third of a ProtoNet episode's time
on one CPU thread, for 2 % of its FLOPs (figures in docs/performance.md). Done window by window in C++, that
activation is never stored, and only a byte per output (which of the four positions went through, or none past the
ReLU) is kept for the backward.

The kernel gets BatchNorm folded into its weights and shift. Its backward (a second kernel) is differentiable in
turn (a third kernel is that one's adjoint), so second-order MAML can take the block; the block kernel and its
backward are C++ autograd functions. BatchNorm's statistics still come from the patches' covariance, as in
:mod:`~metacli.models.kernels.patch_conv`, so every BatchNorm mode is handled as there: a fourth kernel sums the
patches and their outer products in one pass, instead of building the patch matrix and its centred copy.
The kernels let go of the GIL, so task threads run them side by side. They are compiled on first use
(:mod:`metacli.models.kernels.native`); where that fails, Conv4 keeps the patch product.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from metacli.models.kernels.native import NativeKernels

_kernels = NativeKernels(Path(__file__).with_name("pooled_product.cpp"), "the native pooled-product kernel",
                         "first use of the max-pool Conv4 here", "Conv4 uses the patch product")


def available() -> bool:
    """Whether the kernel is built (building it now if it was never tried)."""
    return _kernels.available()


def disabled():
    """Conv4 without the kernel while inside: for ``torch.utils.flop_counter``, which counts the native operators
    but cannot see into the kernel."""
    return _kernels.disabled()


def applies(x: torch.Tensor) -> bool:
    """Whether :func:`pooled_product` can take a batch that :func:`~metacli.models.kernels.patch_conv.applies` to:
    float32 or float64, even sides (2x2 windows tile the map), no gradient wanted for the images, and no ``torch.func``
    transform, which the kernels have no rules for."""
    return (x.dtype in (torch.float32, torch.float64) and x.shape[-1] % 2 == 0 and x.shape[-2] % 2 == 0
            and not x.requires_grad
            and not torch._C._functorch.is_functorch_wrapped_tensor(x) and _kernels.usable())


def padded(x: torch.Tensor) -> torch.Tensor:
    """``x`` zero-padded by one on each side, as the kernels take it."""
    return F.pad(x, (1, 1, 1, 1)).contiguous()


def patch_moments(padded_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean ``[c * 9]`` and biased covariance ``[c * 9, c * 9]`` of the 3x3 patches of a stride-1 convolution
    of ``padded_x``, without a gradient. The sums are taken in float64, where the products of float32 values are
    exact, so the one-pass covariance of float32 images loses nothing to cancellation (float64 images lose what a
    one-pass formula loses in double)."""
    return tuple(_kernels.module().patch_moments(padded_x))


def pooled_product(padded_x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``relu(max_pool2d(conv2d(x, w, padding=1) + shift, 2))`` as a channels-last ``[n, c, h / 2, w / 2]`` batch,
    for ``padded_x = padded(x)`` and ``weight = w.flatten(1).T`` (``[c * 9, filters]``)."""
    return _kernels.module().pooled_product(padded_x, weight, shift).permute(0, 3, 1, 2)
