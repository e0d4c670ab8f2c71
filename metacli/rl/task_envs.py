"""The base of an ``env=`` task family: tasks drawn from a distribution (goals, arm probabilities, Meta-World
variations), each run as a sub-environment of a Gymnasium vector environment.

A task family is to reinforcement learning what a dataset is to classification: its held-out tasks are fixed by a
seed (validation by ``trainer.val_seed``, test by ``eval.seed``), its training tasks are drawn from the run's
generator, and every sub-environment of a rollout is reseeded from a seed the run's generator drew, so a resumed
run steps the same environments as an unbroken one.
"""
from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator

import gymnasium
import torch

from metacli.tasks import REINFORCEMENT

#: The streams fixed tasks of each split are drawn from (validation and test tasks never coincide).
SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}


class TaskFamilyEnv(ABC):
    """A distribution of tasks and the vector environment that steps a batch of them.

    Args:
        horizon: steps per episode.
        trajectories: episodes sampled per task for one adaptation step (MAML's ``fast_batch_size``).
        gamma: the discount of the returns the learners optimise; reported returns are undiscounted.
    """

    family = REINFORCEMENT
    name: str
    channels = None
    image_size = None  # nothing for the image-memory check to size
    has_alphabets = False

    def __init__(self, horizon: int, trajectories: int, gamma: float) -> None:
        if horizon < 1 or trajectories < 1:
            raise ValueError(f"horizon={horizon} and trajectories={trajectories} must be at least 1")
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma={gamma} must be in (0, 1]")
        self.horizon, self.trajectories, self.gamma = horizon, trajectories, gamma

    @property
    @abstractmethod
    def observation_space(self) -> gymnasium.Space:
        """One sub-environment's observations."""

    @property
    @abstractmethod
    def action_space(self) -> gymnasium.Space:
        """One sub-environment's actions."""

    @abstractmethod
    def sample_tasks(self, count: int, generator: torch.Generator, split: str = "train") -> torch.Tensor:
        """``count`` tasks of ``split`` as a ``[count, task_dim]`` tensor (or task indices), drawn with ``generator``."""

    @abstractmethod
    def vector_env(self, num_envs: int) -> gymnasium.vector.VectorEnv:
        """A vector environment of ``num_envs`` sub-environments; ``reset(seed=, options={"tasks": ...})`` gives
        each its task (one row of ``tasks`` a sub-environment), a plain ``reset`` keeps them."""

    def describe(self) -> dict:
        return {"name": self.name, "horizon": self.horizon, "trajectories": self.trajectories, "gamma": self.gamma,
                **self.settings()}

    def settings(self) -> dict:
        """What else defines the family's tasks (the goal box, the arm count)."""
        return {}

    def content_sha256(self, split: str) -> str:
        """What the fixed tasks of ``split`` are drawn from: the family and the split's stream."""
        return hashlib.sha256(repr((self.describe(), split, SPLIT_STREAMS[split])).encode()).hexdigest()

    def episodes(self, split: str, *_, where: str = "", **__) -> "FixedTasks":
        """The fixed tasks of ``split`` (validation and test), as the classification samplers give episodes."""
        return FixedTasks(self, split)

    def training_tasks(self, meta_batch: int, generator: torch.Generator) -> "TaskBatch":
        """A meta-batch of training tasks, and the seed their environments are reset with, both from ``generator``."""
        tasks = self.sample_tasks(meta_batch, generator, "train")
        return TaskBatch(self, tasks, _draw_seed(generator))

    def references(self, batch: "TaskBatch") -> dict[str, torch.Tensor]:
        """Per-task regrets of hand-made policies simulated on ``batch``'s tasks and seeds, the references a table
        shows beside a learner (Thompson sampling on bandits); none here."""
        return {}

    def extra_metrics(self, rollout) -> dict[str, torch.Tensor]:
        """Per-task numbers besides the return a rollout is judged by (a bandit's regret, Meta-World's success)."""
        return {}


def _draw_seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


@dataclass
class TaskBatch:
    """Tasks to run together, and the seed that fixes every random draw of their rollouts (environment resets and
    the policy's action samples)."""

    family: TaskFamilyEnv
    tasks: torch.Tensor
    seed: int

    def __len__(self) -> int:
        return len(self.tasks)

    def generator(self) -> torch.Generator:
        """The action-sampling stream of this batch (a fresh one each call: the same samples each time)."""
        return torch.Generator().manual_seed(self.seed)


class FixedTasks:
    """The held-out tasks of a split, fixed by a seed: every learner is scored on the same tasks and the same
    environment seeds."""

    def __init__(self, family: TaskFamilyEnv, split: str) -> None:
        self.family, self.split = family, split

    def fixed(self, count: int, seed: int, batch_size: int) -> Iterator[TaskBatch]:
        generator = torch.Generator().manual_seed(seed * len(SPLIT_STREAMS) + SPLIT_STREAMS[self.split])
        tasks = self.family.sample_tasks(count, generator, self.split)
        for start in range(0, count, batch_size):
            yield TaskBatch(self.family, tasks[start:start + batch_size], _draw_seed(generator))
