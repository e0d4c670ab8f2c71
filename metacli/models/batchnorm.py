"""BatchNorm's running statistics on every meta-learning path, for the plain ``torch.nn`` BatchNorm layers of any
backbone. Nothing here changes what a layer's own ``forward`` does: the execution layer asks for each behaviour
below explicitly, for the modules and the span it names.

- :func:`recorded_statistics`: inside ``torch.func`` transforms the layers normalise in elementary ops and hand
  their running-statistic updates back as tensors (one ``(mean, unbiased var)`` pair per call), to be applied
  afterwards with :func:`apply_statistics` in the order the serial loop would have applied them. Two reasons:
  ``vmap`` of the native kernel's double backward gives a wrong second-order MAML gradient (a non-zero gradient
  for a conv bias that the normalisation removes; measured in float64 against the serial loop), while elementary
  ops have exact batching rules; and a transform may not update a buffer in place.
- :class:`throwaway_statistics`: forwards that gradient checkpointing recomputes during the backward update copies
  of the buffers, which would otherwise count every batch twice.
- :func:`own_statistics` and :func:`fold_statistics`: a task thread trains a replica whose buffers are its own, and the
  caller carries each replica's updates over to the shared layers in task order.
- :func:`batch_statistics_only`: transductive evaluation and Reptile's inner loop normalise with the batch and
  leave the buffers alone.
- :func:`statistics_folded_after`: a training step that runs a layer several times before its one backward (TADAM)
  normalises with the native kernel and folds the running-statistic updates in afterwards.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

BatchNorm = nn.modules.batchnorm._BatchNorm
Statistics = list[tuple[torch.Tensor, torch.Tensor]]
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def batch_norms(module: nn.Module) -> list[BatchNorm]:
    """Every BatchNorm layer of ``module`` that keeps running statistics."""
    return [m for m in module.modules() if isinstance(m, BatchNorm) and m.running_mean is not None]


def uses_batch_statistics(norm: BatchNorm) -> bool:
    """Whether a forward of ``norm`` normalises with the batch's own statistics (else with the running ones)."""
    return norm.training or not norm.track_running_stats


