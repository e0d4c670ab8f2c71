"""Every inner-loop path gives the serial loop's meta-gradient and running BatchNorm statistics."""
from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

from metacli.algorithms.anil import ANIL
from metacli.algorithms.inner_loop import adapt_to_support, query_loss
from metacli.algorithms.lstm_meta_learner import LSTMMetaLearner
from metacli.algorithms.maml import MAML
from metacli.algorithms.meta_sgd import MetaSGD
from metacli.algorithms.protonet import ProtoNet
from metacli.algorithms.relation_net import RelationNet
from metacli.algorithms.reptile import Reptile
from metacli.algorithms.siamese import SiameseNet
from metacli.data.episodes import EpisodeBatch
from metacli.execution import task_threads
from metacli.execution.gradient_paths import PATHS, meta_train_gradient_learner
from metacli.execution.meta_batch import meta_train_step
from metacli.execution.settings import Execution
from metacli.execution.task_threads import split_meta_batch
from metacli.models.conv4 import Conv4
from metacli.models.resnet12 import ResNet12

pytestmark = pytest.mark.usefixtures("one_thread")


def random_batch(tasks: int, queries: int, channels: int = 1, size: int = 28, dtype=torch.float64) -> EpisodeBatch:
    generator = torch.Generator().manual_seed(1)
    return EpisodeBatch(torch.rand(tasks, 5, channels, size, size, generator=generator, dtype=dtype),
                        torch.arange(5).expand(tasks, -1),
                        torch.rand(tasks, 5 * queries, channels, size, size, generator=generator, dtype=dtype),
                        torch.arange(5).repeat(queries).expand(tasks, -1), 5)


def textbook_losses(learner: MAML, batch: EpisodeBatch) -> torch.Tensor:
    """The reference every path must match: MAML as the paper writes it, task by task, with plain autograd."""
    losses = []
    module = learner.adapted_module()
    for episode in batch:
        episode = learner.embed(episode)
        adapted = adapt_to_support(module, learner.adapted_parameters(), episode, learner.inner_loop(True), True,
                                   learner.family)
        loss, _ = query_loss(module, adapted, episode.query_x, episode.query_y, learner.family)
        (loss / len(batch)).backward()
        losses.append(loss.detach())
    return torch.stack(losses)


def run_path(learner: MAML, batch: EpisodeBatch, path: str, checkpoint: bool = False
             ) -> tuple[dict, dict, torch.Tensor]:
    learner = copy.deepcopy(learner)
    if path == "textbook":
        losses = textbook_losses(learner, batch)
    else:
        losses, _ = meta_train_gradient_learner(learner, batch, path, checkpoint)
    grads = {name: p.grad.clone() for name, p in learner.named_parameters()}
    return grads, {name: b.clone() for name, b in learner.named_buffers()}, losses


def assert_paths_agree(learner: MAML, batch: EpisodeBatch, checkpoint: bool = False) -> None:
    serial_grads, serial_buffers, serial_losses = run_path(learner, batch, "textbook")
    assert max(g.abs().max().item() for g in serial_grads.values()) > 1e-4  # a real, non-zero meta-gradient
    assert serial_buffers and any(b.float().abs().sum() > 0 for b in serial_buffers.values())
    for path in PATHS:
        grads, buffers, losses = run_path(learner, batch, path, checkpoint)
        torch.testing.assert_close(losses, serial_losses, rtol=1e-9, atol=1e-12, msg=path)
        for name in serial_grads:
            torch.testing.assert_close(grads[name], serial_grads[name], rtol=1e-8, atol=1e-11, msg=f"{path}: {name}")
        for name in serial_buffers:  # running BatchNorm statistics, folded in the serial loop's order
            torch.testing.assert_close(buffers[name], serial_buffers[name], rtol=1e-9, atol=1e-12,
                                       msg=f"{path}: {name}")


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("pool", ["max", "stride"])
@pytest.mark.parametrize("hidden", [8, 40])  # 40: wide enough for the first block to run as a patch product
def test_paths_agree_on_conv4(first_order, steps, pool, hidden):
    torch.manual_seed(0)
    learner = MAML(Conv4(hidden=hidden, pool=pool), n_way=5, inner_lr=0.4, inner_steps=steps,
                   first_order=first_order).double()
    assert_paths_agree(learner, random_batch(tasks=4, queries=3))


