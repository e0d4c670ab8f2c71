"""A uniformly random policy: the floor of every meta-RL table (actions uniform over the action space)."""
from __future__ import annotations

import torch

from metacli.algorithms.meta_rl import MetaRLLearner, StageMetrics, stage_metrics
from metacli.rl.distributions import Categorical
from metacli.rl.rollout import rollout
from metacli.rl.task_envs import TaskBatch


class Uniform:
    """Uniform over a box, shaped like a distribution of :mod:`metacli.rl.distributions` (sampling only)."""

    def __init__(self, low: torch.Tensor, high: torch.Tensor, shape: tuple[int, ...]) -> None:
        self.low, self.high, self.shape = low, high, shape

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        return self.low + (self.high - self.low) * torch.rand(*self.shape, generator=generator)

    def detach(self) -> "Uniform":
        return self

    @staticmethod
    def stack(items: list["Uniform"], dim: int) -> None:
        return None


class RandomPolicy(MetaRLLearner):
    """Never trained (``trainer.steps=0``); it acts uniformly at random on every task."""

    def meta_update(self, batch: TaskBatch, optimizer=None) -> dict[str, float]:
        raise NotImplementedError("the random policy is not trained: run it with trainer.steps=0")

    def stages(self, batch: TaskBatch) -> dict[str, StageMetrics]:
        space = self.action_space

        def act(observations, previous, memory):
            tasks, per_task = observations.shape[:2]
            if hasattr(space, "n"):
                return Categorical(torch.zeros(tasks, per_task, int(space.n))), None
            low, high = torch.as_tensor(space.low), torch.as_tensor(space.high)
            return Uniform(low, high, (tasks, per_task, *space.shape)), None

        return {"random actions": stage_metrics(batch, rollout(batch, act, batch.family.trajectories,
                                                               batch.generator()))}
