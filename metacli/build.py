"""Turn a composed config into objects: device, dataset, learner, optimiser. Shared by train, eval and the API."""
from __future__ import annotations

import inspect
import os
import random
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from metacli.algorithms.base import FewShotLearner
from metacli.algorithms.meta_rl import MetaRLLearner
from metacli.config_schema import algo_targets
from metacli.data.augment import augmented
from metacli.data.base import FewShotDataset, unit_range
from metacli.data.batches import CoTrainingBatch, ImageBatchSampler, LabelledBatch
from metacli.data.episodes import EpisodeBatch
from metacli.data.trajectories import TrajectorySampler
from metacli.data.within_alphabet import WithinAlphabetSampler, require_alphabets
from metacli.errors import CheckpointError, ConfigError, MetacliError
from metacli.execution.settings import Execution
from metacli.reliability.checkpoint import CHECKPOINTS, check_origin, load_checkpoint, origin
from metacli.rl.task_envs import TaskFamilyEnv
from metacli.saved_config import run_file
from metacli.tasks import REINFORCEMENT


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


def build_partial(node: DictConfig, what: str, *args):
    """Build a ``_partial_`` config and call it with ``args`` (an optimiser with its parameters, a scheduler with
    its optimiser); a complaint at either stage is a one-line ConfigError."""
    factory = build(node, what)
    try:
        return factory(*args)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"cannot build {what}: {str(exc).splitlines()[0]}; fix the {what}.* overrides") from exc


def load_trained(learner: FewShotLearner, cfg: DictConfig, dataset: FewShotDataset, run_dir: Path, which: str,
                 device: torch.device) -> dict:
    """Load ``<run_dir>/<which>.pt`` (``which``: best or last) into ``learner``, built from ``cfg`` for
    ``dataset``; returns the checkpoint's state. A checkpoint of another algorithm, network or dataset is refused."""
    if which not in CHECKPOINTS:
        raise ConfigError(f"which={which!r} names no checkpoint: use which=best or which=last")
    path = run_file(run_dir, CHECKPOINTS[which])
    state = load_checkpoint(path, device)
    check_origin(state, origin(cfg, dataset), path, fix="evaluate the run dir that wrote it, or restore its own "
                                                       f"{path.name}")
    try:
        learner.load_state_dict(state["learner"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit the {type(learner).__name__} built from the run's config "
                              f"(changed n_way?): {str(exc).splitlines()[0]}") from exc
    return state


def resolve_device(device_cfg: DictConfig) -> torch.device:
    kind = device_cfg.type
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but CUDA is not available here: use device=cpu or device=auto")
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"device.type={kind} is not supported: use device=cpu, device=cuda or device=auto")
    return torch.device(kind)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed every generator; ``deterministic`` also makes CUDA kernels repeat themselves bit for bit (cuDNN and
    cuBLAS pick run-to-run varying algorithms otherwise). On the CPU metacli's kernels are deterministic anyway."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS makes its first handle
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def build_dataset(cfg: DictConfig) -> FewShotDataset | TaskFamilyEnv:
    """The run's tasks: a dataset, or (``env=``) a family of reinforcement-learning environments."""
    if cfg.get("env") is not None:
        return build(cfg.env, "env")
    if cfg.dataset is None:
        raise ConfigError("no dataset to train on: choose one with dataset=NAME, or env=NAME for reinforcement "
                          "learning (metacli list datasets)")
    return build(cfg.dataset, "dataset")


def check_family(cfg: DictConfig, dataset: FewShotDataset) -> None:
    """Refuse, in one line naming the algorithms that can, an algorithm that cannot run on the dataset's task
    family (ProtoNet on sinusoid regression, say)."""
    family = dataset.family
    if family.name in get_class(cfg.algo._target_).families:
        return
    able = [name for name, target in algo_targets().items() if family.name in get_class(target).families]
    source = "env" if family is REINFORCEMENT else "dataset"
    raise ConfigError(f"{get_class(cfg.algo._target_).__name__} cannot learn {family.name} tasks "
                      f"({source}={dataset.name}): use one of algo={', algo='.join(able)}")


