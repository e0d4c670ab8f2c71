"""Functional gradient-descent adaptation shared by the optimisation-based algorithms (MAML and its family).

A meta-batch is meta-trained along one of three paths, all giving the same meta-gradient and the same running
BatchNorm statistics (tested in float64):

- ``serial``: task after task, each back-propagated as soon as its query loss exists, so one task's graph is alive
  at a time. The reference path.
- ``batched_first``: the first inner step of every task starts from the same weights, so it runs for the whole
  meta-batch at once (``vmap`` over tasks with shared weights folds into one large batch with per-task BatchNorm
  statistics; for Conv4 with a linear head, :mod:`metacli.algorithms.conv4_first_step` writes that step out
  instead, faster); the remaining steps and the query pass run task by task with the native kernels, and the
  meta-gradient is chained through the shared first step in one final backward. The fast path on CPU.
- ``vmap``: every step and the query pass vectorised over tasks with ``torch.func.vmap``. Per-task weights turn
  into grouped kernels, which pay off on a GPU and lose on a 2-core CPU.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from metacli.algorithms import conv4_first_step
from metacli.algorithms.timing import phase
from metacli.data.episodes import Episode, EpisodeBatch
from metacli.models.batchnorm import apply_statistics, frozen_statistics, recorded_statistics
from metacli.tasks import TaskFamily

Params = dict[str, torch.Tensor]
PATHS = ("serial", "batched_first", "vmap")


def functional_forward(module: nn.Module, params: Params, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` with ``params`` in place of (some of) its parameters; buffers stay the module's own."""
    return functional_call(module, params, (x,))


@dataclass(frozen=True)
class InnerLoop:
    """How one task adapts: ``steps`` SGD steps at ``lr`` (a float, or per-parameter rates as Meta-SGD learns).

    ``second_order=False`` treats each inner gradient as a constant (first-order MAML). ``checkpoint`` recomputes
    each step's forward during the outer backward instead of storing it, so memory stays flat in ``steps``.
    """

    steps: int
    lr: float | Params
    second_order: bool = True
    checkpoint: bool = False


def sgd_step(params: Params, grads: Params, lr: float | Params) -> Params:
    """``p - lr * g`` for every parameter, with one rate or a per-parameter dict of rates."""
    return {name: p - (lr[name] if isinstance(lr, dict) else lr) * grads[name] for name, p in params.items()}


def support_loss(module: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, family: TaskFamily
                 ) -> torch.Tensor:
    """The task family's loss (cross-entropy, MSE) of ``params`` on a support set."""
    return family.loss(functional_forward(module, params, x), y)


