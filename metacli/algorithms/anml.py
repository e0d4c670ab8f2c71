"""ANML, a neuromodulated meta-learning algorithm (Beaulieu, Frati, Miconi, Lehman, Stanley, Clune & Cheney,
"Learning to Continually Learn", ECAI 2020).

OML's online learning (:mod:`metacli.algorithms.oml`) on a gated representation: a second network of the
backbone's shape, the neuromodulator, scales each feature of the prediction network by a sigmoid of its own output
for the same image, so that it can switch off, per input, the features whose learning would disturb other classes.
Both networks and the head's initial weights are meta-learned through the online inner loop; here, as in OML, only
the linear head learns in the inner loop and on test streams.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from metacli.algorithms.oml import OML


class Gated(nn.Module):
    """``features(x) * sigmoid(modulator(x))``: the neuromodulated representation."""

    def __init__(self, features: nn.Module, modulator: nn.Module) -> None:
        super().__init__()
        self.features, self.modulator = features, modulator
        self.out_dim = features.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x) * torch.sigmoid(self.modulator(x))


class ANML(OML):
    """OML with a neuromodulatory gate on its representation. Arguments as :class:`OML`'s; the neuromodulator is a
    freshly initialised copy of the backbone."""

    def __init__(self, backbone: nn.Module, *args, **kwargs) -> None:
        super().__init__(backbone, *args, **kwargs)
        self.modulator = copy.deepcopy(backbone)
        for module in self.modulator.modules():
            if module is not self.modulator and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def representation(self) -> nn.Module:
        return Gated(self.backbone, self.modulator)
