"""The one interface every algorithm implements, and the BatchNorm evaluation modes.

An algorithm states what it computes for one task (an :class:`~metacli.data.episodes.Episode`: a support set to
adapt to, a query set to predict): :meth:`FewShotLearner.predict` the query predictions after adapting, and,
where its training objective is not the task family's loss of those predictions, :meth:`FewShotLearner.task_loss`.
The task family (:mod:`metacli.tasks`) owns the loss and the metric: accuracy for classification, MSE for
regression. How a meta-batch of tasks is run (task by task, over threads, vectorised, with checkpointed inner
loops) belongs to :mod:`metacli.execution`, which drives the learner through this interface only; learners that
adapt by gradient descent on some of their parameters (:class:`GradientLearner`) say which, so that the execution
layer can batch and vectorise their inner loops. Algorithms never see the dataset, the loggers or the execution
settings.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from metacli.algorithms.inner_loop import InnerLoop, Params, adapt_to_support, functional_forward
from metacli.algorithms.similarity import class_means
from metacli.data.episodes import Episode
from metacli.models.batchnorm import batch_statistics_only
from metacli.tasks import CLASSIFICATION, TaskFamily

BN_MODES = ("transductive", "running")


class FewShotLearner(nn.Module, ABC):
    """Base class: adapt to a task's support set, predict its queries.

    Args:
        backbone: the embedding network (``out_dim`` attribute required).
        n_way: ways of the test episodes; algorithms with a fixed-size head (``fixed_way``) also train with it.
        bn_mode: BatchNorm at evaluation. ``"transductive"`` normalises each episode with its own batch statistics
            (support and query together), as most papers' code does; ``"running"`` uses the running statistics
            accumulated in training, so each query is classified independently of the others.
    """

    #: The task families (:mod:`metacli.tasks`) the learner can run on, by name.
    families: tuple[str, ...] = ("classification",)
    #: The family of the tasks it is given; the builder sets the dataset's.
    family: TaskFamily = CLASSIFICATION
    #: True when the model's output size is tied to ``n_way`` (so training must use the test way).
    fixed_way: bool = False
    #: What a training batch is: ``"episodes"`` (an :class:`EpisodeBatch`), ``"labelled"`` (a
    #: :class:`~metacli.data.batches.LabelledBatch` of all training classes, for learners whose config has an
    #: ``n_classes`` key, which the builder fills with the train split's count), ``"episodes_and_labelled"`` (a
    #: :class:`~metacli.data.batches.CoTrainingBatch` of both, the labelled part ``auxiliary_batch`` images), or
    #: ``"trajectories"`` (a :class:`~metacli.data.trajectories.TrajectoryBatch` of the shape the learner's
    #: ``trajectory`` gives).
    training_data: str = "episodes"
    #: How a training batch becomes a loss: ``"per_task"``, :meth:`task_loss` of each task, which the execution
    #: layer may run in any order, on threads or vectorised; or ``"whole_batch"``, :meth:`batch_loss` of the batch.
    training_step: str = "per_task"
    #: Whether the tasks of a meta-batch may be trained on worker threads: true where a training forward changes
    #: no state but BatchNorm's running statistics and draws no random numbers.
    parallel_tasks: bool = False
    #: Whether :meth:`task_loss` may run for a whole meta-batch at once under ``torch.func.vmap``: one batched
    #: forward of every task with the shared weights, BatchNorm statistics per task (``execution.vectorize``).
    batched_tasks: bool = False

    def __init__(self, backbone: nn.Module, n_way: int, bn_mode: str = "transductive") -> None:
        super().__init__()
        if bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
        self.backbone = backbone
        self.n_way = n_way
        self.bn_mode = bn_mode

    @abstractmethod
    def predict(self, task: Episode, training: bool) -> torch.Tensor:
        """Adapt to ``task``'s support set and return the predictions for its queries: ``[n_query_total, n_way]``
        logits for classification, ``[n_query_total, 1]`` values for regression.

        ``training`` is True inside meta-training (the result will be back-propagated), False at evaluation.
        """

    def task_loss(self, task: Episode, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The objective of one task and the family's metric on its queries; by default the family's loss of
        :meth:`predict` (cross-entropy, MSE). Its gradient is what meta-training follows."""
        predictions = self.predict(task, training)
        return self.family.loss(predictions, task.query_y), self.family.score(predictions, task.query_y)

    def batch_loss(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """For ``training_step = "whole_batch"``: the loss and metric of a training batch, per task or overall."""
        raise NotImplementedError(f"{type(self).__name__} trains per task")

    def representation(self) -> nn.Module | None:
        """The network whose features a class-incremental stream is learned on, online, by a linear head
        (``eval.protocol=continual``, :mod:`metacli.continual`); None where the learner has none to offer."""
        return None

    def task_embedding(self, task: Episode) -> torch.Tensor | None:
        """The task as one vector: the mean of its class prototypes in :meth:`representation`'s features, which is
        what TADAM conditions its backbone on (``metacli embed-tasks`` maps these); None without a representation."""
        network = self.representation()
        if network is None:
            return None
        return class_means(network(task.support_x), task.support_y, task.n_way).mean(dim=0)

    def training_metrics(self) -> dict[str, float]:
        """Learner-specific numbers logged with each training step, read after its meta-gradient."""
        return {}

    @torch.no_grad()
    def evaluate_episode(self, episode: Episode) -> float:
        """The family's metric on one episode's queries (accuracy, MSE), with BatchNorm as ``bn_mode`` says and no
        state left changed."""
        with self.evaluation_mode():
            _, score = self.task_loss(episode, training=False)
        return score.item()

    def evaluate_batch(self, batch) -> list[float]:
        """The metric of each episode of a batch (what validation and the test average); on a GPU, all episodes at
        once where the learner allows it (:attr:`batched_tasks`)."""
        if self.batched_tasks and batch.support_x.device.type == "cuda":
            return self.evaluate_at_once(batch)
        return [self.evaluate_episode(episode) for episode in batch]

    @torch.no_grad()
    def evaluate_at_once(self, batch) -> list[float]:
        """:meth:`evaluate_episode` of every episode of ``batch`` in one vectorised pass (``vmap`` over episodes with
        the shared weights; BatchNorm per episode)."""

        def one_episode(support_x, support_y, query_x, query_y):
            return self.task_loss(Episode(support_x, support_y, query_x, query_y, batch.n_way), training=False)[1]

        with self.evaluation_mode():
            scores = torch.func.vmap(one_episode)(batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        return scores.tolist()

    @contextmanager
    def evaluation_mode(self) -> Iterator[None]:
        """Put BatchNorm in the ``bn_mode`` behaviour for evaluation, and restore training mode afterwards."""
        was_training = self.training
        try:
            if self.bn_mode == "transductive":
                self.train()
                with batch_statistics_only(self):
                    yield
            else:
                self.eval()
                yield
        finally:
            self.train(was_training)


class GradientLearner(FewShotLearner):
    """A learner that adapts to a task by the differentiable gradient descent of an :class:`InnerLoop` on some of
    its parameters (MAML and its family). It says which, and the execution layer may then run a meta-batch's inner
    loops together: a shared first step, ``vmap`` over tasks, checkpointed steps.

    A subclass defines :meth:`inner_loop`, and narrows :meth:`adapted_parameters` (with :meth:`features` and
    :meth:`adapted_module` when only a part after fixed features adapts).
    """

    parallel_tasks = True

    @abstractmethod
    def inner_loop(self, training: bool) -> InnerLoop | None:
        """The inner loop of meta-training or of evaluation; ``None`` where there is none (no adaptation)."""

    def features(self) -> nn.Module | None:
        """A module that every task's inputs go through unadapted before :meth:`adapted_module`, or ``None``."""
        return None

    def adapted_module(self) -> nn.Module:
        """The module whose :meth:`adapted_parameters` the inner loop adapts."""
        return self

    def adapted_parameters(self) -> Params:
        """The parameters the inner loop adapts, by their names in :meth:`adapted_module`."""
        return dict(self.adapted_module().named_parameters())

    def embed(self, task: Episode) -> Episode:
        """``task`` with its inputs through :meth:`features` (support and query apart, so that each set is
        normalised with its own BatchNorm statistics)."""
        features = self.features()
        if features is None:
            return task
        return Episode(features(task.support_x), task.support_y, features(task.query_x), task.query_y, task.n_way)

    def adapt(self, task: Episode, training: bool) -> Params:
        """The adapted parameters after the inner loop on ``task``'s support set."""
        return self._adapt_embedded(self.embed(task), training)

    def predict(self, task: Episode, training: bool) -> torch.Tensor:
        task = self.embed(task)
        return functional_forward(self.adapted_module(), self._adapt_embedded(task, training), task.query_x)

    def _adapt_embedded(self, task: Episode, training: bool) -> Params:
        return adapt_to_support(self.adapted_module(), self.adapted_parameters(), task, self.inner_loop(training),
                                training, self.family)
