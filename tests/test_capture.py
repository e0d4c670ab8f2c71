"""The logic around a captured meta-training step (static buffers, warm-up without trace, static gradients, a new
capture for new shapes) gives the eager steps' gradients, statistics and parameters, step after step. On the CPU
the step runs again where CUDA replays its graph; tests/test_cuda.py checks the graph itself."""
from __future__ import annotations

import copy

import pytest
import torch

from metacli.algorithms.maml import MAML
from metacli.algorithms.protonet import ProtoNet
from metacli.errors import ConfigError
from metacli.execution.meta_batch import capture_for, meta_train_step
from metacli.execution.settings import Execution
from metacli.models.conv4 import Conv4
from test_vectorize import random_batch

pytestmark = pytest.mark.usefixtures("one_thread")
LEARNERS = {
    "maml_second_order": lambda: MAML(Conv4(1, hidden=8), n_way=5, inner_lr=0.4, inner_steps=2),
    "protonet": lambda: ProtoNet(Conv4(1, hidden=8), n_way=5),
}


def train(learner, execution: Execution, batches) -> list[dict]:
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    captured = capture_for(learner, execution)
    states = []
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        metrics = meta_train_step(learner, batch, execution, captured)
        states.append({"metrics": metrics, "grads": [p.grad.clone() for p in learner.parameters()],
                       "buffers": {k: v.clone() for k, v in learner.named_buffers()}})
        optimizer.step()
    states.append({"parameters": [p.detach().clone() for p in learner.parameters()],
                   "captures": captured.captures if captured is not None else None})
    return states


@pytest.mark.parametrize("name", LEARNERS)
def test_captured_steps_train_as_eager_ones(name):
    torch.manual_seed(0)
    learner = LEARNERS[name]().double()
    # Two batches of one shape, then one of another (more queries): a second capture.
    batches = [random_batch(4, 3), random_batch(4, 3), random_batch(4, 2)]
    batches[1].query_x.mul_(0.5)
    eager = train(copy.deepcopy(learner), Execution(vectorize=True), batches)
    captured = train(copy.deepcopy(learner), Execution(vectorize=True, capture=True), batches)
    assert captured[-1]["captures"] == 2 and eager[-1]["captures"] is None
    for ours, reference in zip(captured[:-1], eager[:-1]):
        assert ours["metrics"] == reference["metrics"]
        assert all(torch.equal(a, b) for a, b in zip(ours["grads"], reference["grads"]))
        assert all(torch.equal(ours["buffers"][k], v) for k, v in reference["buffers"].items())
    assert all(torch.equal(a, b) for a, b in zip(captured[-1]["parameters"], eager[-1]["parameters"]))


def test_only_vectorised_steps_are_captured():
    learner = ProtoNet(Conv4(1, hidden=8), n_way=5)
    assert capture_for(learner, Execution(capture="auto", vectorize=True)) is None  # auto: CUDA only
    with pytest.raises(ConfigError, match="execution.capture=true needs a vectorised meta-batch"):
        capture_for(learner, Execution(capture=True, vectorize=False))
