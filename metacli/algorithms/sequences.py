"""Episodes as sequences of (embedding, label) steps, for the model-based learners (SNAIL, memory-augmented nets).

Each query gets its own sequence: the whole support set, then the query, so that queries never see each other
and are classified independently, as in the metric-based algorithms.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def check_way(episode_way: int, n_way: int) -> None:
    """The label input and the output are ``n_way`` wide, so an episode of another way cannot be read: a wider one
    would fail inside ``one_hot`` with no hint, a narrower one would be scored against classes it does not have."""
    if episode_way != n_way:
        raise ValueError(f"this model was built {n_way}-way and cannot read a {episode_way}-way episode")


def support_order(n_support: int, training: bool, device: torch.device) -> torch.Tensor:
    """A random order of the support set in meta-training (drawn from torch's seeded generator), the sampler's
    class-by-class order at evaluation, so a fixed test episode always gives the same sequence."""
    if training:
        return torch.randperm(n_support).to(device)
    return torch.arange(n_support, device=device)


def labelled_steps(support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, n_way: int,
                   label_lag: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The steps every query's sequence is made of, each ``[embedding, one-hot label]``: the support steps
    ``[S, D+n_way]``, common to all sequences, and one query step per query ``[Q, D+n_way]``.

    ``label_lag=0`` pairs each support embedding with its own label and gives the query a zero label (SNAIL).
    ``label_lag=1`` shows each label one step late, beside the next input (Santoro et al.'s memory-augmented
    network), so the first step has a zero label and the query step carries the last support label.
    """
    if label_lag not in (0, 1):
        raise ValueError(f"label_lag must be 0 or 1, got {label_lag}")
    labels = F.one_hot(support_y, n_way).to(support.dtype)
    blank = labels.new_zeros(1, n_way)
    labels = torch.cat([labels, blank]) if label_lag == 0 else torch.cat([blank, labels])
    support_steps = torch.cat([support, labels[:-1]], dim=1)
    query_steps = torch.cat([query, labels[-1:].expand(query.shape[0], -1)], dim=1)
    return support_steps, query_steps


def episode_sequences(support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, n_way: int,
                      label_lag: int) -> torch.Tensor:
    """``[Q, S+1, D+n_way]`` sequences: every support step then one query step (see :func:`labelled_steps`)."""
    support_steps, query_steps = labelled_steps(support, support_y, query, n_way, label_lag)
    return torch.cat([support_steps.expand(query_steps.shape[0], -1, -1), query_steps.unsqueeze(1)], dim=1)
