"""Sample trajectories of a batch of tasks: ``per_task`` sub-environments a task, all stepped at once through the
family's vector environment, actions drawn from the batch's generator."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from metacli.rl.task_envs import TaskBatch

#: ``act(observations [T, N, obs], previous, memory) -> (distribution over [T, N] actions, memory)``; ``previous`` is
#: ``(actions, rewards, first)`` of the last step ([T, N, ...] each; ``first`` marks its episode's first step of a
#: trial's next episode) or None at a trial's start, ``memory`` the policy's own state (a recurrent policy's).
Act = Callable[[torch.Tensor, Any, Any], tuple[Any, Any]]


@dataclass
class Rollout:
    """Trajectories of ``T`` tasks, ``N`` a task, ``H`` steps each (``episodes`` episodes of a trial back to back):
    observations ``[T, N, H, obs]``, actions ``[T, N, H, act]`` (``[T, N, H]`` for discrete actions), rewards and
    the per-step ``info`` numbers ``[T, N, H]``, and the distribution the actions were drawn from (detached)."""

    tasks: torch.Tensor
    observations: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    behaviour: Any
    gamma: float = 1.0  # the family's discount, for the advantages of these trajectories
    episodes: int = 1
    info: dict[str, torch.Tensor] | None = None

    def episode_returns(self) -> torch.Tensor:
        """Undiscounted return of each episode, averaged over the task's trajectories: ``[T, episodes]``."""
        t, n, h = self.rewards.shape
        return self.rewards.view(t, n, self.episodes, h // self.episodes).sum(dim=3).mean(dim=1)

    def returns(self) -> torch.Tensor:
        """Each task's mean undiscounted return per episode: ``[T]``."""
        return self.episode_returns().mean(dim=1)

    def episode(self, index: int) -> "Rollout":
        """The ``index``-th episode of every trial, as a rollout of its own."""
        length = self.rewards.shape[2] // self.episodes
        steps = slice(index * length, (index + 1) * length)
        behaviour = type(self.behaviour)(*(getattr(self.behaviour, f)[:, :, steps] for f in self.behaviour.__annotations__))
        return Rollout(self.tasks, self.observations[:, :, steps], self.actions[:, :, steps],
                       self.rewards[:, :, steps], behaviour, self.gamma, 1,
                       None if self.info is None else {k: v[:, :, steps] for k, v in self.info.items()})


def _tensor(value) -> torch.Tensor:
    return torch.from_numpy(np.asarray(value, dtype=np.float32)) if not isinstance(value, torch.Tensor) else value


def rollout(batch: TaskBatch, act: Act, per_task: int, generator: torch.Generator, episodes: int = 1,
            env=None) -> Rollout:
    """``per_task`` trials of ``episodes`` episodes for each task of ``batch``, acting with ``act``. The
    environments are reset with the batch's seed, the same each call: a rollout differs only by the policy and the
    actions the ``generator`` draws. ``env`` reuses a vector environment of ``len(batch) * per_task``
    sub-environments (Meta-World's worker processes)."""
    family, count = batch.family, len(batch)
    env = env or family.vector_env(count * per_task)
    observations, actions, rewards, behaviour, info = [], [], [], [], {}
    previous, memory = None, None
    with torch.no_grad():
        for episode in range(episodes):
            tasks = batch.tasks.repeat_interleave(per_task, dim=0) if episode == 0 else None
            seed = batch.seed + episode
            obs, _ = env.reset(seed=seed, options={"tasks": tasks} if tasks is not None else None)
            for _ in range(family.horizon):
                obs = _tensor(obs).view(count, per_task, -1)
                distribution, memory = act(obs, previous, memory)
                action = distribution.sample(generator)
                next_obs, reward, _, _, step_info = env.step(action.reshape(count * per_task, *action.shape[2:]))
                reward = _tensor(reward).view(count, per_task)
                first = torch.zeros(count, per_task, dtype=torch.bool)
                observations.append(obs)
                actions.append(action)
                rewards.append(reward)
                behaviour.append(distribution.detach())
                if "success" in step_info:  # Meta-World's per-step success flag
                    info.setdefault("success", []).append(_tensor(step_info["success"]).view(count, per_task))
                previous, obs = (action, reward, first), next_obs
            if previous is not None:
                previous = (previous[0], previous[1], torch.ones(count, per_task, dtype=torch.bool))
    stacked = type(behaviour[0]).stack(behaviour, 2)
    return Rollout(batch.tasks, torch.stack(observations, 2), torch.stack(actions, 2), torch.stack(rewards, 2),
                   stacked, family.gamma, episodes, {key: torch.stack(values, 2) for key, values in info.items()} or None)
