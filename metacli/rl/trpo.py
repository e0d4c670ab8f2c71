"""The trust-region outer step of MAML-RL (Finn et al. 2017, following Schulman et al. 2015): the surrogate's
gradient, the Fisher-vector products of the mean KL by double back-propagation (through the inner loop for MAML),
conjugate gradient for the natural direction, and a backtracking line search that keeps the KL within bounds."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def conjugate_gradient(product: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iterations: int,
                       tolerance: float = 1e-10) -> torch.Tensor:
    """An approximate solution of ``A x = b`` for symmetric positive definite ``A`` given as ``product(v) = A v``."""
    x, r = torch.zeros_like(b), b.clone()
    p, rr = r.clone(), r @ r
    for _ in range(iterations):
        ap = product(p)
        alpha = rr / (p @ ap)
        x, r = x + alpha * p, r - alpha * ap
        new_rr = r @ r
        if new_rr < tolerance:
            break
        p, rr = r + (new_rr / rr) * p, new_rr
    return x


Curvature = Callable[[torch.Tensor], torch.Tensor]


def kl_hessian_product(kl: torch.Tensor, wrt: list[torch.Tensor], spread=lambda v: v, gather=lambda v: v
                       ) -> Curvature:
    """``v -> H v`` for the Hessian of ``kl`` with respect to ``wrt``; ``spread`` maps a vector of the
    parameters' size onto ``wrt``'s flat layout and ``gather`` maps the product back (per-task copies)."""
    gradient = _flat(torch.autograd.grad(kl, wrt, create_graph=True))

    def product(vector: torch.Tensor) -> torch.Tensor:
        return gather(_flat(torch.autograd.grad(gradient @ spread(vector), wrt, retain_graph=True)))
    return product


def trpo_step(parameters: list[nn.Parameter], surrogate: Callable[[], tuple[torch.Tensor, torch.Tensor]],
              max_kl: float, damping: float, cg_iterations: int, backtrack_ratio: float, max_backtracks: int,
              curvature: Callable[[], Curvature] | None = None) -> dict[str, float]:
    """Move ``parameters`` along the natural gradient of ``surrogate() -> (loss, mean KL from the sampling
    policy)``, the largest step of the backtracking search that lowers the loss with the KL at most ``max_kl``;
    leave them unchanged if none does, or if the loss is not finite. The natural gradient uses the KL's Hessian in
    ``parameters``, or the product ``curvature()`` builds. Returns the loss, KL and step taken."""
    loss, kl = surrogate()
    if not torch.isfinite(loss):
        return {"loss": loss.item(), "kl": float("nan"), "step_fraction": 0.0}
    gradient = _flat(torch.autograd.grad(loss, parameters, retain_graph=curvature is None))
    hessian = kl_hessian_product(kl, parameters) if curvature is None else curvature()

    def fisher_product(vector: torch.Tensor) -> torch.Tensor:
        return hessian(vector) + damping * vector

    direction = conjugate_gradient(fisher_product, gradient, cg_iterations)
    curvature = direction @ fisher_product(direction)
    full_step = torch.sqrt(2 * max_kl / curvature.clamp(min=1e-12)) * direction
    start = _flat(p.detach() for p in parameters)
    old_loss = loss.item()
    fraction = 1.0
    # Not under no_grad: MAML's surrogate differentiates its inner loop even when only its value is wanted.
    for _ in range(max_backtracks):
        _assign(parameters, start - fraction * full_step)
        new_loss, new_kl = surrogate()
        if new_loss.item() < old_loss and new_kl.item() <= max_kl:
            return {"loss": old_loss, "kl": new_kl.item(), "step_fraction": fraction}
        fraction *= backtrack_ratio
    _assign(parameters, start)
    return {"loss": old_loss, "kl": 0.0, "step_fraction": 0.0}


@torch.no_grad()
def _assign(parameters: list[nn.Parameter], flat: torch.Tensor) -> None:
    offset = 0
    for p in parameters:
        p.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
