"""BatchNorm that every meta-learning path can differentiate, vectorise and keep running statistics for.

Outside ``torch.func`` transforms it is ``nn.BatchNorm2d`` (the fused native kernel is the fastest on the serial
path). Inside :func:`recorded_statistics` it switches to elementary ops, for two reasons:

- ``torch.func.vmap`` of the native kernel's double backward gives a wrong second-order MAML gradient (a non-zero
  gradient for a conv bias that the normalisation removes; measured in float64 against the serial loop), while
  elementary ops have exact batching rules;
- a transform may not update a buffer in place, so the running-statistic updates are handed back as tensors
  (one ``(mean, unbiased var)`` pair per call) and applied afterwards with :func:`apply_statistics`, in the order
  the serial loop would have applied them.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class StatisticsRecord:
    """The BatchNorm calls of one traced forward: which layer, and the batch statistics it would have folded in."""

    def __init__(self) -> None:
        self.layers: list[BatchNorm2d] = []
        self.statistics: list[tuple[torch.Tensor, torch.Tensor]] = []


# Per thread, because a meta-batch may be split over worker threads (metacli.algorithms.task_threads): whether
# forwards are being recomputed by checkpointing, and where running-statistic updates are deferred to.
_thread = threading.local()


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with the same parameters, buffers and modes, plus a recording mode for transforms."""

    record: StatisticsRecord | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.record is None:
            if not (self.training and self.track_running_stats):
                return super().forward(x)
            if getattr(_thread, "frozen", False):
                # The same kernel call as the first forward (checkpointing compares the saved tensors), with
                # throwaway copies of the buffers.
                return F.batch_norm(x, self.running_mean.clone(), self.running_var.clone(), self.weight, self.bias,
                                    True, self.momentum or 0.0, self.eps)
            deferred = getattr(_thread, "deferred", None)
            if deferred is None:
                return super().forward(x)
            # Momentum 1 from zero buffers leaves exactly the batch mean and unbiased variance in them.
            mean, var = torch.zeros_like(self.running_mean), torch.zeros_like(self.running_var)
            out = F.batch_norm(x, mean, var, self.weight, self.bias, True, 1.0, self.eps)
            deferred.layers.append(self)
            deferred.statistics.append((mean, var))
            return out
        if self.uses_batch_statistics():
            mean = x.mean(dim=(0, 2, 3))
            var = x.var(dim=(0, 2, 3), unbiased=False)
            self.take_batch_statistics(mean, var, x.numel() // x.shape[1])
        else:
            mean, var = self.running_mean, self.running_var
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            shift = self.bias - mean * scale * self.weight
            scale = scale * self.weight
        else:
            shift = -mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]

    def uses_batch_statistics(self) -> bool:
        """Whether a forward normalises with the batch's own statistics (else with the running ones)."""
        return self.training or not self.track_running_stats

    def take_batch_statistics(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        """Do with a batch's mean and biased variance (over ``count`` values a channel) what a forward in this mode
        does with them: record them inside :func:`recorded_statistics`, nothing while checkpointing recomputes,
        defer them in a task thread, else fold them into the running buffers; nothing unless training and
        tracking. For forwards that compute the statistics another way (:mod:`metacli.models.patch_conv`)."""
        if not (self.training and self.track_running_stats):
            return
        update = running_update(mean, var, count)
        if self.record is not None:
            self.record.layers.append(self)
            self.record.statistics.append(update)
        elif not getattr(_thread, "frozen", False):
            apply_statistics([self], [update])

    def fold_in(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """One running-average update, exactly as a native training-mode forward would make it."""
        self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        # Statistics recorded under bfloat16 autocast are folded into the float32 buffers.
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(var.to(self.running_var.dtype), momentum)


def running_update(mean: torch.Tensor, var: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What a training-mode forward folds into the running buffers, from a batch's mean and biased variance over
    ``count`` values a channel: the mean and the unbiased variance, detached."""
    return mean.detach(), var.detach() * count / max(count - 1, 1)


@contextmanager
def recorded_statistics(module: nn.Module) -> Iterator[StatisticsRecord]:
    """Run ``module``'s BatchNorm layers in elementary ops, recording running-statistic updates instead of making them.

    Return ``record.statistics`` from inside the transform (it is a pytree of tensors; ``record.layers`` is not),
    then hand what the transform returned to :func:`apply_statistics`.
    """
    record = StatisticsRecord()
    layers = [m for m in module.modules() if isinstance(m, BatchNorm2d)]
    for m in layers:
        m.record = record
    try:
        yield record
    finally:
        for m in layers:
            m.record = None


class frozen_statistics:
    """Training-mode BatchNorm in this thread that folds nothing into its buffers: for forwards that gradient
    checkpointing recomputes during the backward, which would otherwise count every batch twice.

    A class, not a generator, because checkpointing may enter the same instance once per backward pass.
    """

    def __enter__(self) -> None:
        self.previous, _thread.frozen = getattr(_thread, "frozen", False), True

    def __exit__(self, *exc_info) -> None:
        _thread.frozen = self.previous


@contextmanager
def deferred_statistics() -> Iterator[StatisticsRecord]:
    """Nothing in this thread writes the running buffers: native forwards and :func:`apply_statistics` record
    their updates instead, in call order, for the caller to fold in with ``apply_statistics(record.layers,
    record.statistics)`` once it is the thread's turn. Threads sharing the buffers neither race nor reorder them.
    """
    previous, _thread.deferred = getattr(_thread, "deferred", None), StatisticsRecord()
    try:
        yield _thread.deferred
    finally:
        _thread.deferred = previous


@torch.no_grad()
def apply_statistics(layers: list[BatchNorm2d], statistics: list[tuple[torch.Tensor, torch.Tensor]],
                     task: int | None = None) -> None:
    """Fold recorded statistics into the running buffers, in call order (``task`` indexes vmapped records)."""
    deferred = getattr(_thread, "deferred", None)
    for layer, (mean, var) in zip(layers, statistics):
        mean, var = (mean, var) if task is None else (mean[task], var[task])
        if deferred is None:
            layer.fold_in(mean, var)
        else:
            deferred.layers.append(layer)
            deferred.statistics.append((mean, var))
