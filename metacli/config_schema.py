"""The structured schema of ``metacli train``: types are checked by OmegaConf at composition, ranges by
:func:`check_ranges` before anything runs. Group nodes (algo, dataset, backbone, ...) are checked by the
constructors that ``instantiate`` calls."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from metacli.errors import ConfigError


def config_dir() -> Path:
    """``conf/``: inside the installed package (wheel), else beside the package (source checkout, editable)."""
    packaged = Path(__file__).resolve().parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "conf"


def group_targets(group: str) -> dict[str, list[str]]:
    """Each option of a shipped config group with the ``_target_`` class paths its YAML names, read as data (a
    YAML may nest them: a logger's per-backend nodes, MANN's ``algo:`` under ``# @package _global_``)."""

    def walk(node: object) -> list[str]:
        found = []
        for key, value in (node.items() if isinstance(node, dict) else ()):
            if key == "_target_" and isinstance(value, str):
                found.append(value)
            else:
                found += walk(value)
        return found

    return {path.stem: walk(yaml.safe_load(path.read_text()))
            for path in sorted((config_dir() / group).glob("*.yaml"))}


def algo_targets() -> dict[str, str]:
    """Each ``algo=`` option's learner class path."""
    return {name: targets[0] for name, targets in group_targets("algo").items()}


# trainer.precision's values; metacli.execution.precision maps them to autocast contexts (kept here, free of torch,
# because the CLI composes configs before it imports torch).
PRECISIONS = ("fp32", "bf16")
# Validation metrics a sweep may optimise; auto: the task family's (accuracy; mse for regression; return for RL).
OBJECTIVES = ("auto", "val/accuracy", "val/mse", "val/return")


def _at_least(low, default):
    return field(default=default, metadata={"min": low})


@dataclass
class TaskSchema:
    """Episode shape. Test and validation episodes use n_way/k_shot/n_query; training may differ (higher way)."""

    n_way: int = _at_least(2, 5)
    k_shot: int = _at_least(1, 1)
    n_query: int = _at_least(1, 15)
    train_way: Optional[int] = _at_least(2, None)
    train_shot: Optional[int] = _at_least(1, None)
    train_query: Optional[int] = _at_least(1, None)
    # episodes: over all the split's classes; within_alphabet: each episode's characters from one alphabet (or one
    # rotation of it), support and queries by different drawers, as Lake et al.'s test episodes (Omniglot).
    train_protocol: str = field(default="episodes", metadata={"choices": ("episodes", "within_alphabet")})


@dataclass
class TrainerSchema:
    steps: int = _at_least(0, 1000)
    meta_batch: int = _at_least(1, 4)
    batch_size: int = _at_least(1, 128)
    val_every: int = _at_least(1, 250)
    val_episodes: int = _at_least(1, 100)
    val_seed: int = 1
    log_every: int = _at_least(1, 10)
    checkpoint_every: int = _at_least(1, 50)
    on_nonfinite: str = field(default="stop", metadata={"choices": ("stop", "skip")})
    max_grad_norm: Optional[float] = _at_least(1e-8, None)
    precision: str = field(default="fp32", metadata={"choices": PRECISIONS})
    retain_host_memory: bool = True
    check_memory: bool = True
    plots: bool = True
    # What `metacli train` returns to a sweeper: a validation metric, best over the run; tests never select.
    objective: str = field(default="auto", metadata={"choices": OBJECTIVES})
    deterministic: bool = False
    resume: bool = False
    progress: bool = True
    optimizer: Any = None
    scheduler: Any = None


@dataclass
class ExecutionSchema:
    """How meta-batches run (metacli.execution.settings.Execution checks the values)."""

    vectorize: Any = "auto"
    batch_first_step: bool = True
    checkpoint_inner: bool = False
    task_threads: Any = "auto"
    capture: Any = False


@dataclass
class ContinualSchema:
    """eval.protocol=continual: class-incremental streams learned online (metacli/continual.py)."""

    lengths: list = field(default_factory=lambda: [10, 50, 100, 200, 600])  # classes a test stream, each scored
    streams: int = _at_least(1, 50)         # test streams of each length, fixed by eval.seed
    train_shots: int = _at_least(1, 15)     # images of a class learned online; its other images test retention
    lrs: list = field(default_factory=lambda: [0.1, 0.03, 0.01, 0.003, 0.001, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6])
    val_streams: int = _at_least(1, 10)     # validation streams (trainer.val_seed) that choose the rate
    val_length: int = _at_least(2, 50)      # classes of the validation streams scored during meta-training


@dataclass
class GenerativeSchema:
    """eval.protocol=generative: generated images judged by a separately trained classifier (metacli/generative.py)."""

    judge: Optional[str] = None             # run dir of a classification run (a ProtoNet) on the same dataset
    way: int = _at_least(2, 5)              # characters an episode
    judge_shots: int = _at_least(1, 5)      # other drawers' images of each character: the judge's support set
    samples: int = _at_least(1, 10)         # images generated a character, and real held-out images to compare


@dataclass
class EvalSchema:
    episodes: int = _at_least(1, 600)
    seed: int = 0
    batch_size: int = _at_least(1, 25)
    bn_mode: str = field(default="transductive", metadata={"choices": ("transductive", "running")})
    # episodes: N-way K-shot over the split's classes; within_alphabet: Lake et al.'s one-shot protocol (Omniglot);
    # continual: class-incremental streams learned online, scored by retention and forgetting; generative: a
    # generator adapted to each character, its images judged.
    protocol: str = field(default="episodes", metadata={"choices": ("episodes", "within_alphabet", "continual",
                                                                     "generative")})
    continual: ContinualSchema = field(default_factory=ContinualSchema)
    generative: GenerativeSchema = field(default_factory=GenerativeSchema)


@dataclass
class TrainSchema:
    seed: int = 0
    task: TaskSchema = field(default_factory=TaskSchema)
    trainer: TrainerSchema = field(default_factory=TrainerSchema)
    eval: EvalSchema = field(default_factory=EvalSchema)
    execution: ExecutionSchema = field(default_factory=ExecutionSchema)
    algo: Any = None
    dataset: Any = None
    # Reinforcement-learning task families come through the env group; an env option sets dataset to null.
    env: Any = None
    backbone: Any = None
    device: Any = None
    logger: Any = None
    # Random distortions of the training images (conf/augment/), or null; never applied to val or test.
    augment: Any = None
    # The paper's number for an experiment's protocol ({metric: value, ci95, source}), shown by `metacli report`.
    expected: Any = None


def check_ranges(cfg: DictConfig, schema: type = TrainSchema, prefix: str = "") -> None:
    """Raise ConfigError for the first value below its ``min`` or outside its ``choices``."""
    for f in fields(schema):
        value = cfg.get(f.name)
        key = f"{prefix}{f.name}"
        if is_dataclass(f.default_factory):
            check_ranges(value, f.default_factory, key + ".")
            continue
        if value is None:
            continue
        low = f.metadata.get("min")
        if low is not None and value < low:
            raise ConfigError(f"{key}={value} is out of range: it must be at least {low} (override it, e.g. {key}={max(low, 1)})")
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{key}={value} is not valid: choose one of {', '.join(choices)}")


# A train run dir is named after its task family: ``${metacli_first_set:${dataset choice},${env choice},none}`` is the
# dataset, or the environment where an env option dropped the dataset (``oc.select`` would keep the dropped null).
OmegaConf.register_new_resolver(
    "metacli_first_set", lambda *values: next(value for value in values if value is not None), replace=True)


def register() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainSchema)
