"""Scoring on fixed episodes: mean accuracy with its 95% confidence interval, and the results record."""
from __future__ import annotations

import math
from typing import Callable

import torch
from omegaconf import DictConfig

from metacli.algorithms.base import FewShotLearner
from metacli.data.base import FewShotDataset
from metacli.data.episodes import EpisodeSampler


def score(learner: FewShotLearner, sampler: EpisodeSampler, episodes: int, seed: int, batch_size: int,
          between_batches: Callable[[], None] | None = None) -> dict:
    """Accuracy over ``episodes`` tasks fixed by ``seed``: mean, sample std, and 1.96 * std / sqrt(n).
    ``between_batches`` is called before each batch (a stop request raises there)."""
    accuracies = []
    for batch in sampler.fixed(episodes, seed, batch_size):
        if between_batches is not None:
            between_batches()
        accuracies += [learner.evaluate_episode(episode) for episode in batch]
    accuracies = torch.tensor(accuracies, dtype=torch.float64)
    std = accuracies.std().item() if episodes > 1 else 0.0
    return {"accuracy": accuracies.mean().item(), "std": std, "ci95": 1.96 * std / math.sqrt(episodes),
            "episodes": episodes}


def make_test_sampler(cfg: DictConfig, dataset: FewShotDataset, device: torch.device) -> EpisodeSampler:
    return EpisodeSampler(dataset.split("test"), cfg.task.n_way, cfg.task.k_shot, cfg.task.n_query,
                          dataset.normalize, device, where="test split")


def build_results(cfg: DictConfig, learner: FewShotLearner, dataset: FewShotDataset, sampler: EpisodeSampler,
                  checkpoint: dict | None, weights: str, between_batches: Callable[[], None] | None = None) -> dict:
    """Score ``learner`` on the test episodes and describe the protocol: the content of results.json.
    ``weights`` says what was tested: the ``best`` or ``last`` checkpoint, or the ``initialisation``."""
    scored = score(learner, sampler, cfg.eval.episodes, cfg.eval.seed, cfg.eval.batch_size, between_batches)
    return {
        "algorithm": type(learner).__name__,
        "algo": cfg.algo._target_,
        "backbone": cfg.backbone._target_,
        "dataset": dataset.describe(),
        "task": {"n_way": cfg.task.n_way, "k_shot": cfg.task.k_shot, "n_query": cfg.task.n_query},
        "eval_seed": cfg.eval.seed,
        "bn_mode": cfg.eval.bn_mode,
        "weights": weights,
        "checkpoint_step": None if checkpoint is None else checkpoint["step"],
        "best_val_accuracy": None if checkpoint is None else checkpoint["best_val"],
        # Threads of the training that made the checkpoint (absent from checkpoints older than this record).
        "trained_on_threads": None if checkpoint is None else checkpoint.get("threads"),
        **scored,
    }
