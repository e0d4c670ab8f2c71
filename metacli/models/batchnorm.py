"""BatchNorm written in plain tensor ops, so that every meta-learning path differentiates it the same way.

``torch.func.vmap`` of the native batch-norm kernel's double backward gives a wrong second-order MAML gradient (a
non-zero gradient for a conv bias that the normalisation removes; measured in float64 against the serial loop).
Spelling the normalisation out in ops that have exact batching rules makes the serial and vectorised paths agree.
"""
from __future__ import annotations

import torch
from torch import nn


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with the same parameters, buffers and modes, computed with elementary ops.

    Batch statistics are used in training mode, or whenever ``track_running_stats`` is off (transductive
    evaluation, vectorised inner loops); running averages are updated only in training mode while tracking.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_batch = self.training or not self.track_running_stats
        if use_batch:
            mean = x.mean(dim=(0, 2, 3))
            var = x.var(dim=(0, 2, 3), unbiased=False)
            if self.training and self.track_running_stats:
                with torch.no_grad():
                    n = x.numel() / x.shape[1]
                    self.num_batches_tracked.add_(1)
                    momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                    self.running_mean.lerp_(mean.detach(), momentum)
                    self.running_var.lerp_(var.detach() * n / max(n - 1, 1), momentum)
        else:
            mean, var = self.running_mean, self.running_var
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            shift = self.bias - mean * scale * self.weight
            scale = scale * self.weight
        else:
            shift = -mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]
