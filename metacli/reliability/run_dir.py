"""A training job's claim on its run dir: a new run never lands on an existing one, a resume never overwrites the
config the run was trained with, and both rules hold for every job of a multirun as for a single run.

A scheduler that requeues a job runs it again with the same command, without ``trainer.resume=true`` (Hydra's
submitit launcher after a preemption, SLURM's ``--requeue``, torchrun's ``--max-restarts``). The claim records
which scheduler job made the run (:data:`JOB`), and the same job finding its own checkpoint resumes by itself
(:func:`requeued`); any other job is still refused the dir.

Hydra's own copy of the config (``hydra.output_subdir``) is switched off for ``metacli train``, because Hydra writes
it before any code of ours runs, over whatever the dir held; :func:`claim` writes it instead, once the dir is
known to be free (``.hydra/``) or the run's own (``.hydra/resumed/`` on a resume).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from metacli.errors import ConfigError
from metacli.reliability.run_lock import LOCK_NAME, lock_run_dir, unlock_run_dir

LAST, BEST = "last.pt", "best.pt"
#: The checkpoints a user may name (``which=``); no other file of a run dir is ever loaded as one.
CHECKPOINTS = {"best": BEST, "last": LAST}
RESULTS, METRICS = "results.json", "metrics.jsonl"
#: The scheduler job that claimed the run dir (:func:`job_identity`), where there is one.
JOB = ".metacli-job"
#: The run's wall time, kept apart from results.json so that the same seed still gives the same results file.
TIMING = "timing.json"


def previous(path: Path) -> Path:
    """Where the version before a checkpoint's current one is kept."""
    return path.with_name(path.name + ".prev")


#: The files that make a dir a run's: its checkpoints and its results.
RECORDS = (LAST, previous(Path(LAST)).name, BEST, previous(Path(BEST)).name, RESULTS, METRICS)
RESUMABLE = (LAST, previous(Path(LAST)).name)


def records(run_dir: Path) -> list[str]:
    """The run records ``run_dir`` holds, by name."""
    return [name for name in RECORDS if (Path(run_dir) / name).exists()]


def job_identity() -> str | None:
    """The id a scheduler keeps across requeues of this job: SLURM's (an array task's own), submitit's local job's,
    or torchrun's run id (``--standalone`` makes a new one each launch; ``--rdzv-id`` names it). None outside them."""
    env = os.environ
    if "SLURM_ARRAY_JOB_ID" in env:
        return f"slurm:{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
    if "SLURM_JOB_ID" in env:
        return f"slurm:{env['SLURM_JOB_ID']}"
    if "SUBMITIT_LOCAL_JOB_ID" in env:
        return f"submitit_local:{env['SUBMITIT_LOCAL_JOB_ID']}"
    if env.get("TORCHELASTIC_RUN_ID", "none") != "none":  # torchrun's default id is "none" for every launch
        return f"torchrun:{env['TORCHELASTIC_RUN_ID']}"
    return None


def requeued(run_dir: Path) -> bool:
    """Whether this is the job that claimed ``run_dir``, started again by its scheduler, with a checkpoint to resume."""
    identity, record = job_identity(), Path(run_dir) / JOB
    return (identity is not None and record.is_file() and record.read_text().strip() == identity
            and any((Path(run_dir) / name).exists() for name in RESUMABLE))


def check_claim(run_dir: Path, resume: bool) -> None:
    """Raise a one-line ConfigError when a new run would land on an existing one, or a resume has nothing to
    continue from but would overwrite a finished run's records."""
    held = records(run_dir)
    if not resume and held:
        raise ConfigError(f"{run_dir} already holds a run ({', '.join(held)}): continue it with trainer.resume=true, "
                          "or give the new run its own hydra.run.dir (hydra.sweep.dir for a multirun)")
    if resume and held and not set(held) & set(RESUMABLE) and set(held) - {METRICS}:
        raise ConfigError(f"{run_dir} holds a run ({', '.join(held)}) but no {LAST} to continue from, so "
                          "trainer.resume=true would start over and overwrite it: give the new run its own "
                          "hydra.run.dir")


def claim(cfg: DictConfig, run_dir: Path, resume: bool) -> None:
    """Check ``run_dir`` is free (or, on a resume, continuable), lock it for this process, and save the job's
    config where Hydra would have: ``.hydra/``, or ``.hydra/resumed/`` when the run's own is already there."""
    run_dir = Path(run_dir)
    check_claim(run_dir, resume)
    lock_run_dir(run_dir)
    identity = job_identity()
    if identity is not None:
        (run_dir / JOB).write_text(identity + "\n")
    target = run_dir / ".hydra"
    if resume and (target / "config.yaml").exists():
        target = target / "resumed"
    target.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, target / "config.yaml")
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), target / "hydra.yaml")
        OmegaConf.save(hydra_cfg.overrides.task, target / "overrides.yaml")


#: What starting a run writes into its dir before it records anything: the saved config, the lock, W&B's offline
#: folder and run id (the job's log comes on top); and what starting a sweep writes into the sweep dir.
RUN_START = {".hydra", LOCK_NAME, JOB, "wandb", "wandb_run_id.txt"}
SWEEP_START = {"multirun.yaml"}


def discard_if_empty(folder: Path, written_at_start: set[str]) -> None:
    """Remove the dir of a run (or sweep) that stopped before it recorded anything, so a failed start leaves no
    empty run behind. A dir that holds a run record or anything not ``written_at_start`` is left as it is."""
    folder = Path(folder)
    if HydraConfig.initialized():
        written_at_start = written_at_start | {f"{HydraConfig.get().job.name}.log"}
    if folder.is_dir() and not records(folder) and all(p.name in written_at_start for p in folder.iterdir()):
        shutil.rmtree(folder)


def discard_unclaimed(run_dir: Path) -> None:
    """Remove the dir of a job that stopped before claiming it, where it holds nothing but Hydra's job log and the
    lock (this process's: another process starting in the same dir keeps its lock, and so its dir)."""
    try:
        lock_run_dir(run_dir)
    except ConfigError:
        return
    try:
        discard_if_empty(run_dir, {LOCK_NAME})
    finally:
        unlock_run_dir(run_dir)
