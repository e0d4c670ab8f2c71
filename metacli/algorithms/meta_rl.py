"""The interface of meta-reinforcement-learning learners, and the policy-gradient adaptation MAML-RL and the
pretrained baseline share.

A meta-RL learner never sees a dataset: it is given a :class:`~metacli.rl.task_envs.TaskBatch` (tasks, the
vector environment that steps them, a seed) and samples its own trajectories. Its outer update needs more than one
gradient (a trust-region search, PPO's epochs), so it steps itself (``updates_itself``): the runner hands it the
optimiser and reads back the step's numbers. A non-finite ``loss`` says the update stopped before applying a
non-finite step (TRPO applies nothing then; PPO keeps its earlier minibatches' steps).
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import gymnasium
import torch
from torch import nn

from metacli.rl.advantages import baseline_advantages
from metacli.rl.policies import FeedForwardPolicy, Params
from metacli.rl.rollout import Rollout, rollout
from metacli.rl.task_envs import TaskBatch
from metacli.tasks import REINFORCEMENT, TaskFamily

#: A stage's per-task numbers: the mean undiscounted return and the family's own (regret, success).
StageMetrics = dict[str, torch.Tensor]


class MetaRLLearner(nn.Module, ABC):
    """Base class: meta-train on batches of tasks, and report how well the learner does on held-out tasks at each
    stage of its adaptation (before it, after each gradient step, or each episode of a trial)."""

    families: tuple[str, ...] = ("reinforcement",)
    family: TaskFamily = REINFORCEMENT
    updates_itself = True
    #: Whether the update steps the run's ``trainer.optimizer`` (PPO's Adam) or needs none (a trust-region step).
    uses_optimizer = True
    #: Sampling draws random numbers in order: a meta-batch runs on one thread (batched over its tasks instead).
    parallel_tasks = False

    def __init__(self, observation_space: gymnasium.Space, action_space: gymnasium.Space) -> None:
        super().__init__()
        self.observation_space, self.action_space = observation_space, action_space

    @abstractmethod
    def meta_update(self, batch: TaskBatch, optimizer: torch.optim.Optimizer | None) -> dict[str, float]:
        """Sample ``batch``'s tasks, update the learner; return ``loss``, ``return`` and numbers of its own."""

    @abstractmethod
    def stages(self, batch: TaskBatch) -> dict[str, StageMetrics]:
        """Each adaptation stage's per-task metrics on ``batch``, in order; the last is the learner's score."""

    def evaluate_batch(self, batch: TaskBatch) -> list[float]:
        """Each task's return at the final stage (what validation selects on)."""
        return list(self.stages(batch).values())[-1]["return"].tolist()


def stage_metrics(batch: TaskBatch, sampled: Rollout) -> StageMetrics:
    return {"return": sampled.returns(), **batch.family.extra_metrics(sampled)}


class PolicyGradientLearner(MetaRLLearner):
    """A feed-forward policy adapted to a task by vanilla policy-gradient steps (REINFORCE with the linear feature
    baseline), each on ``trajectories`` fresh episodes of the current adapted policy.

    Args:
        backbone: the policy's body (``backbone=mlp``), sized by the builder for the observations.
        inner_lr: the adaptation step size α.
        test_inner_steps: adaptation steps reported at test (MAML's figure: 1 to 3).
        init_log_std: the initial log standard deviation of continuous actions.
    """

    def __init__(self, backbone: nn.Module, observation_space: gymnasium.Space, action_space: gymnasium.Space,
                 inner_lr: float = 0.1, test_inner_steps: int = 3, init_log_std: float = 0.0) -> None:
        super().__init__(observation_space, action_space)
        if inner_lr < 0 or test_inner_steps < 0:
            raise ValueError(f"inner_lr={inner_lr} and test_inner_steps={test_inner_steps} must not be negative")
        self.policy = FeedForwardPolicy(backbone, action_space, init_log_std)
        self.inner_lr, self.test_inner_steps = inner_lr, test_inner_steps

    def act(self, params: Params, per_task: bool):
        def act(observations, previous, memory):
            return self.policy.distribution(params, observations, per_task), None
        return act

    def sample(self, batch: TaskBatch, params: Params, per_task: bool, generator: torch.Generator) -> Rollout:
        return rollout(batch, self.act(params, per_task), batch.family.trajectories, generator)

    def adapt(self, params: Params, sampled: Rollout, per_task: bool, create_graph: bool) -> Params:
        """One policy-gradient step on each task's trajectories: ``[T, ...]`` parameters, one set a task. Each
        task's gradient comes from one backward pass over the whole batch, taken with respect to the parameters
        repeated a task (each task's loss reaches only its own copy)."""
        count = len(sampled.tasks)
        repeated = params if per_task else {k: v.expand(count, *v.shape) for k, v in params.items()}
        advantages = baseline_advantages(sampled.observations, sampled.rewards, sampled.gamma)
        log_probs = self.policy.distribution(repeated, sampled.observations, per_task=True).log_prob(sampled.actions)
        losses = -(log_probs * advantages).flatten(1).mean(dim=1)
        grads = torch.autograd.grad(losses.sum(), list(repeated.values()), create_graph=create_graph)
        return {name: value - self.inner_lr * grad for (name, value), grad in zip(repeated.items(), grads)}

    def stages(self, batch: TaskBatch) -> dict[str, StageMetrics]:
        generator = batch.generator()
        params, per_task = {k: v.detach() for k, v in self.policy.parameters_dict().items()}, False
        results = {}
        for step in range(self.test_inner_steps + 1):
            sampled = self.sample(batch, params, per_task, generator)
            results["before adaptation" if step == 0 else f"after {step} step{'s' * (step > 1)}"] = \
                stage_metrics(batch, sampled)
            if step < self.test_inner_steps:
                with torch.enable_grad():
                    params = {k: v.detach().requires_grad_() for k, v in params.items()}
                    params = {k: v.detach() for k, v in self.adapt(params, sampled, per_task, False).items()}
                per_task = True
        return results
