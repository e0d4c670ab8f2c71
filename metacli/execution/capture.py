"""A meta-training step captured once and replayed (``execution.capture``): on CUDA a ``torch.cuda.graph`` of the
whole meta-gradient, second order included, so that a step is one graph launch instead of thousands of small
kernel launches. ``torch.compile`` does not differentiate twice, so the capture is of the eager step itself, over
static input buffers.

The logic around the graph is the same on every device and is what the CPU tests check: the batch is copied into
static buffers of its shapes (new shapes capture again); warm-up steps, which CUDA needs before a capture of
autograd, leave no trace (BatchNorm statistics restored, gradients dropped); the step's losses, scores and the
parameters' gradients are the static tensors the capture wrote; BatchNorm running statistics are updated in place
by every replay. On the CPU the step is run again on the static buffers where CUDA replays the graph.

Only paths without host synchronisation inside the step can be captured: the vectorised ones (``vmap``,
``batched_tasks``), on one thread, with nothing drawn at random in the step.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from metacli.data.episodes import EpisodeBatch
from metacli.execution.timing import untimed
from metacli.models.batchnorm import restore, snapshot

Run = Callable[[nn.Module, EpisodeBatch], tuple[torch.Tensor, torch.Tensor]]
#: Eager steps before a capture, as torch.cuda.graph asks of autograd (on a side stream); they are undone.
WARMUP = 3


def _fields(batch: EpisodeBatch) -> tuple[torch.Tensor, ...]:
    return batch.support_x, batch.support_y, batch.query_x, batch.query_y


class CapturedStep:
    """``run(learner, batch)`` (accumulate the meta-gradient, return per-task losses and scores) captured for each
    batch shape and replayed."""

    def __init__(self, learner: nn.Module, run: Run) -> None:
        self.learner, self.run = learner, run
        self.params = [p for p in learner.parameters() if p.requires_grad]
        self.shapes: tuple | None = None
        self.captures = 0

    def __call__(self, batch: EpisodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
        shapes = tuple(t.shape for t in _fields(batch)) + (batch.n_way,)
        if shapes != self.shapes:
            self._capture(batch)
            self.shapes = shapes
        for static, value in zip(_fields(self.batch), _fields(batch)):
            static.copy_(value)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._eager()
        for p, grad in zip(self.params, self.grads):
            p.grad = grad
        return self.outputs

    def _eager(self) -> None:
        for p in self.params:
            p.grad = None
        self.outputs = self.run(self.learner, self.batch)
        self.grads = [p.grad for p in self.params]

    def _capture(self, batch: EpisodeBatch) -> None:
        self.batch = EpisodeBatch(*(t.clone() for t in _fields(batch)), batch.n_way)
        cuda = self.batch.support_x.device.type == "cuda"
        statistics = snapshot(self.learner)
        stream = torch.cuda.Stream() if cuda else None
        if cuda:
            stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
            for _ in range(WARMUP):
                self._eager()
        if cuda:
            torch.cuda.current_stream().wait_stream(stream)
        restore(self.learner, statistics)
        self.graph = None
        if cuda:
            for p in self.params:
                p.grad = None
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph), untimed():
                self._eager()
        self.captures += 1

