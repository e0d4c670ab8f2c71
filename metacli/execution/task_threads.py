"""A meta-batch split over worker threads, which share the intra-op threads out (``execution.task_threads``).

Why: a task's convolutions are too small for oneDNN to keep two cores busy on two intra-op threads, while two
halves of a meta-batch, one per core, scale almost perfectly. Kernels release the GIL, and a CPU backward runs in
the thread that calls it. A meta-batch smaller than the thread count gets fewer workers, each with more intra-op
threads, so no core idles.

Each worker meta-trains its chunk on a :func:`replica` of the learner, whose BatchNorm layers update running
statistics of their own. The caller then carries the chunks' statistics and gradients over to the learner in chunk
order, so the result does not depend on which thread finished first.
"""
from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
from torch import nn

from metacli.execution.timing import parallel_phases
from metacli.data.episodes import EpisodeBatch
from metacli.models.batchnorm import fold_statistics, own_statistics, snapshot
from metacli.execution.precision import current_autocast
from metacli.execution.settings import Execution

Run = Callable[[nn.Module, EpisodeBatch], tuple[torch.Tensor, torch.Tensor]]
_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}
_lock = threading.Lock()


def thread_layout(learner: nn.Module, execution: Execution) -> dict[str, int]:
    """The threads a learner meta-trains on here. They order its gradient sums, so a run's numbers depend on them at
    rounding level: checkpoints and results.json record them, and a resume with another layout warns."""
    return {"task_threads": execution.workers(learner), "intra_op_threads": torch.get_num_threads()}


def replica(module: nn.Module) -> nn.Module:
    """A twin of ``module`` for one worker: its own module objects (``functional_call`` swaps tensors into the
    module it is given), its own leaf parameters over the same storage (each worker's backward fills its own
    ``.grad``), BatchNorm running statistics of its own, and the very same other buffers (which workers only
    read)."""
    memo: dict[int, torch.Tensor] = {id(b): b for b in module.buffers()}
    memo.update(own_statistics(module))
    memo.update({id(p): nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in module.parameters()})
    return copy.deepcopy(module, memo)


def _pool(workers: int) -> ThreadPoolExecutor:
    """``workers`` threads, each with an equal share (at least one) of the calling thread's intra-op threads."""
    threads = torch.get_num_threads()
    share = max(1, threads // workers)
    with _lock:
        if (workers, share) not in _pools:
            started = threading.Barrier(workers + 1)

            def take_share() -> None:
                # ATen sets a thread's OpenMP thread count from the process-wide one the first time the thread
                # asks for it, which would undo a bare set_num_threads once the main thread restores its own
                # count below: ask first, then set.
                torch.get_num_threads()
                torch.set_num_threads(share)
                started.wait()

            pool = ThreadPoolExecutor(workers, thread_name_prefix="metacli-task", initializer=take_share)
            for _ in range(workers):  # start every worker now, so that the reset below comes after theirs
                pool.submit(lambda: None)
            started.wait()
            # torch.set_num_threads also sets the default of threads created later: give the main thread's back.
            torch.set_num_threads(threads)
            _pools[workers, share] = pool
        return _pools[workers, share]


def split_meta_batch(learner: nn.Module, batch: EpisodeBatch, workers: int, run: Run) -> tuple[torch.Tensor, ...]:
    """``run(learner, batch)``, which accumulates the meta-gradient of the mean query loss and returns per-task
    losses and accuracies; on ``workers`` threads, each running ``run`` on a replica and a contiguous chunk."""
    chunks = batch.split(min(workers, len(batch)))
    if len(chunks) == 1:
        return run(learner, batch)

    autocast = current_autocast(next(learner.parameters()).device)
    start = snapshot(learner)  # workers leave the learner's own buffers alone until the carry-over below

    def work(chunk: EpisodeBatch):
        twin = replica(learner)
        with autocast:
            losses, accuracies = run(twin, chunk)
        return losses, accuracies, twin

    with parallel_phases():
        results = list(_pool(len(chunks)).map(work, chunks))
    for chunk, (_, _, twin) in zip(chunks, results):
        fold_statistics(learner, start, snapshot(twin))
        share = len(chunk) / len(batch)  # each chunk averaged its own tasks' losses
        for p, q in zip(learner.parameters(), twin.parameters()):
            if q.grad is not None:
                p.grad = q.grad * share if p.grad is None else p.grad + q.grad * share
    return torch.cat([r[0] for r in results]), torch.cat([r[1] for r in results])