@pytest.mark.parametrize("algorithm", [ANIL, MetaSGD])
@pytest.mark.parametrize("first_order", [False, True])
def test_paths_agree_for_anil_and_meta_sgd(algorithm, first_order):
    torch.manual_seed(0)
    learner = algorithm(Conv4(hidden=8), n_way=5, inner_lr=0.4, inner_steps=2, first_order=first_order).double()
    if isinstance(learner, MetaSGD):
        with torch.no_grad():  # distinct learned rates, so that a rate mixed up between parameters would show
            for rate in learner.inner_rates.values():
                rate.uniform_(0.1, 0.5)
    assert_paths_agree(learner, random_batch(tasks=3, queries=2))


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("hidden", [6, 112])  # 112: wide enough for 3 channels to take the patch product
def test_paths_agree_on_a_colour_conv4_with_a_2x2_final_map(channels_last, hidden):
    # 36 -> 18 -> 9 -> 4 -> 2: an odd map for the pooling to round, and a flattened 2x2 map for the head.
    torch.manual_seed(0)
    learner = MAML(Conv4(in_channels=3, image_size=36, hidden=hidden, channels_last=channels_last), n_way=5,
                   inner_lr=0.4).double()
    assert_paths_agree(learner, random_batch(tasks=3, queries=2, channels=3, size=36))


def written_out(learner, module=None, family: str = "classification") -> bool:
    module = learner if module is None else module
    params = learner.adapted_parameters()
    return learner.backbone.support_gradient_kernel(module, params, family) is not None


