"""What only a GPU can show: exact resume and determinism of CUDA runs, the vectorised meta-gradient equal to the
serial one, every algorithm and bf16 on the device, and no CPU kernel built for a CUDA run.

Marked ``cuda``: skipped, saying why, where no CUDA device is present; ``scripts/gpu_check.sh`` runs them.
"""
from __future__ import annotations

import copy
import signal
import subprocess
import sys

import pytest
import torch

from metacli.algorithms.maml import MAML
from metacli.build import build_dataset, build_learner, training_batches
from metacli.data.episodes import EpisodeBatch
from metacli.models.conv4 import Conv4
from metacli.execution.precision import training_precision
from metacli.execution.meta_batch import meta_train_step
from test_configs import classifiers, compose
from test_reliability import outputs, resume, rows, start, wait_for
from test_vectorize import assert_paths_agree, random_batch

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")
ON_CUDA = ["device=cuda", "trainer.deterministic=true"]


@pytest.fixture(scope="module")
def cuda_reference(tmp_path_factory) -> tuple[bytes, bytes]:
    run_dir = tmp_path_factory.mktemp("cuda-reference") / "run"
    process = start(run_dir, *ON_CUDA)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    return outputs(run_dir)


def test_a_cuda_run_repeats_itself(cuda_reference, tmp_path):
    run_dir = tmp_path / "run"
    process = start(run_dir, *ON_CUDA)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    assert outputs(run_dir) == cuda_reference


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_a_stopped_cuda_run_resumes_exactly(cuda_reference, tmp_path, signum):
    run_dir = tmp_path / "run"
    process = start(run_dir, *ON_CUDA)
    wait_for(lambda: any(r["step"] >= 24 for r in rows(run_dir)), process)
    process.send_signal(signum)
    process.communicate(timeout=300)
    assert process.returncode != 0 and not (run_dir / "results.json").exists()
    resume(run_dir, *ON_CUDA)
    assert outputs(run_dir) == cuda_reference


def test_vectorised_meta_gradient_equals_the_serial_one_on_cuda():
    torch.manual_seed(0)
    learner = MAML(Conv4(hidden=16), n_way=5, inner_lr=0.4, inner_steps=2).double().to(CUDA)
    batch = random_batch(tasks=4, queries=3)
    on_device = EpisodeBatch(batch.support_x.to(CUDA), batch.support_y.to(CUDA), batch.query_x.to(CUDA),
                             batch.query_y.to(CUDA), batch.n_way)
    assert_paths_agree(learner, on_device)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("algo", classifiers())
def test_every_algo_takes_a_cuda_step(algo, precision):
    cfg = compose(f"algo={algo}", "backbone.hidden=8", "dataset=synthetic", "trainer.meta_batch=2",
                  "trainer.batch_size=20", "device=cuda", f"trainer.precision={precision}")
    torch.manual_seed(0)
    dataset = build_dataset(cfg)
    learner = build_learner(cfg, dataset).to(CUDA)
    batch = training_batches(cfg, learner, dataset, CUDA)(
        torch.Generator().manual_seed(0))
    learner = copy.deepcopy(learner).train()
    with training_precision(precision, CUDA):
        loss = meta_train_step(learner, batch)["loss"]
    grads = [p.grad for p in learner.parameters() if p.grad is not None]
    assert grads and all(g.is_cuda and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(torch.tensor(loss)) and any(g.abs().max() > 0 for g in grads)


CUDA_STEP_BUILDS_NO_KERNEL = """
import torch
from metacli.algorithms.protonet import ProtoNet
from metacli.data.synthetic import SyntheticGlyphs
from metacli.data.episodes import EpisodeSampler
from metacli.models.kernels import pooled_product
from metacli.models.conv4 import Conv4
from metacli.execution.meta_batch import meta_train_step
data = SyntheticGlyphs()
learner = ProtoNet(Conv4(), n_way=5).to("cuda")
batch = EpisodeSampler(data.split("train"), 5, 1, 5, data.normalize, "cuda").sample(2, torch.Generator().manual_seed(0))
meta_train_step(learner, batch)
print(not pooled_product._kernels.tried)
"""


def test_a_cuda_step_builds_no_cpu_kernel():
    done = subprocess.run([sys.executable, "-c", CUDA_STEP_BUILDS_NO_KERNEL], capture_output=True, text=True)
    assert done.stdout.strip() == "True", done.stdout + done.stderr


@pytest.mark.parametrize("name", ["protonet", "relation_net", "siamese"])
def test_metric_learners_batch_their_tasks_on_cuda(name):
    """``auto`` vectorises a metric learner's meta-batch and its evaluation episodes on CUDA, with the task-by-task
    gradients, statistics and scores (float64)."""
    from metacli.execution.settings import Execution
    from test_batched_tasks import LEARNERS

    torch.manual_seed(0)
    learner = LEARNERS[name]().double().to(CUDA)
    batch = random_batch(4, 3)
    batch = EpisodeBatch(batch.support_x.to(CUDA), batch.support_y.to(CUDA), batch.query_x.to(CUDA),
                         batch.query_y.to(CUDA), batch.n_way)
    assert Execution().training_path(learner) == "batched_tasks"
    twins = {path: copy.deepcopy(learner) for path in (True, False)}
    for vectorize, twin in twins.items():
        meta_train_step(twin, batch, Execution(vectorize=vectorize, task_threads=1))
    for (key, a), b in zip(twins[True].state_dict().items(), twins[False].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=key)
    for a, b in zip(twins[True].parameters(), twins[False].parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)
    learner = twins[False]
    assert learner.evaluate_batch(batch) == pytest.approx([learner.evaluate_episode(e) for e in batch], abs=1e-12)


@pytest.mark.parametrize("name", ["maml_second_order", "protonet"])
def test_a_captured_cuda_graph_trains_as_eager_steps(name):
    """The step captured in a CUDA graph and replayed gives the eager steps' gradients, statistics and parameters."""
    from test_capture import LEARNERS, train
    from metacli.execution.settings import Execution

    torch.manual_seed(0)
    learner = LEARNERS[name]().double().to(CUDA)
    batches = []
    for queries in (3, 3, 2):
        b = random_batch(4, queries)
        batches.append(EpisodeBatch(b.support_x.to(CUDA), b.support_y.to(CUDA), b.query_x.to(CUDA), b.query_y.to(CUDA),
                                    b.n_way))
    eager = train(copy.deepcopy(learner), Execution(vectorize=True), batches)
    captured = train(copy.deepcopy(learner), Execution(vectorize=True, capture="auto"), batches)
    assert captured[-1]["captures"] == 2
    for ours, reference in zip(captured[:-1], eager[:-1]):
        assert ours["metrics"] == pytest.approx(reference["metrics"], rel=1e-9)
        for a, b in zip(ours["grads"], reference["grads"]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for a, b in zip(captured[-1]["parameters"], eager[-1]["parameters"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
