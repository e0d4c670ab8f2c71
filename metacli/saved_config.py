"""A run dir's saved config, read as data: what ``metacli eval`` and ``load_learner`` rebuild a run from.

A run dir may come from anyone (a shared folder, a downloaded archive), so its ``.hydra/config.yaml`` must not
be able to run code. Three rules make it so, all checked on the raw file before anything is resolved, imported or
built:

- every ``_target_`` is a literal string found, to the letter, in :data:`BUILDABLE`: a dotted path that walks
  through a module attribute (``metacli.build.torch.load``) or names a function is never imported;
- the only interpolations are plain references to the config's own keys (``${task.k_shot}``, ``${.inner_lr}``):
  resolvers (``oc.create`` builds nodes no check saw, ``oc.env`` reads secrets into error lines) are refused;
- the file is a mapping of the train schema's sections, of bounded size.
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml
from omegaconf import DictConfig, ListConfig, Node, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from metacli.config_schema import TrainSchema, group_targets
from metacli.errors import CheckpointError

_OPTIMIZERS = ("Adadelta", "Adagrad", "Adam", "AdamW", "Adamax", "ASGD", "NAdam", "RAdam", "RMSprop", "Rprop", "SGD")
# Schedulers whose arguments are plain numbers: LambdaLR and its kin take functions, SequentialLR schedulers.
_SCHEDULERS = ("ConstantLR", "CosineAnnealingLR", "CosineAnnealingWarmRestarts", "CyclicLR", "ExponentialLR",
               "LinearLR", "MultiStepLR", "OneCycleLR", "PolynomialLR", "StepLR")



def _shipped_targets() -> list[str]:
    """Every ``_target_`` of the shipped learner, backbone, dataset, environment, augmentation and logger configs: an algorithm
    added as one file and one YAML is loadable from its saved runs with no edit here."""
    return [target for group in ("algo", "backbone", "dataset", "env", "augment", "logger")
            for targets in group_targets(group).values() for target in targets]


#: Every class a saved config may name as ``_target_``, spelled exactly as the shipped configs spell it.
BUILDABLE = frozenset(_shipped_targets() + [f"torch.optim.{name}" for name in _OPTIMIZERS]
                      + [f"torch.optim.lr_scheduler.{name}" for name in _SCHEDULERS])

#: A reference to another key of the same config, absolute or relative, and nothing else.
_PLAIN_REFERENCE = re.compile(r"\$\{\.*[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*\}")
#: Sections a run's config always has, each a mapping (``seed`` aside), but those of the data: a meta-RL run has an
#: env for its dataset (and a recurrent policy no backbone).
_SECTIONS = ("algo", "backbone", "dataset", "device", "task", "trainer", "eval")
_SECTIONS_OF_DATA = ("backbone", "dataset")
#: A saved config is a few kilobytes; far more is not one, and is not parsed.
MAX_CONFIG_BYTES = 1 << 20

CONFIG_FILE = Path(".hydra") / "config.yaml"


def run_file(run_dir: Path, name: str | Path) -> Path:
    """``run_dir / name``, refused unless it stays inside ``run_dir`` once links and ``..`` are resolved."""
    run_dir = Path(run_dir)
    path = run_dir / name
    if not path.resolve().is_relative_to(run_dir.resolve()):
        raise CheckpointError(f"{path} leads outside the run dir {run_dir}: a run's files must lie inside it; "
                              "restore the run dir from its source")
    return path


def _raw(node: Node) -> object:
    """A node's value as written in the file, interpolations unresolved."""
    return node._value()


def _walk(node: Node, path: str):
    """Every node under ``node`` with its dotted path, without resolving anything."""
    yield node, path
    if node._is_interpolation() or node._is_none() or node._is_missing():
        return
    if isinstance(node, DictConfig):
        for key in node.keys():
            yield from _walk(node._get_node(key), f"{path}{key}.")
    elif isinstance(node, ListConfig):
        for index in range(len(node)):
            yield from _walk(node._get_node(index), f"{path}{index}.")


