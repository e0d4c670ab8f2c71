"""The action distributions of the policies, sampled from an explicit generator (torch.distributions draws from the
global one, which a resumed run could not put back to where it was between rollouts)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Gaussian:
    """A diagonal Gaussian over continuous actions; ``log_std`` broadcasts against ``mean``."""

    mean: torch.Tensor
    log_std: torch.Tensor

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype)
        return self.mean + self.log_std.exp() * noise

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        z = (actions - self.mean) * torch.exp(-self.log_std)
        return (-0.5 * z.pow(2) - self.log_std - 0.5 * torch.log(torch.tensor(2 * torch.pi))).sum(dim=-1)

    def kl(self, other: "Gaussian") -> torch.Tensor:
        """KL(self || other), summed over action dimensions."""
        variance, other_variance = (2 * self.log_std).exp(), (2 * other.log_std).exp()
        return (other.log_std - self.log_std + (variance + (self.mean - other.mean).pow(2)) / (2 * other_variance)
                - 0.5).sum(dim=-1)

    def entropy(self) -> torch.Tensor:
        return (self.log_std + 0.5 * torch.log(torch.tensor(2 * torch.pi * torch.e))).expand_as(self.mean).sum(-1)

    def reshape(self, *shape: int) -> "Gaussian":
        """The same distribution over a batch of another shape (the last dimension kept)."""
        return Gaussian(self.mean.reshape(*shape, self.mean.shape[-1]), self.log_std)

    def detach(self) -> "Gaussian":
        return Gaussian(self.mean.detach(), self.log_std.detach().expand_as(self.mean))

    @staticmethod
    def stack(items: list["Gaussian"], dim: int) -> "Gaussian":
        return Gaussian(torch.stack([d.mean for d in items], dim), torch.stack([d.log_std for d in items], dim))


@dataclass
class Categorical:
    """A distribution over discrete actions, by its logits."""

    logits: torch.Tensor

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        probabilities = self.logits.softmax(dim=-1).reshape(-1, self.logits.shape[-1])
        return torch.multinomial(probabilities, 1, generator=generator).view(self.logits.shape[:-1])

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        return self.logits.log_softmax(dim=-1).gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)

    def kl(self, other: "Categorical") -> torch.Tensor:
        mine = self.logits.log_softmax(dim=-1)
        return (mine.exp() * (mine - other.logits.log_softmax(dim=-1))).sum(dim=-1)

    def entropy(self) -> torch.Tensor:
        log_p = self.logits.log_softmax(dim=-1)
        return -(log_p.exp() * log_p).sum(dim=-1)

    def reshape(self, *shape: int) -> "Categorical":
        return Categorical(self.logits.reshape(*shape, self.logits.shape[-1]))

    def detach(self) -> "Categorical":
        return Categorical(self.logits.detach())

    @staticmethod
    def stack(items: list["Categorical"], dim: int) -> "Categorical":
        return Categorical(torch.stack([d.logits for d in items], dim))
