"""ANIL, Almost No Inner Loop (Raghu, Raghu, Bengio & Vinyals, "Rapid Learning or Feature Reuse? Towards
Understanding the Effectiveness of MAML", ICLR 2020).

MAML with the inner loop restricted to the linear head: the backbone is meta-learned in the outer loop only. Since
the backbone is the same for every task and every inner step, meta-training embeds each task's support and query
images once, runs the inner loops on the embeddings, and back-propagates into the backbone once. That is what makes a meta-iteration
cheaper than MAML's on the same configuration (``scripts/bench.py --algos maml_second_order anil``).
"""
from __future__ import annotations

import torch

from metacli.algorithms.inner_loop import Params, meta_train_batch
from metacli.algorithms.maml import MAML
from metacli.algorithms.timing import phase
from metacli.data.episodes import EpisodeBatch


class ANIL(MAML):
    """ANIL: every option of :class:`MAML`, with only ``head.*`` adapted per task."""

    def adapted_parameters(self) -> Params:
        return {name: p for name, p in self.named_parameters() if name.startswith("head.")}

    def embed_tasks(self, batch: EpisodeBatch) -> EpisodeBatch:
        """Support and query embeddings of every task, each set normalised with its own BatchNorm statistics.

        Task by task with the native kernels: measured faster on the CPU than one vmapped forward, whose
        BatchNorm must fall back to elementary ops.
        """
        with phase("inner_loop"):
            # Support then query of each task in turn: the running statistics are folded in the serial loop's order.
            embedded = [(self.backbone(s), self.backbone(q)) for s, q in zip(batch.support_x, batch.query_x)]
            support, query = (torch.stack(sets) for sets in zip(*embedded))
        return EpisodeBatch(support, batch.support_y, query, batch.query_y, batch.n_way)

    def meta_train_tasks(self, batch: EpisodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
        embedded = self.embed_tasks(batch)
        # The head's inner loops and query losses run on leaf copies of the embeddings, so that each task can be
        # back-propagated on its own; the backbone then gets its meta-gradient in one backward.
        support = embedded.support_x.detach().requires_grad_()
        query = embedded.query_x.detach().requires_grad_()
        leaves = EpisodeBatch(support, batch.support_y, query, batch.query_y, batch.n_way)
        head = {name.removeprefix("head."): p for name, p in self.adapted_parameters().items()}
        losses, accuracies = meta_train_batch(self.head, head, leaves, self.inner_loop(True), self.inner_path(),
                                              self.family)
        # First order, the support embeddings do not reach the meta-objective, and get no gradient.
        pairs = [(out, leaf.grad) for out, leaf in ((embedded.support_x, support), (embedded.query_x, query))
                 if leaf.grad is not None]
        with phase("outer_backward"):
            torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])
        return losses, accuracies
