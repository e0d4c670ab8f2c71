"""Meta-train, validate, keep the best checkpoint, test on fixed episodes: the loop behind ``metacli train``.

The runner knows the learner only through :class:`~metacli.algorithms.base.FewShotLearner`, and the data only
through samplers, so it never depends on which algorithm or dataset it drives.
"""
from __future__ import annotations

import json
import logging
import math
import time
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ValidationError

from metacli.build import (build, build_dataset, build_execution, build_learner, build_partial, load_trained,
                           resolve_device, seed_everything, training_batches)
from metacli.config_schema import check_ranges
from metacli.errors import CheckpointError, ConfigError, MetacliError, ProcessesLost, TrainingError
from metacli.evaluation import build_results, make_samplers, make_test_sampler, validate
from metacli.logging.console import console, print_results
from metacli.logging.identity import run_identity
from metacli.logging.jsonl import read_rows
from metacli.logging.progress import Progress
from metacli.execution import processes
from metacli.execution.meta_batch import capture_for, meta_train_step
from metacli.execution.precision import training_precision
from metacli.execution.ranks import Processes, from_environment
from metacli.execution.task_threads import thread_layout
from metacli.reliability.atomic import replace_file
from metacli.reliability.checkpoint import BEST, LAST, check_origin, load_latest_good, origin, save_checkpoint
from metacli.reliability.host_memory import retain_freed_memory
from metacli.reliability.memory_budget import check_memory
from metacli.reliability.preemption import PreemptionWatch
from metacli.reliability.rng import capture_rng, restore_rng
from metacli.reliability.run_dir import (METRICS, RESULTS, RUN_START, TIMING, claim, discard_if_empty,
                                         discard_unclaimed, requeued)
from metacli.reliability.run_lock import unlock_run_dir
from metacli.saved_config import load_run_config

log = logging.getLogger(__name__)


