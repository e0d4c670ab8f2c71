"""The online learner of continual meta-learning: a linear softmax head over fixed features, learned by plain SGD
on one sample at a time, in one pass (Javed & White, "Meta-Learning Representations for Continual Learning",
NeurIPS 2019; Beaulieu et al., "Learning to Continually Learn", ECAI 2020).

The cross-entropy gradient of a linear head is written out (``softmax - one_hot`` times the features), so one step
is a few tensor operations that serve three callers alike: OML's and ANML's differentiable inner loop (the
meta-gradient flows through it to the representation), a few-shot episode's support set, and the evaluation of
many streams and learning rates at once (any leading dimensions: one head per stream and rate).
"""
from __future__ import annotations

import torch


def logit_error(weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, label: int | torch.Tensor
                ) -> torch.Tensor:
    """The gradient of the cross-entropy of one sample per head with respect to its logits, ``softmax - one_hot``:
    ``weight [..., C, D]``, ``bias [..., C]``, ``features [..., D]``, ``label`` an int shared by every head or a
    ``[...]`` tensor of class indices."""
    error = torch.softmax((weight @ features[..., None]).squeeze(-1) + bias, dim=-1)
    if isinstance(label, int):
        return error - torch.nn.functional.one_hot(torch.tensor(label), error.shape[-1]).to(error)
    return error - torch.nn.functional.one_hot(label, error.shape[-1]).to(error)


def online_step(weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, label: int | torch.Tensor,
             lr: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The head after one SGD step on one sample (per head), as new tensors: differentiable in everything, the
    inner loop of meta-training. ``lr`` is a number or a ``[...]`` tensor, one rate per head."""
    error = logit_error(weight, bias, features, label)
    lr = torch.as_tensor(lr, dtype=error.dtype, device=error.device)[..., None]
    return weight - (lr * error)[..., None] * features[..., None, :], bias - lr * error


def learn_online(weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
                 lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The head after :func:`online_step` on each of ``features [N, D]`` in turn, with its label."""
    for sample, label in zip(features, labels):
        weight, bias = online_step(weight, bias, sample, label, lr)
    return weight, bias


class OnlineHeads:
    """Zero-initialised linear heads over ``n_classes`` classes, one per leading index of ``shape`` (streams,
    learning rates), learned in place by :meth:`learn`; all classes start with equal scores."""

    def __init__(self, shape: tuple[int, ...], n_classes: int, dim: int, device: torch.device | str,
                 dtype: torch.dtype = torch.float32) -> None:
        self.weight = torch.zeros(*shape, n_classes, dim, device=device, dtype=dtype)
        self.bias = torch.zeros(*shape, n_classes, device=device, dtype=dtype)

    @torch.no_grad()
    def learn(self, features: torch.Tensor, label: int | torch.Tensor, lr: torch.Tensor) -> None:
        """One SGD step of every head on its sample (``features [..., D]``, broadcast over ``shape``) with its rate
        (``lr`` broadcastable to ``shape``)."""
        error = logit_error(self.weight, self.bias, features, label)
        scaled = error * lr[..., None]
        classes, dim = self.weight.shape[-2:]
        # weight -= scaled x features as one batched rank-one update in place: no [..., C, D] temporary.
        self.weight.view(-1, classes, dim).baddbmm_(scaled.reshape(-1, classes, 1),
                                                   features.expand(*scaled.shape[:-1], dim).reshape(-1, 1, dim),
                                                   alpha=-1)
        self.bias.sub_(scaled)

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """The predicted class of each of ``features [..., N, D]`` by every head: ``[*shape, N]``."""
        return (features @ self.weight.transpose(-1, -2) + self.bias[..., None, :]).argmax(-1)
