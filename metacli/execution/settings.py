"""``execution.*``: how meta-batches run. No choice here changes what is computed beyond rounding (the order of
sums); each is a matter of speed and memory on the device at hand."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from metacli.algorithms.base import FewShotLearner, GradientLearner
from metacli.errors import ConfigError


@dataclass(frozen=True)
class Execution:
    """How the runner meta-trains a batch of tasks.

    Args:
        vectorize: run the inner loops of a :class:`GradientLearner`'s meta-batch with ``torch.func.vmap``
            (``true``), and the meta-batch of a learner with ``batched_tasks`` (ProtoNet, Relation and Siamese
            networks) as one batched forward; task by task (``false``); or whichever is faster on the device
            (``auto``: vectorised on CUDA, task by task on the CPU).
        batch_first_step: task by task, but the first inner step (from shared weights) of all tasks at once.
        checkpoint_inner: recompute each inner step in the outer backward instead of storing it (memory flat in
            the inner steps, at the cost of one more forward and backward per step).
        capture: capture the meta-training step once per batch shape and replay it (:mod:`metacli.execution.capture`;
            a CUDA graph on CUDA): ``true``, ``false``, or ``auto`` (on CUDA where the path is vectorised).
            Only vectorised paths (``vmap``, ``batched_tasks``) can be captured.
        task_threads: split a meta-batch over this many worker threads (``auto``: one per CPU thread, one on
            CUDA), for learners whose tasks may train in parallel (``FewShotLearner.parallel_tasks``). Results
            change with it only at the level of rounding: it orders the gradient sums, and sizes the batch of the
            shared first step.
    """

    vectorize: bool | str = "auto"
    batch_first_step: bool = True
    checkpoint_inner: bool = False
    task_threads: int | str = "auto"
    capture: bool | str = False

    def __post_init__(self) -> None:
        if self.vectorize not in (True, False, "auto"):
            raise ValueError(f"execution.vectorize must be true, false or auto, got {self.vectorize!r}")
        if self.capture not in (True, False, "auto"):
            raise ValueError(f"execution.capture must be true, false or auto, got {self.capture!r}")
        threads = self.task_threads
        if threads != "auto" and not (isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1):
            raise ValueError(f"execution.task_threads must be auto or a positive integer, got {threads!r}")

    def gradient_path(self, device: torch.device) -> str:
        """The inner-loop path (one of :data:`metacli.execution.gradient_paths.PATHS`) of a
        :class:`GradientLearner` on ``device``; ``auto`` vectorises on CUDA only, where grouped kernels pay off
        (docs/performance.md)."""
        vectorize = device.type == "cuda" if self.vectorize == "auto" else self.vectorize
        if vectorize:
            return "vmap"
        return "batched_first" if self.batch_first_step else "serial"

    def training_path(self, learner: FewShotLearner) -> str:
        """The path of ``learner``'s meta-batches: its inner-loop path (:meth:`gradient_path`) for a
        :class:`GradientLearner` that adapts by gradient descent in training; ``batched_tasks`` (one vectorised
        forward of the meta-batch) for a learner that allows it where vectorising is on; else ``task_by_task``."""
        device = next(learner.parameters()).device
        if isinstance(learner, GradientLearner) and learner.inner_loop(True) is not None:
            return self.gradient_path(device)
        if learner.batched_tasks and self.gradient_path(device) == "vmap":
            return "batched_tasks"
        return "task_by_task"

    def captures(self, learner: FewShotLearner) -> bool:
        """Whether ``learner``'s meta-training steps are captured and replayed; ``capture=true`` on a path that
        cannot be captured is a one-line ConfigError."""
        if self.capture is False:
            return False
        vectorised = learner.training_step == "per_task" and self.training_path(learner) in ("vmap", "batched_tasks")
        if self.capture == "auto":
            return vectorised and next(learner.parameters()).device.type == "cuda"
        if not vectorised:
            raise ConfigError(f"execution.capture=true needs a vectorised meta-batch, which {type(learner).__name__} "
                              "does not have here: set execution.vectorize=true (MAML family, ProtoNet, Relation and "
                              "Siamese networks) or execution.capture=false")
        return True

    def workers(self, learner: FewShotLearner) -> int:
        """Worker threads for ``learner``'s meta-batches: one unless its tasks may train in parallel, apart and not
        vectorised; else ``task_threads`` with ``auto`` one per intra-op thread on the CPU and one on CUDA, whose
        kernels are launched asynchronously from one thread anyway."""
        if (not learner.parallel_tasks or learner.training_step != "per_task"
                or self.training_path(learner) in ("vmap", "batched_tasks")):
            return 1
        if self.task_threads == "auto":
            return torch.get_num_threads() if next(learner.parameters()).device.type == "cpu" else 1
        return self.task_threads