class PlainNet(nn.Module):
    """A backbone of plain ``torch.nn`` layers that metacli knows nothing about, with two BatchNorm layers: one at
    the default momentum, one keeping a cumulative average (momentum None)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(1, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                    nn.Conv2d(6, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6, momentum=None),
                                    nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = 6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@pytest.mark.parametrize("first_order", [False, True])
def test_plain_torch_batchnorm_is_right_on_every_path(first_order):
    """Every inner-loop path, checkpointed or not, and a meta-batch split over threads, give the textbook loop's
    meta-gradient and running statistics for a backbone built from ``torch.nn`` alone."""
    torch.manual_seed(0)
    learner = MAML(PlainNet(), n_way=5, inner_lr=0.4, inner_steps=2, first_order=first_order).double()
    batch = random_batch(tasks=3, queries=2)
    assert_paths_agree(learner, batch)
    assert_paths_agree(learner, batch, checkpoint=True)
    runs = []
    for threads in (1, 2):
        twin = copy.deepcopy(learner)
        for _ in range(2):
            meta_train_step(twin, batch, Execution(vectorize=False, task_threads=threads))
        runs.append((dict(twin.named_parameters()), dict(twin.named_buffers())))
    (params, buffers), (params_2, buffers_2) = runs
    # Two meta-steps of three tasks, each with two support forwards and a query forward.
    assert buffers["backbone.layers.4.num_batches_tracked"].item() == 2 * 3 * 3
    for name, p in params.items():
        torch.testing.assert_close(params_2[name].grad, p.grad, rtol=1e-8, atol=1e-11, msg=name)
    for name, b in buffers.items():
        torch.testing.assert_close(buffers_2[name], b, rtol=1e-9, atol=1e-12, msg=name)


def test_conv4_first_step_is_taken_where_it_applies():
    maml = MAML(Conv4(hidden=8, pool="stride"), n_way=5)
    assert written_out(maml)
    assert not written_out(maml, family="regression")  # the kernel writes out the cross-entropy's gradient
    assert written_out(MetaSGD(Conv4(hidden=8), n_way=5))
    anil = ANIL(Conv4(hidden=8), n_way=5)  # adapts its head alone, after the backbone's features
    assert not written_out(anil, anil.head)
    resnet = MAML(ResNet12(image_size=32, widths=(4, 6, 8, 8)), n_way=5)
    assert not hasattr(resnet.backbone, "support_gradient_kernel")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the vmapped step follows autocast's casts
        assert not written_out(maml)
    handle = maml.backbone.features[7].register_forward_hook(lambda *args: None)  # the written-out step skips it
    assert not written_out(maml)
    handle.remove()
    assert written_out(maml)


def test_paths_agree_on_resnet12_with_checkpointing():
    torch.manual_seed(0)
    learner = MAML(ResNet12(image_size=32, widths=(4, 6, 8, 8)), n_way=5, inner_lr=0.1, inner_steps=2).double()
    assert_paths_agree(learner, random_batch(tasks=2, queries=2, channels=3, size=32), checkpoint=True)


def test_checkpointing_changes_nothing_but_memory():
    torch.manual_seed(0)
    learner = MAML(Conv4(hidden=8), n_way=5, inner_lr=0.4, inner_steps=3).double()
    batch = random_batch(tasks=2, queries=2)
    for path in ("serial", "batched_first"):
        plain, _, _ = run_path(learner, batch, path)
        recomputed, _, _ = run_path(learner, batch, path, checkpoint=True)
        for name in plain:
            torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-9, atol=1e-12, msg=name)


def test_running_statistics_serve_evaluation_after_vectorised_training():
    torch.manual_seed(0)
    learner = MAML(Conv4(hidden=8), n_way=5, bn_mode="running")
    meta_train_step(learner, random_batch(tasks=3, queries=2, dtype=torch.float32), Execution(vectorize=True))
    bn = learner.backbone.features[1]
    assert int(bn.num_batches_tracked) == 3 * 2  # per task: one support forward and one query forward
    episode = next(iter(random_batch(tasks=1, queries=2, dtype=torch.float32)))
    assert 0.0 <= learner.evaluate_episode(episode) <= 1.0


def test_vectorize_switch():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert Execution().gradient_path(cuda) == "vmap" and Execution().gradient_path(cpu) == "batched_first"
    assert Execution(vectorize=True).gradient_path(cpu) == "vmap"
    assert Execution(vectorize=False, batch_first_step=False).gradient_path(cuda) == "serial"
    with pytest.raises(ValueError, match="vectorize must be"):
        Execution(vectorize="sometimes")
    with pytest.raises(ValueError, match="task_threads must be"):
        Execution(task_threads=0)


@pytest.mark.parametrize("algorithm,options,execution", [
    (MAML, {}, {}), (MAML, {"first_order": True}, {}), (MAML, {}, {"batch_first_step": False}),
    (MAML, {"inner_steps": 3}, {"checkpoint_inner": True}), (MetaSGD, {"inner_steps": 2}, {}),
    (ANIL, {"inner_steps": 2}, {}),
    # Reptile with SGD inside: Adam would turn the rounding-level gradients of the conv biases in front of
    # BatchNorm (which the normalisation cancels) into steps of their own, different for another summation order.
    (ProtoNet, {}, {}), (Reptile, {"inner_steps": 2, "inner_optimizer": "sgd", "inner_lr": 0.4}, {}),
    (RelationNet, {}, {}), (SiameseNet, {}, {}), (LSTMMetaLearner, {"inner_steps": 2}, {})])
def test_meta_batch_split_over_threads_changes_nothing(algorithm, options, execution):
    """Two worker threads on an uneven split (3 + 2 tasks), over two meta-iterations with an optimiser step in
    between: the same losses, meta-gradients and running statistics as one thread."""
    torch.manual_seed(0)
    learner = algorithm(Conv4(hidden=8), n_way=5, **options).double()  # the MAML family at its default lr, 0.4
    batch = random_batch(tasks=5, queries=2)
    runs = []
    for threads in (1, 2):
        twin = copy.deepcopy(learner)
        optimizer = torch.optim.SGD(twin.parameters(), lr=0.1)
        metrics = []
        for _ in range(2):
            optimizer.zero_grad()
            metrics.append(meta_train_step(twin, batch, Execution(task_threads=threads, **execution)))
            grads = {name: p.grad.clone() for name, p in twin.named_parameters() if p.grad is not None}
            optimizer.step()
        runs.append((metrics, grads, {name: b.clone() for name, b in twin.named_buffers()}))
    (metrics, grads, buffers), (metrics_2, grads_2, buffers_2) = runs
    assert len(grads) == len(list(learner.parameters())) and max(g.abs().max() for g in grads.values()) > 1e-4
    for step, step_2 in zip(metrics, metrics_2):
        assert step_2 == pytest.approx(step, rel=1e-9)
    assert grads_2.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_2[name], grads[name], rtol=1e-8, atol=1e-11, msg=name)
    for name in buffers:
        torch.testing.assert_close(buffers_2[name], buffers[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("threads,chunks,share", [(2, 2, 1), (4, 2, 2), (3, 2, 1)])
def test_task_threads_share_the_intra_op_threads(monkeypatch, threads, chunks, share):
    """Workers must keep their share after the main thread restores its own count; otherwise each one starts an
    OpenMP team of the process-wide size, and two workers oversubscribe two cores (bf16 steps ran 20x slower).
    A meta-batch of fewer tasks than threads gets fewer workers with more threads each."""
    monkeypatch.setattr(task_threads, "_pools", {})  # pools made now, with the main thread on ``threads``
    torch.set_num_threads(threads)
    seen = []

    def run(twin, chunk):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return torch.zeros(len(chunk)), torch.zeros(len(chunk))

    try:
        split_meta_batch(Conv4(hidden=8), random_batch(tasks=chunks, queries=1), 4, run)
        assert torch.get_num_threads() == threads
        assert sorted(n for _, n in seen) == [share] * chunks
        assert all(name.startswith("metacli-task") for name, _ in seen)
    finally:
        for pool in task_threads._pools.values():
            pool.shutdown()
