"""OML, online-aware meta-learning (Javed & White, "Meta-Learning Representations for Continual Learning",
NeurIPS 2019).

A representation (the backbone) is meta-learned so that a linear head learned on its features online, one image at
a time, takes in new classes without forgetting the old. Each meta-training step draws a short class-incremental
trajectory (:mod:`metacli.data.trajectories`), resets the head's rows of its classes, learns it image by image
with SGD (:mod:`metacli.algorithms.online`), and back-propagates the loss of the learned head on unseen images of
those classes and on a remember set of other classes into the representation and the head's initial weights:
forgetting the other classes is penalised as much as not learning the new ones. Defaults are the paper's Omniglot
settings (3 classes x 5 images a trajectory, 5 queries a class, 15 images to remember, inner rate 0.03).

On a test stream (``eval.protocol=continual``) the representation is frozen and a new zero head learns online; a
few-shot episode is learned the same way, one pass over its support set. The reset rows start at zero, as every
row of a new head does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metacli.algorithms.base import FewShotLearner
from metacli.algorithms.online import learn_online
from metacli.data.episodes import Episode
from metacli.data.trajectories import Trajectory, TrajectoryBatch


class OML(FewShotLearner):
    """A representation meta-learned for online learning.

    Args:
        backbone, n_way, bn_mode: see :class:`FewShotLearner`.
        n_classes: classes of the train split (filled in by the builder): the meta-training head's size.
        inner_lr: the online SGD rate of meta-training and of few-shot episodes (a stream's is chosen on
            validation streams).
        trajectory_classes, trajectory_shots: a trajectory's classes and the images of each learned online.
        trajectory_queries, remember: the unseen images of each trajectory class, and the images of other classes,
            that the learned head is judged on.
    """

    training_data = "trajectories"
    training_step = "whole_batch"

    def __init__(self, backbone: nn.Module, n_way: int, bn_mode: str = "transductive", n_classes: int | None = None,
                 inner_lr: float = 0.03, trajectory_classes: int = 3, trajectory_shots: int = 5,
                 trajectory_queries: int = 5, remember: int = 15) -> None:
        super().__init__(backbone, n_way, bn_mode)
        if n_classes is None or n_classes < 2:
            raise ValueError(f"algo.n_classes must be the train split's class count (at least 2), got {n_classes}")
        if inner_lr <= 0:
            raise ValueError(f"algo.inner_lr must be positive, got {inner_lr}")
        if trajectory_queries + remember < 1:
            raise ValueError("algo.trajectory_queries and algo.remember leave nothing to judge a trajectory on: set "
                             "either above 0")
        self.head = nn.Linear(backbone.out_dim, n_classes)
        nn.init.kaiming_normal_(self.head.weight)  # fan-in, as the paper's code initialises its layers
        nn.init.zeros_(self.head.bias)
        self.inner_lr = inner_lr
        self.trajectory = (trajectory_classes, trajectory_shots, trajectory_queries, remember)

    def representation(self) -> nn.Module:
        return self.backbone

    def batch_loss(self, batch: TrajectoryBatch) -> tuple[torch.Tensor, torch.Tensor]:
        losses, scores = zip(*(self.trajectory_loss(trajectory) for trajectory in batch))
        return torch.stack(losses), torch.stack(scores)

    def trajectory_loss(self, trajectory: Trajectory) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss and accuracy on the trajectory's queries of the head learned online on its stream."""
        n_stream = len(trajectory.stream_y)
        # One forward for both sets: BatchNorm normalises with statistics of many classes, not of the stream's few.
        features = self.representation()(torch.cat([trajectory.stream_x, trajectory.query_x]))
        keep = torch.ones(self.head.out_features, device=features.device)
        keep[trajectory.classes] = 0
        weight, bias = self.head.weight * keep[:, None], self.head.bias * keep
        weight, bias = learn_online(weight, bias, features[:n_stream], trajectory.stream_y, self.inner_lr)
        logits = features[n_stream:] @ weight.T + bias
        return F.cross_entropy(logits, trajectory.query_y), (logits.argmax(1) == trajectory.query_y).float().mean()

    def predict(self, task: Episode, training: bool) -> torch.Tensor:
        n_support = len(task.support_y)
        features = self.representation()(torch.cat([task.support_x, task.query_x]))
        weight, bias = learn_online(features.new_zeros(task.n_way, features.shape[1]), features.new_zeros(task.n_way),
                                    features[:n_support], task.support_y, self.inner_lr)
        return features[n_support:] @ weight.T + bias
