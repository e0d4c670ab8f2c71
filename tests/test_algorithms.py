"""MAML (meta-gradient, inner loop, train/test inner settings), BatchNorm evaluation modes, ProtoNet's prototypes and
distances, learning on synthetic glyphs, and backbone output sizes."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metacli.algorithms.base import FewShotLearner
from metacli.algorithms.inner_loop import functional_forward
from metacli.algorithms.maml import MAML
from metacli.algorithms.protonet import ProtoNet
from metacli.algorithms.similarity import class_means
from metacli.data.episodes import Episode
from metacli.models.conv4 import Conv4
from metacli.models.resnet12 import ResNet12
from metacli.execution.meta_batch import meta_train_step


from learning import assert_learned, batch, episode, meta_train, sampler

pytestmark = pytest.mark.usefixtures("one_thread")


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def pretrain(learner: FewShotLearner, glyphs, steps: int = 4, seed: int = 0) -> FewShotLearner:
    """A few meta-steps, so that the weights and BatchNorm's running statistics are no longer their initial values."""
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    train = sampler(glyphs)
    for _ in range(steps):
        learner.train()
        optimizer.zero_grad()
        meta_train_step(learner, train.sample(2, generator))
        optimizer.step()
    return learner


# ---------------------------------------------------------------- MAML


def test_first_order_meta_gradient_differs_from_second_order(glyphs):
    torch.manual_seed(0)
    second = MAML(Conv4(hidden=8), 5, inner_lr=0.4, inner_steps=1, first_order=False)
    first = copy.deepcopy(second)
    first.train_loop = dataclasses.replace(first.train_loop, second_order=False)
    tasks = batch(glyphs, size=2)
    metrics_second = meta_train_step(second, tasks)
    metrics_first = meta_train_step(first, tasks)
    # Same weights, same tasks: the same forward pass and loss; only the meta-gradient differs.
    assert metrics_first["loss"] == pytest.approx(metrics_second["loss"], rel=1e-6)
    grads_second = {n: p.grad for n, p in second.backbone.named_parameters()}
    grads_first = {n: p.grad for n, p in first.backbone.named_parameters()}
    for grads in (grads_second, grads_first):
        assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
        assert all(g.norm() > 1e-4 for n, g in grads.items() if n.endswith("weight")), "a backbone weight got no gradient"
    flat_second = torch.cat([g.flatten() for g in grads_second.values()])
    flat_first = torch.cat([g.flatten() for g in grads_first.values()])
    assert (flat_second - flat_first).norm() > 0.1 * flat_second.norm(), "first_order made no difference"
    # Head gradients exist in both, and differ too.
    assert not torch.allclose(first.head.weight.grad, second.head.weight.grad)


def test_inner_steps_reduce_the_support_loss(glyphs):
    ep = episode(glyphs, seed=1)
    losses = []
    for steps in (1, 3, 5):
        torch.manual_seed(1)
        model = MAML(Conv4(hidden=8), 5, inner_lr=0.4, inner_steps=1, test_inner_steps=steps)
        before = F.cross_entropy(model(ep.support_x), ep.support_y).item()
        adapted = model.adapt(ep, training=False)
        after = F.cross_entropy(functional_forward(model, adapted, ep.support_x), ep.support_y).item()
        losses.append((before, after))
    befores = [b for b, _ in losses]
    assert befores[0] == pytest.approx(befores[1]) == pytest.approx(befores[2])
    assert losses[0][1] < befores[0]
    assert losses[0][1] > losses[1][1] > losses[2][1], f"more inner steps must fit the support set better: {losses}"
    assert losses[2][1] < 0.6 * befores[0]


def manual_sgd(model: MAML, ep: Episode, steps: int, lr: float) -> dict[str, torch.Tensor]:
    """Plain SGD on the support cross-entropy, written out independently of metacli's inner loop."""
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    for _ in range(steps):
        logits = torch.func.functional_call(model, params, (ep.support_x,))
        grads = torch.autograd.grad(F.cross_entropy(logits, ep.support_y), list(params.values()))
        params = {n: (p - lr * g).detach().requires_grad_() for (n, p), g in zip(params.items(), grads)}
    return params


def _close(a: dict, b: dict) -> bool:
    return all(torch.allclose(a[n], b[n], atol=1e-5, rtol=1e-4) for n in a)


