"""TADAM (Oreshkin, Rodríguez López & Lacoste, "TADAM: Task dependent adaptive metric for improved few-shot
learning", NeurIPS 2018): Prototypical Networks with a learned metric scale, a backbone conditioned on the task, and
auxiliary co-training.

- **Metric scaling.** A query's logits are ``-α · ‖q - c_k‖²``, the scale ``α`` learned (positive).
- **Task conditioning.** The task's representation is the mean of its class prototypes, computed by the backbone
  unconditioned. A task embedding network (TEN) maps it, for every BatchNorm layer of the backbone, to a FiLM scale
  and shift applied right after the normalisation: ``γ = 1 + γ₀ · h_γ(c)``, ``β = β₀ · h_β(c)``. The gates ``γ₀``
  and ``β₀`` are one scalar each per layer; they start at 0, so training starts from the unconditioned network, and
  they are L2-penalised, as in the paper. Support and queries then go through the conditioned backbone.
- **Auxiliary co-training.** The same backbone also classifies images of all training classes with a linear head
  (64-way on mini-ImageNet). The paper samples this auxiliary task instead of an episode with probability
  ``p = 0.9^⌊20 t / T⌋`` at step ``t`` of ``T``. Here each step runs both and weights them ``1 - p`` and ``p``:
  the same objective in expectation, without a coin's variance. ``auxiliary_batch=0`` turns it off.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from metacli.algorithms.base import FewShotLearner
from metacli.algorithms.similarity import class_means, squared_euclidean
from metacli.data.batches import CoTrainingBatch
from metacli.data.episodes import Episode, EpisodeBatch
from metacli.models.batchnorm import BatchNorm, statistics_folded_after

Film = list[tuple[torch.Tensor, torch.Tensor]]


class TaskEmbeddingNetwork(nn.Module):
    """The TEN: for each conditioned layer, a two-layer perceptron from the task representation to that layer's
    scale and shift, gated by the layer's scalars ``γ₀`` and ``β₀``."""

    def __init__(self, in_dim: int, widths: list[int], hidden: int) -> None:
        super().__init__()
        self.predictors = nn.ModuleList(
            nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, 2 * width)) for width in widths)
        self.scale_gates = nn.Parameter(torch.zeros(len(widths)))
        self.shift_gates = nn.Parameter(torch.zeros(len(widths)))

    def forward(self, task: torch.Tensor) -> Film:
        film = []
        for predictor, scale_gate, shift_gate in zip(self.predictors, self.scale_gates, self.shift_gates):
            scale, shift = predictor(task).chunk(2, dim=-1)
            film.append((1 + scale_gate * scale, shift_gate * shift))
        return film

    def penalty(self) -> torch.Tensor:
        return self.scale_gates.square().sum() + self.shift_gates.square().sum()


def _modulate(scale: torch.Tensor, shift: torch.Tensor, module: nn.Module, inputs, output: torch.Tensor
              ) -> torch.Tensor:
    shape = (1, -1) + (1,) * (output.dim() - 2)  # per channel, for images and vectors alike
    return output * scale.view(shape) + shift.view(shape)


