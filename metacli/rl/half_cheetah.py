"""Half-cheetah locomotion tasks of the MAML paper (Finn et al. 2017, section 5.3), as a reward wrapper on
Gymnasium's ``HalfCheetah-v5`` (MuJoCo): run at a target velocity ``v*`` drawn uniformly from ``[velocity_low,
velocity_high]`` (the paper's [0, 2]; reward ``-|v - v*| - ctrl_cost * |a|²``), or forward or backward (``d = ±1``;
reward ``d * v - ctrl_cost * |a|²``). The target is hidden from the observation. Episodes last ``horizon`` steps
(the paper's 200). Simulated in worker processes; needs MuJoCo, which the ``rl`` extra installs."""
from __future__ import annotations

import functools

import gymnasium
import numpy as np
import torch

from metacli.rl.process_vector_env import ProcessTaskFamily, require

KINDS = ("velocity", "direction")


class HalfCheetah(ProcessTaskFamily):
    """Args:
        kind: ``velocity`` (a target speed a task) or ``direction`` (forward or backward).
        velocity_low, velocity_high: the range target velocities are drawn from.
        ctrl_cost: the weight of the squared action in the reward (the paper's 0.05).
        workers: simulator processes.
    """

    name = "half_cheetah"

    def __init__(self, kind: str = "velocity", horizon: int = 200, trajectories: int = 20, gamma: float = 0.99,
                 velocity_low: float = 0.0, velocity_high: float = 2.0, ctrl_cost: float = 0.05,
                 workers: int = 2) -> None:
        super().__init__(horizon, trajectories, gamma, workers)
        if kind not in KINDS:
            raise ValueError(f"env.kind={kind!r}: choose velocity (a target speed a task) or direction (forward or "
                             "backward)")
        if not velocity_low < velocity_high or ctrl_cost < 0:
            raise ValueError(f"velocities in [{velocity_low}, {velocity_high}] with ctrl_cost={ctrl_cost}: give "
                             "velocity_low < velocity_high and ctrl_cost >= 0")
        require("mujoco", self.name)
        self.kind, self.velocity_low, self.velocity_high, self.ctrl_cost = kind, velocity_low, velocity_high, ctrl_cost
        self._take_spaces(_make_cheetah(kind, ctrl_cost))

    def settings(self) -> dict:
        return {"kind": self.kind, "velocity": [self.velocity_low, self.velocity_high], "ctrl_cost": self.ctrl_cost}

    def sample_tasks(self, count: int, generator: torch.Generator, split: str = "train") -> torch.Tensor:
        """Target velocities, or directions ±1, as a ``[count, 1]`` tensor."""
        if self.kind == "velocity":
            return self.velocity_low + (self.velocity_high - self.velocity_low) * torch.rand(count, 1,
                                                                                             generator=generator)
        return torch.randint(0, 2, (count, 1), generator=generator).float() * 2 - 1

    def task(self, code: torch.Tensor) -> float:
        return float(code[0])

    def env_factory(self):
        return functools.partial(_make_cheetah, self.kind, self.ctrl_cost)


def _make_cheetah(kind: str, ctrl_cost: float) -> "TargetLocomotion":
    # The bare MuJoCo environment: the rollout counts the horizon, and Gymnasium's checking wrappers cost a step.
    return TargetLocomotion(gymnasium.make("HalfCheetah-v5").unwrapped, kind, ctrl_cost)


class TargetLocomotion(gymnasium.Wrapper):
    """A locomotion environment rewarded for its forward velocity (``info["x_velocity"]``) matching a target, or
    for running in a direction; ``set_task`` gives the target."""

    def __init__(self, env: gymnasium.Env, kind: str, ctrl_cost: float) -> None:
        super().__init__(env)
        self.kind, self.ctrl_cost, self.target = kind, ctrl_cost, 0.0

    def set_task(self, target: float) -> None:
        self.target = float(target)

    def step(self, action):
        observation, _, terminated, truncated, info = self.env.step(action)
        velocity = info["x_velocity"]
        progress = -abs(velocity - self.target) if self.kind == "velocity" else self.target * velocity
        reward = progress - self.ctrl_cost * float(np.square(action).sum())
        return observation, reward, terminated, truncated, info
