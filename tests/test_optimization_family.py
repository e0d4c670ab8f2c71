"""Reptile, Meta-SGD and ANIL: their defining mechanics, and that each learns on synthetic glyphs."""
from __future__ import annotations

import copy

import pytest
import torch

from learning import assert_learned, batch, episode, meta_train
from metacli.algorithms.anil import ANIL
from metacli.algorithms.inner_loop import fine_tune
from metacli.algorithms.maml import MAML
from metacli.algorithms.meta_sgd import MetaSGD
from metacli.algorithms.reptile import Reptile
from metacli.data.episodes import EpisodeBatch
from metacli.models.conv4 import Conv4
from metacli.execution.gradient_paths import meta_train_batch
from metacli.execution.meta_batch import meta_train_step
from metacli.execution.settings import Execution

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- Reptile


def test_functional_adam_matches_torch_adam():
    target = torch.randn(7, 3)
    start = {"w": torch.randn(7, 3)}
    loss = lambda p: ((p["w"] - target) ** 2).sum()  # noqa: E731
    ours = fine_tune(loss, start, steps=6, lr=0.05, optimizer="adam", betas=(0.0, 0.999))["w"]
    w = start["w"].clone().requires_grad_()
    reference = torch.optim.Adam([w], lr=0.05, betas=(0.0, 0.999))
    for _ in range(6):
        reference.zero_grad()
        loss({"w": w}).backward()
        reference.step()
    torch.testing.assert_close(ours, w.detach())
    sgd = fine_tune(loss, start, steps=1, lr=0.1)["w"]
    torch.testing.assert_close(sgd, start["w"] - 0.1 * 2 * (start["w"] - target))
    assert not start["w"].requires_grad, "fine_tune must not touch the parameters it starts from"


def test_reptile_meta_gradient_is_the_mean_move_towards_the_adapted_weights(glyphs):
    torch.manual_seed(0)
    learner = Reptile(Conv4(hidden=8), 5, inner_optimizer="sgd", inner_lr=0.1, inner_steps=3)
    tasks = batch(glyphs, size=3)
    learner.inner_data = "support"
    before = {name: p.detach().clone() for name, p in learner.named_parameters()}
    expected = {name: torch.zeros_like(p) for name, p in before.items()}
    for task in tasks:
        adapted = copy.deepcopy(learner).adapt(task, training=True)
        for name in expected:
            expected[name] += (before[name] - adapted[name].detach()) / 3
    meta_train_step(learner, tasks)
    for name, p in learner.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], msg=name)
        torch.testing.assert_close(p.detach(), before[name], msg=f"{name} moved before the optimiser step")
    assert learner.head.weight.grad.norm() > 0 and learner.backbone.features[0].weight.grad.norm() > 0


def test_reptile_outer_sgd_at_lr_eps_is_the_reptile_update(glyphs):
    torch.manual_seed(0)
    learner = Reptile(Conv4(hidden=8), 5, inner_optimizer="sgd", inner_lr=0.1, inner_steps=2)
    task = episode(glyphs)
    adapted = copy.deepcopy(learner).adapt(task, training=True)
    before = {name: p.detach().clone() for name, p in learner.named_parameters()}
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.25)
    meta_train_step(learner, batch(glyphs, size=1))
    optimizer.step()
    for name, p in learner.named_parameters():  # theta + eps * (theta_task - theta)
        torch.testing.assert_close(p.detach(), before[name] + 0.25 * (adapted[name].detach() - before[name]),
                                   msg=name)


def test_reptile_evaluation_leaves_the_initialisation_alone(glyphs):
    torch.manual_seed(0)
    learner = Reptile(Conv4(hidden=8), 5, test_inner_steps=5, bn_mode="running")
    state = copy.deepcopy(learner.state_dict())
    assert 0.0 <= learner.evaluate_episode(episode(glyphs, split="test")) <= 1.0
    for name, value in learner.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_reptile_rejects_bad_settings():
    with pytest.raises(ValueError, match="inner_optimizer"):
        Reptile(Conv4(hidden=8), 5, inner_optimizer="rmsprop")
    with pytest.raises(ValueError, match="inner_steps>=1"):
        Reptile(Conv4(hidden=8), 5, inner_steps=0)
    with pytest.raises(ValueError, match="inner_data"):
        Reptile(Conv4(hidden=8), 5, inner_data="query")


def test_reptile_learns_synthetic_glyphs(glyphs):
    # Measured on CPU (seed 0): fine-tuning the initialisation scores 0.57; after 100 meta-iterations the
    # meta-learned initialisation scores 0.67-0.69 (inner SGD 0.05 x 5 steps on support and query, eps=0.5). At
    # eps=1 the trajectory turned on the rounding of the gradient sums: 0.62 to 0.67 for two summation orders.
    torch.manual_seed(0)
    learner = Reptile(Conv4(hidden=16), 5, inner_optimizer="sgd", inner_lr=0.05, inner_steps=5, test_inner_steps=10)
    before, after = meta_train(learner, glyphs, steps=100, meta_batch=4, lr=0.5, optimizer=torch.optim.SGD)
    assert_learned("Reptile", before, after, at_least=0.55, gain=0.06)


def test_reptile_meta_trains_on_support_and_query_but_evaluates_on_support(glyphs):
    torch.manual_seed(0)
    task = episode(glyphs)
    fits_all = Reptile(Conv4(hidden=8), 5, inner_optimizer="sgd", inner_lr=0.1, inner_steps=1, test_inner_steps=1)
    fits_support = copy.deepcopy(fits_all)
    fits_support.inner_data = "support"
    assert not torch.equal(fits_all.adapt(task, training=True)["head.weight"],
                           fits_support.adapt(task, training=True)["head.weight"])
    torch.testing.assert_close(fits_all.adapt(task, training=False)["head.weight"],
                               fits_support.adapt(task, training=False)["head.weight"])


