"""Scoring on fixed episodes: mean accuracy with its 95% confidence interval, and the results record."""
from __future__ import annotations

import math
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from metacli.algorithms.base import FewShotLearner
from metacli.algorithms.meta_rl import MetaRLLearner
from metacli.data.base import FewShotDataset
from metacli.data.episodes import EpisodeSampler
from metacli.data.within_alphabet import WithinAlphabetSampler
from metacli.errors import ConfigError
from metacli.execution.processes import gather_in_order
from metacli.execution.ranks import ONE, Processes
from metacli.logging.progress import Progress
from metacli.results_file import FINGERPRINT_DEFAULTS
from metacli.rl.task_envs import FixedTasks
from metacli.tasks import REINFORCEMENT


def score(learner: FewShotLearner, sampler: EpisodeSampler, episodes: int, seed: int, batch_size: int,
          between_batches: Callable[[], None] | None = None, progress: Progress | None = None,
          processes: Processes = ONE) -> dict:
    """The task family's metric (accuracy, MSE) over ``episodes`` tasks fixed by ``seed``: its mean under the
    metric's name, sample std, 1.96 * std / sqrt(n), and each episode's value. ``between_batches`` is called before
    each batch (a stop request raises there); ``progress`` counts episodes. Several ``processes`` take the batches
    in turn and gather the values in episode order."""
    metric, mine, total, count = learner.family.metric, {}, 0.0, 0
    for index, batch in enumerate(sampler.fixed(episodes, seed, batch_size)):
        if between_batches is not None:
            between_batches()
        if index % processes.size == processes.rank:
            mine[index] = learner.evaluate_batch(batch)
            total, count = total + sum(mine[index]), count + len(mine[index])
        if progress is not None:
            progress.advance(len(batch), status=f"{metric} {total / max(count, 1):.3f}")
    values = gather_in_order(mine) if processes.many else [value for index in sorted(mine) for value in mine[index]]
    return {**summarize(values, metric), "episodes": episodes, "per_episode": values}


def summarize(values: list[float], metric: str) -> dict:
    """The mean of per-episode (per-task) values under the metric's name, their sample std and 1.96 * std /
    sqrt(n)."""
    per_episode = torch.tensor(values, dtype=torch.float64)
    std = per_episode.std().item() if len(values) > 1 else 0.0
    return {metric: per_episode.mean().item(), "std": std, "ci95": 1.96 * std / math.sqrt(len(values))}


def _scored_apart(cfg: DictConfig):
    """The module of a protocol that scores a learner in a way of its own (``continual``: streams learned online;
    ``generative``: generated images judged), with its ``Protocol`` and ``fingerprint``; None for episodes."""
    if cfg.eval.protocol == "continual":
        from metacli import continual  # both build on this module

        return continual
    if cfg.eval.protocol == "generative":
        from metacli import generative

        return generative
    return None


def make_sampler(cfg: DictConfig, dataset: FewShotDataset, split: str, device: torch.device) -> EpisodeSampler:
    """The fixed episodes of ``split`` that validation or the test score, as ``eval.protocol`` draws them (for
    ``continual``, the fixed streams of both splits: validation chooses the test's online rate)."""
    where = f"{split} split"
    scored_apart = _scored_apart(cfg)
    if scored_apart is not None:
        return scored_apart.Protocol(cfg, dataset, device)
    if cfg.eval.protocol == "within_alphabet":
        if (cfg.task.k_shot, cfg.task.n_query) != (1, 1):
            raise ConfigError(f"eval.protocol=within_alphabet is one-shot with one query a character: set "
                              f"task.k_shot=1 task.n_query=1 (not {cfg.task.k_shot} and {cfg.task.n_query})")
        return WithinAlphabetSampler(dataset.split(split), cfg.task.n_way, dataset.normalize, device, where=where)
    return dataset.episodes(split, cfg.task.n_way, cfg.task.k_shot, cfg.task.n_query, device, where=where)


def make_test_sampler(cfg: DictConfig, dataset: FewShotDataset, device: torch.device) -> EpisodeSampler:
    return make_sampler(cfg, dataset, "test", device)


def make_samplers(cfg: DictConfig, dataset: FewShotDataset, device: torch.device
                  ) -> tuple[EpisodeSampler, EpisodeSampler]:
    """The validation and test samplers of a training run; a protocol that scores apart holds both splits in one
    object, built once (a generative run's judge is loaded once)."""
    validation = make_sampler(cfg, dataset, "val", device)
    return validation, validation if _scored_apart(cfg) is not None else make_test_sampler(cfg, dataset, device)


def validate(cfg: DictConfig, learner: FewShotLearner, sampler: EpisodeSampler, processes: Processes = ONE) -> dict:
    """The validation score that selects checkpoints: the metric on ``trainer.val_episodes`` fixed episodes, or
    retention on the validation streams (``eval.protocol=continual``)."""
    if _scored_apart(cfg) is not None:
        return sampler.validate(learner)
    return score(learner, sampler, cfg.trainer.val_episodes, cfg.trainer.val_seed, cfg.eval.batch_size,
                 processes=processes)