def write_json(payload: dict, path: Path) -> None:
    replace_file(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def _build_loggers(cfg: DictConfig, run_dir: Path, resume_step: int | None) -> list:
    identity = run_identity(cfg)
    context = {"run_dir": str(run_dir), "resume_step": resume_step, "run_name": identity["name"],
               "run_group": identity["group"], "run_tags": identity["tags"],
               "run_config": OmegaConf.to_container(cfg, resolve=True)}
    # Not recursive: run_config holds _target_ nodes that are data here, not objects to build.
    return [build(node, f"logger.{name}", _recursive_=False, _convert_="all", **context)
            for name, node in (cfg.logger or {}).items()]


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Run the whole training job of ``cfg`` in ``run_dir`` and return its test results.

    The run dir is claimed first (:func:`metacli.reliability.run_dir.claim`: never another run's, locked for the
    job's duration, the job's config saved), so neither a second process nor a sweep job can overwrite the run.
    Under torchrun the first process claims it for all (:mod:`metacli.execution.processes`).
    """
    group = from_environment()
    if not group.leader:  # the first process speaks for the run
        logging.getLogger().setLevel(logging.ERROR)
    if not cfg.trainer.resume and requeued(run_dir):
        log.warning("%s is this job's own run, started again by its scheduler: resuming it", run_dir)
        cfg.trainer.resume = True
    try:  # checked in the job, not before Hydra starts it: a launcher may run it on another machine
        check_ranges(cfg)
        device = resolve_device(cfg.device)
        if group.many:
            group.check_meta_batch(cfg.trainer.meta_batch)
    except ConfigError:
        if group.leader:
            discard_unclaimed(run_dir)
        raise
    if group.many:
        device = processes.join(group, device)
    try:
        refusal = None
        if group.leader:
            try:
                claim(cfg, run_dir, cfg.trainer.resume)
            except MetacliError as exc:
                refusal = exc
        if group.many:
            refusal = processes.from_leader(refusal)
        if refusal is not None:
            raise refusal
        try:
            return _train(cfg, run_dir, device, group)
        except BaseException:
            if group.leader:
                discard_if_empty(run_dir, RUN_START)  # still locked: no other process can be starting in it
            raise
        finally:
            unlock_run_dir(run_dir)
    except ProcessesLost as exc:
        raise ProcessesLost(f"{exc}; {_kept_checkpoint(run_dir)}: rerun with trainer.resume=true (torchrun "
                            "--max-restarts does so by itself)") from exc
    finally:
        processes.leave()


def _nonfinite(loss: float, learner: torch.nn.Module) -> str | None:
    """What went non-finite in this step (the loss or a gradient), or None."""
    if not math.isfinite(loss):
        return f"the meta-training loss became {loss}"
    grads = [p.grad.detach().abs().amax() for p in learner.parameters() if p.grad is not None]
    if grads and not torch.stack(grads).isfinite().all():
        return "a meta-gradient became NaN or Inf"
    return None


def _load_state(state: dict, expected_origin: dict, where: Path, learner, optimizer, scheduler) -> None:
    """Load a checkpoint into the run's objects; one of another algorithm, network or dataset is a one-line error."""
    check_origin(state, expected_origin, where, fix="resume it with its own algo, backbone and dataset, or give "
                                                    "this run a new hydra.run.dir")
    try:
        learner.load_state_dict(state["learner"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{where} does not fit the {type(learner).__name__} built from this config (another "
                              f"way, width or optimiser?): {str(exc).splitlines()[0]}; resume with the run's own "
                              "settings or use a new hydra.run.dir") from exc
    if scheduler is not None and state.get("scheduler"):
        scheduler.load_state_dict(state["scheduler"])


def _train(cfg: DictConfig, run_dir: Path, device: torch.device, group: Processes) -> dict:
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    if cfg.trainer.retain_host_memory:
        retain_freed_memory()
    dataset = build_dataset(cfg)
    if cfg.trainer.objective not in ("auto", f"val/{dataset.family.metric}"):
        raise ConfigError(f"trainer.objective={cfg.trainer.objective}, but {dataset.name} tasks are judged by "
                          f"{dataset.family.metric}: set trainer.objective=val/{dataset.family.metric} (or auto)")
    if cfg.trainer.check_memory:
        check_memory(cfg, dataset, device)
    learner = build_learner(cfg, dataset).to(device)
    if group.many:
        processes.check_learner(learner)
    execution = build_execution(cfg)
    captured = capture_for(learner, execution)
    trained_on = origin(cfg, dataset)
    next_batch = training_batches(cfg, learner, dataset, device)
    val_sampler, test_sampler = make_samplers(cfg, dataset, device)
    # A learner with nothing to train (the random policy) has no optimiser, nor has one whose outer step is its own
    # (MAML-RL's trust-region step).
    trainable = list(learner.parameters())
    optimizer = (build_partial(cfg.trainer.optimizer, "trainer.optimizer", trainable)
                 if trainable and getattr(learner, "uses_optimizer", True) else None)
    scheduler = (build_partial(cfg.trainer.scheduler, "trainer.scheduler", optimizer)
                 if cfg.trainer.scheduler and optimizer is not None else None)
    generator = torch.Generator().manual_seed(cfg.seed)

    family = dataset.family
    start_step, best_val, best_step, skipped = 0, family.worst, None, 0
    # Wall time counts every session of the run: a resume adds its own to what the checkpoint had taken.
    started, earlier_seconds = time.monotonic(), 0.0

    def wall_seconds() -> float:
        return earlier_seconds + time.monotonic() - started

    threads = thread_layout(learner, execution)
    state = load_latest_good(run_dir / LAST, device) if cfg.trainer.resume else None
    if state is not None:
        _load_state(state, trained_on, run_dir / LAST, learner, optimizer, scheduler)
        restore_rng(state["rng"], generator)
        start_step, best_val, best_step, skipped = state["step"], state["best_val"], state["best_step"], state["skipped"]
        earlier_seconds = float(state.get("wall_seconds", 0.0))  # absent from checkpoints older than this record
        log.info("resumed from %s at step %d", run_dir / LAST, start_step)
        if state.get("threads") not in (None, threads):  # None: a checkpoint older than this record
            log.warning("this run was meta-trained with %s and resumes with %s: its numbers will differ from an "
                        "uninterrupted run's at rounding level; set execution.task_threads and OMP_NUM_THREADS as "
                        "before to continue it exactly", state["threads"], threads)
    elif cfg.trainer.resume:
        log.warning("trainer.resume=true but %s has no %s: starting from scratch", run_dir, LAST)

    loggers = _build_loggers(cfg, run_dir, start_step if cfg.trainer.resume else None) if group.leader else []

    def save(step: int, best: bool = False) -> None:
        if not group.leader:
            return
        state = {"learner": learner.state_dict(), "optimizer": optimizer.state_dict() if optimizer else None,
                 "scheduler": scheduler.state_dict() if scheduler is not None else None,
                 "step": step, "best_val": best_val, "best_step": best_step, "skipped": skipped,
                 "origin": trained_on, "rng": capture_rng(generator), "threads": threads,
                 "wall_seconds": wall_seconds()}
        save_checkpoint(state, *([run_dir / BEST] if best else []), run_dir / LAST)

    def log_row(row: dict, step: int) -> None:
        for logger in loggers:
            logger.log(row, step)

    steps = cfg.trainer.steps
    if not trainable and steps > 0:
        log.warning("%s has nothing to train: testing it as it is", type(learner).__name__)
        steps = cfg.trainer.steps = 0  # results.json and the report say what was trained, not what was asked
    if steps == 0:
        log.warning("trainer.steps=0: no meta-training; testing the initialisation")
    try:
        with PreemptionWatch(processes.any_process if group.many else bool) as preemption:
            with Progress("meta-train", total=steps, unit="steps", enabled=cfg.trainer.progress and group.leader,
                          completed=start_step) as progress:
                val_shown = "-"
                for step in range(start_step + 1, steps + 1):
                    learner.train()
                    if optimizer is not None:
                        optimizer.zero_grad(set_to_none=True)
                    with training_precision(cfg.trainer.precision, device):
                        if getattr(learner, "updates_itself", False):  # meta-RL: sampling and its own update
                            metrics = learner.meta_update(next_batch(generator), optimizer)
                        elif group.many:
                            metrics = processes.meta_train_step_across(
                                learner, next_batch(generator),
                                partial(meta_train_step, execution=execution, captured=captured), group)
                        else:
                            metrics = meta_train_step(learner, next_batch(generator), execution, captured)
                    fault = _nonfinite(metrics["loss"], learner)
                    if fault is None:
                        if not getattr(learner, "updates_itself", False):
                            if cfg.trainer.max_grad_norm is not None:
                                metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(
                                    learner.parameters(), cfg.trainer.max_grad_norm).item()
                            optimizer.step()
                    elif cfg.trainer.on_nonfinite == "skip":
                        skipped += 1
                        log.warning("%s at step %d: meta-batch skipped (%d so far)", fault, step, skipped)
                    else:
                        raise TrainingError(
                            f"{fault} at step {step}: likely a too high trainer.optimizer.lr or inner learning rate, "
                            f"or exploding second-order gradients; lower them, or set trainer.on_nonfinite=skip; "
                            f"{_kept_checkpoint(run_dir)}")
                    if scheduler is not None:
                        scheduler.step()
                    if step % cfg.trainer.log_every == 0:
                        row = {f"train/{key}": value for key, value in metrics.items()}
                        if cfg.trainer.on_nonfinite == "skip":
                            row["train/skipped_batches"] = skipped
                        log_row({**row, **({"lr": optimizer.param_groups[0]["lr"]} if optimizer else {})}, step)
                    # Rows are logged before the checkpoint of their step: a resume keeps exactly the rows up to it.
                    if step % cfg.trainer.val_every == 0 or step == steps:
                        val = validate(cfg, learner, val_sampler, group)
                        improved = family.better(val[family.metric], best_val)
                        if improved:
                            best_val, best_step = val[family.metric], step
                        log_row({f"val/{family.metric}": val[family.metric], "val/ci95": val["ci95"]}, step)
                        save(step, best=improved)
                        val_shown = f"{val[family.metric]:.3f}"
                        saved = True
                    else:
                        saved = step % cfg.trainer.checkpoint_every == 0
                        if saved:
                            save(step)
                    progress.advance(status=f"loss {metrics['loss']:.3f}  {family.metric} "
                                            f"{metrics[family.metric]:.3f}  val {val_shown}")
                    # The signal may arrive at any moment of the step: checkpoint here, just before stopping.
                    if step < steps and preemption.asked():
                        if not saved:
                            save(step)
                        preemption.stop_if_asked(f"stopped at step {step} with a checkpoint in {run_dir / LAST}; rerun "
                                                 "with trainer.resume=true to continue")

            if group.many:
                processes.wait_for_all()  # the first process's last checkpoint is written
            best = load_latest_good(run_dir / BEST, device)
            if best is not None:
                learner.load_state_dict(best["learner"])
            results = build_results(cfg, learner, dataset, test_sampler, best, "best" if best else "initialisation",
                                    between_batches=lambda: preemption.stop_if_asked(
                                        f"stopped while testing; {_kept_checkpoint(run_dir)}: rerun with "
                                        "trainer.resume=true to test it and write results.json"), processes=group)
        if not group.leader:
            return results
        write_json(results, run_dir / RESULTS)
        write_json({"wall_seconds": wall_seconds()}, run_dir / TIMING)
        for logger in loggers:
            logger.log_results(results)
        if cfg.trainer.plots:
            images = _plot(cfg, run_dir, learner, test_sampler, dataset, results)
            for logger in loggers:
                logger.log_images(images)
    finally:
        for logger in loggers:
            logger.close()
    print_results(results)
    console.print(f"outputs in {run_dir}: results.json, metrics.jsonl, best.pt"
                  f"{', ' + ', '.join(Path(p).name for p in images.values()) if cfg.trainer.plots else ''}\n"
                  f"re-test: metacli eval checkpoint={run_dir}  |  continue with more steps: the same command with "
                  f"trainer.resume=true trainer.steps=N hydra.run.dir={run_dir}\n"
                  f"compare with another run on the same episodes: metacli compare {run_dir} OTHER_RUN_DIR",
                  highlight=False, soft_wrap=True, markup=False)  # a path is text, whatever brackets it holds
    return results


def _plot(cfg: DictConfig, run_dir: Path, learner, test_sampler, dataset, results: dict) -> dict[str, Path]:
    """``curves.png`` (when metrics were logged to metrics.jsonl) and ``episode.png`` (``adaptation.png`` for
    meta-RL: the return at each adaptation stage; ``retention.png`` for a continual run, ``generation.png`` for a
    generative one), by their W&B keys."""
    from metacli import plots  # matplotlib is imported only by runs that draw

    family = learner.family.name
    if family == "reinforcement":
        shape = f"{dataset.trajectories} trajectories a task"
    else:
        shape = f"{cfg.task.n_way}-way {cfg.task.k_shot}-shot" if family == "classification" else f"{cfg.task.k_shot}-shot"
    title = f"{type(learner).__name__} on {dataset.name}, {shape}"
    if family == "reinforcement":
        images = {"plots/adaptation": plots.save(plots.adaptation_figure(results, title), run_dir / plots.ADAPTATION)}
    elif cfg.eval.protocol == "generative":
        images = {"plots/generation": plots.save(plots.generation_figure(
            test_sampler.first_episode, f"{type(learner).__name__} on unseen {dataset.name} characters"),
            run_dir / plots.GENERATION)}
    elif cfg.eval.protocol == "continual":
        title = f"{type(learner).__name__} on {dataset.name}, class-incremental streams"
        images = {"plots/retention": plots.save(plots.retention_figure([(results["algorithm"], results)], title),
                                                run_dir / plots.RETENTION)}
    else:
        episode = (plots.episode_figure(learner, test_sampler, dataset, cfg.eval.seed) if family == "classification"
                   else plots.regression_figure(learner, test_sampler, cfg.eval.seed))
        images = {"plots/episode": plots.save(episode, run_dir / plots.EPISODE)}
    metrics = run_dir / METRICS
    if metrics.exists():
        images["plots/curves"] = plots.save(plots.curves_figure(read_rows(metrics), title, learner.family.metric),
                                            run_dir / plots.CURVES)
    return images


def _kept_checkpoint(run_dir: Path) -> str:
    """Which checkpoint a run that stops now leaves behind, read from the file itself."""
    state = load_latest_good(run_dir / LAST) if (run_dir / LAST).exists() else None
    if state is None:
        return "no checkpoint was written before it (rerun from scratch after the fix)"
    return f"the checkpoint of step {state['step']} is kept in {run_dir / LAST}"


def _set_given(section: DictConfig, given: DictConfig) -> None:
    """Set in ``section`` every value that ``given`` (eval's overrides, nested) does not leave null."""
    for key, value in given.items():
        if isinstance(value, DictConfig):
            _set_given(section[key], value)
        elif value is not None:
            try:
                section[key] = value
            except ValidationError as exc:  # the run's typed config refuses it: eval's own config is untyped
                raise ConfigError(f"{exc.full_key}={value}: {str(exc).splitlines()[0]}; give a value of that "
                                  "type") from None


def evaluate_run(run_dir: Path, overrides: DictConfig, out_dir: Path) -> dict:
    """Re-test a finished run's checkpoint, optionally with other eval/task/device settings (``metacli eval``)."""
    cfg = load_run_config(run_dir)
    # The network is the trained one: interpolations in its sections (SNAIL's depth follows task.k_shot) are
    # resolved before the overrides change the task.
    for section in ("algo", "backbone"):
        cfg[section] = OmegaConf.to_container(cfg[section], resolve=True)
    for section in ("eval", "task"):
        _set_given(cfg[section], overrides[section])
    if overrides.adapt_steps is not None:
        if "test_inner_steps" not in cfg.algo:
            raise ConfigError(f"adapt_steps={overrides.adapt_steps}: {cfg.algo._target_.rsplit('.', 1)[-1]} does not "
                              "adapt by gradient steps; drop adapt_steps")
        cfg.algo.test_inner_steps = overrides.adapt_steps
    if overrides.dataset_root is not None:
        cfg.dataset.root = overrides.dataset_root
    cfg.device = overrides.device
    check_ranges(cfg)
    started = time.monotonic()
    device = resolve_device(cfg.device)
    dataset = build_dataset(cfg)
    if overrides.check_memory:
        check_memory(cfg, dataset, device, training=False, switch="check_memory")
    learner = build_learner(cfg, dataset).to(device)
    state = load_trained(learner, cfg, dataset, run_dir, overrides.which, device)
    results = build_results(cfg, learner, dataset, make_test_sampler(cfg, dataset, device), state, overrides.which)
    write_json(results, out_dir / RESULTS)
    write_json({"wall_seconds": time.monotonic() - started}, out_dir / TIMING)
    print_results(results)
    console.print(f"outputs in {out_dir}: results.json\ncompare with another run on the same episodes: "
                  f"metacli compare {out_dir} OTHER_RUN_DIR", highlight=False, soft_wrap=True, markup=False)
    return results
