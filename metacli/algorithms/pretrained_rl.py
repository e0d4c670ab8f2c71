"""The multi-task pretrained baseline of MAML's RL experiments (Finn et al. 2017, section 5.3): one policy trained
on all the training tasks at once (it cannot tell them apart), with the same TRPO step as MAML-RL, then fine-tuned
on a test task by the same policy-gradient steps."""
from __future__ import annotations

import gymnasium
from torch import nn

from metacli.algorithms.maml_rl import MAMLRL


class PretrainedPolicy(MAMLRL):
    """MAML-RL with no inner step in training: see :class:`~metacli.algorithms.maml_rl.MAMLRL` for the arguments."""

    def __init__(self, backbone: nn.Module, observation_space: gymnasium.Space, action_space: gymnasium.Space,
                 **settings) -> None:
        super().__init__(backbone, observation_space, action_space, inner_steps=0, **settings)
