"""Refuse, before anything is allocated, a config whose memory cannot fit (``trainer.meta_batch=1000000000``,
``eval.episodes=1000000000``, ``dataset.image_size=2000``), with one line naming the key, instead of a process
the kernel kills after minutes of swapping, or a CUDA out-of-memory error at the first step.

Every figure here is a lower bound, from shapes alone: the decoded images, one forward's layer outputs per image
(measured on the meta device), and the index tensors that pin the evaluation episodes. A run refused by it could
not have fitted; a run it lets through may still need more (gradients, inner-loop copies), so it never refuses a
config that works. ``trainer.check_memory=false`` skips it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from metacli.build import build
from metacli.data.base import FewShotDataset
from metacli.errors import ConfigError
from metacli.models.layers import activation_bytes

_FLOAT = 4
# Episode draws hold a float key per candidate and its int64 argsort.
_DRAW = 4 + 8


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().split()[0]
    except (OSError, IndexError):
        return None
    return int(text) if text.isdigit() else None


def host_available_bytes() -> int:
    """Memory this process may still take: the least of the cgroup's room (v2, else v1) and MemAvailable."""
    room = []
    for limit, usage in (("memory.max", "memory.current"),
                         ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        cap, used = _read_int(Path("/sys/fs/cgroup") / limit), _read_int(Path("/sys/fs/cgroup") / usage)
        if cap is not None and used is not None and cap < 1 << 60:  # v1 writes "no limit" as a huge number
            room.append(cap - used)
            break
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        room.append(int(meminfo["MemAvailable"].split()[0]) * 1024)
    except (OSError, KeyError, ValueError):
        room.append(torch.iinfo(torch.int64).max)  # not Linux: no figure to check against
    return max(0, min(room))


def _gib(count: float) -> str:
    return f"{count / 2**30:.1f} GiB"


def _episode_bytes(way: int, shot: int, query: int, per_image: int) -> int:
    return way * (shot + query) * per_image


def needs(cfg: DictConfig, dataset: FewShotDataset, training: bool) -> dict[str, tuple[int, bool]]:
    """The lower bound each key drives, in bytes, and whether it lies on the training device (else the host)."""
    channels, size = dataset.channels, dataset.image_size
    probe = build(cfg.backbone, "backbone", in_channels=channels, image_size=size)
    per_image = channels * size * size * _FLOAT + activation_bytes(probe, channels, size)
    task, split_bytes = cfg.task, dataset.decoded_bytes()
    test_classes, test_per_class = dataset.split_shape("test")
    items = {"dataset.image_size": (split_bytes, False),
             "eval.batch_size": (cfg.eval.batch_size * _episode_bytes(task.n_way, task.k_shot, task.n_query,
                                                                      per_image), True),
             "eval.episodes": (cfg.eval.episodes * (test_classes + task.n_way * test_per_class) * _DRAW, False)}
    if training:
        if "n_classes" in cfg.algo:  # a non-episodic learner trains on mini-batches of images
            items["trainer.batch_size"] = (cfg.trainer.batch_size * per_image, True)
        else:
            way, shot = task.train_way or task.n_way, task.train_shot or task.k_shot
            items["trainer.meta_batch"] = (cfg.trainer.meta_batch * _episode_bytes(
                way, shot, task.train_query or task.n_query, per_image), True)
        val_classes, val_per_class = dataset.split_shape("val")
        items["trainer.val_episodes"] = (cfg.trainer.val_episodes * (val_classes + task.n_way * val_per_class)
                                         * _DRAW, False)
    return items


def check_memory(cfg: DictConfig, dataset: FewShotDataset, device: torch.device, training: bool = True,
                 switch: str = "trainer.check_memory") -> None:
    """Raise a one-line ConfigError naming the key whose memory cannot fit on the host or on ``device``; its fix
    names ``switch``, the key that turns the check off. Datasets of vectors (sinusoid) hold a few numbers a task:
    nothing to check."""
    if dataset.image_size is None:
        return
    items = needs(cfg, dataset, training)
    on_cuda = device.type == "cuda"
    budgets = {False: host_available_bytes()}
    if on_cuda:
        budgets[True] = torch.cuda.mem_get_info(device)[0]
    for on_device, budget in budgets.items():
        # On the CPU every item shares the host; on CUDA the batches (and a copy of the splits) share the GPU.
        mine = {key: need for key, (need, where) in items.items() if not on_cuda or where == on_device}
        if on_cuda and on_device:
            mine["dataset.image_size"] = items["dataset.image_size"][0]
        total = sum(mine.values())
        if total > budget:
            # Images too large for the decoded data alone make every batch too large too: name their size.
            image_size_alone = mine["dataset.image_size"] > budget
            key = "dataset.image_size" if image_size_alone else max(mine, key=mine.get)
            where = f"GPU {device}" if on_device and on_cuda else "this process"
            raise ConfigError(f"{key}={_value(cfg, key)} needs at least {_gib(mine[key])} of memory ({_gib(total)} "
                              f"for the whole run), but {where} can use {_gib(budget)}: lower {key}, or set "
                              f"{switch}=false if you know better")


def _value(cfg: DictConfig, key: str):
    section, name = key.split(".")
    return cfg[section][name]