def test_training_and_evaluation_use_their_own_inner_loop(glyphs):
    ep = episode(glyphs, seed=2)
    torch.manual_seed(2)
    model = MAML(Conv4(hidden=8), 5, inner_lr=0.4, inner_steps=1, test_inner_lr=0.1, test_inner_steps=3)
    train_params = model.adapt(ep, training=True)
    eval_params = model.adapt(ep, training=False)
    assert _close(train_params, manual_sgd(model, ep, steps=1, lr=0.4))
    assert _close(eval_params, manual_sgd(model, ep, steps=3, lr=0.1))
    assert not _close(eval_params, manual_sgd(model, ep, steps=1, lr=0.4))
    # In training the adapted weights stay attached to the meta-parameters; at evaluation they are detached.
    assert train_params["head.weight"].grad_fn is not None
    assert eval_params["head.weight"].grad_fn is None


def test_test_inner_settings_default_to_the_training_ones():
    model = MAML(Conv4(hidden=8), 5, inner_lr=0.3, inner_steps=2)
    assert (model.test_loop.lr, model.test_loop.steps) == (0.3, 2)
    model = MAML(Conv4(hidden=8), 5, inner_lr=0.3, inner_steps=2, test_inner_lr=0.05, test_inner_steps=7)
    assert (model.train_loop.lr, model.train_loop.steps, model.test_loop.lr, model.test_loop.steps) == (0.3, 2, 0.05, 7)


def test_zero_test_inner_steps_means_no_adaptation(glyphs):
    ep = episode(glyphs, seed=3)
    torch.manual_seed(3)
    model = MAML(Conv4(hidden=8), 5, inner_steps=1, test_inner_steps=0)
    adapted = model.adapt(ep, training=False)
    assert all(torch.equal(adapted[n], p) for n, p in model.named_parameters())
    with torch.no_grad():
        assert torch.allclose(model.predict(ep, training=False), model(ep.query_x))
        assert not torch.allclose(model.predict(ep, training=True), model(ep.query_x))


@pytest.mark.parametrize("kwargs", [dict(inner_steps=0), dict(inner_lr=0.0), dict(inner_lr=-0.1)])
def test_maml_rejects_a_useless_inner_loop(kwargs):
    with pytest.raises(ValueError):
        MAML(Conv4(hidden=8), 5, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(test_inner_steps=-1), dict(test_inner_lr=-0.4)])
def test_maml_rejects_a_negative_test_inner_loop(kwargs):
    """algo.test_inner_steps=-1 would silently skip adaptation and test_inner_lr<0 would ascend the support loss:
    wrong input, to be refused by the constructor like inner_steps=0 (0 test steps stays allowed: no fine-tuning)."""
    with pytest.raises(ValueError):
        MAML(Conv4(hidden=8), 5, **kwargs)


def test_maml_head_is_sized_by_the_way():
    model = MAML(Conv4(hidden=8), 7)
    assert model.fixed_way and not ProtoNet.fixed_way
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 7)


# ---------------------------------------------------------------- evaluation leaves no trace


def _learners(bn_mode: str):
    torch.manual_seed(4)
    yield MAML(Conv4(hidden=8), 5, bn_mode=bn_mode, test_inner_steps=2)
    yield ProtoNet(Conv4(hidden=8), 5, bn_mode=bn_mode)


@pytest.mark.parametrize("bn_mode", ["transductive", "running"])
def test_evaluation_changes_no_weight_and_no_running_statistic(glyphs, bn_mode):
    for learner in _learners(bn_mode):
        pretrain(learner, glyphs, steps=2)
        learner.zero_grad(set_to_none=True)
        before = {k: v.clone() for k, v in learner.state_dict().items() if not k.endswith("num_batches_tracked")}
        for ep in batch(glyphs, size=3, seed=5, split="test"):
            accuracy = learner.evaluate_episode(ep)
            assert 0.0 <= accuracy <= 1.0
        after = learner.state_dict()
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert not changed, f"{type(learner).__name__} evaluation ({bn_mode}) changed {changed}"
        assert all(p.grad is None for p in learner.parameters()), "evaluation must not accumulate gradients"
        assert learner.training, "evaluation must restore training mode"


@pytest.mark.parametrize("bn_mode", ["transductive", "running"])
def test_evaluation_leaves_the_whole_state_dict_identical(glyphs, bn_mode):
    """Including BatchNorm's num_batches_tracked: evaluating (e.g. validation) must leave the checkpoint as it was."""
    for learner in _learners(bn_mode):
        pretrain(learner, glyphs, steps=2)
        before = {k: v.clone() for k, v in learner.state_dict().items()}
        learner.evaluate_episode(episode(glyphs, seed=6, split="test"))
        after = learner.state_dict()
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert not changed, f"{type(learner).__name__} evaluation ({bn_mode}) changed {changed}"


