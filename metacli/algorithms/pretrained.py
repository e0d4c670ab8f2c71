"""The pretrained-and-fine-tuned baseline of MAML's experiments (Finn, Abbeel & Levine, ICML 2017, section 5.1):
one network trained on the points of every training task with no adaptation (on sinusoids it learns their mean),
then fine-tuned at test time with a few SGD steps on each task's support set. It answers whether meta-learning
the initialisation beats plain pretraining with the same fine-tuning.
"""
from __future__ import annotations

import torch

from metacli.algorithms.base import FewShotLearner
from metacli.algorithms.maml import MAML
from metacli.data.episodes import Episode, EpisodeBatch


class Pretrained(MAML):
    """Pretraining on all tasks, fine-tuning on each test task.

    Args:
        backbone, n_way, bn_mode, task_threads: see :class:`FewShotLearner`.
        test_inner_lr, test_inner_steps: the fine-tuning SGD on a test task's support set (``metacli eval
            adapt_steps=N`` changes the steps).
    """

    def __init__(self, backbone, n_way: int, bn_mode: str = "transductive", test_inner_lr: float = 0.01,
                 test_inner_steps: int = 10, task_threads: int | str = "auto") -> None:
        # MAML's training inner loop is never run: training is plain supervised learning on every task's points.
        super().__init__(backbone, n_way, bn_mode, inner_lr=test_inner_lr, inner_steps=1, test_inner_lr=test_inner_lr,
                         test_inner_steps=test_inner_steps, task_threads=task_threads)

    def query_logits(self, episode: Episode, training: bool) -> torch.Tensor:
        return self(episode.query_x) if training else super().query_logits(episode, training)

    def meta_train_tasks(self, batch: EpisodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
        # Support and query points alike are training data: both go into the loss.
        return FewShotLearner.meta_train_tasks(self, EpisodeBatch(
            batch.support_x, batch.support_y, torch.cat([batch.support_x, batch.query_x], dim=1),
            torch.cat([batch.support_y, batch.query_y], dim=1), batch.n_way))
