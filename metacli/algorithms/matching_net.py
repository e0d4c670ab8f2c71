"""Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra, "Matching Networks for One Shot
Learning", NeurIPS 2016).

A query x̂ is classified by attention over the labelled support set: ŷ = Σ_i a(x̂, x_i) y_i with y_i one-hot and
a(x̂, x_i) = softmax_i(τ · cos(f(x̂), g(x_i))). The logits are log ŷ, the log of the attention mass on each class,
so the query cross-entropy is the paper's objective -log P(y | x̂, S). Without full-context embeddings
(``fce=False``) f and g are the backbone itself, run once over support and query together so that transductive
BatchNorm sees the whole episode.

Full-context embeddings (``fce=True``, the paper's appendix) embed each example in the context of the support set:

* g(x_i) = h→_i + h←_i + g'(x_i): a bidirectional LSTM runs over the backbone embeddings g'(x_i) of the support set;
* f(x̂) = h_K after K = ``fce_steps`` steps of an attention LSTM that reads the context-embedded support set:
  ĥ_k, c_k = LSTM(f'(x̂), [h_{k-1}, r_{k-1}], c_{k-1});  h_k = ĥ_k + f'(x̂);  r_k = Σ_i softmax_i(<h_k, g(x_i)>) g(x_i).
  Each query is processed on its own (the queries are only batched).

The bidirectional LSTM would otherwise learn the sampler's class-by-class support order, so meta-training shuffles
the support set (labels kept aligned); evaluation uses the fixed order, so a test episode always gets the same answer.

Choices the paper leaves open or that deviate from it:

* τ (``temperature``): the paper's softmax is over plain cosine similarities (τ = 1). Cosines lie in [-1, 1], so
  the attention can never weigh one support example more than e² times another and the class mass stays close to
  uniform; a fixed τ = 10 (as for the cosine ProtoNet here) trains far better. τ = 1 recovers the paper.
* The attention LSTM starts from h_0 = f'(x̂) (the skip connection with ĥ_0 = 0), c_0 = 0, and r_0 read with h_0,
  so the first step already sees the support set.
* An LSTM whose recurrent state is [h, r] is an ``LSTMCell`` whose input is [f'(x̂), r] and whose state is h: its
  gates are linear in the concatenation either way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metacli.algorithms.base import FewShotLearner
from metacli.algorithms.sequences import support_order
from metacli.algorithms.similarity import cosine_similarity
from metacli.data.episodes import Episode


def class_log_mass(log_attention: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """``[Q, n_way]`` log of each class's attention mass, log Σ_{i: y_i = c} a_i, from ``[Q, S]`` log-attention.

    Summed in log space, so it stays exact where the mass underflows (no clamp, and a confidently wrong query still
    gets a gradient). A class without support examples gets the most negative finite value: -inf would make the
    gradient NaN.
    """
    members = F.one_hot(labels, n_way).T.bool()
    per_class = log_attention.unsqueeze(1).masked_fill(~members, torch.finfo(log_attention.dtype).min)
    return per_class.logsumexp(dim=2)


class MatchingNet(FewShotLearner):
    """Matching Networks.

    Args:
        backbone, n_way, bn_mode: see :class:`FewShotLearner`.
        temperature: τ multiplying the cosine similarities in the attention softmax (1.0 is the paper's).
        fce: add the full-context embeddings (the two LSTMs, each as wide as ``backbone.out_dim``).
        fce_steps: K, the attention LSTM's steps over the support set for each query (fce only).
    """

    def __init__(self, backbone: nn.Module, n_way: int, bn_mode: str = "transductive", temperature: float = 10.0,
                 fce: bool = False, fce_steps: int = 5) -> None:
        super().__init__(backbone, n_way, bn_mode)
        if not temperature > 0:
            raise ValueError(f"algo.temperature must be > 0 (1.0 is the paper's plain cosine), got {temperature}")
        if fce not in (True, False):
            raise ValueError(f"algo.fce must be true or false, got {fce!r}")
        if fce_steps < 1:
            raise ValueError(f"algo.fce_steps must be at least 1, got {fce_steps}")
        self.temperature, self.fce, self.fce_steps = temperature, fce, fce_steps
        dim = backbone.out_dim
        # g's LSTM and f's attention LSTM; hidden width = embedding width, for the skip connections.
        self.support_lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True) if fce else None
        self.query_lstm = nn.LSTMCell(2 * dim, dim) if fce else None

    def predict(self, episode: Episode, training: bool) -> torch.Tensor:
        n_support = episode.support_x.shape[0]
        # One forward for support and query, so transductive BatchNorm sees the whole episode.
        embeddings = self.backbone(torch.cat([episode.support_x, episode.query_x]))
        support, query, labels = embeddings[:n_support], embeddings[n_support:], episode.support_y
        if self.fce:
            order = support_order(n_support, training, support.device)
            support, labels = self.embed_support(support[order]), labels[order]
            query = self.embed_queries(query, support)
        log_attention = (self.temperature * cosine_similarity(query, support)).log_softmax(dim=1)
        return class_log_mass(log_attention, labels, episode.n_way)

    def embed_support(self, support: torch.Tensor) -> torch.Tensor:
        """g: each support embedding read in the context of the whole (ordered) support set, plus the skip."""
        context, _ = self.support_lstm(support.unsqueeze(0))
        forward, backward = context.squeeze(0).chunk(2, dim=1)
        return forward + backward + support

    def embed_queries(self, query: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """f: ``fce_steps`` steps of the attention LSTM over the context-embedded ``support``, each query alone."""
        hidden, cell = query, torch.zeros_like(query)
        for _ in range(self.fce_steps):
            read = (hidden @ support.T).softmax(dim=1) @ support
            hidden, cell = self.query_lstm(torch.cat([query, read], dim=1), (hidden, cell))
            hidden = hidden + query
        return hidden