def episodes_fingerprint(cfg: DictConfig, dataset: FewShotDataset) -> dict:
    """What fixes the test episodes: two results with the same fingerprint were scored on the same tasks, episode
    for episode, so they can be compared pairwise (``metacli compare``)."""
    scored_apart = _scored_apart(cfg)
    if scored_apart is not None:
        return scored_apart.fingerprint(cfg, dataset)
    if dataset.family is REINFORCEMENT:  # tasks and environment seeds; the seeds are drawn a batch of tasks
        return {"env": dataset.describe(), "split": "test", "content_sha256": dataset.content_sha256("test"),
                "eval_seed": cfg.eval.seed, "episodes": cfg.eval.episodes, "batch_size": cfg.eval.batch_size}
    return {"dataset": dataset.describe(), "split": "test", "content_sha256": dataset.content_sha256("test"),
            "n_way": cfg.task.n_way, "k_shot": cfg.task.k_shot, "n_query": cfg.task.n_query,
            "image_size": dataset.image_size, "eval_seed": cfg.eval.seed, "episodes": cfg.eval.episodes,
            **({"protocol": cfg.eval.protocol} if cfg.eval.protocol != FINGERPRINT_DEFAULTS["protocol"] else {})}


def build_results(cfg: DictConfig, learner: FewShotLearner, dataset: FewShotDataset, sampler: EpisodeSampler,
                  checkpoint: dict | None, weights: str, between_batches: Callable[[], None] | None = None,
                  processes: Processes = ONE) -> dict:
    """Score ``learner`` on the test episodes (shared out over ``processes``) and describe the protocol: the content
    of results.json. ``weights`` says what was tested: the ``best`` or ``last`` checkpoint, or the
    ``initialisation``."""
    if dataset.family is REINFORCEMENT:
        scored, extra = stage_scores(cfg, learner, sampler, between_batches)
    elif _scored_apart(cfg) is not None:
        scored, extra = sampler.test(learner, between_batches)
    else:
        with Progress("test", total=cfg.eval.episodes, unit="episodes", enabled=processes.leader) as progress:
            scored = score(learner, sampler, cfg.eval.episodes, cfg.eval.seed, cfg.eval.batch_size, between_batches,
                           progress, processes)
        extra = {"task": {"n_way": cfg.task.n_way, "k_shot": cfg.task.k_shot, "n_query": cfg.task.n_query},
                 "bn_mode": cfg.eval.bn_mode}
    per_episode, metric = scored.pop("per_episode"), learner.family.metric
    return {
        "algorithm": type(learner).__name__,
        "metric": metric,  # the key of the score below: what `metacli report` tabulates
        "seed": cfg.seed,
        "steps": cfg.trainer.steps,
        "algo": cfg.algo._target_,
        "backbone": cfg.backbone._target_ if cfg.get("backbone") else None,
        "dataset": dataset.describe(),
        **extra,
        "eval_seed": cfg.eval.seed,
        "weights": weights,
        "checkpoint_step": None if checkpoint is None else checkpoint["step"],
        f"best_val_{metric}": None if checkpoint is None else checkpoint["best_val"],
        "best_val_step": None if checkpoint is None else checkpoint["best_step"],
        # Threads of the training that made the checkpoint (absent from checkpoints older than this record).
        "trained_on_threads": None if checkpoint is None else checkpoint.get("threads"),
        "world_size": processes.size,  # processes that shared the meta-batches and the test episodes
        **scored,
        "expected": OmegaConf.to_container(cfg.expected) if cfg.get("expected") else None,
        "test_fingerprint": episodes_fingerprint(cfg, dataset),
        "episode_scores": per_episode,
    }


def stage_scores(cfg: DictConfig, learner: MetaRLLearner, tasks: FixedTasks,
                 between_batches: Callable[[], None] | None = None) -> tuple[dict, dict]:
    """A meta-RL learner on the fixed test tasks: the return (and the family's own metrics) at each adaptation
    stage ± 95 % CI over tasks, the final stage as the score, and the family's reference policies on the same tasks
    and seeds (Thompson sampling on bandits). Returns the score and the record's RL-specific part."""
    per_stage: dict[str, dict[str, list[float]]] = {}
    references: dict[str, list[float]] = {}
    with Progress("test", total=cfg.eval.episodes, unit="tasks") as progress:
        for batch in tasks.fixed(cfg.eval.episodes, cfg.eval.seed, cfg.eval.batch_size):
            if between_batches is not None:
                between_batches()
            for stage, metrics in learner.stages(batch).items():
                for name, values in metrics.items():
                    per_stage.setdefault(stage, {}).setdefault(name, []).extend(values.tolist())
            for name, values in tasks.family.references(batch).items():
                references.setdefault(name, []).extend(values.tolist())
            final = list(per_stage.values())[-1]["return"]
            progress.advance(len(batch), status=f"return {sum(final) / len(final):.3f}")
    final = list(per_stage.values())[-1]
    scored = {**summarize(final["return"], "return"), "episodes": cfg.eval.episodes, "per_episode": final["return"]}
    family = tasks.family
    extra = {"task": {"env": family.name, "trajectories": family.trajectories, "horizon": family.horizon},
             # A list, as results.json's keys are written sorted: the stages in the order of adaptation.
             "stages": [{"stage": stage, **{name: summarize(values, name) for name, values in metrics.items()}}
                        for stage, metrics in per_stage.items()],
             "stage_scores": per_stage,
             "references": {name: summarize(values, "regret") for name, values in references.items()}}
    return scored, extra