# ---------------------------------------------------------------- BatchNorm modes


@pytest.mark.parametrize("make", [
    lambda mode: MAML(Conv4(hidden=8), 5, bn_mode=mode, test_inner_steps=1),
    lambda mode: ProtoNet(Conv4(hidden=8), 5, bn_mode=mode),
], ids=["maml", "protonet"])
def test_bn_modes_give_different_query_logits(glyphs, make):
    torch.manual_seed(5)
    learner = pretrain(make("transductive"), glyphs, steps=4)
    ep = episode(glyphs, seed=7, split="test")
    logits = {}
    for mode in ("transductive", "running"):
        learner.bn_mode = mode
        with torch.no_grad(), learner.evaluation_mode():
            logits[mode] = learner.predict(ep, training=False)
    assert logits["transductive"].shape == logits["running"].shape == (25, 5)
    assert torch.isfinite(logits["transductive"]).all() and torch.isfinite(logits["running"]).all()
    assert not torch.allclose(logits["transductive"], logits["running"], atol=1e-3)


def test_running_mode_classifies_each_query_on_its_own(glyphs):
    torch.manual_seed(6)
    learner = pretrain(ProtoNet(Conv4(hidden=8), 5), glyphs, steps=4)
    ep = episode(glyphs, seed=8, split="test")
    few = Episode(ep.support_x, ep.support_y, ep.query_x[:3], ep.query_y[:3], ep.n_way)
    results = {}
    for mode in ("transductive", "running"):
        learner.bn_mode = mode
        with torch.no_grad(), learner.evaluation_mode():
            results[mode] = (learner.predict(ep, training=False)[:3], learner.predict(few, training=False))
    assert torch.allclose(*results["running"], atol=1e-4), "running BN: a query's logits must not depend on the others"
    assert not torch.allclose(*results["transductive"], atol=1e-4), "transductive BN uses the episode's statistics"


def _bn_settings(norms) -> list[tuple]:
    return [(m.training, m.momentum, m.track_running_stats, m.eps) for m in norms]


@pytest.mark.parametrize("bn_mode", ["transductive", "running"])
@pytest.mark.parametrize("was_training", [True, False])
def test_evaluation_mode_restores_training_flag_and_momentum(bn_mode, was_training):
    learner = ProtoNet(Conv4(hidden=8), 5, bn_mode=bn_mode)
    norms = batch_norms(learner)
    assert len(norms) == 4
    for i, m in enumerate(norms):
        m.momentum = 0.1 + 0.1 * i
    learner.train(was_training)
    settings = _bn_settings(norms)
    with learner.evaluation_mode():
        # transductive: batch statistics (BatchNorm in training behaviour); running: the running averages.
        assert all(m.training == (bn_mode == "transductive") for m in norms)
    assert _bn_settings(norms) == settings
    assert [m.momentum for m in norms] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert all(m.training == was_training for m in learner.modules())
    # Restored on the way out of an exception as well.
    with pytest.raises(RuntimeError), learner.evaluation_mode():
        raise RuntimeError("boom")
    assert _bn_settings(norms) == settings
    assert all(m.training == was_training for m in learner.modules())


def test_unknown_bn_mode_is_rejected():
    with pytest.raises(ValueError, match="bn_mode"):
        ProtoNet(Conv4(hidden=8), 5, bn_mode="batch")


# ---------------------------------------------------------------- ProtoNet


def test_class_means_on_a_hand_example():
    embeddings = torch.tensor([[0.0, 0.0], [3.0, 1.0], [2.0, 2.0], [4.0, 8.0], [-1.0, 5.0], [6.0, 0.0]])
    labels = torch.tensor([0, 2, 0, 1, 2, 2])
    means = class_means(embeddings, labels, 3)
    expected = torch.tensor([[1.0, 1.0], [4.0, 8.0], [8.0 / 3, 2.0]])
    assert torch.allclose(means, expected)


class Pixels(nn.Flatten):
    """A real (parameter-free) backbone whose embedding is the image's pixels: distances can be worked out by hand."""

    def __init__(self, out_dim: int) -> None:
        super().__init__()
        self.out_dim = out_dim


def points(*xy) -> torch.Tensor:
    return torch.tensor(xy, dtype=torch.float32).view(len(xy), 1, 1, 2)