@contextmanager
def conditioned(norms: list[BatchNorm], film: Film) -> Iterator[None]:
    """Each of ``norms`` followed by its FiLM ``(scale, shift)`` for the forwards inside. Hooks leave the backbone's
    own code alone, and a backbone's fused fast path steps aside for a hooked layer (``models.layers.hooked``)."""
    handles = [norm.register_forward_hook(partial(_modulate, scale, shift)) for norm, (scale, shift) in zip(norms, film)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class TADAM(FewShotLearner):
    """TADAM: a task-conditioned ProtoNet with a learned metric scale and auxiliary co-training.

    Args:
        backbone, n_way, bn_mode: see :class:`FewShotLearner`.
        n_classes: classes of the train split, for the auxiliary head (filled in by the builder).
        scale: the metric scale ``α`` at the start.
        ten_hidden: width of the TEN's hidden layers.
        penalty: weight of the L2 penalty on the TEN's gates.
        auxiliary_batch: labelled training images per step for the auxiliary task; 0 trains on episodes alone.
        auxiliary_decay, auxiliary_drops, total_steps: the auxiliary weight ``decay^⌊drops · t / total_steps⌋``.
    """

    training_step = "whole_batch"

    def __init__(self, backbone: nn.Module, n_way: int, bn_mode: str = "transductive", n_classes: int | None = None,
                 scale: float = 1.0, ten_hidden: int = 64, penalty: float = 0.01, auxiliary_batch: int = 64,
                 auxiliary_decay: float = 0.9, auxiliary_drops: int = 20, total_steps: int = 1000) -> None:
        super().__init__(backbone, n_way, bn_mode)
        if scale <= 0 or penalty < 0 or auxiliary_batch < 0 or not 0 <= auxiliary_decay <= 1:
            raise ValueError(f"algo: scale must be > 0, penalty and auxiliary_batch >= 0 and auxiliary_decay in "
                             f"[0, 1]; got scale={scale}, penalty={penalty}, auxiliary_batch={auxiliary_batch}, "
                             f"auxiliary_decay={auxiliary_decay}")
        if auxiliary_batch and not n_classes:
            raise ValueError("algo.n_classes: the auxiliary task classifies the training classes, so it needs their "
                             "count (the builder fills it in), or algo.auxiliary_batch=0")
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))
        # Every BatchNorm of the backbone is conditioned, in the order a forward meets them.
        self.norms = [module for module in backbone.modules() if isinstance(module, BatchNorm)]
        self.task_network = TaskEmbeddingNetwork(backbone.out_dim, [norm.num_features for norm in self.norms],
                                                 ten_hidden)
        self.penalty = penalty
        self.auxiliary_batch = auxiliary_batch
        self.training_data = "episodes_and_labelled" if auxiliary_batch else "episodes"
        self.auxiliary_head = nn.Linear(backbone.out_dim, n_classes) if auxiliary_batch else None
        self.auxiliary_decay, self.auxiliary_drops, self.total_steps = auxiliary_decay, auxiliary_drops, total_steps
        # Steps trained, saved with the weights, so a resumed run continues the auxiliary schedule where it was.
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self._metrics: dict[str, float] = {}

    def representation(self) -> nn.Module:
        return self.backbone  # unconditioned: what the task representation is computed with

    def predict(self, episode: Episode, training: bool) -> torch.Tensor:
        film = self.task_network(self.task_embedding(episode))
        n_support = episode.support_x.shape[0]
        with conditioned(self.norms, film):
            embeddings = self.backbone(torch.cat([episode.support_x, episode.query_x]))
        prototypes = class_means(embeddings[:n_support], episode.support_y, episode.n_way)
        return -self.log_scale.exp() * squared_euclidean(embeddings[n_support:], prototypes)

    def auxiliary_weight(self) -> float:
        """``p`` at the current step: the auxiliary task's share of the objective."""
        drops = self.auxiliary_drops * int(self.steps_done) // max(self.total_steps, 1)
        return self.auxiliary_decay ** drops

    def batch_loss(self, batch: EpisodeBatch | CoTrainingBatch) -> tuple[torch.Tensor, torch.Tensor]:
        episodes = batch.episodes if isinstance(batch, CoTrainingBatch) else batch
        # Each layer normalises several batches before the one backward: the support sets, the conditioned episodes,
        # the auxiliary images.
        with statistics_folded_after(self.backbone):
            losses, scores = map(torch.stack, zip(*(self.task_loss(task, training=True) for task in episodes)))
            if isinstance(batch, CoTrainingBatch):
                auxiliary = F.cross_entropy(self.auxiliary_head(self.backbone(batch.labelled.x)), batch.labelled.y)
        self._metrics = {"metric_scale": self.log_scale.exp().item()}
        if isinstance(batch, CoTrainingBatch):
            weight = self.auxiliary_weight()
            losses = (1 - weight) * losses + weight * auxiliary
            self._metrics.update(auxiliary_loss=auxiliary.item(), auxiliary_weight=weight)
        with torch.no_grad():
            self.steps_done += 1
        return losses + self.penalty * self.task_network.penalty(), scores

    def training_metrics(self) -> dict[str, float]:
        return self._metrics
