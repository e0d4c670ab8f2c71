"""Turn a composed config into objects: device, dataset, learner, optimiser. Shared by train, eval and the API."""
from __future__ import annotations

import random

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from metacli.algorithms.base import FewShotLearner
from metacli.data.base import FewShotDataset
from metacli.errors import ConfigError, MetacliError


def build(node: DictConfig, what: str, **kwargs):
    """``instantiate(node, **kwargs)``, with a constructor's complaint turned into a one-line ConfigError."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, MetacliError):
            raise cause
        reason = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        raise ConfigError(f"cannot build {what}: {reason}; fix the {what}.* overrides "
                          f"(see `metacli train --cfg job`)") from exc


def resolve_device(device_cfg: DictConfig) -> torch.device:
    kind = device_cfg.type
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but CUDA is not available here: use device=cpu or device=auto")
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"device.type={kind} is not supported: use device=cpu, device=cuda or device=auto")
    return torch.device(kind)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_dataset(cfg: DictConfig) -> FewShotDataset:
    return build(cfg.dataset, "dataset")


def build_learner(cfg: DictConfig, dataset: FewShotDataset) -> FewShotLearner:
    """Backbone sized for the dataset's images, wrapped by the configured algorithm."""
    backbone = build(cfg.backbone, "backbone", in_channels=dataset.channels, image_size=dataset.image_size)
    return build(cfg.algo, "algo", backbone=backbone, n_way=cfg.task.n_way, bn_mode=cfg.eval.bn_mode)
