"""ANIL, Almost No Inner Loop (Raghu, Raghu, Bengio & Vinyals, "Rapid Learning or Feature Reuse? Towards
Understanding the Effectiveness of MAML", ICLR 2020).

MAML with the inner loop restricted to the linear head: the backbone is meta-learned in the outer loop only. The
inner gradient then never runs back through the convolutions, so a meta-iteration costs less than MAML's on the
same configuration (``scripts/bench.py --algos maml_second_order anil``).
"""
from __future__ import annotations

from metacli.algorithms.inner_loop import Params
from metacli.algorithms.maml import MAML


class ANIL(MAML):
    """ANIL: every option of :class:`MAML`, with only ``head.*`` adapted per task."""

    def adapted_parameters(self) -> Params:
        return {name: p for name, p in self.named_parameters() if name.startswith("head.")}
