"""One training step of any learner: the meta-gradient of a training batch accumulated into ``.grad``, with the
batch run as ``execution.*`` says. The runner, the benchmark and the tests all train through :func:`meta_train_step`.
"""
from __future__ import annotations

from functools import partial

import torch

from metacli.algorithms.base import FewShotLearner
from metacli.data.episodes import Episode, EpisodeBatch
from metacli.execution.capture import CapturedStep
from metacli.execution.gradient_paths import meta_train_gradient_learner, vmap_tasks
from metacli.execution.settings import Execution
from metacli.execution.task_threads import split_meta_batch
from metacli.execution.timing import phase


def meta_train_step(learner: FewShotLearner, batch, execution: Execution = Execution(),
                    captured: CapturedStep | None = None) -> dict[str, float]:
    """Accumulate ``learner``'s meta-gradient of ``batch`` into ``.grad`` (the caller steps the optimiser); return
    the step's mean loss, the family's metric and the learner's own :meth:`~FewShotLearner.training_metrics`.
    ``captured`` (:func:`capture_for`) replays the step instead of running it eagerly."""
    if captured is not None:
        losses, scores = captured(batch)
    elif learner.training_step == "whole_batch":
        with phase("inner_loop"):
            losses, scores = learner.batch_loss(batch)
        with phase("outer_backward"):
            losses.mean().backward()
    else:
        losses, scores = split_meta_batch(learner, batch, execution.workers(learner),
                                          partial(run_tasks, execution=execution))
    return {"loss": losses.mean().item(), learner.family.metric: scores.mean().item(), **learner.training_metrics()}


def capture_for(learner: FewShotLearner, execution: Execution) -> CapturedStep | None:
    """The captured step of ``learner`` where ``execution.capture`` asks for one (:mod:`metacli.execution.capture`)."""
    return CapturedStep(learner, partial(run_tasks, execution=execution)) if execution.captures(learner) else None


def run_tasks(learner: FewShotLearner, batch: EpisodeBatch, execution: Execution
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate the meta-gradient of the mean task loss of ``batch``; return per-task losses and scores. A learner
    that adapts by gradient descent in training goes along its inner-loop path, any other task by task."""
    path = execution.training_path(learner)
    if path == "task_by_task":
        return task_by_task(learner, batch)
    if path == "batched_tasks":
        return batched_tasks(learner, batch)
    return meta_train_gradient_learner(learner, batch, path, execution.checkpoint_inner)


def task_by_task(learner: FewShotLearner, batch: EpisodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Back-propagate each task's loss as soon as it exists, so that one task's graph is alive at a time."""
    losses, scores = [], []
    for task in batch:
        with phase("inner_loop"):
            loss, score = learner.task_loss(task, training=True)
        with phase("outer_backward"):
            (loss / len(batch)).backward()
        losses.append(loss.detach())
        scores.append(score)
    return torch.stack(losses), torch.stack(scores)


def batched_tasks(learner: FewShotLearner, batch: EpisodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Every task's loss at once: ``vmap`` over tasks with shared weights, which folds the meta-batch into one large
    batch of each layer while BatchNorm normalises each task with its own statistics; the running statistics are
    then folded in task order, as task by task would."""

    def one_task(record, support_x, support_y, query_x, query_y):
        start = len(record.statistics)
        loss, score = learner.task_loss(Episode(support_x, support_y, query_x, query_y, batch.n_way), training=True)
        return loss, score, record.statistics[start:]

    return vmap_tasks(learner, one_task, batch)
