"""The policies of the meta-RL learners: a feed-forward policy (MAML-RL, the pretrained baseline) whose parameters
may differ per task, and a recurrent policy whose memory runs through a whole trial (RL²)."""
from __future__ import annotations

import gymnasium
import torch
from torch import nn

from metacli.rl.distributions import Categorical, Gaussian

Params = dict[str, torch.Tensor]


def action_size(space: gymnasium.Space) -> int:
    """Outputs a policy head needs: a mean per continuous dimension, a logit per discrete action."""
    if isinstance(space, gymnasium.spaces.Box):
        return int(space.shape[0])
    if isinstance(space, gymnasium.spaces.Discrete):
        return int(space.n)
    raise ValueError(f"actions in {space} are not supported: give a Box or a Discrete action space")


class FeedForwardPolicy(nn.Module):
    """``body`` (the backbone, an MLP) and a linear head: a Gaussian's mean with a learned state-independent log
    standard deviation for continuous actions, logits for discrete ones.

    :meth:`distribution` takes parameters explicitly, shared (``[out, in]`` weights) or one set a task (``[T, out,
    in]``, with observations ``[T, ...]``), so a meta-batch's adapted policies act in one batched call."""

    def __init__(self, body: nn.Module, action_space: gymnasium.Space, init_log_std: float = 0.0) -> None:
        super().__init__()
        self.body = body
        self.continuous = isinstance(action_space, gymnasium.spaces.Box)
        self.head = nn.Linear(body.out_dim, action_size(action_space))
        if self.continuous:
            self.log_std = nn.Parameter(torch.full((action_size(action_space),), float(init_log_std)))

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(observations))

    def parameters_dict(self) -> Params:
        return dict(self.named_parameters())

    def _linear(self, params: Params, name: str, x: torch.Tensor, per_task: bool) -> torch.Tensor:
        weight, bias = params[f"{name}.weight"], params[f"{name}.bias"]
        if per_task:  # [T, M, in] @ [T, in, out]: batched matrix products, cheap to differentiate twice
            return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
        return nn.functional.linear(x, weight, bias)

    def _output(self, params: Params, observations: torch.Tensor, per_task: bool) -> torch.Tensor:
        """The head's output for ``params``, written out layer by layer over the body's linear layers and
        activations (the MLP backbone's)."""
        x = observations.reshape(observations.shape[0], -1, observations.shape[-1]) if per_task else observations
        for index, module in self.body.layers.named_children():
            x = self._linear(params, f"body.layers.{index}", x, per_task) if isinstance(module, nn.Linear) \
                else module(x)
        return self._linear(params, "head", x, per_task).reshape(*observations.shape[:-1], -1)

    def distribution(self, params: Params, observations: torch.Tensor, per_task: bool = False):
        output = self._output(params, observations, per_task)
        if not self.continuous:
            return Categorical(output)
        log_std = params["log_std"]
        if per_task:  # [T, act] against outputs [T, ..., act]
            log_std = log_std.view(log_std.shape[0], *([1] * (output.dim() - 2)), -1)
        return Gaussian(output, log_std)


class RecurrentPolicy(nn.Module):
    """A GRU over (observation, previous action, previous reward, new-episode flag), its state carried across the
    episodes of a trial, with a policy head and a value head (RL², Duan et al. 2016)."""

    def __init__(self, observation_space: gymnasium.Space, action_space: gymnasium.Space, hidden: int) -> None:
        super().__init__()
        self.continuous = isinstance(action_space, gymnasium.spaces.Box)
        self.actions = action_size(action_space)
        inputs = int(observation_space.shape[0]) + self.actions + 2
        self.gru = nn.GRU(inputs, hidden, batch_first=True)
        self.policy_head = nn.Linear(hidden, self.actions)
        self.value_head = nn.Linear(hidden, 1)
        if self.continuous:
            self.log_std = nn.Parameter(torch.zeros(self.actions))

    def inputs(self, observations: torch.Tensor, actions: torch.Tensor | None, rewards: torch.Tensor | None,
               first: torch.Tensor | None) -> torch.Tensor:
        """Each step's input, from ``[B, L, ...]`` observations and the previous step's action, reward and flag
        (None at a trial's first step: zeros)."""
        shape = observations.shape[:-1]
        if actions is None:
            encoded = torch.zeros(*shape, self.actions)
            rewards, first = torch.zeros(shape), torch.ones(shape)
        else:
            encoded = actions if self.continuous else nn.functional.one_hot(actions.long(), self.actions).float()
        return torch.cat([observations, encoded, rewards.unsqueeze(-1), first.float().unsqueeze(-1)], dim=-1)

    def forward(self, inputs: torch.Tensor, hidden: torch.Tensor | None = None):
        """The action distribution and value of each step of ``[B, L, in]`` inputs, and the last hidden state."""
        features, hidden = self.gru(inputs, hidden)
        head = self.policy_head(features)
        distribution = Gaussian(head, self.log_std) if self.continuous else Categorical(head)
        return distribution, self.value_head(features).squeeze(-1), hidden
