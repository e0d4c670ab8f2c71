"""Task families: what a task's targets are, the loss a learner minimises on them, and the metric it is judged by.

A dataset belongs to one family (``dataset.family``); a learner declares the families it can run on
(``FewShotLearner.families``) and is given its dataset's. Everything downstream (validation, checkpoint
selection, results, reports, sweeps) reads the metric's name and direction from the family, so a regression
run is selected on the lowest validation MSE as a classification run is on the highest accuracy.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from metacli.metrics import HIGHER_IS_BETTER


class TaskFamily:
    """A kind of task. ``outputs(n_way)`` is the size of a learner's prediction per query."""

    name: str
    metric: str
    higher_is_better: bool

    def loss(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def outputs(self, n_way: int) -> int:
        raise NotImplementedError

    def better(self, value: float, than: float) -> bool:
        return value > than if self.higher_is_better else value < than

    @property
    def worst(self) -> float:
        """Worse than any value: where the best validation score starts."""
        return -math.inf if self.higher_is_better else math.inf

    def __repr__(self) -> str:
        return f"<{self.name} tasks, judged by {self.metric}>"


class Classification(TaskFamily):
    """N-way classification: class scores per query, cross-entropy, accuracy."""

    name, metric = "classification", "accuracy"
    higher_is_better = HIGHER_IS_BETTER[metric]

    def loss(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(predictions, targets)

    def score(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (predictions.argmax(dim=1) == targets).float().mean()

    def outputs(self, n_way: int) -> int:
        return n_way


class Regression(TaskFamily):
    """Scalar regression: one value per query, judged and trained by the mean squared error."""

    name, metric = "regression", "mse"
    higher_is_better = HIGHER_IS_BETTER[metric]

    def loss(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(predictions, targets)

    def score(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(predictions.detach(), targets)

    def outputs(self, n_way: int) -> int:
        return 1


CLASSIFICATION, REGRESSION = Classification(), Regression()
FAMILIES = {family.name: family for family in (CLASSIFICATION, REGRESSION)}

