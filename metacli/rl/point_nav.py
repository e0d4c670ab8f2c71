"""2D point navigation, the MAML paper's meta-RL task family (Finn et al. 2017, section 5.3): a point starts at the
origin and must reach a goal drawn uniformly from a square; the action is a step, clipped to ±0.1 a coordinate;
the reward is minus the distance to the goal; episodes last ``horizon`` steps."""
from __future__ import annotations

import gymnasium
import numpy as np
import torch

from metacli.rl.task_envs import TaskFamilyEnv
from metacli.rl.tensor_vector_env import TensorVectorEnv


class PointNavigation(TaskFamilyEnv):
    """Args:
        goal_low, goal_high: the square goals are drawn from (the paper's [-0.5, 0.5]²).
        max_step: the clip of each action coordinate.
    """

    name = "point_nav"

    def __init__(self, horizon: int = 100, trajectories: int = 20, gamma: float = 0.99, goal_low: float = -0.5,
                 goal_high: float = 0.5, max_step: float = 0.1) -> None:
        super().__init__(horizon, trajectories, gamma)
        if not goal_low < goal_high or max_step <= 0:
            raise ValueError(f"goals in [{goal_low}, {goal_high}] with steps of {max_step}: give goal_low < "
                             "goal_high and max_step > 0")
        self.goal_low, self.goal_high, self.max_step = goal_low, goal_high, max_step

    @property
    def observation_space(self) -> gymnasium.Space:
        return gymnasium.spaces.Box(-np.inf, np.inf, (2,), np.float32)

    @property
    def action_space(self) -> gymnasium.Space:
        return gymnasium.spaces.Box(-self.max_step, self.max_step, (2,), np.float32)

    def settings(self) -> dict:
        return {"goal": [self.goal_low, self.goal_high], "max_step": self.max_step}

    def sample_tasks(self, count: int, generator: torch.Generator, split: str = "train") -> torch.Tensor:
        return self.goal_low + (self.goal_high - self.goal_low) * torch.rand(count, 2, generator=generator)

    def vector_env(self, num_envs: int) -> "PointNavVectorEnv":
        return PointNavVectorEnv(num_envs, self)


class PointNavVectorEnv(TensorVectorEnv):
    def __init__(self, num_envs: int, family: PointNavigation) -> None:
        super().__init__(num_envs, family.observation_space, family.action_space)
        self.max_step = family.max_step
        self.position = torch.zeros(num_envs, 2)

    def _start(self) -> torch.Tensor:
        self.position = torch.zeros(self.num_envs, 2)
        return self.position.clone()

    def step(self, actions):
        self.position = self.position + torch.as_tensor(actions, dtype=torch.float32).clamp(-self.max_step,
                                                                                             self.max_step)
        rewards = -(self.position - self.tasks).norm(dim=1)
        never = torch.zeros(self.num_envs, dtype=torch.bool)
        return self.position.clone(), rewards, never, never, {}
