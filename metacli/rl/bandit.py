"""Bernoulli multi-armed bandits, the RL² paper's first task family (Duan et al. 2016, section 4.1): a task is ``arms``
success probabilities drawn uniformly from [0, 1]; an episode is a trial of ``horizon`` pulls of one bandit. The
observation carries nothing (a learner sees its previous action and reward); the reward of a pull is 1 with the
arm's probability. Regret is measured against the best arm's expected reward, pull by pull (pseudo-regret).
Thompson sampling and UCB1 (Auer et al. 2002), simulated on the same bandits with the same seeds, are the
references a table shows beside a learner; a uniformly random policy is the floor."""
from __future__ import annotations

import math

import gymnasium
import numpy as np
import torch

from metacli.rl.task_envs import TaskBatch, TaskFamilyEnv
from metacli.rl.tensor_vector_env import TensorVectorEnv


class BernoulliBandits(TaskFamilyEnv):
    """Args:
        arms: the number of arms ``k``.
        horizon: pulls per trial ``n``.
    """

    name = "bandit"

    def __init__(self, arms: int = 5, horizon: int = 100, trajectories: int = 1, gamma: float = 1.0) -> None:
        super().__init__(horizon, trajectories, gamma)
        if arms < 2:
            raise ValueError(f"arms={arms}: a bandit needs at least 2 arms")
        self.arms = arms

    @property
    def observation_space(self) -> gymnasium.Space:
        return gymnasium.spaces.Box(0.0, 0.0, (1,), np.float32)

    @property
    def action_space(self) -> gymnasium.Space:
        return gymnasium.spaces.Discrete(self.arms)

    def settings(self) -> dict:
        return {"arms": self.arms}

    def sample_tasks(self, count: int, generator: torch.Generator, split: str = "train") -> torch.Tensor:
        return torch.rand(count, self.arms, generator=generator)

    def vector_env(self, num_envs: int) -> "BanditVectorEnv":
        return BanditVectorEnv(num_envs, self)

    def extra_metrics(self, rollout) -> dict[str, torch.Tensor]:
        """Each task's mean regret over its trials: the best arm's probability minus the pulled arm's, summed."""
        probabilities = rollout.tasks.unsqueeze(1).expand(-1, rollout.actions.shape[1], -1)  # [T, N, arms]
        pulled = probabilities.gather(2, rollout.actions.flatten(2).long())  # [T, N, H]
        best = probabilities.amax(dim=2, keepdim=True)
        return {"regret": (best - pulled).sum(dim=2).mean(dim=1)}

    def references(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        """Per-task regret of Thompson sampling, UCB1 and a uniformly random policy on ``batch``'s bandits, their
        pulls' rewards drawn from the batch's seed."""
        return {name: _simulate(policy, batch, self.horizon) for name, policy in
                (("thompson_sampling", _thompson), ("ucb1", _ucb1), ("random", _uniform))}


class BanditVectorEnv(TensorVectorEnv):
    def __init__(self, num_envs: int, family: BernoulliBandits) -> None:
        super().__init__(num_envs, family.observation_space, family.action_space)

    def _start(self) -> torch.Tensor:
        return torch.zeros(self.num_envs, 1)

    def step(self, actions):
        arm = torch.as_tensor(actions).long().view(-1, 1)
        success = self.tasks.gather(1, arm).squeeze(1)
        rewards = (torch.rand(self.num_envs, generator=self.generator) < success).float()
        never = torch.zeros(self.num_envs, dtype=torch.bool)
        return torch.zeros(self.num_envs, 1), rewards, never, never, {}


def _simulate(policy, batch: TaskBatch, horizon: int) -> torch.Tensor:
    """Run a count-based ``policy(successes, pulls, t, generator) -> arms`` on the batch's bandits for one trial."""
    env = batch.family.vector_env(len(batch))
    env.reset(seed=batch.seed, options={"tasks": batch.tasks})
    generator = batch.generator()
    arms = batch.tasks.shape[1]
    successes, pulls = torch.zeros(len(batch), arms), torch.zeros(len(batch), arms)
    regret = torch.zeros(len(batch))
    best = batch.tasks.amax(dim=1)
    for t in range(horizon):
        arm = policy(successes, pulls, t, generator)
        _, reward, *_ = env.step(arm)
        successes[torch.arange(len(batch)), arm] += reward
        pulls[torch.arange(len(batch)), arm] += 1
        regret += best - batch.tasks.gather(1, arm.view(-1, 1)).squeeze(1)
    return regret


def _thompson(successes, pulls, t, generator) -> torch.Tensor:
    """Draw each arm's probability from its Beta(1 + successes, 1 + failures) posterior; pull the highest."""
    # Beta(a, b) is X / (X + Y) with X ~ Gamma(a), Y ~ Gamma(b); torch's Beta sampler takes no generator.
    x, y = _gamma(1 + successes, generator), _gamma(1 + pulls - successes, generator)
    return (x / (x + y)).argmax(dim=1)


def _gamma(shape: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gamma(shape, 1) samples for integer shapes (counts + 1): sums of ``shape`` unit exponentials."""
    most = int(shape.max())
    exponentials = -torch.log1p(-torch.rand(*shape.shape, most, generator=generator))
    keep = torch.arange(most) < shape.unsqueeze(-1)
    return (exponentials * keep).sum(dim=-1)


def _ucb1(successes, pulls, t, generator) -> torch.Tensor:
    """Pull each arm once, then the highest mean + sqrt(2 ln t / pulls)."""
    untried = pulls == 0
    bonus = torch.sqrt(2 * math.log(max(t, 1)) / pulls.clamp(min=1))
    index = torch.where(untried, torch.inf, successes / pulls.clamp(min=1) + bonus)
    return index.argmax(dim=1)


def _uniform(successes, pulls, t, generator) -> torch.Tensor:
    return torch.randint(0, pulls.shape[1], (len(pulls),), generator=generator)
