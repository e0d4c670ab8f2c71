"""Functional gradient-descent adaptation shared by the optimisation-based algorithms (MAML and its family)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.func import functional_call

Params = dict[str, torch.Tensor]


def functional_forward(module: nn.Module, params: Params, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` with ``params`` in place of (some of) its parameters; buffers stay the module's own."""
    return functional_call(module, params, (x,))


def gradient_descent(loss_fn: Callable[[Params], torch.Tensor], params: Params, steps: int,
                     lr: float | Params, training: bool, second_order: bool) -> Params:
    """Take ``steps`` SGD steps on ``loss_fn`` from ``params`` and return the adapted parameters.

    ``lr`` is one float or a per-parameter dict (Meta-SGD's learned rates). In training the adapted parameters
    stay a differentiable function of ``params``: through the full Hessian path when ``second_order``, else
    through the identity only (first-order MAML). At evaluation each step is detached, so memory is flat in
    ``steps``.
    """
    for _ in range(steps):
        with torch.enable_grad():
            loss = loss_fn(params)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=training and second_order)
        updated = {}
        for (name, p), g in zip(params.items(), grads):
            step_lr = lr[name] if isinstance(lr, dict) else lr
            new = p - step_lr * g
            updated[name] = new if training else new.detach().requires_grad_()
        params = updated
    return params
