"""Prototypical Networks (Snell, Swersky & Zemel, "Prototypical Networks for Few-shot Learning", NeurIPS 2017).

Each class is the mean embedding (prototype) of its support images; a query is scored by its negative squared
Euclidean distance to each prototype. Training may use more ways than testing ("higher way"): set
``task.train_way``.
"""
from __future__ import annotations

import torch
from torch import nn

from metacli.algorithms.base import FewShotLearner
from metacli.algorithms.similarity import class_means, cosine_similarity, squared_euclidean
from metacli.data.episodes import Episode


class ProtoNet(FewShotLearner):
    """Prototypical Networks.

    Args:
        backbone, n_way, bn_mode: see :class:`FewShotLearner`.
        distance: ``"squared_euclidean"`` (the paper's) or ``"cosine"``.
        temperature: scale applied to the cosine similarity (ignored for Euclidean).
    """

    parallel_tasks = True
    batched_tasks = True

    def __init__(self, backbone, n_way: int, bn_mode: str = "transductive", distance: str = "squared_euclidean",
                 temperature: float = 10.0) -> None:
        super().__init__(backbone, n_way, bn_mode)
        if distance not in ("squared_euclidean", "cosine"):
            raise ValueError(f"algo.distance must be 'squared_euclidean' or 'cosine', got {distance!r}")
        self.distance, self.temperature = distance, temperature

    def representation(self) -> nn.Module:
        return self.backbone  # the metric-learned embedding

    def predict(self, episode: Episode, training: bool) -> torch.Tensor:
        n_support = episode.support_x.shape[0]
        # One forward for support and query, so transductive BatchNorm sees the whole episode.
        embeddings = self.backbone(torch.cat([episode.support_x, episode.query_x]))
        support, query = embeddings[:n_support], embeddings[n_support:]
        prototypes = class_means(support, episode.support_y, episode.n_way)
        if self.distance == "cosine":
            return self.temperature * cosine_similarity(query, prototypes)
        return -squared_euclidean(query, prototypes)
