"""Meta-train, validate, keep the best checkpoint, test on fixed episodes: the loop behind ``metacli train``.

The runner knows the learner only through :class:`~metacli.algorithms.base.FewShotLearner`, and the data only
through samplers, so it never depends on which algorithm or dataset it drives.
"""
from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from metacli.build import build, build_dataset, build_learner, resolve_device, seed_everything
from metacli.checkpoint import BEST, LAST, load_checkpoint, save_checkpoint
from metacli.config_schema import check_ranges
from metacli.data.episodes import EpisodeSampler
from metacli.errors import ConfigError, TrainingError
from metacli.evaluation import build_results, make_test_sampler, score
from metacli.logging.console import console, results_table, training_progress

log = logging.getLogger(__name__)


def write_json(payload: dict, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def _train_shape(cfg: DictConfig) -> tuple[int, int, int]:
    task = cfg.task
    return (task.train_way or task.n_way, task.train_shot or task.k_shot, task.train_query or task.n_query)


def _build_loggers(cfg: DictConfig, run_dir: Path, resume_step: int | None) -> list:
    context = {"run_dir": str(run_dir), "resume_step": resume_step, "run_name": run_dir.name,
               "run_config": OmegaConf.to_container(cfg, resolve=True)}
    # Not recursive: run_config holds _target_ nodes that are data here, not objects to build.
    return [build(node, f"logger.{name}", _recursive_=False, _convert_="all", **context)
            for name, node in (cfg.logger or {}).items()]


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Run the whole training job of ``cfg`` in ``run_dir`` and return its test results."""
    check_ranges(cfg)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    dataset = build_dataset(cfg)
    learner = build_learner(cfg, dataset).to(device)
    train_way, train_shot, train_query = _train_shape(cfg)
    if learner.fixed_way and train_way != cfg.task.n_way:
        raise ConfigError(f"{type(learner).__name__} has an n_way-sized head, so task.train_way={train_way} must equal "
                          f"task.n_way={cfg.task.n_way}: drop the task.train_way override")
    train_sampler = EpisodeSampler(dataset.split("train"), train_way, train_shot, train_query, dataset.normalize,
                                   device, where="train split")
    val_sampler = EpisodeSampler(dataset.split("val"), cfg.task.n_way, cfg.task.k_shot, cfg.task.n_query,
                                 dataset.normalize, device, where="val split")
    test_sampler = make_test_sampler(cfg, dataset, device)
    optimizer = build(cfg.trainer.optimizer, "trainer.optimizer")(learner.parameters())
    scheduler = build(cfg.trainer.scheduler, "trainer.scheduler")(optimizer) if cfg.trainer.scheduler else None
    generator = torch.Generator().manual_seed(cfg.seed)

    start_step, best_val, best_step = 0, -math.inf, None
    if cfg.trainer.resume and (run_dir / LAST).exists():
        state = load_checkpoint(run_dir / LAST, device)
        learner.load_state_dict(state["learner"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["rng"]["episodes"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate((state["rng"]["python"][0], tuple(state["rng"]["python"][1]), state["rng"]["python"][2]))
        start_step, best_val, best_step = state["step"], state["best_val"], state.get("best_step")
        log.info("resumed from %s at step %d", run_dir / LAST, start_step)
    elif cfg.trainer.resume:
        log.warning("trainer.resume=true but %s has no %s: starting from scratch", run_dir, LAST)

    loggers = _build_loggers(cfg, run_dir, start_step if cfg.trainer.resume else None)

    def checkpoint(step: int) -> dict:
        return {"learner": learner.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "step": step, "best_val": best_val, "best_step": best_step,
                "rng": {"episodes": generator.get_state(), "torch": torch.get_rng_state(),
                        "python": list(random.getstate())}}

    steps = cfg.trainer.steps
    try:
        with training_progress(cfg.trainer.progress) as progress:
            bar = progress.add_task("meta-train", total=steps, completed=start_step, loss=float("nan"),
                                    accuracy=float("nan"), val="-")
            for step in range(start_step + 1, steps + 1):
                learner.train()
                optimizer.zero_grad(set_to_none=True)
                metrics = learner.meta_train_step(train_sampler.sample(cfg.trainer.meta_batch, generator))
                if not math.isfinite(metrics["loss"]):
                    raise TrainingError(
                        f"the meta-training loss became {metrics['loss']} at step {step}: lower trainer.optimizer.lr "
                        f"or the algorithm's learning rates; the last good checkpoint is kept in {run_dir / LAST}")
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                progress.update(bar, advance=1, loss=metrics["loss"], accuracy=metrics["accuracy"])
                if step % cfg.trainer.log_every == 0:
                    row = {**{f"train/{key}": value for key, value in metrics.items()},
                           "lr": optimizer.param_groups[0]["lr"]}
                    for logger in loggers:
                        logger.log(row, step)
                if step % cfg.trainer.val_every == 0 or step == steps:
                    val = score(learner, val_sampler, cfg.trainer.val_episodes, cfg.trainer.val_seed,
                                cfg.eval.batch_size)
                    if val["accuracy"] > best_val:
                        best_val, best_step = val["accuracy"], step
                        save_checkpoint(checkpoint(step), run_dir / BEST)
                    save_checkpoint(checkpoint(step), run_dir / LAST)
                    progress.update(bar, val=f"{val['accuracy']:.3f}")
                    for logger in loggers:
                        logger.log({"val/accuracy": val["accuracy"], "val/ci95": val["ci95"]}, step)

        best = load_checkpoint(run_dir / BEST, device) if (run_dir / BEST).exists() else None
        if best is not None:
            learner.load_state_dict(best["learner"])
        results = build_results(cfg, learner, dataset, test_sampler, best)
        write_json(results, run_dir / "results.json")
        for logger in loggers:
            logger.log_results(results)
    finally:
        for logger in loggers:
            logger.close()
    console.print(results_table(results))
    return results


def evaluate_run(run_dir: Path, overrides: DictConfig, out_dir: Path) -> dict:
    """Re-test a finished run's checkpoint, optionally with other eval/task/device settings (``metacli eval``)."""
    config_file = run_dir / ".hydra" / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"{run_dir} is not a metacli run dir (no .hydra/config.yaml): pass checkpoint=<a run dir "
                          "under outputs/train>")
    cfg = OmegaConf.load(config_file)
    for section in ("eval", "task"):
        for key, value in overrides[section].items():
            if value is not None:
                cfg[section][key] = value
    if overrides.dataset_root is not None:
        cfg.dataset.root = overrides.dataset_root
    cfg.device = overrides.device
    check_ranges(cfg)
    device = resolve_device(cfg.device)
    dataset = build_dataset(cfg)
    learner = build_learner(cfg, dataset).to(device)
    state = load_checkpoint(run_dir / f"{overrides.which}.pt", device)
    try:
        learner.load_state_dict(state["learner"])
    except RuntimeError as exc:
        raise ConfigError(f"{run_dir / (overrides.which + '.pt')} does not fit the {type(learner).__name__} built "
                          f"from the run's config (changed n_way?): {str(exc).splitlines()[0]}") from exc
    results = build_results(cfg, learner, dataset, make_test_sampler(cfg, dataset, device), state)
    write_json(results, out_dir / "results.json")
    console.print(results_table(results))
    return results
