"""The pretrained-and-fine-tuned baseline of MAML's experiments (Finn, Abbeel & Levine, ICML 2017, section 5.1):
one network trained on the points of every training task with no adaptation (on sinusoids it learns their mean),
then fine-tuned at test time with a few SGD steps on each task's support set. It answers whether meta-learning
the initialisation beats plain pretraining with the same fine-tuning.
"""
from __future__ import annotations

import torch

from metacli.algorithms.inner_loop import InnerLoop
from metacli.algorithms.maml import MAML
from metacli.data.episodes import Episode


class Pretrained(MAML):
    """Pretraining on all tasks, fine-tuning on each test task.

    Args:
        backbone, n_way, bn_mode: see :class:`FewShotLearner`.
        test_inner_lr, test_inner_steps: the fine-tuning SGD on a test task's support set (``metacli eval
            adapt_steps=N`` changes the steps).
    """

    def __init__(self, backbone, n_way: int, bn_mode: str = "transductive", test_inner_lr: float = 0.01,
                 test_inner_steps: int = 10) -> None:
        super().__init__(backbone, n_way, bn_mode, inner_lr=test_inner_lr, test_inner_lr=test_inner_lr,
                         test_inner_steps=test_inner_steps)

    def inner_loop(self, training: bool) -> InnerLoop | None:
        return None if training else self.test_loop  # training is plain supervised learning: nothing adapts

    def predict(self, episode: Episode, training: bool) -> torch.Tensor:
        return self(episode.query_x) if training else super().predict(episode, training)

    def task_loss(self, episode: Episode, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if training:  # support and query points alike are training data: both go into the loss
            episode = Episode(episode.support_x, episode.support_y, torch.cat([episode.support_x, episode.query_x]),
                              torch.cat([episode.support_y, episode.query_y]), episode.n_way)
        return super().task_loss(episode, training)
