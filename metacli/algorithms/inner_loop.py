"""Functional gradient-descent adaptation shared by the optimisation-based algorithms (MAML and its family, Reptile,
LEO, the LSTM meta-learner): one task's inner loop, as the papers define it. How the inner loops of a meta-batch
are run together is :mod:`metacli.execution.gradient_paths`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from metacli.data.episodes import Episode
from metacli.tasks import TaskFamily

Params = dict[str, torch.Tensor]


def functional_forward(module: nn.Module, params: Params, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` with ``params`` in place of (some of) its parameters; buffers stay the module's own."""
    return functional_call(module, params, (x,))


@dataclass(frozen=True)
class InnerLoop:
    """How one task adapts: ``steps`` SGD steps at ``lr`` (a float, or per-parameter rates as Meta-SGD learns).

    ``second_order=False`` treats each inner gradient as a constant (first-order MAML). ``checkpoint``, which the
    execution layer sets for ``execution.checkpoint_inner``, recomputes each step's forward during the outer
    backward instead of storing it, so memory stays flat in ``steps``: it gives the context the recomputation runs
    in (one that keeps BatchNorm's running statistics from counting a batch twice).
    """

    steps: int
    lr: float | Params
    second_order: bool = True
    checkpoint: Callable[[], contextlib.AbstractContextManager] | None = None


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
        if training and loop.checkpoint is not None:
            values = checkpoint(step, *values, use_reentrant=False,
                                context_fn=lambda: (contextlib.nullcontext(), loop.checkpoint()))
        else:
            values = step(*values)
        if not training:
            values = tuple(v.detach().requires_grad_() for v in values)
    return dict(zip(params, values))


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


def reptile_pull(module: nn.Module, adapted: Params) -> torch.Tensor:
    """Half the squared distance from ``module``'s parameters to ``adapted`` (held fixed): its gradient is Reptile's
    theta - theta' (Nichol et al. 2018), the direction the outer optimiser then steps along."""
    return sum(0.5 * (p - adapted[name].detach()).pow(2).sum() for name, p in module.named_parameters())


def query_loss(module: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, family: TaskFamily
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The task family's loss and metric of the adapted ``params`` on a query set."""
    predictions = functional_forward(module, params, x)
    return family.loss(predictions, y), family.score(predictions, y)
