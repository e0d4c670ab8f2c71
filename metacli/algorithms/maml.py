"""Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
Networks", ICML 2017), second order by default, first order (FOMAML) with ``first_order=true``.

The network is the backbone plus a linear head (``n_way`` outputs; one for regression). Each task adapts all parameters with a few SGD steps on
its support set (``inner_steps`` at ``inner_lr`` in training, ``test_inner_steps`` at ``test_inner_lr`` at
evaluation); the query loss after adaptation is the meta-objective.
"""
from __future__ import annotations

import torch
from torch import nn

from metacli.algorithms.base import FewShotLearner
from metacli.algorithms.inner_loop import (InnerLoop, Params, adapt_to_support, functional_forward, inner_path,
                                           meta_train_batch)
from metacli.data.episodes import Episode, EpisodeBatch


class MAML(FewShotLearner):
    """MAML and first-order MAML.

    Args:
        backbone, n_way, bn_mode: see :class:`FewShotLearner`.
        inner_lr, inner_steps: inner SGD during meta-training.
        test_inner_lr, test_inner_steps: inner SGD at evaluation (``None``: as in training).
        first_order: drop the second-order terms of the meta-gradient.
        vectorize: meta-train the tasks of a meta-batch with ``torch.func.vmap`` (``true``), one by one
            (``false``), or whichever is faster on the device (``auto``: vmap on CUDA, serial on CPU). Evaluation
            is always per episode. Every path gives the same meta-gradient and running BatchNorm statistics.
        batch_first_step: on the non-vectorised path, run the first inner step of all tasks as one batch.
        checkpoint_inner: recompute each inner step in the outer backward instead of storing it (memory flat in
            ``inner_steps``, at the cost of one more forward and backward per step).
        task_threads: see :class:`FewShotLearner`; the vectorised path always runs on one.
    """

    families = ("classification", "regression")
    fixed_way = True

    def __init__(self, backbone, n_way: int, bn_mode: str = "transductive", inner_lr: float = 0.4,
                 inner_steps: int = 1, test_inner_lr: float | None = None, test_inner_steps: int | None = None,
                 first_order: bool = False, vectorize: bool | str = "auto", batch_first_step: bool = True,
                 checkpoint_inner: bool = False, task_threads: int | str = "auto") -> None:
        super().__init__(backbone, n_way, bn_mode, task_threads)
        if vectorize not in (True, False, "auto"):
            raise ValueError(f"algo.vectorize must be true, false or auto, got {vectorize!r}")
        test_inner_lr = inner_lr if test_inner_lr is None else test_inner_lr
        test_inner_steps = inner_steps if test_inner_steps is None else test_inner_steps
        if inner_lr <= 0 or inner_steps < 1 or test_inner_lr <= 0 or test_inner_steps < 0:
            raise ValueError(f"MAML needs inner_lr>0, inner_steps>=1, test_inner_lr>0 and test_inner_steps>=0; got "
                             f"{inner_lr}, {inner_steps}, {test_inner_lr} and {test_inner_steps}")
        self.head = nn.Linear(backbone.out_dim, n_way)
        self.train_loop = InnerLoop(inner_steps, inner_lr, second_order=not first_order, checkpoint=checkpoint_inner)
        self.test_loop = InnerLoop(test_inner_steps, test_inner_lr)
        self.vectorize, self.batch_first_step = vectorize, batch_first_step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def adapted_parameters(self) -> Params:
        """The parameters the inner loop adapts: all of the network's (ANIL narrows this to the head)."""
        return {name: p for name, p in self.named_parameters() if name.startswith(("backbone.", "head."))}

    def inner_loop(self, training: bool) -> InnerLoop:
        """The inner loop of meta-training or of evaluation (Meta-SGD swaps in its learned rates)."""
        return self.train_loop if training else self.test_loop

    def adapt(self, episode: Episode, training: bool) -> Params:
        """Parameters after the inner loop on ``episode``'s support set (the test loop unless ``training``)."""
        return adapt_to_support(self, self.adapted_parameters(), episode, self.inner_loop(training), training,
                                self.family)

    def query_logits(self, episode: Episode, training: bool) -> torch.Tensor:
        return functional_forward(self, self.adapt(episode, training), episode.query_x)

    def inner_path(self) -> str:
        return inner_path(self.vectorize, self.batch_first_step, next(self.parameters()).device)

    def meta_batch_workers(self) -> int:
        return 1 if self.inner_path() == "vmap" else super().meta_batch_workers()

    def meta_train_tasks(self, batch: EpisodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return meta_train_batch(self, self.adapted_parameters(), batch, self.inner_loop(True), self.inner_path(),
                                self.family)
