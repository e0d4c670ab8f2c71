"""Baseline and Baseline++ (Chen, Liu, Kira, Wang & Huang, "A Closer Look at Few-shot Classification", ICLR 2019).

Training is not episodic: the backbone and a classifier over all training classes are trained with plain
cross-entropy on mini-batches (``trainer.batch_size`` images per step). At test time the classifier is thrown
away; a new ``n_way`` head is fitted on the support embeddings of each episode with the backbone frozen, and the
queries are classified by it. ``head=linear`` is Baseline; ``head=cosine`` is Baseline++, whose classifier scores
the cosine similarity between an embedding and each class's weight vector, times ``scale``.

Test-time fine-tuning follows the paper: SGD with momentum 0.9 and weight decay 0.001 for ``finetune_epochs``
passes over the support set in mini-batches of ``finetune_batch``. Its randomness (head initialisation, batch
order) comes from a generator seeded with ``finetune_seed`` for every episode, so an episode always gets the
same score.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metacli.algorithms.base import FewShotLearner
from metacli.algorithms.similarity import cosine_similarity
from metacli.data.batches import LabelledBatch
from metacli.data.episodes import Episode

HEADS = ("linear", "cosine")


class CosineClassifier(nn.Module):
    """Baseline++'s head: ``scale`` times the cosine similarity to one learned weight vector per class."""

    def __init__(self, in_dim: int, n_classes: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_classes, in_dim))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)  # nn.Linear's initialisation
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * cosine_similarity(x, self.weight)


def make_head(kind: str, in_dim: int, n_classes: int, scale: float) -> nn.Module:
    return nn.Linear(in_dim, n_classes) if kind == "linear" else CosineClassifier(in_dim, n_classes, scale)


class Baseline(FewShotLearner):
    """Baseline / Baseline++: pre-train a classifier on all training classes, fine-tune a new head per episode.

    Args:
        backbone, n_way, bn_mode: see :class:`FewShotLearner`.
        n_classes: classes of the train split (filled in by the builder).
        head: ``"linear"`` (Baseline) or ``"cosine"`` (Baseline++), for training and test heads alike.
        scale: the cosine head's scale (the paper's code uses 2 for 64 classes, 10 beyond 200).
        finetune_epochs, finetune_batch, finetune_lr: the test-time fitting of the new head.
        finetune_seed: seeds each episode's head initialisation and batch order.
    """

    training_data = "labelled"
    training_step = "whole_batch"

    def __init__(self, backbone: nn.Module, n_way: int, bn_mode: str = "transductive", n_classes: int | None = None,
                 head: str = "linear", scale: float = 10.0, finetune_epochs: int = 100, finetune_batch: int = 4,
                 finetune_lr: float = 0.01, finetune_seed: int = 0) -> None:
        super().__init__(backbone, n_way, bn_mode)
        if head not in HEADS:
            raise ValueError(f"algo.head must be one of {HEADS}, got {head!r}")
        if n_classes is None or n_classes < 2:
            raise ValueError(f"algo.n_classes must be the train split's class count (at least 2), got {n_classes}")
        if finetune_epochs < 1 or finetune_batch < 1 or finetune_lr <= 0 or scale <= 0:
            raise ValueError("algo.finetune_epochs, algo.finetune_batch, algo.finetune_lr and algo.scale must be "
                             "positive")
        self.head_kind, self.scale = head, scale
        self.classifier = make_head(head, backbone.out_dim, n_classes, scale)
        self.finetune_epochs, self.finetune_batch, self.finetune_lr = finetune_epochs, finetune_batch, finetune_lr
        self.finetune_seed = finetune_seed

    def representation(self) -> nn.Module:
        return self.backbone  # the backbone pre-trained on all training classes: the pretrained baseline of continual learning

    def batch_loss(self, batch: LabelledBatch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.classifier(self.backbone(batch.x))
        return F.cross_entropy(logits, batch.y), (logits.argmax(dim=1) == batch.y).float().mean()

    def predict(self, episode: Episode, training: bool) -> torch.Tensor:
        n_support = episode.support_x.shape[0]
        # Frozen features, from one forward of the whole episode (so transductive BatchNorm sees all of it).
        with torch.no_grad():
            embeddings = self.backbone(torch.cat([episode.support_x, episode.query_x]))
        support, query = embeddings[:n_support], embeddings[n_support:]
        head = self.fit_head(support, episode.support_y, episode.n_way)
        with torch.no_grad():
            return head(query)

    def fit_head(self, support: torch.Tensor, labels: torch.Tensor, n_way: int) -> nn.Module:
        """A new ``n_way`` head fitted to the (detached) support embeddings."""
        generator = torch.Generator().manual_seed(self.finetune_seed)
        with torch.random.fork_rng(devices=[]):  # the head's random init must not move the run's RNG
            torch.manual_seed(int(torch.randint(2 ** 31, (1,), generator=generator)))
            head = make_head(self.head_kind, support.shape[1], n_way, self.scale).to(support.device)
        optimizer = torch.optim.SGD(head.parameters(), lr=self.finetune_lr, momentum=0.9, dampening=0.9,
                                    weight_decay=0.001)
        with torch.enable_grad():
            for _ in range(self.finetune_epochs):
                order = torch.randperm(len(support), generator=generator).to(support.device)
                for chunk in order.split(self.finetune_batch):
                    optimizer.zero_grad(set_to_none=True)
                    F.cross_entropy(head(support[chunk]), labels[chunk]).backward()
                    optimizer.step()
        return head
