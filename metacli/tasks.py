"""Task families: what a task's targets are, the loss a learner minimises on them, and the metric it is judged by.

A dataset belongs to one family (``dataset.family``); a learner declares the families it can run on
(``FewShotLearner.families``) and is given its dataset's. Everything downstream (validation, checkpoint
selection, results, reports, sweeps) reads the metric's name and direction from the family, so a regression
run is selected on the lowest validation MSE as a classification run is on the highest accuracy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from metacli.metrics import HIGHER_IS_BETTER


Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TaskFamily:
    """A kind of task: its loss and per-task metric on ``(predictions, targets)``, and how many values a learner
    predicts per query (``outputs``: a fixed count, or None for one per way)."""

    name: str
    metric: str
    loss: Metric | None
    score: Metric | None
    outputs_per_query: int | None

    @property
    def higher_is_better(self) -> bool:
        return HIGHER_IS_BETTER[self.metric]

    def outputs(self, n_way: int) -> int:
        return n_way if self.outputs_per_query is None else self.outputs_per_query

    def better(self, value: float, than: float) -> bool:
        return value > than if self.higher_is_better else value < than

    @property
    def worst(self) -> float:
        """Worse than any value: where the best validation score starts."""
        return -math.inf if self.higher_is_better else math.inf


def _accuracy(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (predictions.argmax(dim=1) == targets).float().mean()


def _mse(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(predictions.detach(), targets)


#: N-way classification: class scores per query, cross-entropy, accuracy.
CLASSIFICATION = TaskFamily("classification", "accuracy", F.cross_entropy, _accuracy, None)
#: Scalar regression: one value per query, trained and judged by the mean squared error.
REGRESSION = TaskFamily("regression", "mse", F.mse_loss, _mse, 1)
#: Reinforcement learning (``env=``): a learner samples its own trajectories; it is judged by the mean undiscounted
#: return on held-out tasks, so it has no loss or score of given targets.
REINFORCEMENT = TaskFamily("reinforcement", "return", None, None, None)
