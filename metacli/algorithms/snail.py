"""SNAIL (Mishra, Rohaninejad, Chen & Abbeel, "A Simple Neural Attentive Meta-Learner", ICLR 2018).

A model-based learner: no inner loop and no metric, the network reads the episode as a sequence and outputs the
query's label. Each query gets its own sequence of ``T = N*K + 1`` steps: the support set, each step its
embedding beside its one-hot label, then the query beside a zero label (:func:`episode_sequences`). Causal
temporal convolutions (:class:`TCBlock`) and causal soft attention (:class:`AttentionBlock`) interleave as in the
paper's few-shot network, ``Attention(64, 32), TC(T, 128), Attention(256, 128), TC(T, 128), Attention(512, 256)``,
and a linear layer (the paper's 1x1 convolution) reads the ``n_way`` logits at the last, query, step. Only that
step is scored, so the loss is the query cross-entropy of the base class. The support order is shuffled in every
meta-training episode (the model must not rely on the sampler's class-by-class order) and kept at evaluation.

Deviations: the TC blocks' depth is fixed when the model is built, so it comes from ``algo.k_shot`` (the task's
shot by default) rather than from each episode (other shots still run; see :class:`TCBlock`), and their dilations start at 1, not 2 (see
:mod:`metacli.models.temporal`).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from metacli.algorithms.base import FewShotLearner
from metacli.algorithms.sequences import check_way, episode_sequences, support_order
from metacli.data.episodes import Episode
from metacli.models.temporal import AttentionBlock, TCBlock


class SNAIL(FewShotLearner):
    """SNAIL's few-shot network: attention and TC blocks in turn, over ``[embedding, label]`` sequences.

    Args:
        backbone, n_way, bn_mode: see :class:`FewShotLearner`.
        k_shot: shots the TC blocks are sized for: ``ceil(log2(n_way * k_shot + 1))`` dense blocks each.
        attention_keys, attention_values: key (and query) size and value size of each attention block.
        tc_filters: filters of the dense blocks of each TC block; one TC block sits between consecutive attention
            blocks, so there is one entry fewer than attention blocks.
    """

    fixed_way = True

    def __init__(self, backbone, n_way: int, bn_mode: str = "transductive", k_shot: int = 1,
                 attention_keys: Sequence[int] = (64, 256, 512), attention_values: Sequence[int] = (32, 128, 256),
                 tc_filters: Sequence[int] = (128, 128)) -> None:
        super().__init__(backbone, n_way, bn_mode)
        if k_shot < 1:
            raise ValueError(f"algo.k_shot must be at least 1, got {k_shot}")
        for key, sizes in (("attention_keys", attention_keys), ("attention_values", attention_values),
                           ("tc_filters", tc_filters)):
            if any(size < 1 for size in sizes):
                raise ValueError(f"algo.{key} must hold positive sizes, got {list(sizes)}")
        if not attention_keys or len(attention_values) != len(attention_keys):
            raise ValueError(f"algo.attention_keys and algo.attention_values must be non-empty and of equal length, "
                             f"got {list(attention_keys)} and {list(attention_values)}")
        if len(tc_filters) != len(attention_keys) - 1:
            raise ValueError(f"algo.tc_filters must have one entry fewer than algo.attention_keys "
                             f"({len(attention_keys) - 1}), got {list(tc_filters)}")
        length = n_way * k_shot + 1
        dim = backbone.out_dim + n_way
        blocks: list[nn.Module] = []
        for i, (key_size, value_size) in enumerate(zip(attention_keys, attention_values)):
            blocks.append(AttentionBlock(dim, key_size, value_size))
            dim = blocks[-1].out_dim
            if i < len(tc_filters):
                blocks.append(TCBlock(dim, length, tc_filters[i]))
                dim = blocks[-1].out_dim
        self.blocks = nn.Sequential(*blocks)
        self.output = nn.Linear(dim, n_way)

    def predict(self, episode: Episode, training: bool) -> torch.Tensor:
        check_way(episode.n_way, self.n_way)
        n_support = episode.support_x.shape[0]
        # One forward for support and query, so transductive BatchNorm sees the whole episode.
        embeddings = self.backbone(torch.cat([episode.support_x, episode.query_x]))
        support, query = embeddings[:n_support], embeddings[n_support:]
        order = support_order(n_support, training, support.device)
        sequences = episode_sequences(support[order], episode.support_y[order], query, self.n_way, label_lag=0)
        # Causality makes the last step the only one that has seen the query: the logits are read there.
        return self.output(self.blocks(sequences)[:, -1])
