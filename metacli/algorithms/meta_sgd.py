"""Meta-SGD (Li, Zhou, Chen & Li, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning", 2017).

MAML whose inner learning rate is a learned tensor of the same shape as each parameter, meta-learned jointly with
the initialisation: one inner step is ``theta - alpha * grad`` with ``*`` elementwise. The rates are parameters of
the module, so checkpoints keep them; each training step logs their mean, spread and sign balance.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from metacli.algorithms.inner_loop import InnerLoop
from metacli.algorithms.maml import MAML


class MetaSGD(MAML):
    """Meta-SGD: the options of :class:`MAML`; ``inner_lr`` initialises every learned rate.

    ``test_inner_lr`` is not used: evaluation adapts with the learned rates, as the paper does.
    """

    def __init__(self, backbone, n_way: int, bn_mode: str = "transductive", inner_lr: float = 0.4, **options) -> None:
        super().__init__(backbone, n_way, bn_mode, inner_lr=inner_lr, **options)
        # ParameterDict keys may not contain dots, so the rates are keyed by the parameter name with "/" for ".".
        self.inner_rates = nn.ParameterDict({
            name.replace(".", "/"): nn.Parameter(torch.full_like(p, inner_lr))
            for name, p in self.adapted_parameters().items()})

    def learned_rates(self) -> dict[str, torch.Tensor]:
        return {key.replace("/", "."): rate for key, rate in self.inner_rates.items()}

    def inner_loop(self, training: bool) -> InnerLoop:
        return dataclasses.replace(super().inner_loop(training), lr=self.learned_rates())

    def training_metrics(self) -> dict[str, float]:
        with torch.no_grad():
            rates = torch.cat([rate.flatten() for rate in self.inner_rates.values()])
            return {"inner_lr_mean": rates.mean().item(), "inner_lr_std": rates.std().item(),
                    "inner_lr_negative_fraction": (rates < 0).float().mean().item()}
