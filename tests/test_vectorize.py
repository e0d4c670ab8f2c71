"""Every inner-loop path gives the serial loop's meta-gradient and running BatchNorm statistics."""
from __future__ import annotations

import copy
import threading

import pytest
import torch

from metacli.algorithms import conv4_first_step, task_threads
from metacli.algorithms.inner_loop import PATHS, adapt_to_support, inner_path, meta_train_batch, query_loss
from metacli.algorithms.anil import ANIL
from metacli.algorithms.maml import MAML
from metacli.algorithms.meta_sgd import MetaSGD
from metacli.algorithms.protonet import ProtoNet
from metacli.algorithms.relation_net import RelationNet
from metacli.algorithms.reptile import Reptile
from metacli.algorithms.siamese import SiameseNet
from metacli.algorithms.task_threads import split_meta_batch
from metacli.data.episodes import EpisodeBatch
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
    for episode in batch:
        adapted = adapt_to_support(learner, learner.adapted_parameters(), episode, learner.inner_loop(True), True,
                                   learner.family)
        loss, _ = query_loss(learner, adapted, episode.query_x, episode.query_y, learner.family)
        (loss / len(batch)).backward()
        losses.append(loss.detach())
    return torch.stack(losses)


def run_path(learner: MAML, batch: EpisodeBatch, path: str) -> tuple[dict, dict, torch.Tensor]:
    learner = copy.deepcopy(learner)
    if path == "textbook":
        losses = textbook_losses(learner, batch)
    else:
        losses, _ = meta_train_batch(learner, learner.adapted_parameters(), batch, learner.inner_loop(True), path,
                                     learner.family)
    grads = {name: p.grad.clone() for name, p in learner.named_parameters()}
    return grads, {name: b.clone() for name, b in learner.named_buffers()}, losses


def assert_paths_agree(learner: MAML, batch: EpisodeBatch) -> None:
    serial_grads, serial_buffers, serial_losses = run_path(learner, batch, "textbook")
    assert max(g.abs().max().item() for g in serial_grads.values()) > 1e-4  # a real, non-zero meta-gradient
    assert serial_buffers and any(b.float().abs().sum() > 0 for b in serial_buffers.values())
    for path in PATHS:
        grads, buffers, losses = run_path(learner, batch, path)
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


def test_conv4_first_step_is_taken_where_it_applies():
    maml = MAML(Conv4(hidden=8, pool="stride"), n_way=5)
    assert conv4_first_step.applies(maml, maml.adapted_parameters())
    meta_sgd = MetaSGD(Conv4(hidden=8), n_way=5)
    assert conv4_first_step.applies(meta_sgd, meta_sgd.adapted_parameters())
    anil = ANIL(Conv4(hidden=8), n_way=5)  # adapts its head alone, with a path of its own
    assert not conv4_first_step.applies(anil.head, dict(anil.head.named_parameters()))
    resnet = MAML(ResNet12(image_size=32, widths=(4, 6, 8, 8)), n_way=5)
    assert not conv4_first_step.applies(resnet, resnet.adapted_parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the vmapped step follows autocast's casts
        assert not conv4_first_step.applies(maml, maml.adapted_parameters())
    handle = maml.backbone.features[7].register_forward_hook(lambda *args: None)  # the written-out step skips it
    assert not conv4_first_step.applies(maml, maml.adapted_parameters())
    handle.remove()
    assert conv4_first_step.applies(maml, maml.adapted_parameters())


def test_paths_agree_on_resnet12_with_checkpointing():
    torch.manual_seed(0)
    learner = MAML(ResNet12(image_size=32, widths=(4, 6, 8, 8)), n_way=5, inner_lr=0.1, inner_steps=2,
                   checkpoint_inner=True).double()
    assert_paths_agree(learner, random_batch(tasks=2, queries=2, channels=3, size=32))


def test_checkpointing_changes_nothing_but_memory():
    torch.manual_seed(0)
    learner = MAML(Conv4(hidden=8), n_way=5, inner_lr=0.4, inner_steps=3).double()
    checkpointed = copy.deepcopy(learner)
    checkpointed.train_loop = MAML(Conv4(hidden=8), 5, inner_steps=3, checkpoint_inner=True).train_loop
    batch = random_batch(tasks=2, queries=2)
    for path in ("serial", "batched_first"):
        plain, _, _ = run_path(learner, batch, path)
        recomputed, _, _ = run_path(checkpointed, batch, path)
        for name in plain:
            torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-9, atol=1e-12, msg=name)


def test_running_statistics_serve_evaluation_after_vectorised_training():
    torch.manual_seed(0)
    learner = MAML(Conv4(hidden=8), n_way=5, bn_mode="running", vectorize=True)
    learner.meta_train_step(random_batch(tasks=3, queries=2, dtype=torch.float32))
    bn = learner.backbone.features[1]
    assert int(bn.num_batches_tracked) == 3 * 2  # per task: one support forward and one query forward
    episode = next(iter(random_batch(tasks=1, queries=2, dtype=torch.float32)))
    assert 0.0 <= learner.evaluate_episode(episode) <= 1.0


def test_vectorize_switch():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert inner_path("auto", True, cuda) == "vmap" and inner_path("auto", True, cpu) == "batched_first"
    assert inner_path(True, True, cpu) == "vmap" and inner_path(False, False, cuda) == "serial"
    with pytest.raises(ValueError, match="vectorize must be"):
        MAML(Conv4(hidden=8), n_way=5, vectorize="sometimes")


@pytest.mark.parametrize("algorithm,options", [
    (MAML, {}), (MAML, {"first_order": True}), (MAML, {"batch_first_step": False}),
    (MAML, {"inner_steps": 3, "checkpoint_inner": True}), (MetaSGD, {"inner_steps": 2}), (ANIL, {"inner_steps": 2}),
    # Reptile with SGD inside: Adam would turn the rounding-level gradients of the conv biases in front of
    # BatchNorm (which the normalisation cancels) into steps of their own, different for another summation order.
    (ProtoNet, {}), (Reptile, {"inner_steps": 2, "inner_optimizer": "sgd", "inner_lr": 0.4}), (RelationNet, {}),
    (SiameseNet, {})])
def test_meta_batch_split_over_threads_changes_nothing(algorithm, options):
    """Two worker threads on an uneven split (3 + 2 tasks), over two meta-iterations with an optimiser step in
    between: the same losses, meta-gradients and running statistics as one thread."""
    torch.manual_seed(0)
    learner = algorithm(Conv4(hidden=8), n_way=5, **options).double()  # the MAML family at its default lr, 0.4
    batch = random_batch(tasks=5, queries=2)
    runs = []
    for threads in (1, 2):
        twin = copy.deepcopy(learner)
        twin.task_threads = threads
        optimizer = torch.optim.SGD(twin.parameters(), lr=0.1)
        metrics = []
        for _ in range(2):
            optimizer.zero_grad()
            metrics.append(twin.meta_train_step(batch))
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
