"""Meta-batches split over two gloo processes give one process's meta-gradient and BatchNorm statistics."""
from __future__ import annotations

import copy
import os
import socket
from functools import partial

import pytest
import torch
import torch.multiprocessing as mp

from metacli.algorithms.maml import MAML
from metacli.algorithms.protonet import ProtoNet
from metacli.algorithms.reptile import Reptile
from metacli.execution import processes
from metacli.execution.meta_batch import meta_train_step
from metacli.execution.settings import Execution
from metacli.models.conv4 import Conv4
from test_vectorize import random_batch

pytestmark = pytest.mark.usefixtures("one_thread")
LEARNERS = {
    "maml_second_order": lambda: MAML(Conv4(1, hidden=8), n_way=5, inner_lr=0.4, inner_steps=2, first_order=False),
    "protonet": lambda: ProtoNet(Conv4(1, hidden=8), n_way=5),
    "reptile": lambda: Reptile(Conv4(1, hidden=8), n_way=5, inner_steps=2),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def state_after_step(learner, run) -> dict:
    metrics = run(learner)
    return {"grads": {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None},
            "buffers": {n: b.clone() for n, b in learner.named_buffers()}, "metrics": metrics}


def one_process_of_two(rank: int, port: int, name: str, tasks: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    learner = LEARNERS[name]().double()
    layout = processes.from_environment()
    processes.join(layout, torch.device("cpu"), timeout_s=60)
    try:
        step = partial(meta_train_step, execution=Execution(vectorize=False, task_threads=1))
        result = state_after_step(learner, lambda m: processes.meta_train_step_across(m, random_batch(tasks, 3), step,
                                                                                       layout))
        torch.save(result, f"{out}.{rank}")
    finally:
        processes.leave()


@pytest.mark.parametrize("name,tasks", [("maml_second_order", 4), ("protonet", 3), ("reptile", 4)])
def test_two_processes_match_one(name, tasks, tmp_path):
    torch.manual_seed(0)
    learner = LEARNERS[name]().double()
    alone = state_after_step(copy.deepcopy(learner), lambda m: meta_train_step(
        m, random_batch(tasks, 3), Execution(vectorize=False, task_threads=1)))
    mp.spawn(one_process_of_two, args=(free_port(), name, tasks, str(tmp_path / "state")), nprocs=2)
    first, second = (torch.load(tmp_path / f"state.{rank}") for rank in (0, 1))
    assert first["grads"].keys() == alone["grads"].keys() and alone["grads"]
    for key, grad in alone["grads"].items():
        torch.testing.assert_close(first["grads"][key], grad, rtol=1e-9, atol=1e-12)
        assert torch.equal(first["grads"][key], second["grads"][key])  # every process steps the same way
    for key, buffer in alone["buffers"].items():
        torch.testing.assert_close(first["buffers"][key], buffer, rtol=1e-9, atol=1e-12)
        assert torch.equal(first["buffers"][key], second["buffers"][key])
    assert first["metrics"] == pytest.approx(alone["metrics"], rel=1e-6)  # accuracies are float32 means
