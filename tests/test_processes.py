"""Meta-batches split over two gloo processes give one process's meta-gradient and BatchNorm statistics."""
from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from functools import partial

import pytest
import torch
import torch.multiprocessing as mp

from metacli.algorithms.maml import MAML
from metacli.algorithms.protonet import ProtoNet
from metacli.algorithms.reptile import Reptile
from metacli.execution import processes
from metacli.execution.meta_batch import meta_train_step
from metacli.execution.ranks import from_environment
from metacli.execution.settings import Execution
from metacli.models.conv4 import Conv4
from conftest import run_cli
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
    layout = from_environment()
    processes.join(layout, torch.device("cpu"))
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


# The command line under torchrun: ProtoNet on synthetic glyphs, a meta-batch of 4 shared by two processes.
RUN = ["experiment=smoke", "trainer.meta_batch=4", "trainer.steps=120", "trainer.val_every=60",
       "trainer.checkpoint_every=20", "eval.episodes=40"]


def torchrun(*args: str, cwd, restarts: int = 0, background: bool = False):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               f"--max-restarts={restarts}", "-m", "metacli", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if background:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def metacli_lines(stderr: str) -> list[str]:
    """metacli's own lines among torchrun's report (which is torchrun's, traceback included)."""
    assert 'metacli/' not in "".join(line for line in stderr.splitlines() if line.lstrip().startswith("File ")), \
        stderr
    return [line for line in stderr.splitlines() if line.startswith("metacli: ")]


def scores(run_dir) -> list[float]:
    return json.loads((run_dir / "results.json").read_text())["episode_scores"]


def wait_for(path, process, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """One run under torchrun with two processes, uninterrupted, and the same run as one process."""
    root = tmp_path_factory.mktemp("torchrun")
    done = torchrun(*RUN, f"hydra.run.dir={root / 'two'}", cwd=root)
    assert done.returncode == 0, done.stderr
    alone = run_cli("train", *RUN, f"hydra.run.dir={root / 'one'}", cwd=root, env={"OMP_NUM_THREADS": "1"})
    assert alone.returncode == 0, alone.stderr
    return root, done


def test_torchrun_trains_as_one_process_would(two_process_run):
    root, done = two_process_run
    results = json.loads((root / "two" / "results.json").read_text())
    assert results["world_size"] == 2 and json.loads((root / "one" / "results.json").read_text())["world_size"] == 1
    # The same test episodes, scored by learners trained on the same meta-gradients up to summation order (float32
    # rounding that 120 Adam steps amplify a little; the float64 tests above show the sums themselves agree).
    one, two = scores(root / "one"), scores(root / "two")
    assert abs(sum(two) - sum(one)) / len(one) < 0.02 and sum(abs(a - b) for a, b in zip(one, two)) / len(one) < 0.05
    assert results["accuracy"] > 0.6  # and it learned: chance is 0.2
    assert done.stdout.count("metacli test results") == 1  # only the first process reports


def test_a_dead_process_is_one_line_and_the_run_resumes(two_process_run, tmp_path):
    root, _ = two_process_run
    run_dir = tmp_path / "run"
    running = torchrun(*RUN, f"hydra.run.dir={run_dir}", cwd=tmp_path, restarts=1, background=True)
    wait_for(run_dir / "last.pt", running)
    workers = subprocess.run(["pgrep", "-P", str(running.pid)], capture_output=True, text=True).stdout.split()
    os.kill(int(max(workers, key=int)), signal.SIGKILL)
    _, stderr = running.communicate(timeout=600)
    assert running.returncode == 0, stderr
    # The survivor says so in one line, unless torchrun, which stops every process once one has died, stopped it
    # first: then torchrun's own report is all there is.
    lost = [line for line in metacli_lines(stderr) if "error" in line]
    assert len(lost) <= 1 and all("lost the others" in line and "last.pt" in line for line in lost), stderr
    log = (run_dir / "train.log").read_text()
    assert "started again by its scheduler: resuming it" in log and "resumed from" in log
    assert scores(run_dir) == scores(root / "two")  # exactly the uninterrupted run


def test_a_stopped_torchrun_resumes(two_process_run, tmp_path):
    root, _ = two_process_run
    run_dir = tmp_path / "run"
    running = torchrun(*RUN, f"hydra.run.dir={run_dir}", cwd=tmp_path, background=True)
    wait_for(run_dir / "last.pt", running)
    running.send_signal(signal.SIGTERM)  # torchrun passes it on to every process
    _, stderr = running.communicate(timeout=600)
    assert running.returncode != 0 and not (run_dir / "results.json").exists()
    (stopped,) = metacli_lines(stderr)
    assert stopped.startswith("metacli: preempted: ") and "trainer.resume=true" in stopped
    again = torchrun(*RUN, f"hydra.run.dir={run_dir}", "trainer.resume=true", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert scores(run_dir) == scores(root / "two")


@pytest.mark.parametrize("args,needle", [
    (["trainer.meta_batch=1"], "trainer.meta_batch=1 is smaller than the 2 processes"),
    (["algo=baseline"], "cannot be shared out over processes"),
    ([], "must share one run dir: add hydra.run.dir=PATH"),
])
def test_torchrun_bad_input_is_one_line(args, needle, tmp_path):
    run_dir = [] if not args else [f"hydra.run.dir={tmp_path / 'run'}"]
    done = torchrun("experiment=smoke", *args, *run_dir, cwd=tmp_path)
    assert done.returncode != 0
    (line,) = metacli_lines(done.stderr)
    assert line.startswith("metacli: error: ") and needle in line, done.stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("*.pt"))
