"""Siamese Networks: verification pairs and their weights, the weighted L1 distance, the K-shot average, the pair
cross-entropy, gradients, evaluation without trace, any way at test time (20-way one-shot after 5-way training),
constructor checks, its config, and learning on synthetic glyphs."""
from __future__ import annotations

import hydra
import pytest
import torch
import torch.nn.functional as F

import metacli.cli
from metacli.algorithms.siamese import SiameseNet, pair_targets
from metacli.build import build_dataset, build_learner
from metacli.config_schema import register
from metacli.data.episodes import Episode
from metacli.evaluation import score
from metacli.models.conv4 import Conv4
from metacli.execution.meta_batch import meta_train_step

from learning import (assert_evaluation_leaves_no_trace, assert_learned, batch, episode, meta_train, sampler,
                      train_a_little)

pytestmark = pytest.mark.usefixtures("one_thread")


def small_siamese(**kwargs) -> SiameseNet:
    return SiameseNet(Conv4(hidden=8), 5, **kwargs)


# ---------------------------------------------------------------- pairs and distance


def test_pair_targets_and_balanced_weights_on_a_hand_example():
    targets, weights = pair_targets(torch.tensor([0, 2]), torch.tensor([0, 1, 2]), balance=True)
    assert torch.equal(targets, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    # 2 same pairs share half of the weight, 4 different pairs the other half.
    assert torch.allclose(weights, torch.tensor([[0.25, 0.125, 0.125], [0.125, 0.125, 0.25]]))
    _, plain = pair_targets(torch.tensor([0, 2]), torch.tensor([0, 1, 2]), balance=False)
    assert torch.allclose(plain, torch.full((2, 3), 1 / 6))


def test_weighted_l1_distance_is_symmetric_and_the_papers_formula():
    torch.manual_seed(0)
    learner = small_siamese()
    a, b = torch.randn(4, learner.backbone.out_dim), torch.randn(3, learner.backbone.out_dim)
    assert torch.allclose(learner.similarity(a, b), learner.similarity(b, a).T)
    alpha, bias = learner.distance.weight.squeeze(0), learner.distance.bias
    expected = (alpha * (a[1] - b[2]).abs()).sum() + bias
    assert learner.similarity(a, b)[1, 2].item() == pytest.approx(expected.item(), rel=1e-5)


def test_k_shot_averages_the_probabilities_per_class():
    """The best single match is class 1 (0.9), but class 0 has the higher mean probability (0.8 against 0.5)."""
    learner = small_siamese()
    support_y = torch.tensor([0, 0, 1, 1])
    ep = Episode(torch.zeros(4, 1, 28, 28), support_y, torch.zeros(1, 1, 28, 28), torch.tensor([0]), 2)
    probabilities = torch.tensor([[0.8, 0.8, 0.9, 0.1]])
    logits = learner.class_log_probabilities(torch.logit(probabilities), ep)
    assert torch.allclose(logits, torch.tensor([[0.8, 0.5]]).log(), atol=1e-6)
    assert logits.argmax(dim=1).item() == 0


def test_training_loss_is_the_balanced_pair_cross_entropy(glyphs):
    torch.manual_seed(0)
    learner = small_siamese()
    ep = episode(glyphs, seed=1, k_shot=2, n_query=3)
    loss, accuracy = learner.task_loss(ep, training=True)
    pair_logits = learner.pair_logits(ep)  # batch statistics again: the same embeddings
    same = ep.query_y.unsqueeze(1) == ep.support_y.unsqueeze(0)
    p = torch.sigmoid(pair_logits)
    expected = 0.5 * -p[same].log().mean() + 0.5 * -(1 - p[~same]).log().mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() != pytest.approx(F.cross_entropy(learner.predict(ep, True), ep.query_y).item(), rel=1e-3)
    predicted = learner.predict(ep, training=True).argmax(dim=1)
    assert accuracy.item() == (predicted == ep.query_y).float().mean().item()


def test_gradients_reach_the_backbone_and_the_l1_weights(glyphs):
    torch.manual_seed(0)
    learner = small_siamese()
    metrics = meta_train_step(learner, batch(glyphs))
    assert torch.isfinite(torch.tensor(metrics["loss"])) and 0 <= metrics["accuracy"] <= 1
    for name, p in learner.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
    assert learner.distance.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- evaluation


@pytest.mark.parametrize("bn_mode", ["transductive", "running"])
def test_evaluation_is_deterministic_and_leaves_no_trace(glyphs, bn_mode):
    torch.manual_seed(0)
    learner = train_a_little(small_siamese(bn_mode=bn_mode), glyphs)
    assert_evaluation_leaves_no_trace(learner, episode(glyphs, seed=3, split="test"))


@pytest.mark.parametrize("n_way,k_shot", [(3, 2), (20, 1)])
def test_any_way_and_shot_at_test_time(glyphs, n_way, k_shot):
    torch.manual_seed(0)
    learner = small_siamese()  # built for 5 ways
    assert not learner.fixed_way
    ep = episode(glyphs, seed=5, n_way=n_way, k_shot=k_shot, n_query=2, split="test")
    with torch.no_grad(), learner.evaluation_mode():
        assert learner.predict(ep, training=False).shape == (2 * n_way, n_way)


# ---------------------------------------------------------------- construction


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="algo.balance_pairs"):
        small_siamese(balance_pairs="yes")


def test_the_config_builds_the_learner():
    register()
    with hydra.initialize_config_dir(config_dir=str(metacli.cli.config_dir()), version_base="1.3"):
        cfg = hydra.compose(config_name="train", overrides=["algo=siamese", "algo.balance_pairs=false",
                                                             "backbone.hidden=8", "dataset=synthetic", "task.n_way=4"])
    learner = build_learner(cfg, build_dataset(cfg))
    assert isinstance(learner, SiameseNet) and not learner.balance_pairs and learner.n_way == 4
    assert learner.distance.in_features == learner.backbone.out_dim and learner.distance.out_features == 1


# ---------------------------------------------------------------- learning


def test_siamese_learns_synthetic_glyphs_and_tests_20_way(glyphs):
    # Measured on CPU (1 thread, seed 0): 5-way 1-shot 0.193 before, 0.670 after 200 steps of 4 tasks; the same
    # learner scores 0.333 on 20-way 1-shot episodes of the test split (chance 0.05), the paper's protocol.
    torch.manual_seed(0)
    learner = SiameseNet(Conv4(hidden=32), 5)
    before, after = meta_train(learner, glyphs, steps=200, meta_batch=4, lr=3e-3)
    assert_learned("Siamese", before, after, at_least=0.5, gain=0.25)
    twenty_way = score(learner, sampler(glyphs, "test", n_way=20, n_query=2), episodes=20, seed=0, batch_size=10)
    print(f"Siamese 20-way 1-shot test accuracy: {twenty_way['accuracy']:.3f}")
    assert twenty_way["accuracy"] >= 0.2, f"20-way 1-shot reached only {twenty_way['accuracy']:.3f} (chance 0.05)"
