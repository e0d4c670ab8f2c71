"""Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
Networks", ICML 2017), second order by default, first order (FOMAML) with ``first_order=true``.

The network is the backbone plus a linear ``n_way`` head. Each task adapts all parameters with a few SGD steps on
its support set (``inner_steps`` at ``inner_lr`` in training, ``test_inner_steps`` at ``test_inner_lr`` at
evaluation); the query loss after adaptation is the meta-objective.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metacli.algorithms.base import FewShotLearner
from metacli.algorithms.inner_loop import (Params, functional_forward, gradient_descent, use_vectorized,
                                           vectorized_query_losses)
from metacli.data.episodes import Episode, EpisodeBatch


class MAML(FewShotLearner):
    """MAML and first-order MAML.

    Args:
        backbone, n_way, bn_mode: see :class:`FewShotLearner`.
        inner_lr, inner_steps: inner SGD during meta-training.
        test_inner_lr, test_inner_steps: inner SGD at evaluation (``None``: as in training).
        first_order: drop the second-order terms of the meta-gradient.
        vectorize: meta-train the tasks of a meta-batch with ``torch.func.vmap`` (``true``), one by one
            (``false``), or whichever is faster on the device (``auto``: vmap on CUDA, serial on CPU). Evaluation
            is always per episode. The vmap path normalises with batch statistics only, so it needs
            ``bn_mode=transductive``.
    """

    fixed_way = True

    def __init__(self, backbone, n_way: int, bn_mode: str = "transductive", inner_lr: float = 0.4,
                 inner_steps: int = 1, test_inner_lr: float | None = None, test_inner_steps: int | None = None,
                 first_order: bool = False, vectorize: bool | str = "auto") -> None:
        super().__init__(backbone, n_way, bn_mode)
        if vectorize not in (True, False, "auto"):
            raise ValueError(f"algo.vectorize must be true, false or auto, got {vectorize!r}")
        if vectorize is True and bn_mode == "running":
            raise ValueError("algo.vectorize=true keeps no running BatchNorm statistics, so it cannot serve "
                             "eval.bn_mode=running; use algo.vectorize=false or eval.bn_mode=transductive")
        test_inner_lr = inner_lr if test_inner_lr is None else test_inner_lr
        test_inner_steps = inner_steps if test_inner_steps is None else test_inner_steps
        if inner_lr <= 0 or inner_steps < 1 or test_inner_lr <= 0 or test_inner_steps < 0:
            raise ValueError(f"MAML needs inner_lr>0, inner_steps>=1, test_inner_lr>0 and test_inner_steps>=0; got "
                             f"{inner_lr}, {inner_steps}, {test_inner_lr} and {test_inner_steps}")
        self.head = nn.Linear(backbone.out_dim, n_way)
        self.inner_lr, self.inner_steps = inner_lr, inner_steps
        self.test_inner_lr, self.test_inner_steps = test_inner_lr, test_inner_steps
        self.first_order, self.vectorize = first_order, vectorize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def adapt(self, episode: Episode, training: bool) -> Params:
        """Parameters after the inner loop on ``episode``'s support set."""
        params = dict(self.named_parameters())

        def support_loss(p: Params) -> torch.Tensor:
            return F.cross_entropy(functional_forward(self, p, episode.support_x), episode.support_y)

        steps, lr = (self.inner_steps, self.inner_lr) if training else (self.test_inner_steps, self.test_inner_lr)
        return gradient_descent(support_loss, params, steps, lr, training, second_order=not self.first_order)

    def query_logits(self, episode: Episode, training: bool) -> torch.Tensor:
        return functional_forward(self, self.adapt(episode, training), episode.query_x)

    def meta_train_step(self, batch: EpisodeBatch) -> dict[str, float]:
        device = next(self.parameters()).device
        if self.bn_mode == "running" or not use_vectorized(self.vectorize, device):
            return super().meta_train_step(batch)
        losses, accuracies = vectorized_query_losses(self, dict(self.named_parameters()), batch, self.inner_steps,
                                                     self.inner_lr, second_order=not self.first_order)
        losses.mean().backward()
        return {"loss": losses.detach().mean().item(), "accuracy": accuracies.mean().item()}