def test_protonet_logits_on_a_hand_example():
    learner = ProtoNet(Pixels(2), 2)
    ep = Episode(support_x=points((0, 0), (2, 0), (4, 4), (6, 4)), support_y=torch.tensor([0, 0, 1, 1]),
                 query_x=points((1, 0), (1, 3), (5, 4)), query_y=torch.tensor([0, 0, 1]), n_way=2)
    # Prototypes (1, 0) and (5, 4).
    expected = -torch.tensor([[0.0, 32.0], [9.0, 17.0], [32.0, 0.0]])
    assert torch.allclose(learner.predict(ep, training=False), expected, atol=1e-4)
    loss, accuracy = learner.task_loss(ep, training=False)
    assert accuracy.item() == 1.0 and loss.item() == pytest.approx(F.cross_entropy(expected, ep.query_y).item(), rel=1e-4)


def test_protonet_logits_are_negative_squared_distances_to_prototypes(glyphs):
    torch.manual_seed(7)
    learner = ProtoNet(Conv4(hidden=8), 5, bn_mode="running")
    pretrain(learner, glyphs, steps=2)
    ep = episode(glyphs, seed=9, k_shot=3, n_query=4, split="test")
    learner.eval()
    with torch.no_grad():
        logits = learner.predict(ep, training=False)
        support, query = learner.backbone(ep.support_x), learner.backbone(ep.query_x)
    prototypes = torch.stack([support[ep.support_y == c].mean(0) for c in range(5)])
    expected = -((query[:, None, :] - prototypes[None, :, :]) ** 2).sum(-1)
    assert logits.shape == (20, 5)
    assert torch.allclose(logits, expected, rtol=1e-4, atol=1e-3)
    assert (logits <= 1e-4).all()


def test_protonet_cosine_distance():
    learner = ProtoNet(Pixels(2), 2, distance="cosine", temperature=10.0)
    ep = Episode(support_x=points((1, 0), (3, 0), (0, 2)), support_y=torch.tensor([0, 0, 1]),
                 query_x=points((3, 3), (0, 5), (-2, 0)), query_y=torch.tensor([0, 1, 0]), n_way=2)
    logits = learner.predict(ep, training=False)
    s = 10.0 / 2**0.5
    expected = torch.tensor([[s, s], [0.0, 10.0], [-10.0, 0.0]])
    assert torch.allclose(logits, expected, atol=1e-4)
    # Scale-invariant, unlike the Euclidean distance.
    scaled = Episode(ep.support_x * 7, ep.support_y, ep.query_x * 0.5, ep.query_y, 2)
    assert torch.allclose(learner.predict(scaled, training=False), expected, atol=1e-4)
    euclidean = ProtoNet(Pixels(2), 2)
    assert not torch.allclose(euclidean.predict(scaled, training=False), euclidean.predict(ep, training=False))
    with pytest.raises(ValueError, match="distance"):
        ProtoNet(Pixels(2), 2, distance="manhattan")


def test_protonet_centred_sets_ignore_a_shift_of_either_set():
    ep = Episode(support_x=points((0, 0), (4, 0)), support_y=torch.tensor([0, 1]),
                 query_x=points((1, 0), (3, 0)), query_y=torch.tensor([0, 1]), n_way=2)
    # Queries drawn by a hand that moves everything 3 to the right: (4, 0) and (6, 0), both nearer class 1.
    shifted = Episode(ep.support_x, ep.support_y, ep.query_x + torch.tensor([3.0, 0.0]), ep.query_y, 2)
    plain, centred = ProtoNet(Pixels(2), 2), ProtoNet(Pixels(2), 2, center_sets=True)
    assert plain.predict(shifted, training=False).argmax(1).tolist() == [1, 1]
    # Centred, support (-2, 0) and (2, 0) against queries (-1, 0) and (1, 0), shifted or not.
    expected = -torch.tensor([[1.0, 9.0], [9.0, 1.0]])
    for episode in (ep, shifted):
        assert torch.allclose(centred.predict(episode, training=False), expected, atol=1e-5)
    # Meta-training stays inductive.
    assert torch.equal(centred.predict(shifted, training=True), plain.predict(shifted, training=True))


