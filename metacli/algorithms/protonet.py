"""Prototypical Networks (Snell, Swersky & Zemel, "Prototypical Networks for Few-shot Learning", NeurIPS 2017).

Each class is the mean embedding (prototype) of its support images; a query is scored by its negative squared
Euclidean distance to each prototype. Training may use more ways than testing ("higher way"): set
``task.train_way``.

Two transductive options for evaluation, where a query's prediction depends on the other queries of its episode:
``center_sets`` centres the support and the query embeddings each on its own set's mean, which removes what a
set's drawings share and the other's do not (one drawer's hand in Lake et al.'s protocol); ``refine_steps``
moves each prototype towards the queries it softly claims, the soft k-means of Ren et al. ("Meta-Learning for
Semi-Supervised Few-Shot Classification", ICLR 2018) with the queries as the unlabelled images. Meta-training
stays inductive: on Lake's protocol, training through them scored lower on validation than applying them to an
inductively trained network (``conf/experiment/protonet_omniglot_lake_transductive.yaml``).
"""
from __future__ import annotations

import torch
from torch import nn

from metacli.algorithms.base import FewShotLearner
from metacli.algorithms.similarity import class_means, class_sums, cosine_similarity, squared_euclidean
from metacli.data.episodes import Episode


class ProtoNet(FewShotLearner):
    """Prototypical Networks.

    Args:
        backbone, n_way, bn_mode: see :class:`FewShotLearner`.
        distance: ``"squared_euclidean"`` (the paper's) or ``"cosine"``.
        temperature: scale applied to the cosine similarity (ignored for Euclidean).
        center_sets: at evaluation, centre the support and the query embeddings each on its own mean.
        refine_steps: at evaluation, soft k-means steps that refine the prototypes with the queries.
    """

    parallel_tasks = True
    batched_tasks = True

    def __init__(self, backbone, n_way: int, bn_mode: str = "transductive", distance: str = "squared_euclidean",
                 temperature: float = 10.0, center_sets: bool = False, refine_steps: int = 0) -> None:
        super().__init__(backbone, n_way, bn_mode)
        if distance not in ("squared_euclidean", "cosine"):
            raise ValueError(f"algo.distance must be 'squared_euclidean' or 'cosine', got {distance!r}")
        if refine_steps < 0:
            raise ValueError(f"algo.refine_steps must be >= 0, got {refine_steps}")
        self.distance, self.temperature = distance, temperature
        self.center_sets, self.refine_steps = center_sets, refine_steps

    def representation(self) -> nn.Module:
        return self.backbone  # the metric-learned embedding

    def predict(self, episode: Episode, training: bool) -> torch.Tensor:
        n_support = episode.support_x.shape[0]
        # One forward for support and query, so transductive BatchNorm sees the whole episode.
        embeddings = self.backbone(torch.cat([episode.support_x, episode.query_x]))
        support, query = embeddings[:n_support], embeddings[n_support:]
        transductive = not training
        if self.center_sets and transductive:
            support, query = support - support.mean(dim=0), query - query.mean(dim=0)
        logits = self.logits(query, class_means(support, episode.support_y, episode.n_way))
        if self.refine_steps and transductive:
            # Each support image counts once in its prototype, each query by the share of it that the class claims.
            sums = class_sums(support, episode.support_y, episode.n_way)
            counts = class_sums(torch.ones_like(support[:, :1]), episode.support_y, episode.n_way)
            for _ in range(self.refine_steps):
                claims = logits.softmax(dim=1)
                prototypes = (sums + claims.T @ query) / (counts + claims.sum(dim=0).unsqueeze(1))
                logits = self.logits(query, prototypes)
        return logits

    def logits(self, query: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """``[len(query), n_way]`` scores of each query against each prototype."""
        if self.distance == "cosine":
            return self.temperature * cosine_similarity(query, prototypes)
        return -squared_euclidean(query, prototypes)
