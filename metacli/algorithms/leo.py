"""Latent Embedding Optimization (Rusu et al., "Meta-Learning with Latent Embedding Optimization", ICLR 2019).

LEO fits a linear classifier on the backbone's embeddings, adapting it through a low-dimensional latent space:

1. encode: each support embedding is mapped linearly to ``latent_dim``, a relation network scores every pair of
   encoded support examples, and the scores are averaged per class into the mean and log-std of the class's code z;
2. decode: a linear decoder maps each class's z to the mean and log-std of its row of the classifier W;
3. adapt: ``latent_steps`` gradient steps on z on the support loss (logits = embeddings @ W^T, W decoded from z),
   then ``finetune_steps`` steps directly on the decoded W; the queries are scored with the final W.

z and W are sampled with the reparameterisation trick in meta-training and are their means at evaluation (the
paper's deterministic evaluation). The meta-training loss adds to the query cross-entropy the KL of the codes to
N(0, I) (``kl_weight``, β), the encoder penalty ``||stopgrad(z') - z||^2`` (``encoder_penalty_weight``, γ) and the
decoder orthogonality penalty (``orthogonality_weight``, λ); weight decay is left to the outer optimiser. The two
inner learning rates are meta-learned scalars, as in the paper, started at ``latent_lr`` and ``finetune_lr``.

The paper meta-trains on frozen features of a pre-trained WRN-28-10. metacli has no pre-training stage, so the
backbone is trained jointly by default; ``freeze_backbone=true`` gives the paper's setting for a backbone whose
weights were trained elsewhere. Codes are per class, so the way may differ between training and testing.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from metacli.algorithms.base import FewShotLearner
from metacli.algorithms.inner_loop import InnerLoop, gradient_descent
from metacli.algorithms.similarity import class_means
from metacli.data.episodes import Episode

#: Standard deviation of the sampled codes and weights at initialisation. Small, as in the authors' code (their std
#: offset starts it near zero): at exp(0) = 1 the noise drowns the decoded weights and meta-training on synthetic
#: glyphs stays at chance.
INITIAL_STD = 0.01


class Adaptation(NamedTuple):
    """One episode's query logits and the per-episode terms of the LEO loss."""

    logits: torch.Tensor
    kl: torch.Tensor
    encoder_penalty: torch.Tensor


def gaussian_sample(mean: torch.Tensor, log_std: torch.Tensor, training: bool) -> torch.Tensor:
    """A reparameterised draw in meta-training (differentiable in both arguments), the mean at evaluation."""
    return mean + log_std.exp() * torch.randn_like(mean) if training else mean