def test_protonet_refinement_is_a_soft_k_means_step_with_the_queries():
    ep = Episode(support_x=points((0, 0), (4, 0)), support_y=torch.tensor([0, 1]),
                 query_x=points((1, 0), (3, 0), (2, 1)), query_y=torch.tensor([0, 1, 1]), n_way=2)
    refined = ProtoNet(Pixels(2), 2, refine_steps=1).predict(ep, training=False)
    query = ep.query_x.view(3, 2)
    claims = (-torch.cdist(query, torch.tensor([[0.0, 0.0], [4.0, 0.0]])).pow(2)).softmax(1)
    prototypes = (torch.tensor([[0.0, 0.0], [4.0, 0.0]]) + claims.T @ query) / (1 + claims.sum(0)).unsqueeze(1)
    assert torch.allclose(refined, -torch.cdist(query, prototypes).pow(2), atol=1e-5)
    # The queries moved the prototypes.
    assert not torch.allclose(refined, ProtoNet(Pixels(2), 2).predict(ep, training=False))
    with pytest.raises(ValueError, match="refine_steps"):
        ProtoNet(Pixels(2), 2, refine_steps=-1)


def test_protonet_trains_with_a_higher_way_than_it_tests(glyphs):
    torch.manual_seed(8)
    learner = ProtoNet(Conv4(hidden=8), 5)
    tasks = batch(glyphs, size=2, n_way=10, k_shot=1, n_query=2)
    assert tasks.n_way == 10
    with torch.no_grad():
        assert learner.predict(next(iter(tasks)), training=True).shape == (20, 10)
    metrics = meta_train_step(learner, tasks)
    assert metrics["loss"] > 0 and torch.isfinite(torch.tensor(metrics["loss"]))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in learner.parameters())
    assert learner.backbone.features[0].weight.grad.norm() > 0
    accuracy = learner.evaluate_episode(episode(glyphs, seed=10, split="test"))  # and tests 5-way
    assert 0.0 <= accuracy <= 1.0


# ---------------------------------------------------------------- learning


def test_protonet_learns_synthetic_glyphs(glyphs):
    # Measured on CPU (1 thread, seed 0): 0.368 before, 0.713 after 100 steps of 4 tasks.
    torch.manual_seed(0)
    before, after = meta_train(ProtoNet(Conv4(hidden=16), 5), glyphs, steps=100, meta_batch=4, lr=1e-3)
    assert_learned("ProtoNet", before, after, at_least=0.55, gain=0.2)


def test_first_order_maml_learns_synthetic_glyphs(glyphs):
    # Measured on CPU (1 thread, seed 0): 0.398 before, about 0.74 after 80 steps of 4 tasks.
    torch.manual_seed(0)
    learner = MAML(Conv4(hidden=16), 5, inner_lr=0.4, inner_steps=2, test_inner_steps=3, first_order=True)
    before, after = meta_train(learner, glyphs, steps=80, meta_batch=4, lr=3e-3)
    assert_learned("FOMAML", before, after, at_least=0.55, gain=0.2)


# ---------------------------------------------------------------- backbones


@pytest.mark.parametrize("size,pool,hidden,expected", [
    (28, "max", 8, 8),          # 28 -> 14 -> 7 -> 3 -> 1
    (84, "max", 8, 8 * 25),     # 84 -> 42 -> 21 -> 10 -> 5
    (28, "stride", 8, 8),       # spatial mean: the width alone
    (84, "stride", 16, 16),
])
def test_conv4_out_dim(size, pool, hidden, expected):
    backbone = Conv4(in_channels=3 if size == 84 else 1, image_size=size, hidden=hidden, pool=pool)
    assert backbone.out_dim == expected
    assert backbone.training, "computing out_dim must leave the backbone in training mode"
    out = backbone(torch.randn(2, 3 if size == 84 else 1, size, size))
    assert out.shape == (2, expected)


def test_conv4_pool_variants():
    strided, pooled = Conv4(hidden=8, pool="stride"), Conv4(hidden=8, pool="max")
    convs = lambda m: [c for c in m.modules() if isinstance(c, nn.Conv2d)]  # noqa: E731
    pools = lambda m: [p for p in m.modules() if isinstance(p, nn.MaxPool2d)]  # noqa: E731
    assert [c.stride for c in convs(strided)] == [(2, 2)] * 4 and not pools(strided)
    assert [c.stride for c in convs(pooled)] == [(1, 1)] * 4 and len(pools(pooled)) == 4
    assert Conv4(hidden=8, blocks=2).out_dim == 8 * 7 * 7
    with pytest.raises(ValueError, match="pool"):
        Conv4(pool="avg")


@pytest.mark.parametrize("in_channels,size", [(1, 28), (3, 84)])
def test_resnet12_out_dim(in_channels, size):
    backbone = ResNet12(in_channels=in_channels, image_size=size, widths=(4, 6, 8, 12))
    assert backbone.out_dim == 12
    assert backbone(torch.randn(2, in_channels, size, size)).shape == (2, 12)
    assert backbone.training
