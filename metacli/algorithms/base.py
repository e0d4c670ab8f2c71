"""The one interface every few-shot algorithm implements, and the BatchNorm evaluation modes.

An algorithm is an ``nn.Module`` that, given an episode, adapts to its support set and returns logits for its
query set (:meth:`FewShotLearner.query_logits`). The runner drives nothing else: it calls
:meth:`FewShotLearner.meta_train_step` for a meta-batch during training and :meth:`FewShotLearner.evaluate_episode`
for fixed val/test episodes. Algorithms never see the dataset or the loggers.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from metacli.algorithms.task_threads import auto_workers, check_task_threads, split_meta_batch
from metacli.algorithms.timing import phase
from metacli.data.episodes import Episode, EpisodeBatch
from metacli.tasks import CLASSIFICATION, TaskFamily

BN_MODES = ("transductive", "running")


class FewShotLearner(nn.Module, ABC):
    """Base class: adapt to a support set, classify a query set.

    Args:
        backbone: the embedding network (``out_dim`` attribute required).
        n_way: ways of the test episodes; algorithms with a fixed-size head (``fixed_way``) also train with it.
        bn_mode: BatchNorm at evaluation. ``"transductive"`` normalises each episode with its own batch statistics
            (support and query together), as most papers' code does; ``"running"`` uses the running statistics
            accumulated in training, so each query is classified independently of the others.
        task_threads: split a meta-batch over this many worker threads (``auto``: one per CPU thread, one on
            CUDA). Results change with it only at the level of rounding (it orders the gradient sums, and sizes
            the batch of MAML's shared first step): float32's, or bfloat16's under ``trainer.precision=bf16``.
            Learners whose training forward changes state other than metacli's BatchNorm statistics, or draws
            random numbers, keep one.
    """

    #: The task families (:mod:`metacli.tasks`) the learner can run on, by name.
    families: tuple[str, ...] = ("classification",)
    #: The family of the tasks it is given; the builder sets the dataset's.
    family: TaskFamily = CLASSIFICATION
    #: True when the model's output size is tied to ``n_way`` (so training must use the test way).
    fixed_way: bool = False
    #: False for learners trained on plain mini-batches of all training classes (:class:`LabelledBatch`) instead
    #: of episodes; their config has an ``n_classes`` key, which the builder fills with the train split's count.
    episodic: bool = True

    def __init__(self, backbone: nn.Module, n_way: int, bn_mode: str = "transductive",
                 task_threads: int | str = 1) -> None:
        super().__init__()
        if bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
        self.backbone = backbone
        self.n_way = n_way
        self.bn_mode = bn_mode
        self.task_threads = check_task_threads(task_threads)

    @abstractmethod
    def query_logits(self, episode: Episode, training: bool) -> torch.Tensor:
        """Adapt to ``episode``'s support set and return ``[n_query_total, n_way]`` logits for its queries.

        ``training`` is True inside meta-training (the result will be back-propagated), False at evaluation.
        """

    def episode_loss(self, episode: Episode, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The family's query loss and metric of one episode (cross-entropy and accuracy for classification)."""
        predictions = self.query_logits(episode, training)
        return self.family.loss(predictions, episode.query_y), self.family.score(predictions, episode.query_y)

    def meta_train_step(self, batch: EpisodeBatch) -> dict[str, float]:
        """Accumulate the meta-gradient of a meta-batch into ``.grad`` (the caller steps the optimiser).

        Non-episodic learners receive a :class:`~metacli.data.batches.LabelledBatch` instead.
        """
        losses, scores = split_meta_batch(self, batch, self.meta_batch_workers(), type(self).meta_train_tasks)
        return {"loss": losses.mean().item(), self.family.metric: scores.mean().item()}

    def meta_batch_workers(self) -> int:
        """Worker threads for a meta-batch: ``task_threads``, with ``auto`` resolved for the device."""
        device = next(self.parameters()).device
        return auto_workers(device) if self.task_threads == "auto" else self.task_threads

    def meta_train_tasks(self, batch: EpisodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Accumulate the meta-gradient of the mean query loss of ``batch``; return per-task losses and accuracies.

        Back-propagating task by task keeps only one task's graph alive at a time.
        """
        losses, accuracies = [], []
        for episode in batch:
            with phase("inner_loop"):
                loss, accuracy = self.episode_loss(episode, training=True)
            with phase("outer_backward"):
                (loss / len(batch)).backward()
            losses.append(loss.detach())
            accuracies.append(accuracy)
        return torch.stack(losses), torch.stack(accuracies)

    @torch.no_grad()
    def evaluate_episode(self, episode: Episode) -> float:
        """The family's metric on one episode's queries (accuracy, MSE), with BatchNorm as ``bn_mode`` says and no
        state left changed."""
        with self.evaluation_mode():
            _, score = self.episode_loss(episode, training=False)
        return score.item()

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


@contextmanager
def batch_statistics_only(module: nn.Module) -> Iterator[None]:
    """BatchNorm normalises with the batch's statistics and touches no buffer (not even the counter).

    Used for transductive evaluation, and by vectorised inner loops, where an in-place running-average update
    of a shared buffer from per-task batches is impossible.
    """
    batch_norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    tracking = [m.track_running_stats for m in batch_norms]
    for m in batch_norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, track in zip(batch_norms, tracking):
            m.track_running_stats = track
