"""MAML for reinforcement learning (Finn et al. 2017, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
Networks", section 3.2): a policy adapted to each task by a policy-gradient step on its own trajectories, the
initialisation meta-trained so that the adapted policies earn more, with a trust-region (TRPO) outer step
differentiated through the inner step (second order), or through its result only (``first_order``)."""
from __future__ import annotations

import gymnasium
import torch
from torch import nn

from metacli.algorithms.meta_rl import PolicyGradientLearner
from metacli.rl.advantages import baseline_advantages
from metacli.rl.policies import Params
from metacli.rl.rollout import Rollout
from metacli.rl.task_envs import TaskBatch
from metacli.rl.trpo import kl_hessian_product, trpo_step


class MAMLRL(PolicyGradientLearner):
    """Its TRPO step moves the parameters itself: ``trainer.optimizer`` is not used.

    Args (beyond :class:`PolicyGradientLearner`'s):
        inner_steps: adaptation steps in meta-training (the paper: 1); 0 trains one policy on all tasks.
        first_order: drop the second-order terms of the meta-gradient.
        max_kl, damping, cg_iterations, backtrack_ratio, max_backtracks: the TRPO outer step.
        curvature: the trust region's metric. ``inner_loop``: the Hessian of the KL through the inner step, as the
            paper; ``adapted``: the KL's Hessian in the adapted policies' parameters, the inner step's Jacobian
            taken as the identity: several times cheaper a conjugate-gradient iteration. Either way the gradient
            is the exact meta-gradient and the line search checks the exact KL.
    """

    uses_optimizer = False

    def __init__(self, backbone: nn.Module, observation_space: gymnasium.Space, action_space: gymnasium.Space,
                 inner_lr: float = 0.1, inner_steps: int = 1, test_inner_steps: int = 3, first_order: bool = False,
                 max_kl: float = 0.01, damping: float = 1e-5, cg_iterations: int = 10, backtrack_ratio: float = 0.8,
                 max_backtracks: int = 15, curvature: str = "inner_loop", init_log_std: float = 0.0) -> None:
        super().__init__(backbone, observation_space, action_space, inner_lr, test_inner_steps, init_log_std)
        if inner_steps < 0 or max_kl <= 0:
            raise ValueError(f"inner_steps={inner_steps} must not be negative and max_kl={max_kl} must be positive")
        if curvature not in ("inner_loop", "adapted"):
            raise ValueError(f"curvature={curvature!r}: choose inner_loop or adapted")
        self.curvature = curvature
        self.inner_steps, self.first_order = inner_steps, first_order
        self.trust_region = dict(max_kl=max_kl, damping=damping, cg_iterations=cg_iterations,
                                 backtrack_ratio=backtrack_ratio, max_backtracks=max_backtracks)

    def _adapted(self, params: Params, support: list[Rollout], differentiable: bool) -> tuple[Params, bool]:
        """The parameters after the inner steps on ``support`` (one rollout a step), and whether one set a task."""
        per_task = False
        for sampled in support:
            params = self.adapt(params, sampled, per_task, create_graph=differentiable and not self.first_order)
            if self.first_order:  # the adapted values, their dependence on the initialisation dropped
                params = {k: v.detach() + (p - p.detach()) for (k, v), p in
                          zip(params.items(), self.policy.parameters_dict().values())}
            per_task = True
        return params, per_task

    def meta_update(self, batch: TaskBatch, optimizer=None) -> dict[str, float]:
        generator = batch.generator()
        params = self.policy.parameters_dict()
        support = []
        for _ in range(self.inner_steps):  # trajectories of the current adapted policy, one set a step
            adapted, per_task = self._adapted(params, support, differentiable=False)
            support.append(self.sample(batch, {k: v.detach() for k, v in adapted.items()}, per_task, generator))
        adapted, per_task = self._adapted(params, support, differentiable=False)
        query = self.sample(batch, {k: v.detach() for k, v in adapted.items()}, per_task, generator)
        advantages = baseline_advantages(query.observations, query.rewards, query.gamma)
        old_log_probs = query.behaviour.log_prob(query.actions)

        def surrogate() -> tuple[torch.Tensor, torch.Tensor]:
            adapted, per_task = self._adapted(self.policy.parameters_dict(), support, differentiable=True)
            distribution = self.policy.distribution(adapted, query.observations, per_task)
            ratio = torch.exp(distribution.log_prob(query.actions) - old_log_probs)
            return -(ratio * advantages).mean(), query.behaviour.kl(distribution).mean()

        def adapted_curvature():
            """The KL's Hessian in each task's adapted parameters (those the query trajectories were sampled with),
            a vector spread to every task and the products summed back, as the KL averages over tasks."""
            leaves = [v.detach().requires_grad_() for v in adapted.values()]
            distribution = self.policy.distribution(dict(zip(adapted, leaves)), query.observations, per_task=True)
            sizes = [p.numel() for p in self.policy.parameters()]
            count = len(batch)

            def spread(vector):
                return torch.cat([part.expand(count, -1).reshape(-1) for part in vector.split(sizes)])

            def gather(vector):
                return torch.cat([part.view(count, -1).sum(dim=0) for part in vector.split([count * n for n in sizes])])
            return kl_hessian_product(query.behaviour.kl(distribution).mean(), leaves, spread, gather)

        use_adapted = self.curvature == "adapted" and support
        step = trpo_step(list(self.policy.parameters()), surrogate, **self.trust_region,
                         curvature=adapted_curvature if use_adapted else None)
        returns = query.returns().mean().item()
        metrics = {"loss": step["loss"], "return": returns, "kl": step["kl"], "step_fraction": step["step_fraction"]}
        if support:
            metrics["return_before_adaptation"] = support[0].returns().mean().item()
        return metrics
