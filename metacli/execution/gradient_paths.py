"""How the inner loops of a meta-batch run for a :class:`~metacli.algorithms.base.GradientLearner` (MAML and its
family). Every path gives the same meta-gradient and the same running BatchNorm statistics (tested in float64):

- ``serial``: task after task, each back-propagated as soon as its query loss exists, so one task's graph is alive
  at a time. The reference path.
- ``batched_first``: the first inner step of every task starts from the same weights, so it runs for the whole
  meta-batch at once (``vmap`` over tasks with shared weights folds into one large batch with per-task BatchNorm
  statistics; a backbone may offer that step written out, as Conv4 does with
  :mod:`metacli.models.kernels.conv4_first_step`, faster); the remaining steps and the query pass run task by task
  with the native kernels, and the meta-gradient is chained through the shared first step in one final backward.
  The fast path on CPU.
- ``vmap``: every step and the query pass vectorised over tasks with ``torch.func.vmap``. Per-task weights turn
  into grouped kernels, which pay off on a GPU and lose on a 2-core CPU.

A learner whose inner loop adapts only a part after fixed features (ANIL: the head after the backbone) has every
task's support and query sets embedded once, its inner loops run on the embeddings, and one backward into the
features.
"""
from __future__ import annotations

import contextlib
import dataclasses
from functools import partial

import torch
from torch import nn

from metacli.algorithms.base import GradientLearner
from metacli.algorithms.inner_loop import (InnerLoop, Params, adapt_to_support, gradient_descent, query_loss,
                                           sgd_step, support_loss)
from metacli.data.episodes import EpisodeBatch
from metacli.execution.timing import phase
from metacli.models.batchnorm import apply_statistics, recorded_statistics, throwaway_statistics
from metacli.tasks import TaskFamily

PATHS = ("serial", "batched_first", "vmap")