#: The evaluation protocols that need classes of images, and what each does with them.
IMAGE_CLASS_PROTOCOLS = {"continual": "learns class-incremental streams of images",
                         "generative": "draws images of unseen classes"}


def check_data_fits(cfg: DictConfig, dataset: FewShotDataset) -> None:
    """Refuse, in one line, an option that the data cannot serve: a protocol that needs classes of images, or image
    distortions, on sinusoids or an environment; episodes within one alphabet of data without alphabets. It runs
    before the algorithm checks, whose advice would otherwise name learners that cannot run on this data either."""
    name = type(dataset).__name__
    if dataset.image_size is None:
        does = IMAGE_CLASS_PROTOCOLS.get(cfg.eval.protocol)
        if does is not None:
            raise ConfigError(f"eval.protocol={cfg.eval.protocol} {does}, and {name} has no image classes: use "
                              "dataset=omniglot or dataset=mini_imagenet, or eval.protocol=episodes")
        if cfg.get("augment"):
            raise ConfigError(f"augment distorts training images, and {name}'s inputs are not images: leave "
                              "augment out")
    for option in ("eval.protocol", "task.train_protocol"):
        if OmegaConf.select(cfg, option) == "within_alphabet":
            require_alphabets(dataset, option)


def _learns_streams(target: str) -> bool:
    representation = getattr(get_class(target), "representation", None)
    return representation is not None and representation is not FewShotLearner.representation


def check_continual(cfg: DictConfig) -> None:
    """Refuse, in one line naming those that can, a learner with no representation to learn a stream on
    (``eval.protocol=continual``)."""
    if cfg.eval.protocol == "continual" and not _learns_streams(cfg.algo._target_):
        able = [name for name, target in algo_targets().items() if _learns_streams(target)]
        raise ConfigError(f"{get_class(cfg.algo._target_).__name__} has no representation to learn a class-incremental "
                          f"stream on (eval.protocol=continual): use one of algo={', algo='.join(able)}, or "
                          "eval.protocol=episodes")


def check_generative(cfg: DictConfig) -> None:
    """Refuse, in one line, a generator (FIGR) scored by another protocol than ``generative``, or that protocol for a
    learner that draws nothing."""
    learner = get_class(cfg.algo._target_)
    generates = getattr(learner, "generates", False)
    if generates and cfg.eval.protocol != "generative":
        raise ConfigError(f"{learner.__name__} generates images: score it with eval.protocol=generative "
                          "eval.generative.judge=RUN_DIR (a ProtoNet run on the same dataset)")
    if cfg.eval.protocol == "generative" and not generates:
        raise ConfigError(f"eval.protocol=generative scores generated images, and {learner.__name__} draws none: use "
                          "algo=figr, or another eval.protocol")


def build_learner(cfg: DictConfig, dataset: FewShotDataset) -> FewShotLearner:
    """Backbone sized for the dataset's inputs, wrapped by the configured algorithm, given the dataset's task
    family (its output size, loss and metric)."""
    check_data_fits(cfg, dataset)
    check_family(cfg, dataset)
    check_continual(cfg)
    check_generative(cfg)
    if dataset.family is REINFORCEMENT:
        return _build_rl_learner(cfg, dataset)
    backbone = build(cfg.backbone, "backbone", in_channels=dataset.channels, image_size=dataset.image_size)
    # A classifier over all training classes (non-episodic learners) is sized by the data, not by the user, and so
    # is a generator.
    sized = {"n_classes": dataset.split("train").n_classes} if "n_classes" in cfg.algo else {}
    if "image_size" in cfg.algo:
        sized.update(image_size=dataset.image_size, channels=dataset.channels)
    learner = build(cfg.algo, "algo", backbone=backbone, n_way=dataset.family.outputs(cfg.task.n_way),
                    bn_mode=cfg.eval.bn_mode, **sized)
    learner.family = dataset.family
    return learner


