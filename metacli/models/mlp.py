"""A fully connected network (ReLU or tanh) for vector inputs: MAML's sinusoid regressor is ``MLP(hidden=[40, 40])`` (Finn et
al. 2017, section 5.1), followed by the learner's output layer."""
from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


class MLP(nn.Module):
    """Args:
        in_channels: input features (injected from the dataset: 1 for a sinusoid's x).
        image_size: injected like the other backbones'; an MLP takes vectors, so it must be None.
        hidden: the width of each hidden layer.
        activation: ``relu`` or ``tanh`` (the locomotion policies of the meta-RL papers).
    """

    #: Takes vectors (a sinusoid's x, an agent's observations), not images.
    vector_inputs = True

    def __init__(self, in_channels: int = 1, image_size: int | None = None, hidden: list[int] | tuple[int, ...] = (40, 40),
                 activation: str = "relu") -> None:
        super().__init__()
        if image_size is not None:
            raise ValueError("an MLP takes vectors, not images: use backbone=conv4 or resnet12 for an image dataset")
        if not hidden or any(width < 1 for width in hidden):
            raise ValueError(f"backbone.hidden={list(hidden)}: give one or more positive widths, e.g. [40, 40]")
        if activation not in ACTIVATIONS:
            raise ValueError(f"backbone.activation={activation!r}: choose one of {', '.join(ACTIVATIONS)}")
        layers, width = [], in_channels
        for out in hidden:
            layers += [nn.Linear(width, out), ACTIVATIONS[activation]()]
            width = out
        self.layers = nn.Sequential(*layers)
        self.out_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
