"""Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
Networks", ICML 2017), second order by default, first order (FOMAML) with ``first_order=true``.

The network is the backbone plus a linear head (``n_way`` outputs; one for regression). Each task adapts all
parameters with a few SGD steps on its support set (``inner_steps`` at ``inner_lr`` in training,
``test_inner_steps`` at ``test_inner_lr`` at evaluation); the query loss after adaptation is the meta-objective.
"""
from __future__ import annotations

import torch
from torch import nn

from metacli.algorithms.base import GradientLearner
from metacli.algorithms.inner_loop import InnerLoop, Params


class MAML(GradientLearner):
    """MAML and first-order MAML.

    Args:
        backbone, n_way, bn_mode: see :class:`FewShotLearner`.
        inner_lr, inner_steps: inner SGD during meta-training.
        test_inner_lr, test_inner_steps: inner SGD at evaluation (``None``: as in training).
        first_order: drop the second-order terms of the meta-gradient.
    """

    families = ("classification", "regression")
    fixed_way = True

    def __init__(self, backbone, n_way: int, bn_mode: str = "transductive", inner_lr: float = 0.4,
                 inner_steps: int = 1, test_inner_lr: float | None = None, test_inner_steps: int | None = None,
                 first_order: bool = False) -> None:
        super().__init__(backbone, n_way, bn_mode)
        test_inner_lr = inner_lr if test_inner_lr is None else test_inner_lr
        test_inner_steps = inner_steps if test_inner_steps is None else test_inner_steps
        if inner_lr <= 0 or inner_steps < 1 or test_inner_lr <= 0 or test_inner_steps < 0:
            raise ValueError(f"MAML needs inner_lr>0, inner_steps>=1, test_inner_lr>0 and test_inner_steps>=0; got "
                             f"{inner_lr}, {inner_steps}, {test_inner_lr} and {test_inner_steps}")
        self.head = nn.Linear(backbone.out_dim, n_way)
        self.train_loop = InnerLoop(inner_steps, inner_lr, second_order=not first_order)
        self.test_loop = InnerLoop(test_inner_steps, test_inner_lr)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def adapted_parameters(self) -> Params:
        """All of the network's parameters (not Meta-SGD's learned rates)."""
        return {name: p for name, p in self.named_parameters() if name.startswith(("backbone.", "head."))}

    def inner_loop(self, training: bool) -> InnerLoop:
        return self.train_loop if training else self.test_loop
