"""RL² (Duan et al. 2016, "RL²: Fast Reinforcement Learning via Slow Reinforcement Learning"): a recurrent policy
whose hidden state runs through a trial of several episodes of one task, so that learning the task happens in its
activations; the weights are meta-trained across tasks with PPO (Schulman et al. 2017) instead of the paper's TRPO,
on whole trials, with GAE over the trial."""
from __future__ import annotations

import gymnasium
import torch
from torch import nn

from metacli.algorithms.meta_rl import MetaRLLearner, StageMetrics, stage_metrics
from metacli.rl.advantages import generalized_advantages
from metacli.rl.policies import RecurrentPolicy
from metacli.rl.rollout import Rollout, rollout
from metacli.rl.task_envs import TaskBatch


class RL2(MetaRLLearner):
    """Args:
        hidden: GRU units (the paper: 256 for bandits).
        episodes_per_trial: episodes of one task the hidden state runs through.
        gae_lambda: GAE's λ (the discount is the task family's ``gamma``).
        ppo_epochs, minibatches, clip: PPO's passes over a batch of trials, trials split into minibatches, and
            ratio clip.
        value_coef, entropy_coef, max_grad_norm: the value loss and entropy bonus weights, the gradient clip.
    """

    def __init__(self, observation_space: gymnasium.Space, action_space: gymnasium.Space, hidden: int = 256,
                 episodes_per_trial: int = 1, gae_lambda: float = 0.95, ppo_epochs: int = 4, minibatches: int = 4,
                 clip: float = 0.2, value_coef: float = 0.5, entropy_coef: float = 0.01,
                 max_grad_norm: float = 1.0) -> None:
        super().__init__(observation_space, action_space)
        if min(hidden, episodes_per_trial, ppo_epochs, minibatches) < 1 or not 0 < clip < 1:
            raise ValueError("hidden, episodes_per_trial, ppo_epochs and minibatches must be at least 1 and clip "
                             "in (0, 1)")
        self.policy = RecurrentPolicy(observation_space, action_space, hidden)
        self.episodes_per_trial, self.gae_lambda = episodes_per_trial, gae_lambda
        self.ppo_epochs, self.minibatches, self.clip = ppo_epochs, minibatches, clip
        self.value_coef, self.entropy_coef, self.max_grad_norm = value_coef, entropy_coef, max_grad_norm

    def _act(self, observations, previous, memory):
        tasks, per_task = observations.shape[:2]
        flat = observations.reshape(tasks * per_task, 1, -1)
        if previous is None:
            inputs = self.policy.inputs(flat, None, None, None)
        else:
            actions, rewards, first = previous
            inputs = self.policy.inputs(flat, actions.reshape(tasks * per_task, 1, *actions.shape[2:]),
                                        rewards.reshape(-1, 1), first.reshape(-1, 1))
        distribution, _, memory = self.policy(inputs, memory)
        return distribution.reshape(tasks, per_task), memory

    def _trials(self, batch: TaskBatch, generator: torch.Generator) -> Rollout:
        return rollout(batch, self._act, batch.family.trajectories, generator, self.episodes_per_trial)

    def _sequence_inputs(self, sampled: Rollout) -> torch.Tensor:
        """The inputs the policy saw at each step of each trial, rebuilt for one pass over whole sequences."""
        t, n, length = sampled.rewards.shape
        observations = sampled.observations.reshape(t * n, length, -1)
        actions = sampled.actions.reshape(t * n, length, *sampled.actions.shape[3:])
        rewards = sampled.rewards.reshape(t * n, length)
        previous_actions = torch.cat([torch.zeros_like(actions[:, :1]), actions[:, :-1]], dim=1)
        previous_rewards = torch.cat([torch.zeros_like(rewards[:, :1]), rewards[:, :-1]], dim=1)
        first = torch.zeros(t * n, length, dtype=torch.bool)
        first[:, ::length // sampled.episodes] = True
        inputs = self.policy.inputs(observations, previous_actions, previous_rewards, first)
        if not self.policy.continuous:  # the trial's first step saw no action at all, not action 0
            inputs[:, 0, observations.shape[-1]:observations.shape[-1] + self.policy.actions] = 0
        return inputs

    def meta_update(self, batch: TaskBatch, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        generator = batch.generator()
        sampled = self._trials(batch, generator)
        inputs = self._sequence_inputs(sampled)
        count = inputs.shape[0]
        actions = sampled.actions.reshape(count, *sampled.actions.shape[2:])
        old_log_probs = sampled.behaviour.log_prob(sampled.actions).reshape(count, -1)
        rewards = sampled.rewards.reshape(count, -1)
        with torch.no_grad():
            _, values, _ = self.policy(inputs)
        advantages = generalized_advantages(rewards, values, sampled.gamma, self.gae_lambda)
        targets = advantages + values
        # Returns of a trial run to tens or hundreds: the value error is measured in units of their spread, so that
        # it does not drown the policy's gradient in the shared GRU (both pass one gradient clip).
        target_scale = targets.std() + 1e-8
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        size = max(1, count // self.minibatches)
        losses = []
        for _ in range(self.ppo_epochs):
            order = torch.randperm(count, generator=generator)
            for start in range(0, count, size):
                chosen = order[start:start + size]
                distribution, value, _ = self.policy(inputs[chosen])
                ratio = torch.exp(distribution.log_prob(actions[chosen]) - old_log_probs[chosen])
                clipped = ratio.clamp(1 - self.clip, 1 + self.clip)
                policy_loss = -torch.min(ratio * advantages[chosen], clipped * advantages[chosen]).mean()
                loss = (policy_loss + self.value_coef * ((value - targets[chosen]) / target_scale).pow(2).mean()
                        - self.entropy_coef * distribution.entropy().mean())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                norm = nn.utils.clip_grad_norm_(self.parameters(), self.max_grad_norm)
                if not (torch.isfinite(loss) and torch.isfinite(norm)):  # stop before a non-finite step lands
                    return {"loss": float("nan"), "return": sampled.returns().mean().item()}
                optimizer.step()
                losses.append(loss.item())
        return {"loss": sum(losses) / len(losses), "return": sampled.returns().mean().item(),
                **{k: v.mean().item() for k, v in batch.family.extra_metrics(sampled).items()}}

    def stages(self, batch: TaskBatch) -> dict[str, StageMetrics]:
        sampled = self._trials(batch, batch.generator())
        return {f"episode {e + 1}": stage_metrics(batch, sampled.episode(e)) for e in range(sampled.episodes)}
