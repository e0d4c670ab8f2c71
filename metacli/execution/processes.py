"""Meta-batches split across processes: ``torchrun --nproc_per_node=P -m metacli train ...``.

Every process builds the same learner from the same seed and draws the same global meta-batch; process ``r`` runs
the ``r``-th contiguous share of its tasks (as :mod:`metacli.execution.task_threads` does on threads), the
meta-gradients are summed over processes weighted by their shares, and the BatchNorm running statistics are folded
in process order, so every process ends the step with the same gradient and statistics as one process running the
whole meta-batch (up to the order of the sums). Each then takes the same optimiser step. Validation and test
episodes are shared out batch by batch and their scores gathered in episode order.

Processes talk over ``torch.distributed``: gloo on CPU, nccl on CUDA (one GPU a process, ``LOCAL_RANK``'s).
Only the first process (rank 0) claims the run dir, logs and checkpoints; the others read its checkpoints on a
resume.
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from metacli.data.episodes import EpisodeBatch
from metacli.errors import ConfigError, ProcessesLost
from metacli.execution.ranks import Processes, from_environment
from metacli.models.batchnorm import fold_statistics, restore, snapshot


def join(processes: Processes, device: torch.device) -> torch.device:
    """Join the process group (gloo on CPU, nccl on CUDA) and return this process's device: on CUDA its own GPU."""
    if device.type == "cuda":
        if torch.cuda.device_count() <= processes.local_rank:
            raise ConfigError(f"process {processes.rank} needs GPU {processes.local_rank} but this machine has "
                              f"{torch.cuda.device_count()}: start at most one process a GPU (--nproc_per_node)")
        device = torch.device("cuda", processes.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        with _together("joining them"):
            store, rank, size = next(dist.rendezvous("env://"))
            # Processes restarted by torchrun find the same store with the dead ones' addresses in it: each attempt
            # meets under keys of its own.
            store = dist.PrefixStore(f"metacli/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                                    world_size=size, device_id=device if device.type == "cuda" else None)
    return device


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def _together(what: str) -> Iterator[None]:
    """Turn a failed exchange with the other processes (one of them died or hangs) into one line."""
    try:
        yield
    except (RuntimeError, dist.DistError) as exc:
        cause = re.sub(r"^\[[^]]*\] ", "", str(exc).splitlines()[0]).split(". ")[0]  # without gloo's source line
        here = from_environment()
        raise ProcessesLost(f"process {here.rank} of {here.size} lost the others while {what} ({cause})") from exc


def check_learner(learner: nn.Module) -> None:
    """Refuse, in one line, a learner whose tasks cannot be shared out: one trained on whole batches or labelled
    images, one that samples its own tasks (meta-RL), or one whose tasks draw random numbers or change state."""
    if not (learner.parallel_tasks and learner.training_step == "per_task" and learner.training_data == "episodes"
            and not getattr(learner, "updates_itself", False)):
        raise ConfigError(f"{type(learner).__name__} does not train task by task on episodes, so its meta-batch "
                          "cannot be shared out over processes: run it as one process (without torchrun)")


def wait_for_all() -> None:
    with _together("waiting for the first process's checkpoint"):
        dist.barrier()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is set in any process: a decision every process takes together (all must call it)."""
    value = torch.tensor([float(flag)], device=_device())
    with _together("deciding whether to stop"):
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def from_leader(value):
    """Rank 0's ``value`` (any picklable object), in every process."""
    box = [value]
    with _together("starting"):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_in_order(pieces: dict[int, list[float]]) -> list[float]:
    """Every process's ``{index: values}`` merged, the values concatenated by index."""
    gathered: list[dict[int, list[float]]] = [{} for _ in range(dist.get_world_size())]
    with _together("gathering scores"):
        dist.all_gather_object(gathered, pieces)
    merged = {index: values for part in gathered for index, values in part.items()}
    return [value for index in sorted(merged) for value in merged[index]]


@torch.no_grad()
def _sum_gradients(learner: nn.Module, share: float) -> None:
    """Replace each ``.grad`` with the sum over processes of ``share * .grad``; a parameter no process gave a gradient
    keeps none (an optimiser skips it, as it would in one process)."""
    params = [p for p in learner.parameters() if p.requires_grad]
    flat = torch.cat([torch.cat([(p.grad * share).flatten() if p.grad is not None else torch.zeros(p.numel(),
                                 dtype=p.dtype, device=p.device) for p in params]),
                      torch.tensor([float(p.grad is not None) for p in params], device=params[0].device,
                                   dtype=params[0].dtype)])
    with _together("summing meta-gradients"):
        dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    for p, had in zip(params, flat[offset:].tolist()):
        if not had:
            p.grad = None


@torch.no_grad()
def _fold_statistics_in_order(learner: nn.Module, start: list[tuple[torch.Tensor, ...]]) -> None:
    """Fold every process's BatchNorm updates into ``learner`` in process order, starting from ``start``."""
    if not start:
        return
    gathered: list = [None] * dist.get_world_size()
    with _together("gathering BatchNorm statistics"):
        dist.all_gather_object(gathered, [tuple(t.cpu() for t in layer) for layer in snapshot(learner)])
    restore(learner, start)
    for ended in gathered:
        fold_statistics(learner, start, [tuple(t.to(s.device) for t, s in zip(layer, first))
                                         for layer, first in zip(ended, start)])


def meta_train_step_across(learner: nn.Module, batch: EpisodeBatch, step, processes: Processes) -> dict[str, float]:
    """``step(learner, share_of_batch)`` (:func:`metacli.execution.meta_batch.meta_train_step`) on this process's
    share of ``batch``, then the meta-gradient, the BatchNorm statistics and the step's metrics combined over
    processes as if one process had run the whole batch."""
    share = batch.split(processes.size)[processes.rank]
    weight = len(share) / len(batch)
    start = snapshot(learner)
    metrics = step(learner, share)
    _sum_gradients(learner, weight)
    _fold_statistics_in_order(learner, start)
    names = sorted(metrics)
    values = torch.tensor([metrics[name] * weight for name in names], dtype=torch.float64, device=_device())
    with _together("summing metrics"):
        dist.all_reduce(values)
    return dict(zip(names, values.tolist()))