def running_update(mean: torch.Tensor, var: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What a training-mode forward folds into the running buffers, from a batch's mean and biased variance over
    ``count`` values a channel: the mean and the unbiased variance, detached."""
    return mean.detach(), var.detach() * count / max(count - 1, 1)


@torch.no_grad()
def fold_in(norm: BatchNorm, mean: torch.Tensor, var: torch.Tensor) -> None:
    """One running-average update, exactly as a native training-mode forward would make it."""
    norm.num_batches_tracked.add_(1)
    momentum = norm.momentum if norm.momentum is not None else 1.0 / float(norm.num_batches_tracked)
    # Statistics recorded under bfloat16 autocast are folded into the float32 buffers.
    norm.running_mean.lerp_(mean.to(norm.running_mean.dtype), momentum)
    norm.running_var.lerp_(var.to(norm.running_var.dtype), momentum)


class StatisticsRecord:
    """The BatchNorm calls of one traced forward: which layer, and the batch statistics it would have folded in."""

    def __init__(self) -> None:
        self.layers: list[BatchNorm] = []
        self.statistics: Statistics = []


def _recording_forward(norm: BatchNorm, record: StatisticsRecord, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` in elementary ops, recording the running-statistic update instead of making it."""
    dims = [0, *range(2, x.dim())]
    channel = (None, slice(None), *[None] * (x.dim() - 2))
    if uses_batch_statistics(norm):
        mean, var = x.mean(dim=dims), x.var(dim=dims, unbiased=False)
        take_batch_statistics(norm, mean, var, x.numel() // x.shape[1])
    else:
        mean, var = norm.running_mean, norm.running_var
    scale = torch.rsqrt(var + norm.eps)
    if norm.affine:
        shift = norm.bias - mean * scale * norm.weight
        scale = scale * norm.weight
    else:
        shift = -mean * scale
    return x * scale[channel] + shift[channel]


def take_batch_statistics(norm: BatchNorm, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """Do with a batch's mean and biased variance (over ``count`` values a channel) what a training-mode forward
    does with them: record them inside :func:`recorded_statistics`, else fold them into the running buffers;
    nothing unless training and tracking. For forwards that compute the statistics another way
    (:mod:`metacli.models.kernels.patch_conv`)."""
    if not (norm.training and norm.track_running_stats):
        return
    update = running_update(mean, var, count)
    record = norm.__dict__.get("statistics_record")
    if record is not None:
        record.layers.append(norm)
        record.statistics.append(update)
    else:
        fold_in(norm, *update)


@contextmanager
def recorded_statistics(module: nn.Module) -> Iterator[StatisticsRecord]:
    """Run ``module``'s BatchNorm layers in elementary ops, recording running-statistic updates instead of making them.

    Return ``record.statistics`` from inside the transform (it is a pytree of tensors; ``record.layers`` is not),
    then hand what the transform returned to :func:`apply_statistics`.
    """
    record = StatisticsRecord()
    layers = [m for m in module.modules() if isinstance(m, BatchNorm)]
    for m in layers:  # instance attributes, removed on the way out: the class's forward is untouched
        m.statistics_record = record
        m.forward = lambda x, m=m: _recording_forward(m, record, x)
    try:
        yield record
    finally:
        for m in layers:
            del m.forward, m.statistics_record


@torch.no_grad()
def apply_statistics(layers: list[BatchNorm], statistics: Statistics, task: int | None = None) -> None:
    """Fold recorded statistics into the running buffers, in call order (``task`` indexes vmapped records)."""
    for layer, (mean, var) in zip(layers, statistics):
        fold_in(layer, *((mean, var) if task is None else (mean[task], var[task])))


class throwaway_statistics:
    """``module``'s BatchNorm layers update copies of their buffers while inside, and keep their own: for forwards
    that gradient checkpointing recomputes during the backward.

    A class, not a generator, because checkpointing may enter the same instance once per backward pass.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __enter__(self) -> None:
        self.saved = [(norm, [getattr(norm, name) for name in _BUFFERS]) for norm in batch_norms(self.module)]
        for norm, buffers in self.saved:
            for name, buffer in zip(_BUFFERS, buffers):
                setattr(norm, name, buffer.clone())

    def __exit__(self, *exc_info) -> None:
        for norm, buffers in self.saved:
            for name, buffer in zip(_BUFFERS, buffers):
                setattr(norm, name, buffer)


def own_statistics(module: nn.Module) -> dict[int, torch.Tensor]:
    """A ``copy.deepcopy`` memo that gives a copy of ``module`` BatchNorm buffers of its own (copies of the
    current ones), for a replica that trains beside the original."""
    return {id(buffer): buffer.clone() for norm in batch_norms(module) for buffer in
            (getattr(norm, name) for name in _BUFFERS)}


def snapshot(module: nn.Module) -> list[tuple[torch.Tensor, ...]]:
    """The running buffers of ``module``'s BatchNorm layers, copied: where replicas made by :func:`own_statistics`
    start from."""
    return [tuple(getattr(norm, name).clone() for name in _BUFFERS) for norm in batch_norms(module)]


@torch.no_grad()
def fold_statistics(module: nn.Module, start: list[tuple[torch.Tensor, ...]],
                    ended: list[tuple[torch.Tensor, ...]]) -> None:
    """Fold into ``module``'s layers the updates that another copy, which started from ``start`` and ended at
    ``ended`` (both from :func:`snapshot`), made to its own, as if they had been made after ``module``'s so far. A
    running average is affine in its starting value: the copy's result, moved by the same decay applied to how far
    ``module`` has moved since ``start``."""
    for norm, (mean1, var1, count1), (mean0, var0, count0) in zip(batch_norms(module), ended, start):
        steps = int(count1 - count0)
        if steps == 0:
            continue
        if norm.momentum is None:  # a cumulative average: weights by counts
            before, total = float(norm.num_batches_tracked), float(count0) + steps
            for name, first, last in (("running_mean", mean0, mean1), ("running_var", var0, var1)):
                added = last * total - first * float(count0)  # the copy's batches' sum
                getattr(norm, name).mul_(before).add_(added).div_(before + steps)
        else:
            decay = (1.0 - norm.momentum) ** steps
            for name, first, last in (("running_mean", mean0, mean1), ("running_var", var0, var1)):
                current = getattr(norm, name)
                current.copy_(last + decay * (current - first))
        norm.num_batches_tracked.add_(steps)


@torch.no_grad()
def restore(module: nn.Module, saved: list[tuple[torch.Tensor, ...]]) -> None:
    """Put ``module``'s BatchNorm running buffers back to a :func:`snapshot`."""
    for norm, values in zip(batch_norms(module), saved):
        for name, value in zip(_BUFFERS, values):
            getattr(norm, name).copy_(value)


@contextmanager
def batch_statistics_only(module: nn.Module) -> Iterator[None]:
    """BatchNorm normalises with the batch's statistics and touches no buffer (not even the counter).

    Used for transductive evaluation, and by Reptile's inner loop, whose throwaway fast weights must not move
    the shared running averages.
    """
    norms = batch_norms(module)
    tracking = [m.track_running_stats for m in norms]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, track in zip(norms, tracking):
            m.track_running_stats = track


@contextmanager
def statistics_folded_after(module: nn.Module) -> Iterator[None]:
    """BatchNorm normalises each batch with its own statistics (the native kernel) and touches no buffer inside; the
    running-statistic updates the forwards would have made are folded in on the way out, in call order.

    A native training-mode forward keeps the running buffers for its backward, so a second forward of the layer
    before that backward (which updates them in place) breaks it. Recording the whole normalisation in elementary ops
    (:func:`recorded_statistics`) also works, at about twice the cost of a step here.
    """
    pending: list[tuple[BatchNorm, torch.Tensor, torch.Tensor]] = []

    def observe(norm: BatchNorm, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach()
        dims = [0, *range(2, x.dim())]
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        pending.append((norm, *running_update(mean, var, x.numel() // x.shape[1])))

    handles = [norm.register_forward_pre_hook(observe) for norm in batch_norms(module)
               if norm.training and norm.track_running_stats]
    try:
        with batch_statistics_only(module):
            yield
    finally:
        for handle in handles:
            handle.remove()
    for norm, mean, var in pending:
        fold_in(norm, mean, var)