def _build_rl_learner(cfg: DictConfig, env: TaskFamilyEnv) -> MetaRLLearner:
    """A meta-RL learner for ``env``'s spaces; a feed-forward policy's body is the backbone (an MLP) sized for the
    observations, a recurrent policy (RL²) is its own."""
    spaces = {"observation_space": env.observation_space, "action_space": env.action_space}
    if "backbone" in inspect.signature(get_class(cfg.algo._target_)).parameters:
        if cfg.get("backbone") is None or not getattr(get_class(cfg.backbone._target_), "vector_inputs", False):
            raise ConfigError("a meta-RL policy's body takes observation vectors, not images: use backbone=mlp")
        spaces["backbone"] = build(cfg.backbone, "backbone", in_channels=int(env.observation_space.shape[0]))
    return build(cfg.algo, "algo", **spaces)


def build_execution(cfg: DictConfig) -> Execution:
    """The ``execution.*`` settings, a bad value a one-line ConfigError."""
    try:
        return Execution(**OmegaConf.to_container(cfg.execution))
    except ValueError as exc:
        raise ConfigError(f"{exc}; fix the execution.* override") from None


def training_batches(cfg: DictConfig, learner: FewShotLearner, dataset: FewShotDataset, device: torch.device,
                     split: str = "train"
                     ) -> Callable[[torch.Generator], EpisodeBatch | LabelledBatch | CoTrainingBatch]:
    """What one training step of ``learner`` consumes, drawn from ``split`` with a generator: a meta-batch of
    episodes, or a mini-batch of labelled images for a non-episodic learner, or both for a co-training one,
    distorted by ``augment`` if set."""
    if dataset.family is REINFORCEMENT:
        return partial(dataset.training_tasks, cfg.trainer.meta_batch)
    draw = _training_draw(cfg, learner, dataset, device, split)
    return augmented(draw, build(cfg.augment, "augment")) if cfg.get("augment") else draw


def _training_draw(cfg: DictConfig, learner: FewShotLearner, dataset: FewShotDataset, device: torch.device,
                   split: str) -> Callable[[torch.Generator], EpisodeBatch | LabelledBatch | CoTrainingBatch]:
    where = f"{split} split"
    if learner.training_data == "trajectories":
        # A generator learns images as they are (values in [0, 1]), not the backbones' standardised inputs.
        normalize = unit_range if getattr(learner, "generates", False) else dataset.normalize
        return partial(TrajectorySampler(dataset.split(split), *learner.trajectory, normalize, device,
                                         where=where).sample, cfg.trainer.meta_batch)
    if learner.training_data == "labelled":
        return partial(ImageBatchSampler(dataset.split(split), dataset.normalize, device, where=where).sample,
                       cfg.trainer.batch_size)
    episodes = _episode_draw(cfg, learner, dataset, device, split)
    if learner.training_data == "episodes_and_labelled":
        labelled = ImageBatchSampler(dataset.split(split), dataset.normalize, device, where=where)
        return partial(_co_training_batch, episodes, partial(labelled.sample, learner.auxiliary_batch))
    return episodes


def _co_training_batch(episodes: Callable, labelled: Callable, generator: torch.Generator) -> CoTrainingBatch:
    return CoTrainingBatch(episodes(generator), labelled(generator))  # episodes first, then images: one generator


def _episode_draw(cfg: DictConfig, learner: FewShotLearner, dataset: FewShotDataset, device: torch.device,
                  split: str) -> Callable[[torch.Generator], EpisodeBatch]:
    where = f"{split} split"
    task = cfg.task
    way, shot, query = task.train_way or task.n_way, task.train_shot or task.k_shot, task.train_query or task.n_query
    if learner.fixed_way and way != task.n_way:
        raise ConfigError(f"{type(learner).__name__} has an n_way-sized head, so task.train_way={way} must equal "
                          f"task.n_way={task.n_way}: drop the task.train_way override")
    if task.train_protocol == "within_alphabet":
        sampler = WithinAlphabetSampler(dataset.split(split), way, dataset.normalize, device, where, shot, query,
                                        rotated=True)
    else:
        sampler = dataset.episodes(split, way, shot, query, device, where=where)
    return partial(sampler.sample, cfg.trainer.meta_batch)
