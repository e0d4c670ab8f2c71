"""Reptile (Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms", 2018).

Each task of a meta-batch trains a copy of the network with ``inner_steps`` of SGD or Adam on its support set; the
meta-update moves the initialisation towards the mean of the adapted weights, theta += eps * mean(theta_i - theta).
With one task per meta-iteration this is the paper's serial Reptile, with more its batched version. The update is
handed to the outer optimiser as the gradient ``theta - mean(theta_i)``, so ``conf/algo/reptile.yaml`` makes that
optimiser plain SGD with lr eps, annealed linearly to 0 as in the paper. Evaluation fine-tunes the
meta-initialisation on the support set (``test_inner_steps``), BatchNorm following ``eval.bn_mode``.
"""
from __future__ import annotations

import torch
from torch import nn

from metacli.algorithms.base import FewShotLearner
from metacli.algorithms.inner_loop import (Params, fine_tune, functional_forward, query_loss, reptile_pull,
                                           support_loss)
from metacli.data.episodes import Episode
from metacli.models.batchnorm import batch_statistics_only


class Reptile(FewShotLearner):
    """Reptile on the backbone plus a linear head (``n_way`` outputs; one for regression).

    Args:
        backbone, n_way, bn_mode: see :class:`FewShotLearner`.
        inner_optimizer: ``"adam"`` (the paper's, with ``adam_betas`` (0, 0.999)) or ``"sgd"``.
        inner_lr, inner_steps: the per-task training during meta-training (full support set each step).
        test_inner_lr, test_inner_steps: fine-tuning at evaluation (``None`` lr: as in training).
        inner_data: what a meta-training task fits: ``"all"`` its support and query images (Reptile's update needs
            no held-out query, and the paper meta-trains with more shots than it tests), or ``"support"``.
            Evaluation always fits the support set alone.
    """

    families = ("classification", "regression")
    fixed_way = True
    parallel_tasks = True

    def __init__(self, backbone, n_way: int, bn_mode: str = "transductive", inner_optimizer: str = "adam",
                 inner_lr: float = 0.001, inner_steps: int = 5, test_inner_lr: float | None = None,
                 test_inner_steps: int = 50, adam_betas: tuple[float, float] = (0.0, 0.999),
                 inner_data: str = "all") -> None:
        super().__init__(backbone, n_way, bn_mode)
        test_inner_lr = inner_lr if test_inner_lr is None else test_inner_lr
        if inner_optimizer not in ("adam", "sgd"):
            raise ValueError(f"algo.inner_optimizer must be 'adam' or 'sgd', got {inner_optimizer!r}")
        if inner_data not in ("all", "support"):
            raise ValueError(f"algo.inner_data must be 'all' or 'support', got {inner_data!r}")
        if inner_lr <= 0 or inner_steps < 1 or test_inner_lr <= 0 or test_inner_steps < 0:
            raise ValueError(f"Reptile needs inner_lr>0, inner_steps>=1, test_inner_lr>0 and test_inner_steps>=0; "
                             f"got {inner_lr}, {inner_steps}, {test_inner_lr} and {test_inner_steps}")
        self.head = nn.Linear(backbone.out_dim, n_way)
        self.inner_optimizer, self.adam_betas, self.inner_data = inner_optimizer, tuple(adam_betas), inner_data
        self.inner_lr, self.inner_steps = inner_lr, inner_steps
        self.test_inner_lr, self.test_inner_steps = test_inner_lr, test_inner_steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def adapt(self, episode: Episode, training: bool) -> Params:
        steps, lr = (self.inner_steps, self.inner_lr) if training else (self.test_inner_steps, self.test_inner_lr)
        x, y = episode.support_x, episode.support_y
        if training and self.inner_data == "all":
            x, y = torch.cat([x, episode.query_x]), torch.cat([y, episode.query_y])
        return fine_tune(lambda p: support_loss(self, p, x, y, self.family), dict(self.named_parameters()), steps, lr,
                         self.inner_optimizer, self.adam_betas)

    def predict(self, episode: Episode, training: bool) -> torch.Tensor:
        return functional_forward(self, self.adapt(episode, training), episode.query_x)

    def task_loss(self, episode: Episode, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if not training:
            return super().task_loss(episode, training)
        adapted = self.adapt(episode, training=True)
        # The query set only reports progress (on data it may have fitted, with inner_data=all): it must not move
        # the running statistics either.
        with torch.no_grad(), batch_statistics_only(self):
            loss, score = query_loss(self, adapted, episode.query_x, episode.query_y, self.family)
        # Reptile's update theta - theta_i is the gradient of half the squared distance to the adapted weights. The
        # objective carries that gradient, and the query loss as its value for the logs.
        distance = reptile_pull(self, adapted)
        return distance - distance.detach() + loss, score
