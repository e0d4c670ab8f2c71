"""How a run is named to experiment trackers: what it is (``maml-omniglot-5w1s-seed0``, plus whatever else its
sweep varied), the sweep it belongs to, and tags to filter by."""
from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

# Overrides already spelled by the base name, or that say nothing about the run (where it is written, progress).
_IN_NAME = ("algo", "dataset", "seed", "task.n_way", "task.k_shot", "hydra.", "trainer.progress", "trainer.resume",
            "logger")


def _choices(cfg: DictConfig) -> tuple[str, str]:
    if HydraConfig.initialized():
        choices = HydraConfig.get().runtime.choices
        return choices.get("algo"), choices.get("env") or choices.get("dataset")
    tasks = cfg.get("env") or cfg.dataset  # a meta-RL run's environments stand where a dataset would
    return cfg.algo._target_.rsplit(".", 1)[-1].lower(), tasks._target_.rsplit(".", 1)[-1].lower()


def run_identity(cfg: DictConfig) -> dict:
    """``name``, ``group`` (the sweep dir of a multirun job, else None) and ``tags`` of the run ``cfg`` composes."""
    algo, dataset = _choices(cfg)
    shape = f"{cfg.env.trajectories}traj" if cfg.get("env") else f"{cfg.task.n_way}w{cfg.task.k_shot}s"
    name, group = f"{algo}-{dataset}-{shape}-seed{cfg.seed}", None
    if HydraConfig.initialized():
        hydra = HydraConfig.get()
        if hydra.mode == RunMode.MULTIRUN:
            sweep = Path(hydra.sweep.dir).resolve()
            group = f"{sweep.parent.name}/{sweep.name}"
            for override in hydra.overrides.task:
                key, _, value = override.lstrip("+~").partition("=")
                if not key.startswith(_IN_NAME):
                    name += f"-{key.rsplit('.', 1)[-1]}={value}"
    network = [cfg.backbone._target_.rsplit(".", 1)[-1]] if cfg.get("backbone") else []
    return {"name": name, "group": group, "tags": [algo, dataset, shape, *network]}
