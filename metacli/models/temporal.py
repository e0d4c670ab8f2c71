"""Causal sequence blocks from SNAIL (Mishra, Rohaninejad, Chen & Abbeel, "A Simple Neural Attentive
Meta-Learner", ICLR 2018), usable by any model-based learner that reads an episode as a sequence.

All blocks map ``[batch, time, in_dim]`` to ``[batch, time, out_dim]`` and are causal: the output at step ``t``
depends on the inputs at steps ``<= t`` only. Each one concatenates its new features to its input (as in
DenseNets), so ``out_dim = in_dim + <new features>`` and later blocks see everything earlier ones saw.

- :class:`DenseBlock`: a kernel-2 dilated causal convolution (taps at ``t - dilation`` and ``t``) with the gated
  activation ``tanh(a) * sigmoid(b)`` of WaveNet.
- :class:`TCBlock`: dense blocks with dilations ``1, 2, 4, ...``, just enough of them (``ceil(log2 T)``) for the
  last step to see the whole sequence of length ``T``. The paper's listing starts at dilation 2; starting at 1
  lets every block pair neighbouring steps first and still covers ``T`` with the same number of blocks.
- :class:`AttentionBlock`: single-head causally masked softmax attention, scaled by ``1 / sqrt(key_size)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DenseBlock(nn.Module):
    """Causal dilated convolution (kernel 2) with a gated activation; its ``filters`` outputs join the input."""

    def __init__(self, in_dim: int, dilation: int, filters: int) -> None:
        super().__init__()
        self.dilation = dilation
        # One convolution gives both halves of the gate: filters for tanh, filters for sigmoid.
        self.conv = nn.Conv1d(in_dim, 2 * filters, kernel_size=2, dilation=dilation)
        self.out_dim = in_dim + filters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Padding on the left only: step t's window is (t - dilation, t), zeros before the start.
        padded = F.pad(x.transpose(1, 2), (self.dilation, 0))
        value, gate = self.conv(padded).transpose(1, 2).chunk(2, dim=2)
        return torch.cat([x, torch.tanh(value) * torch.sigmoid(gate)], dim=2)


class TCBlock(nn.Module):
    """``ceil(log2 length)`` dense blocks with dilations ``1, 2, 4, ...``: a receptive field of at least ``length``.

    Longer sequences still run; their last step then sees only the last ``2 ** len(blocks)`` steps.
    """

    def __init__(self, in_dim: int, length: int, filters: int) -> None:
        super().__init__()
        blocks = []
        for i in range(max(1, (length - 1).bit_length())):  # bit_length of length - 1 is ceil(log2 length)
            blocks.append(DenseBlock(in_dim, 2 ** i, filters))
            in_dim = blocks[-1].out_dim
        self.blocks = nn.Sequential(*blocks)
        self.out_dim = in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class AttentionBlock(nn.Module):
    """Causal single-head attention: each step reads ``value_size`` features from the steps up to itself."""

    def __init__(self, in_dim: int, key_size: int, value_size: int) -> None:
        super().__init__()
        self.query = nn.Linear(in_dim, key_size)
        self.key = nn.Linear(in_dim, key_size)
        self.value = nn.Linear(in_dim, value_size)
        self.out_dim = in_dim + value_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # softmax(q k^T / sqrt(key_size)) v, with the future masked out (the default scale is 1/sqrt(key_size)).
        read = F.scaled_dot_product_attention(self.query(x), self.key(x), self.value(x), is_causal=True)
        return torch.cat([x, read], dim=2)
