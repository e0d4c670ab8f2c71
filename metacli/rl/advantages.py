"""Returns, baselines and advantages of a batch of trajectories, all ``[T, N, H]`` (tasks, trajectories, steps)."""
from __future__ import annotations

import torch


def discounted_returns(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """The discounted return from each step to the end of its trajectory."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in reversed(range(rewards.shape[-1])):
        running = rewards[..., t] + gamma * running
        returns[..., t] = running
    return returns


def linear_feature_baseline(observations: torch.Tensor, returns: torch.Tensor, ridge: float = 1e-5) -> torch.Tensor:
    """The linear feature baseline of Duan et al. (2016), which MAML's policy gradients use: per task, a ridge
    regression of the returns on the observations, their squares and a cubic in time, fitted to the task's own
    trajectories. The ridge grows tenfold until the normal equations solve (a rank-deficient batch)."""
    t, n, h, _ = observations.shape
    clipped = observations.clamp(-10, 10)
    time = (torch.arange(h, dtype=observations.dtype) / 100.0).view(1, 1, h, 1).expand(t, n, h, 1)
    features = torch.cat([clipped, clipped.pow(2), time, time.pow(2), time.pow(3), torch.ones_like(time)], dim=-1)
    x, y = features.reshape(t, n * h, -1).double(), returns.reshape(t, n * h, 1).double()
    gram, target = x.transpose(1, 2) @ x, x.transpose(1, 2) @ y
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype)
    for _ in range(8):
        weights, info = torch.linalg.solve_ex(gram + ridge * eye, target)
        if bool((info == 0).all()) and bool(weights.isfinite().all()):
            break
        ridge *= 10
    return (x @ weights).view(t, n, h).to(returns.dtype)


def normalized(advantages: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Advantages with zero mean and unit deviation within each task."""
    flat = advantages.flatten(1)
    mean, std = flat.mean(dim=1), flat.std(dim=1)
    shape = (-1,) + (1,) * (advantages.dim() - 1)
    return (advantages - mean.view(shape)) / (std.view(shape) + eps)


def baseline_advantages(observations: torch.Tensor, rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """Discounted returns minus the linear feature baseline, normalised per task: MAML-RL's advantages."""
    returns = discounted_returns(rewards, gamma)
    return normalized(returns - linear_feature_baseline(observations, returns))


def generalized_advantages(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """GAE(γ, λ) (Schulman et al. 2016) of ``[..., H]`` rewards and value estimates, the value after the last step
    taken as 0 (trials end there)."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    next_value = torch.zeros_like(rewards[..., 0])
    for t in reversed(range(rewards.shape[-1])):
        delta = rewards[..., t] + gamma * next_value - values[..., t]
        running = delta + gamma * lam * running
        advantages[..., t] = running
        next_value = values[..., t]
    return advantages
