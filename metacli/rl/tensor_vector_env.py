"""The base of task families stepped as tensors: every sub-environment of a batch at once, behind Gymnasium's
vector API (``reset``/``step`` on batches, ``single_*_space``), with torch tensors in and out."""
from __future__ import annotations

import gymnasium
import torch
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space


class TensorVectorEnv(gymnasium.vector.VectorEnv):
    """``num_envs`` sub-environments held as rows of tensors. Episodes have a fixed length, so a rollout resets
    them all together: autoreset is off. ``reset(options={"tasks": t})`` assigns tasks, one row each."""

    metadata = {"autoreset_mode": AutoresetMode.DISABLED}

    def __init__(self, num_envs: int, observation_space: gymnasium.Space, action_space: gymnasium.Space) -> None:
        self.num_envs = num_envs
        self.single_observation_space, self.single_action_space = observation_space, action_space
        self.observation_space = batch_space(observation_space, num_envs)
        self.action_space = batch_space(action_space, num_envs)
        self.tasks: torch.Tensor | None = None
        self.generator = torch.Generator()

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if options and "tasks" in options:
            tasks = torch.as_tensor(options["tasks"])
            if len(tasks) != self.num_envs:
                raise ValueError(f"{len(tasks)} tasks for {self.num_envs} sub-environments")
            self.tasks = tasks
        if self.tasks is None:
            raise ValueError("the first reset must give the tasks: reset(options={'tasks': ...})")
        if seed is not None:
            self.generator.manual_seed(seed)
        return self._start(), {}

    def _start(self) -> torch.Tensor:
        """Put every sub-environment at the start of an episode of its task; the first observations."""
        raise NotImplementedError
