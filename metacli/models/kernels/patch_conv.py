"""A first convolution and the BatchNorm after it as one matrix product over image patches.

Why: the first convolution of a backbone writes its largest activation (64 x 14 x 14 a 28x28 Omniglot image in
MAML's strided Conv4, 64 x 28 x 28 in the max-pool one), and BatchNorm then reads it twice for its statistics and
once more to normalise it, and its backward reads it again twice. Those passes over memory, not the arithmetic,
were a fifth of a ProtoNet step on the 2-core CPU.

The first convolution sees few input channels (1 for Omniglot, 3 for mini-ImageNet), so each output value is
``w . p + b`` for a patch ``p`` of ``c * 9`` input values. The batch statistics of the output then follow from the
patches' mean ``m`` and their small ``c*9 x c*9`` covariance ``C``: mean ``w . m + b`` and biased variance
``w C w``. The normalisation folds into the weights, and convolution, BatchNorm and ReLU become one product of the
centred patches (with a column of ones for the shift) and the scaled weights, whose result is already channels-last.
Autograd differentiates it to any order, so every inner-loop path and transform can use it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metacli.models.kernels import pooled_product
from metacli.models.batchnorm import take_batch_statistics, uses_batch_statistics


def applies(conv: nn.Module, norm: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`conv_batchnorm` computes ``norm(conv(x))``, and pays: a 3x3 convolution with zero padding 1
    and an affine metacli BatchNorm, on the CPU (where it was measured), outside autocast (whose low-precision
    product would spoil the statistics), with a patch row of at most a quarter of the output's channels. Conv4
    asks it for the native kernel path (:func:`conv_batchnorm_pool_relu`) too.

    The patch matrix is read and written several times, so it must be small next to the activation it saves
    passes over; the width limit was measured on this path. On the 2-core CPU (ProtoNet, meta-batch 32,
    alternating runs): Omniglot's 1 channel into 64 gains (strided Conv4 about 5 %, max-pool Conv4 about 15 % a
    step); mini-ImageNet's 3 channels into 32 (Conv4-32, meta-batch 4) lost 21 %.
    """
    return (isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and norm.affine
            and 4 * (9 * conv.in_channels + 1) <= conv.out_channels
            and conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.dilation == (1, 1)
            and conv.stride[0] == conv.stride[1] and conv.groups == 1 and conv.padding_mode == "zeros"
            and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu"))


def patches(x: torch.Tensor, stride: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """The 3x3 patches (zero padding 1) of a ``[n, c, h, w]`` batch at ``stride``, as ``[n * h' * w', c * 9]`` rows
    in channels-last output order, with ``(n, h', w')``; columns in the order of a flattened conv weight."""
    n, _, h, w = x.shape
    out_h, out_w = (h - 1) // stride + 1, (w - 1) // stride + 1
    padded = F.pad(x, (1, 1, 1, 1))
    taps = [padded[:, :, dy:dy + stride * (out_h - 1) + 1:stride, dx:dx + stride * (out_w - 1) + 1:stride]
            for dy in range(3) for dx in range(3)]
    return torch.stack(taps, dim=-1).permute(0, 2, 3, 1, 4).reshape(n * out_h * out_w, -1), (n, out_h, out_w)


def output_moments(rows: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For patch rows ``[..., rows, k]`` and a flattened conv weight ``[out, k]``: the centred rows, and what
    :func:`conv_moments` gives for the rows' mean and biased covariance."""
    patch_mean = rows.mean(dim=-2, keepdim=True)
    centred = rows - patch_mean
    covariance = centred.transpose(-1, -2) @ centred / rows.shape[-2]
    return (centred, *conv_moments(patch_mean.squeeze(-2), covariance, weight, bias))


def conv_moments(patch_mean: torch.Tensor, covariance: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For patches with mean ``[..., k]`` and biased covariance ``[..., k, k]`` and a flattened conv weight
    ``[out, k]``: the convolution output's mean ``[..., out]`` and biased variance ``[..., out]``, with ``weight @
    covariance`` (``[..., out, k]``, half the variance's gradient in the weight).

    The mean keeps the conv bias, which cancels against itself in training but stays in the graph so that it gets
    its (zero) gradient, as with the native kernels."""
    spread = weight @ covariance
    var = (spread * weight).sum(dim=-1).clamp(min=0)
    centre = patch_mean @ weight.transpose(0, 1)
    return centre if bias is None else centre + bias, var, spread


def _normalisation(centre: torch.Tensor, var: torch.Tensor, count: int,
                   norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and scale ``norm`` normalises a convolution's output with, from the output's batch mean and
    biased variance over ``count`` values a channel, which it records as its mode says."""
    if uses_batch_statistics(norm):
        take_batch_statistics(norm, centre, var, count)
        mean = centre
    else:
        mean, var = norm.running_mean, norm.running_var
    return mean, norm.weight * torch.rsqrt(var + norm.eps)


def conv_batchnorm(x: torch.Tensor, conv: nn.Conv2d, norm: nn.BatchNorm2d, relu: bool) -> torch.Tensor:
    """``norm(conv(x))``, followed by a ReLU if ``relu``, in every BatchNorm mode, as a channels-last batch."""
    rows, (n, h, w) = patches(x, conv.stride[0])
    weight = conv.weight.reshape(conv.out_channels, -1)
    centred, centre, var, _ = output_moments(rows, weight, conv.bias)
    mean, scale = _normalisation(centre, var, rows.shape[0], norm)
    shift = (centre - mean) * scale + norm.bias
    ones = torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)
    out = torch.cat([centred, ones], dim=1) @ torch.cat([weight.transpose(0, 1) * scale, shift[None]])
    if relu:
        # In place here, not on the 4-d view below: an in-place op on a view makes autograd copy its gradient.
        out = out.relu_()
    return out.view(n, h, w, -1).permute(0, 3, 1, 2)


def conv_batchnorm_pool_relu(x: torch.Tensor, conv: nn.Conv2d, norm: nn.BatchNorm2d) -> torch.Tensor:
    """``relu(max_pool2d(norm(conv(x)), 2))`` for a stride-1 ``conv``, by :mod:`metacli.models.kernels.pooled_product`'s
    kernels, where :func:`~metacli.models.kernels.pooled_product.applies` says they can."""
    if conv.stride != (1, 1):
        raise ValueError(f"the pooled-product kernel computes a stride-1 convolution, got stride {conv.stride}")
    padded = pooled_product.padded(x)
    patch_mean, covariance = pooled_product.patch_moments(padded)
    weight = conv.weight.reshape(conv.out_channels, -1)
    centre, var, _ = conv_moments(patch_mean, covariance, weight, conv.bias)
    mean, scale = _normalisation(centre, var, x.shape[0] * x.shape[2] * x.shape[3], norm)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(mean)
    return pooled_product.pooled_product(padded, (weight * scale[:, None]).transpose(0, 1),
                                         (bias - mean) * scale + norm.bias)