def gradient_descent(loss_fn: Callable[[Params], torch.Tensor], params: Params, loop: InnerLoop,
                     training: bool, steps: int | None = None) -> Params:
    """Take ``steps`` (default ``loop.steps``) SGD steps on ``loss_fn`` from ``params``; return the adapted ones.

    In training the adapted parameters stay a differentiable function of ``params``: through the full Hessian path
    when ``loop.second_order``, else through the identity only. At evaluation each step is detached, so memory is
    flat in the number of steps.
    """
    create_graph = training and loop.second_order

    def step(*values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        current = dict(zip(params, values))
        with torch.enable_grad():
            grads = torch.autograd.grad(loss_fn(current), values, create_graph=create_graph)
        return tuple(sgd_step(current, dict(zip(params, grads)), loop.lr).values())

    values = tuple(params.values())
    for _ in range(loop.steps if steps is None else steps):
        if training and loop.checkpoint:
            values = checkpoint(step, *values, use_reentrant=False, context_fn=_recompute_without_statistics)
        else:
            values = step(*values)
        if not training:
            values = tuple(v.detach().requires_grad_() for v in values)
    return dict(zip(params, values))


def _recompute_without_statistics():
    return contextlib.nullcontext(), frozen_statistics()


def fine_tune(loss_fn: Callable[[Params], torch.Tensor], params: Params, steps: int, lr: float,
              optimizer: str = "sgd", betas: tuple[float, float] = (0.0, 0.999), eps: float = 1e-8) -> Params:
    """``steps`` first-order steps of SGD or Adam on ``loss_fn`` from a detached copy of ``params``.

    No graph is kept between steps: for algorithms whose meta-update needs only the adapted weights (Reptile) and
    for fine-tuning baselines. Adam keeps its moments per call, as a fresh optimiser per task would.
    """
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"inner optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    params = {name: p.detach().requires_grad_() for name, p in params.items()}
    first = {name: torch.zeros_like(p) for name, p in params.items()} if optimizer == "adam" else {}
    second = {name: torch.zeros_like(p) for name, p in params.items()} if optimizer == "adam" else {}
    for step in range(1, steps + 1):
        with torch.enable_grad():
            grads = dict(zip(params, torch.autograd.grad(loss_fn(params), list(params.values()))))
        with torch.no_grad():
            if optimizer == "adam":
                for name, g in grads.items():
                    first[name].lerp_(g, 1 - betas[0])
                    second[name].mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
                # Bias-corrected moments, as torch.optim.Adam.
                grads = {name: (first[name] / (1 - betas[0] ** step))
                         / ((second[name] / (1 - betas[1] ** step)).sqrt() + eps) for name in grads}
            params = {name: p.requires_grad_() for name, p in sgd_step(params, grads, lr).items()}
    return params


def adapt_to_support(module: nn.Module, params: Params, episode: Episode, loop: InnerLoop, training: bool,
                     family: TaskFamily) -> Params:
    """``params`` after the inner loop on ``episode``'s support set."""
    return gradient_descent(lambda p: support_loss(module, p, episode.support_x, episode.support_y, family), params,
                            loop, training)


def query_loss(module: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, family: TaskFamily
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The task family's loss and metric of the adapted ``params`` on a query set."""
    predictions = functional_forward(module, params, x)
    return family.loss(predictions, y), family.score(predictions, y)


def meta_train_batch(module: nn.Module, params: Params, batch: EpisodeBatch, loop: InnerLoop, path: str,
                     family: TaskFamily) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate the meta-gradient of the mean query loss into ``.grad``; return per-task losses and scores.

    ``params`` are the parameters the inner loop adapts (all of them for MAML, the head for ANIL); the others are
    used as they are and receive their meta-gradient directly.
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
        if family.name == "classification" and conv4_first_step.applies(module, params):
            first, layers, statistics = _conv4_first(module, params, batch, loop)
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


def _conv4_first(module: nn.Module, params: Params, batch: EpisodeBatch, loop: InnerLoop):
    """The shared first step written out for Conv4 (:mod:`metacli.algorithms.conv4_first_step`): first-step
    weights ``[tasks, ...]``, the BatchNorm layers and their per-task statistics."""
    # First order treats the inner gradients as constants, so they need no graph.
    with contextlib.nullcontext() if loop.second_order else torch.no_grad():
        grads, layers, statistics = conv4_first_step.support_grads(
            module, params, batch.support_x.flatten(0, 1), batch.support_y.flatten(0, 1), len(batch))
    return sgd_step(params, grads, loop.lr), layers, statistics


def _vectorized(module: nn.Module, params: Params, batch: EpisodeBatch, loop: InnerLoop,
                family: TaskFamily) -> tuple[torch.Tensor, torch.Tensor]:
    def task(support_x, support_y, query_x, query_y):
        adapted, statistics = params, []
        for _ in range(loop.steps):
            grads, step_statistics = _support_grads(module, adapted, support_x, support_y, loop, record, family)
            adapted = sgd_step(adapted, grads, loop.lr)
            statistics += step_statistics
        start = len(record.statistics)
        loss, score = query_loss(module, adapted, query_x, query_y, family)
        return loss, score, statistics + record.statistics[start:]

    with phase("inner_loop"), recorded_statistics(module) as record:
        losses, scores, statistics = torch.func.vmap(task)(batch.support_x, batch.support_y, batch.query_x,
                                                               batch.query_y)
        for t in range(len(batch)):
            apply_statistics(record.layers, statistics, t)
    with phase("outer_backward"):
        losses.mean().backward()
    return losses.detach(), scores


def inner_path(vectorize: bool | str, batch_first_step: bool, device: torch.device) -> str:
    """The path ``algo.vectorize`` and ``algo.batch_first_step`` select; ``auto`` vectorises on CUDA only, where
    grouped kernels pay off (each path's measured throughput: docs/performance.md)."""
    if vectorize == "auto":
        vectorize = device.type == "cuda"
    if vectorize:
        return "vmap"
    return "batched_first" if batch_first_step else "serial"
