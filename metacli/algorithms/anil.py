"""ANIL, Almost No Inner Loop (Raghu, Raghu, Bengio & Vinyals, "Rapid Learning or Feature Reuse? Towards
Understanding the Effectiveness of MAML", ICLR 2020).

MAML with the inner loop restricted to the linear head: the backbone is meta-learned in the outer loop only. Since
the backbone is the same for every task and every inner step, each task's support and query images are embedded
once and the inner loop runs on the embeddings, which makes a meta-iteration cheaper than MAML's on the same
configuration (``scripts/bench.py --algos maml_second_order anil``).
"""
from __future__ import annotations

from torch import nn

from metacli.algorithms.inner_loop import Params
from metacli.algorithms.maml import MAML


class ANIL(MAML):
    """ANIL: every option of :class:`MAML`, with only the head adapted per task, after fixed backbone features."""

    def features(self) -> nn.Module:
        return self.backbone

    def adapted_module(self) -> nn.Module:
        return self.head

    def adapted_parameters(self) -> Params:
        return dict(self.head.named_parameters())
