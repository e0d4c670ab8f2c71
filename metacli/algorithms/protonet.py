"""Prototypical Networks (Snell, Swersky & Zemel, "Prototypical Networks for Few-shot Learning", NeurIPS 2017).

Each class is the mean embedding (prototype) of its support images; a query is scored by its negative squared
Euclidean distance to each prototype. Training may use more ways than testing ("higher way"): set
``task.train_way``.
"""
from __future__ import annotations

import torch

from metacli.algorithms.base import FewShotLearner
from metacli.data.episodes import Episode


def class_means(embeddings: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """Mean embedding of each class ``0..n_way-1``."""
    sums = embeddings.new_zeros(n_way, embeddings.shape[1]).index_add_(0, labels, embeddings)
    counts = torch.bincount(labels, minlength=n_way).clamp_min(1).unsqueeze(1)
    return sums / counts


class ProtoNet(FewShotLearner):
    """Prototypical Networks.

    Args:
        backbone, n_way, bn_mode: see :class:`FewShotLearner`.
        distance: ``"squared_euclidean"`` (the paper's) or ``"cosine"``.
        temperature: scale applied to the cosine similarity (ignored for Euclidean).
    """

    def __init__(self, backbone, n_way: int, bn_mode: str = "transductive", distance: str = "squared_euclidean",
                 temperature: float = 10.0) -> None:
        super().__init__(backbone, n_way, bn_mode)
        if distance not in ("squared_euclidean", "cosine"):
            raise ValueError(f"algo.distance must be 'squared_euclidean' or 'cosine', got {distance!r}")
        self.distance, self.temperature = distance, temperature

    def query_logits(self, episode: Episode, training: bool) -> torch.Tensor:
        n_support = episode.support_x.shape[0]
        # One forward for support and query, so transductive BatchNorm sees the whole episode.
        embeddings = self.backbone(torch.cat([episode.support_x, episode.query_x]))
        support, query = embeddings[:n_support], embeddings[n_support:]
        prototypes = class_means(support, episode.support_y, episode.n_way)
        if self.distance == "cosine":
            query = torch.nn.functional.normalize(query, dim=1)
            prototypes = torch.nn.functional.normalize(prototypes, dim=1)
            return self.temperature * query @ prototypes.T
        return -torch.cdist(query, prototypes).pow(2)