def meta_train_gradient_learner(learner: GradientLearner, batch: EpisodeBatch, path: str,
                                checkpoint_inner: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate ``learner``'s meta-gradient of the mean query loss of ``batch`` into ``.grad`` along ``path``,
    with its training inner loop (checkpointed if ``checkpoint_inner``); return per-task losses and scores."""
    module, params, family = learner.adapted_module(), learner.adapted_parameters(), learner.family
    recompute = partial(throwaway_statistics, module) if checkpoint_inner else None
    loop = dataclasses.replace(learner.inner_loop(True), checkpoint=recompute)
    if learner.features() is None:
        return meta_train_batch(module, params, batch, loop, path, family)
    with phase("inner_loop"):
        # Support then query of each task in turn: the running statistics are folded in the serial loop's order.
        embedded = [learner.embed(task) for task in batch]
        support, query = torch.stack([t.support_x for t in embedded]), torch.stack([t.query_x for t in embedded])
    # The inner loops and query losses run on leaf copies of the embeddings, so that each task can be
    # back-propagated on its own; the features then get their meta-gradient in one backward.
    leaves = EpisodeBatch(support.detach().requires_grad_(), batch.support_y, query.detach().requires_grad_(),
                          batch.query_y, batch.n_way)
    losses, scores = meta_train_batch(module, params, leaves, loop, path, family)
    # First order, the support embeddings do not reach the meta-objective, and get no gradient.
    pairs = [(out, leaf.grad) for out, leaf in ((support, leaves.support_x), (query, leaves.query_x))
             if leaf.grad is not None]
    with phase("outer_backward"):
        torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])
    return losses, scores


def meta_train_batch(module: nn.Module, params: Params, batch: EpisodeBatch, loop: InnerLoop, path: str,
                     family: TaskFamily) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate the meta-gradient of the mean query loss into ``.grad``; return per-task losses and scores.

    ``params`` are the parameters of ``module`` the inner loop adapts; the others are used as they are and receive
    their meta-gradient directly.
    """
    if path == "serial":
        return _serial(module, params, batch, loop, family)
    if path == "batched_first":
        return _batched_first(module, params, batch, loop, family)
    if path == "vmap":
        return _vectorized(module, params, batch, loop, family)
    raise ValueError(f"inner-loop path must be one of {PATHS}, got {path!r}")


def _serial(module: nn.Module, params: Params, batch: EpisodeBatch, loop: InnerLoop,
            family: TaskFamily) -> tuple[torch.Tensor, torch.Tensor]:
    losses, scores = [], []
    for episode in batch:
        with phase("inner_loop"):
            adapted = adapt_to_support(module, params, episode, loop, True, family)
            loss, score = query_loss(module, adapted, episode.query_x, episode.query_y, family)
        with phase("outer_backward"):
            (loss / len(batch)).backward()
        losses.append(loss.detach())
        scores.append(score)
    return torch.stack(losses), torch.stack(scores)


def _support_grads(module: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, loop: InnerLoop,
                   record, family: TaskFamily) -> tuple[Params, list]:
    """Per-task inner gradient inside a transform, with the BatchNorm statistics it recorded."""

    def loss_and_statistics(p: Params):
        start = len(record.statistics)
        return support_loss(module, p, x, y, family), record.statistics[start:]

    grads, statistics = torch.func.grad(loss_and_statistics, has_aux=True)(params)
    if not loop.second_order:
        grads = {name: g.detach() for name, g in grads.items()}
    return grads, statistics


def _batched_first(module: nn.Module, params: Params, batch: EpisodeBatch, loop: InnerLoop,
                   family: TaskFamily) -> tuple[torch.Tensor, torch.Tensor]:
    def first_step(x: torch.Tensor, y: torch.Tensor):
        grads, statistics = _support_grads(module, params, x, y, loop, record, family)
        return sgd_step(params, grads, loop.lr), statistics

    with phase("inner_loop"):
        backbone = getattr(module, "backbone", None)
        kernel = getattr(backbone, "support_gradient_kernel", lambda *_: None)(module, params, family.name)
        if kernel is not None:
            first, layers, statistics = _written_out_first(kernel, params, batch, loop)
        else:
            with recorded_statistics(module) as record:
                first, statistics = torch.func.vmap(first_step)(batch.support_x, batch.support_y)
            layers = record.layers
    names = list(first)
    per_task = list(zip(*(first[name].detach().unbind(0) for name in names)))
    first_grads: list[list[torch.Tensor]] = [[] for _ in names]
    losses, scores = [], []
    for task, episode in enumerate(batch):
        # Cut the graph at the task's first-step weights: its own backward stops there, and the shared first
        # step is back-propagated once for all tasks below.
        start = {name: value.requires_grad_() for name, value in zip(names, per_task[task])}
        with phase("inner_loop"):
            apply_statistics(layers, statistics, task)
            adapted = gradient_descent(lambda p: support_loss(module, p, episode.support_x, episode.support_y, family),
                                       start, loop, training=True, steps=loop.steps - 1)
            loss, score = query_loss(module, adapted, episode.query_x, episode.query_y, family)
        with phase("outer_backward"):
            (loss / len(batch)).backward()
        for grads, value in zip(first_grads, start.values()):
            grads.append(value.grad if value.grad is not None else torch.zeros_like(value))
        losses.append(loss.detach())
        scores.append(score)
    with phase("outer_backward"):
        torch.autograd.backward([first[name] for name in names], [torch.stack(g) for g in first_grads])
    return torch.stack(losses), torch.stack(scores)


def _written_out_first(kernel, params: Params, batch: EpisodeBatch, loop: InnerLoop):
    """The shared first step through a backbone's written-out kernel: first-step weights ``[tasks, ...]``, the
    BatchNorm layers and their per-task statistics."""
    # First order treats the inner gradients as constants, so they need no graph.
    with contextlib.nullcontext() if loop.second_order else torch.no_grad():
        grads, layers, statistics = kernel(batch.support_x.flatten(0, 1), batch.support_y.flatten(0, 1), len(batch))
    return sgd_step(params, grads, loop.lr), layers, statistics


def vmap_tasks(module: nn.Module, task, batch: EpisodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """``task(record, support_x, support_y, query_x, query_y)``, which returns the task's loss, score and the
    BatchNorm statistics it recorded, for every task of ``batch`` at once (``vmap``); then the running statistics
    folded in task order and the mean loss back-propagated. Returns per-task losses and scores."""
    with phase("inner_loop"), recorded_statistics(module) as record:
        losses, scores, statistics = torch.func.vmap(partial(task, record))(batch.support_x, batch.support_y,
                                                                            batch.query_x, batch.query_y)
        for t in range(len(batch)):
            apply_statistics(record.layers, statistics, t)
    with phase("outer_backward"):
        losses.mean().backward()
    return losses.detach(), scores


def _vectorized(module: nn.Module, params: Params, batch: EpisodeBatch, loop: InnerLoop,
                family: TaskFamily) -> tuple[torch.Tensor, torch.Tensor]:
    def task(record, support_x, support_y, query_x, query_y):
        adapted, statistics = params, []
        for _ in range(loop.steps):
            grads, step_statistics = _support_grads(module, adapted, support_x, support_y, loop, record, family)
            adapted = sgd_step(adapted, grads, loop.lr)
            statistics += step_statistics
        start = len(record.statistics)
        loss, score = query_loss(module, adapted, query_x, query_y, family)
        return loss, score, statistics + record.statistics[start:]

    return vmap_tasks(module, task, batch)