def kl_to_standard_normal(mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2) || N(0, 1)) in closed form, averaged over the elements (so β is free of the latent size)."""
    return (0.5 * (mean.pow(2) + (2 * log_std).exp() - 1) - log_std).mean()


def orthogonality_penalty(weight: torch.Tensor) -> torch.Tensor:
    """Mean squared entry of ``C - I``, C the cosine correlation between the columns of a Linear layer's ``weight``.

    A column is what one latent dimension adds to the decoded weights; the penalty pushes them apart. It can reach
    zero only when the layer has at least as many outputs as inputs.
    """
    columns = F.normalize(weight, dim=0)
    correlation = columns.T @ columns
    return (correlation - torch.eye(len(correlation), device=weight.device)).pow(2).mean()


class LEO(FewShotLearner):
    """Latent Embedding Optimization.

    Args:
        backbone, n_way, bn_mode: see :class:`FewShotLearner`.
        latent_dim: width of the per-class codes z.
        latent_steps, finetune_steps: inner gradient steps on z, then on the decoded weights (0 skips a stage).
        latent_lr, finetune_lr: initial values of the two meta-learned inner learning rates.
        kl_weight, encoder_penalty_weight, orthogonality_weight: β, γ and λ of the meta-training loss.
        dropout: dropout rate on the embeddings in meta-training.
        freeze_backbone: embed without gradient, so the backbone's parameters are not meta-trained (its BatchNorm
            running statistics still follow the training episodes).
    """

    def __init__(self, backbone, n_way: int, bn_mode: str = "transductive", latent_dim: int = 64,
                 latent_steps: int = 5, finetune_steps: int = 5, latent_lr: float = 1.0, finetune_lr: float = 0.001,
                 kl_weight: float = 1e-3, encoder_penalty_weight: float = 1e-9, orthogonality_weight: float = 1e-3,
                 dropout: float = 0.0, freeze_backbone: bool = False) -> None:
        super().__init__(backbone, n_way, bn_mode)
        if latent_dim < 1:
            raise ValueError(f"algo.latent_dim must be at least 1, got {latent_dim}")
        if latent_steps < 0 or finetune_steps < 0:
            raise ValueError(f"algo.latent_steps and algo.finetune_steps must be >= 0 (0 skips that stage), got "
                             f"{latent_steps} and {finetune_steps}")
        if latent_lr <= 0 or finetune_lr <= 0:
            raise ValueError(f"algo.latent_lr and algo.finetune_lr must be > 0, got {latent_lr} and {finetune_lr}")
        if min(kl_weight, encoder_penalty_weight, orthogonality_weight) < 0:
            raise ValueError(f"algo.kl_weight, algo.encoder_penalty_weight and algo.orthogonality_weight must be "
                             f">= 0 (0 drops the term), got {kl_weight}, {encoder_penalty_weight} and "
                             f"{orthogonality_weight}")
        if not 0 <= dropout < 1:
            raise ValueError(f"algo.dropout must be in [0, 1), got {dropout}")
        width = backbone.out_dim
        self.encoder = nn.Linear(width, latent_dim)
        self.relation = nn.Sequential(nn.Linear(2 * latent_dim, 2 * latent_dim), nn.ReLU(),
                                      nn.Linear(2 * latent_dim, 2 * latent_dim), nn.ReLU(),
                                      nn.Linear(2 * latent_dim, 2 * latent_dim))
        self.decoder = nn.Linear(latent_dim, 2 * width)
        with torch.no_grad():
            self.relation[-1].bias[latent_dim:].fill_(math.log(INITIAL_STD))
            self.decoder.bias[width:].fill_(math.log(INITIAL_STD))
        # Meta-learned in log space: Adam moves a parameter by about its own learning rate per step, which would
        # flip the sign of a 0.001 rate at once; the log keeps the rates positive and their changes relative.
        self.log_latent_lr = nn.Parameter(torch.tensor(math.log(latent_lr)))
        self.log_finetune_lr = nn.Parameter(torch.tensor(math.log(finetune_lr)))
        self.latent_steps, self.finetune_steps = latent_steps, finetune_steps
        self.kl_weight, self.encoder_penalty_weight = kl_weight, encoder_penalty_weight
        self.orthogonality_weight = orthogonality_weight
        self.dropout, self.freeze_backbone = dropout, freeze_backbone

    def embed(self, episode: Episode, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Support and query embeddings from one backbone call, so transductive BatchNorm sees the whole episode."""
        with torch.no_grad() if self.freeze_backbone else contextlib.nullcontext():
            embeddings = self.backbone(torch.cat([episode.support_x, episode.query_x]))
        embeddings = F.dropout(embeddings, self.dropout, training)
        n_support = episode.support_x.shape[0]
        return embeddings[:n_support], embeddings[n_support:]

    def encode(self, support: torch.Tensor, labels: torch.Tensor, n_way: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-std ``[n_way, latent_dim]`` of each class's code."""
        codes = self.encoder(support)
        n = len(codes)
        pairs = torch.cat([codes.unsqueeze(1).expand(n, n, -1), codes.unsqueeze(0).expand(n, n, -1)], dim=2)
        # Example i against every support example, then the class's examples averaged: the paper's 1/(NK^2) sum.
        relations = self.relation(pairs).mean(dim=1)
        return class_means(relations, labels, n_way).chunk(2, dim=1)

    def decode(self, z: torch.Tensor, training: bool) -> torch.Tensor:
        """Classifier weights ``[n_way, out_dim]`` for the codes ``z``, sampled in meta-training."""
        return gaussian_sample(*self.decoder(z).chunk(2, dim=1), training)

    def adapt(self, episode: Episode, training: bool) -> Adaptation:
        """Encode the support set, descend in latent space then on the weights, and score the queries."""
        support, query = self.embed(episode, training)

        def support_loss(weights: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(support @ weights.T, episode.support_y)

        mean, log_std = self.encode(support, episode.support_y, episode.n_way)
        z = gaussian_sample(mean, log_std, training)
        adapted_z = self._descend(lambda code: support_loss(self.decode(code, training)), z, self.latent_steps,
                                  self.log_latent_lr, training)
        weights = self._descend(support_loss, self.decode(adapted_z, training), self.finetune_steps,
                                self.log_finetune_lr, training)
        return Adaptation(logits=query @ weights.T, kl=kl_to_standard_normal(mean, log_std),
                          encoder_penalty=(adapted_z.detach() - z).pow(2).mean())

    @staticmethod
    def _descend(loss_fn: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, steps: int,
                 log_lr: torch.Tensor, training: bool) -> torch.Tensor:
        if not training:
            # Evaluation runs under no_grad: the inner loop differentiates from a fresh leaf (and detaches each step).
            start = start.detach().requires_grad_()
        loop = InnerLoop(steps, {"x": log_lr.exp()})
        return gradient_descent(lambda p: loss_fn(p["x"]), {"x": start}, loop, training)["x"]

    def predict(self, episode: Episode, training: bool) -> torch.Tensor:
        return self.adapt(episode, training).logits

    def task_loss(self, episode: Episode, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Query cross-entropy and accuracy; in meta-training the cross-entropy carries LEO's regularisers."""
        adapted = self.adapt(episode, training)
        loss = F.cross_entropy(adapted.logits, episode.query_y)
        if training:
            loss = (loss + self.kl_weight * adapted.kl + self.encoder_penalty_weight * adapted.encoder_penalty
                    + self.orthogonality_weight * orthogonality_penalty(self.decoder.weight))
        accuracy = (adapted.logits.argmax(dim=1) == episode.query_y).float().mean()
        return loss, accuracy
