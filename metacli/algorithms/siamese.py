"""Siamese Networks (Koch, Zemel & Salakhutdinov, "Siamese Neural Networks for One-shot Image Recognition",
ICML Deep Learning Workshop 2015).

A shared backbone embeds two images; their verification probability ("same class?") is the weighted L1 distance
of the embeddings through a sigmoid, ``p = sigmoid(sum_j alpha_j |h1_j - h2_j| + b)``, a ``Linear(out_dim, 1)`` on
``|h1 - h2|``. Training is binary cross-entropy on same/different pairs, built here from each training episode: every
(query, support) pair, labelled 1 when the two share a class. Evaluation is the paper's one-shot rule: a query goes to
the support example it is most probably the same as; with K > 1 shots the probabilities are averaged per class.

Deviations from the paper, and why:

- Pairs come from the episodes (all query x support pairs) rather than a separate pool of random pairs, so the
  runner's episodic training drives the algorithm unchanged. An N-way episode gives N-1 different pairs per same
  pair; the paper trains on balanced pairs, so with ``balance_pairs`` (default) each pair's cross-entropy is weighted
  so that the same pairs and the different pairs each make half of the loss. Weighting keeps every pair's gradient
  where sub-sampling a balanced set would throw most negatives away.
- The embedding is the configured backbone (e.g. Conv4) instead of the paper's large sigmoid-topped convnet, and
  the paper's layer-wise learning rates, momentum schedule, L2 terms and affine distortions are left to the outer
  optimiser and the data pipeline.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metacli.algorithms.base import FewShotLearner
from metacli.algorithms.similarity import class_average
from metacli.data.episodes import Episode


def pair_targets(query_y: torch.Tensor, support_y: torch.Tensor, balance: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``[Q, S]`` same-class targets (1 = same) of every (query, support) pair, and per-pair loss weights summing to 1.

    With ``balance`` the same pairs share half of the weight and the different pairs the other half, as if the
    pairs were balanced; otherwise every pair weighs the same.
    """
    targets = (query_y.unsqueeze(1) == support_y.unsqueeze(0)).to(torch.get_default_dtype())
    if not balance:
        return targets, torch.full_like(targets, 1 / targets.numel())
    n_same = targets.sum().clamp_min(1)
    n_different = (targets.numel() - targets.sum()).clamp_min(1)
    return targets, torch.where(targets.bool(), 0.5 / n_same, 0.5 / n_different)


class SiameseNet(FewShotLearner):
    """Siamese Networks.

    Args:
        backbone, n_way, bn_mode: see :class:`FewShotLearner`.
        balance_pairs: weight the pair cross-entropy so that same-class and different-class pairs count equally.
    """

    parallel_tasks = True
    batched_tasks = True

    def __init__(self, backbone, n_way: int, bn_mode: str = "transductive", balance_pairs: bool = True) -> None:
        super().__init__(backbone, n_way, bn_mode)
        if not isinstance(balance_pairs, bool):
            raise ValueError(f"algo.balance_pairs must be true or false, got {balance_pairs!r}")
        self.balance_pairs = balance_pairs
        # The alpha_j and b of the paper's weighted L1 distance.
        self.distance = nn.Linear(backbone.out_dim, 1)

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``[len(a), len(b)]`` verification logits (before the sigmoid) between the rows of ``a`` and of ``b``."""
        return self.distance((a.unsqueeze(1) - b.unsqueeze(0)).abs()).squeeze(-1)

    def pair_logits(self, episode: Episode) -> torch.Tensor:
        """``[Q, S]`` verification logits of every (query, support) pair of ``episode``."""
        n_support = episode.support_x.shape[0]
        # One forward for support and query, so transductive BatchNorm sees the whole episode.
        embeddings = self.backbone(torch.cat([episode.support_x, episode.query_x]))
        return self.similarity(embeddings[n_support:], embeddings[:n_support])

    def class_log_probabilities(self, pair_logits: torch.Tensor, episode: Episode) -> torch.Tensor:
        """Log of each class's mean verification probability: the argmax is the paper's one-shot rule."""
        probabilities = class_average(torch.sigmoid(pair_logits), episode.support_y, episode.n_way)
        # A probability that underflowed to 0 would give -inf logits; the floor keeps them finite.
        return probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny).log()

    def predict(self, episode: Episode, training: bool) -> torch.Tensor:
        return self.class_log_probabilities(self.pair_logits(episode), episode)

    def task_loss(self, episode: Episode, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Verification cross-entropy over the episode's (query, support) pairs, and the one-shot query accuracy."""
        pair_logits = self.pair_logits(episode)
        targets, weights = pair_targets(episode.query_y, episode.support_y, self.balance_pairs)
        loss = F.binary_cross_entropy_with_logits(pair_logits, targets.to(pair_logits.dtype),
                                                  weight=weights.to(pair_logits.dtype), reduction="sum")
        predictions = self.class_log_probabilities(pair_logits, episode).argmax(dim=1)
        return loss, (predictions == episode.query_y).float().mean()