def check_saved_config(cfg: DictConfig, source: Path) -> None:
    """Raise a one-line CheckpointError for a resolver or a ``_target_`` outside :data:`BUILDABLE` in ``cfg``."""
    nodes = list(_walk(cfg, ""))
    # Interpolations first, all of them: even asking whether a key exists resolves its value.
    for node, path in nodes:
        if node._is_interpolation():
            text = str(_raw(node))
            if "${" in _PLAIN_REFERENCE.sub("", text):
                raise CheckpointError(f"{source} sets {path.rstrip('.')} to {text!r}: a saved config may only refer "
                                      "to its own keys as ${a.b}, never call a resolver; restore the run's own config")
    for node, path in nodes:
        if isinstance(node, DictConfig) and not node._is_interpolation() and "_target_" in node.keys():
            target = _raw(node._get_node("_target_"))
            if not isinstance(target, str) or target not in BUILDABLE:
                raise CheckpointError(f"{source} sets {path}_target_={target}, which is not a metacli learner, "
                                      "backbone, dataset or logger, or a torch.optim optimiser or scheduler: a saved "
                                      "config builds nothing else; restore the run's own config")


def load_run_config(run_dir: Path) -> DictConfig:
    """The config ``run_dir`` was trained with, checked as :func:`check_saved_config` says and against the train
    schema; every problem with the file is a one-line CheckpointError."""
    run_dir = Path(run_dir)
    config_file = run_file(run_dir, CONFIG_FILE)
    if not config_file.is_file():
        raise CheckpointError(f"{run_dir} is not a metacli run dir (no {CONFIG_FILE}): pass a run dir under "
                              "outputs/train")
    restore = f"restore {config_file} from the run's source, or retrain"
    if config_file.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{config_file} is {config_file.stat().st_size} bytes, too large for a metacli config; "
                              f"{restore}")
    try:
        cfg = OmegaConf.load(config_file)
    except (yaml.YAMLError, UnicodeDecodeError, OmegaConfBaseException, ValueError, OSError) as exc:
        reason = " ".join(str(exc).split())
        raise CheckpointError(f"{config_file} is not valid YAML ({reason}); {restore}") from None
    if not isinstance(cfg, DictConfig):
        raise CheckpointError(f"{config_file} is a {type(cfg).__name__}, not a run's config; {restore}")
    check_saved_config(cfg, config_file)
    _move_execution_keys(cfg)
    rl = isinstance(cfg._get_node("env"), DictConfig)
    missing = [s for s in _SECTIONS if not isinstance(cfg._get_node(s), DictConfig)
               and not (rl and s in _SECTIONS_OF_DATA)]
    if missing:
        raise CheckpointError(f"{config_file} is not a run's config (no {', '.join(missing)} section): it is empty, "
                              f"truncated or something else; {restore}")
    try:
        typed = OmegaConf.merge(OmegaConf.structured(TrainSchema), cfg)
        OmegaConf.to_container(typed, resolve=True)  # every reference must lead somewhere
    except OmegaConfBaseException as exc:
        reason = " ".join(str(exc).splitlines()[0].split())
        raise CheckpointError(f"{config_file} does not fit metacli's train config ({reason}); {restore}") from None
    return typed


# Run dirs written before metacli.execution kept the meta-batch settings among the algorithm's.
MOVED_TO_EXECUTION = ("vectorize", "batch_first_step", "checkpoint_inner", "task_threads")


def _move_execution_keys(cfg: DictConfig) -> None:
    """Move an earlier run's ``algo.task_threads`` (and the other execution keys) to ``execution.*``."""
    algo = cfg.get("algo")
    if not isinstance(algo, DictConfig):
        return
    moved = {key: algo.pop(key) for key in MOVED_TO_EXECUTION if key in algo}
    if moved:
        cfg.execution = OmegaConf.merge(cfg.get("execution") or {}, moved)