# ---------------------------------------------------------------- Meta-SGD


def test_meta_sgd_learns_one_rate_per_weight_and_meta_trains_them(glyphs):
    torch.manual_seed(0)
    learner = MetaSGD(Conv4(hidden=8), 5, inner_lr=0.3)
    rates = learner.learned_rates()
    assert set(rates) == set(learner.adapted_parameters())
    assert all(rates[n].shape == p.shape and torch.all(rates[n] == 0.3) for n, p in learner.adapted_parameters().items())
    assert not any(name.startswith("inner_rates") for name in learner.adapted_parameters())
    metrics = meta_train_step(learner, batch(glyphs, size=2))
    assert metrics["inner_lr_mean"] == pytest.approx(0.3) and metrics["inner_lr_std"] == pytest.approx(0.0, abs=1e-6)
    assert all(rate.grad is not None and rate.grad.norm() > 0 for rate in learner.inner_rates.values())
    assert any(key.startswith("inner_rates.") for key in learner.state_dict()), "the rates must be checkpointed"


def test_meta_sgd_adapts_with_its_learned_rates(glyphs):
    torch.manual_seed(0)
    learner = MetaSGD(Conv4(hidden=8), 5, inner_lr=0.3, test_inner_steps=1)
    with torch.no_grad():
        for rate in learner.inner_rates.values():
            rate.zero_()
        learner.inner_rates["head/bias"].fill_(1.0)
    adapted = learner.adapt(episode(glyphs), training=False)
    for name, p in learner.adapted_parameters().items():
        assert torch.equal(adapted[name], p) == (name != "head.bias"), name


def test_meta_sgd_learns_synthetic_glyphs(glyphs):
    torch.manual_seed(0)
    # Measured on CPU (1 thread, seed 0): 0.228 before, 0.552 after 80 second-order steps of 4 tasks.
    learner = MetaSGD(Conv4(hidden=16), 5, inner_lr=0.4, inner_steps=1, test_inner_steps=1)
    before, after = meta_train(learner, glyphs, steps=80, meta_batch=4, lr=3e-3)
    assert_learned("Meta-SGD", before, after, at_least=0.45, gain=0.2)


# ---------------------------------------------------------------- ANIL


def test_anil_adapts_only_the_head_and_meta_trains_the_body(glyphs):
    torch.manual_seed(0)
    learner = ANIL(Conv4(hidden=8), 5, inner_steps=2)
    assert learner.adapted_module() is learner.head
    assert set(learner.adapted_parameters()) == {"weight", "bias"}
    adapted = learner.adapt(episode(glyphs), training=True)
    assert set(adapted) == {"weight", "bias"}
    assert not torch.equal(adapted["weight"], learner.head.weight)
    meta_train_step(learner, batch(glyphs, size=2))
    assert learner.backbone.features[0].weight.grad.norm() > 0 and learner.head.weight.grad.norm() > 0


def test_anil_second_order_reaches_the_body_through_the_head_update(glyphs):
    torch.manual_seed(0)
    second = ANIL(Conv4(hidden=8), 5)
    first = copy.deepcopy(second)
    first.train_loop = MAML(Conv4(hidden=8), 5, first_order=True).train_loop
    tasks = batch(glyphs, size=2)
    meta_train_step(second, tasks)
    meta_train_step(first, tasks)
    weight = "backbone.features.4.weight"
    grads = {name: dict(m.named_parameters())[weight].grad for name, m in (("first", first), ("second", second))}
    assert not torch.allclose(grads["first"], grads["second"])


def test_anil_learns_synthetic_glyphs(glyphs):
    torch.manual_seed(0)
    # Measured on CPU (1 thread, seed 0): 0.320 before, 0.698 after 80 steps of 4 tasks.
    learner = ANIL(Conv4(hidden=16), 5, inner_lr=0.4, inner_steps=2, test_inner_steps=3)
    before, after = meta_train(learner, glyphs, steps=80, meta_batch=4, lr=3e-3)
    assert_learned("ANIL", before, after, at_least=0.5, gain=0.2)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("vectorize,batch_first_step", [(False, False), (False, True), (True, True)])
def test_anil_embedding_once_gives_the_generic_meta_gradient(first_order, vectorize, batch_first_step):
    torch.manual_seed(0)
    learner = ANIL(Conv4(hidden=8), 5, inner_lr=0.4, inner_steps=1, first_order=first_order).double()
    generator = torch.Generator().manual_seed(1)
    tasks = EpisodeBatch(torch.rand(3, 5, 1, 28, 28, generator=generator, dtype=torch.float64),
                         torch.arange(5).expand(3, -1),
                         torch.rand(3, 10, 1, 28, 28, generator=generator, dtype=torch.float64),
                         torch.arange(5).repeat(2).expand(3, -1), 5)
    reference = copy.deepcopy(learner)
    # The generic path: the whole network's forward at every inner step, the head's parameters adapted.
    head = {f"head.{name}": p for name, p in reference.head.named_parameters()}
    meta_train_batch(reference, head, tasks, reference.inner_loop(True), "serial", reference.family)
    meta_train_step(learner, tasks, Execution(vectorize=vectorize, batch_first_step=batch_first_step))
    for (name, p), q in zip(learner.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-11, msg=name)
    for (name, b), c in zip(learner.named_buffers(), reference.buffers()):  # one inner step: same BN updates
        torch.testing.assert_close(b, c, rtol=1e-9, atol=1e-12, msg=name)
