"""Comparisons between query and support embeddings, written once for the metric-based algorithms."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def class_weights(labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """``[n_way, len(labels)]`` matrix whose row ``c`` averages the entries labelled ``c``."""
    one_hot = F.one_hot(labels, n_way).T.to(torch.get_default_dtype())
    return one_hot / one_hot.sum(dim=1, keepdim=True).clamp_min(1)


def class_means(embeddings: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """Mean embedding of each class ``0..n_way-1`` (prototypes)."""
    return class_weights(labels, n_way).to(embeddings.dtype) @ embeddings


def class_sums(embeddings: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """Summed embedding of each class ``0..n_way-1`` (Relation Network's class representation)."""
    return F.one_hot(labels, n_way).T.to(embeddings.dtype) @ embeddings


def class_average(scores: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """``[Q, S]`` query-to-support scores averaged over each class's support columns: ``[Q, n_way]``."""
    return scores @ class_weights(labels, n_way).to(scores.dtype).T


def cosine_similarity(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``[len(a), len(b)]`` cosine similarities between the rows of ``a`` and of ``b``."""
    return F.normalize(a, dim=-1, eps=eps) @ F.normalize(b, dim=-1, eps=eps).transpose(-1, -2)


def squared_euclidean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[len(a), len(b)]`` squared Euclidean distances between the rows of ``a`` and of ``b``."""
    return torch.cdist(a, b).pow(2)
