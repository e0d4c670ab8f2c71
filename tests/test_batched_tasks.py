"""A metric learner's meta-batch as one batched forward (``vmap`` over tasks with shared weights) gives the
task-by-task meta-gradient, losses and running BatchNorm statistics."""
from __future__ import annotations

import copy

import pytest
import torch

from metacli.algorithms.protonet import ProtoNet
from metacli.algorithms.relation_net import RelationNet
from metacli.algorithms.siamese import SiameseNet
from metacli.execution.meta_batch import meta_train_step
from metacli.execution.settings import Execution
from metacli.models.conv4 import Conv4
from test_vectorize import random_batch

pytestmark = pytest.mark.usefixtures("one_thread")
LEARNERS = {
    "protonet": lambda: ProtoNet(Conv4(1, hidden=8), n_way=5),
    "protonet_cosine": lambda: ProtoNet(Conv4(1, hidden=8), n_way=5, distance="cosine"),
    "protonet_transductive": lambda: ProtoNet(Conv4(1, hidden=8), n_way=5, center_sets=True, refine_steps=2),
    "relation_net": lambda: RelationNet(Conv4(1, hidden=8), n_way=5, hidden=8),
    "siamese": lambda: SiameseNet(Conv4(1, hidden=8), n_way=5),
}


@pytest.mark.parametrize("name", LEARNERS)
def test_batched_tasks_match_task_by_task(name):
    torch.manual_seed(0)
    learner = LEARNERS[name]().double()
    assert learner.batched_tasks
    batch = random_batch(4, 3)
    results = {}
    for vectorize in (False, True):
        twin = copy.deepcopy(learner)
        execution = Execution(vectorize=vectorize, task_threads=1)
        assert execution.training_path(twin) == ("batched_tasks" if vectorize else "task_by_task")
        metrics = meta_train_step(twin, batch, execution)
        results[vectorize] = (metrics, {n: p.grad for n, p in twin.named_parameters()}, dict(twin.named_buffers()))
    (metrics, grads, buffers), (batched_metrics, batched_grads, batched_buffers) = results[False], results[True]
    assert batched_metrics == pytest.approx(metrics, rel=1e-9)
    for key, grad in grads.items():
        torch.testing.assert_close(batched_grads[key], grad, rtol=1e-9, atol=1e-12)
    for key, buffer in buffers.items():
        torch.testing.assert_close(batched_buffers[key], buffer, rtol=1e-9, atol=1e-12)


def test_auto_batches_tasks_on_cuda_only():
    learner = ProtoNet(Conv4(1, hidden=8), n_way=5)
    assert Execution().training_path(learner) == "task_by_task"  # on this CPU


@pytest.mark.parametrize("name", LEARNERS)
@pytest.mark.parametrize("bn_mode", ["transductive", "running"])
def test_episodes_evaluated_at_once_score_as_one_by_one(name, bn_mode):
    torch.manual_seed(0)
    learner = LEARNERS[name]().double()
    learner.bn_mode = bn_mode
    meta_train_step(learner, random_batch(4, 3), Execution(vectorize=False, task_threads=1))  # running statistics
    batch, before = random_batch(6, 2), copy.deepcopy(learner.state_dict())
    at_once = learner.evaluate_at_once(batch)
    assert at_once == pytest.approx([learner.evaluate_episode(episode) for episode in batch], abs=1e-12)
    assert all(torch.equal(before[key], value) for key, value in learner.state_dict().items())  # nothing moved
