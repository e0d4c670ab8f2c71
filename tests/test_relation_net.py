"""Relation Network: scores in [0, 1] for any way and shot, the MSE loss, class sums (not means), gradients,
evaluation without trace, constructor checks, its config, and learning on synthetic glyphs."""
from __future__ import annotations

import hydra
import pytest
import torch

import metacli.cli
from metacli.algorithms.relation_net import RelationNet
from metacli.algorithms.similarity import class_sums
from metacli.build import build_dataset, build_learner
from metacli.config_schema import register
from metacli.data.episodes import Episode
from metacli.models.conv4 import Conv4
from metacli.execution.meta_batch import meta_train_step

from learning import (assert_evaluation_leaves_no_trace, assert_learned, batch, episode, meta_train,
                      train_a_little)

pytestmark = pytest.mark.usefixtures("one_thread")


def small_relation_net(**kwargs) -> RelationNet:
    return RelationNet(Conv4(hidden=8), 5, **{"hidden": 8, **kwargs})


# ---------------------------------------------------------------- scores and loss


@pytest.mark.parametrize("n_way,k_shot", [(5, 1), (3, 2), (20, 1)])
def test_scores_are_in_the_unit_interval_for_any_way_and_shot(glyphs, n_way, k_shot):
    torch.manual_seed(0)
    learner = small_relation_net()  # built for 5 ways
    assert not learner.fixed_way
    ep = episode(glyphs, seed=1, n_way=n_way, k_shot=k_shot, n_query=2, split="test")
    with torch.no_grad(), learner.evaluation_mode():
        scores = learner.predict(ep, training=False)
    assert scores.shape == (2 * n_way, n_way)
    assert scores.min() >= 0 and scores.max() <= 1 and scores.std() > 0


def test_loss_is_the_mse_to_one_hot_targets(glyphs):
    torch.manual_seed(0)
    learner = small_relation_net()
    ep = episode(glyphs, seed=2, k_shot=2, n_query=3)
    loss, accuracy = learner.task_loss(ep, training=True)
    # By hand: every (query, class) pair through the relation module, one at a time.
    n_support = len(ep.support_y)
    embeddings = learner.backbone(torch.cat([ep.support_x, ep.query_x]))  # batch statistics: the same embeddings
    support, query = embeddings[:n_support], embeddings[n_support:]
    squared_errors, hits = [], []
    for q, label in zip(query, ep.query_y):
        scores = torch.stack([learner.relation(torch.cat([support[ep.support_y == c].sum(0), q])).squeeze()
                              for c in range(ep.n_way)])
        squared_errors += [(score - float(c == label)) ** 2 for c, score in enumerate(scores)]
        hits.append(float(scores.argmax() == label))
    assert loss.item() == pytest.approx(torch.stack(squared_errors).mean().item(), rel=1e-5)
    assert accuracy.item() == pytest.approx(sum(hits) / len(hits))


def test_classes_are_sums_of_their_shots(glyphs):
    embeddings, labels = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), torch.tensor([0, 0, 1])
    assert torch.equal(class_sums(embeddings, labels, 3), torch.tensor([[4.0, 6.0], [5.0, 6.0], [0.0, 0.0]]))
    # Two copies of each support image score like one image whose embedding is doubled (a mean would not).
    torch.manual_seed(0)
    learner = small_relation_net(bn_mode="running")  # running statistics: each image embedded on its own
    one_shot = episode(glyphs, seed=3, split="test")
    doubled = Episode(one_shot.support_x.repeat_interleave(2, dim=0), one_shot.support_y.repeat_interleave(2),
                      one_shot.query_x, one_shot.query_y, one_shot.n_way)
    with torch.no_grad(), learner.evaluation_mode():
        support, query = learner.backbone(one_shot.support_x), learner.backbone(one_shot.query_x)
        expected = learner.relation_scores(2 * support, query)
        assert torch.allclose(learner.predict(doubled, training=False), expected, atol=1e-6)
        assert not torch.allclose(learner.predict(one_shot, training=False), expected, atol=1e-3)


def test_gradients_reach_the_relation_module_and_the_backbone(glyphs):
    torch.manual_seed(0)
    learner = small_relation_net()
    metrics = meta_train_step(learner, batch(glyphs))
    assert torch.isfinite(torch.tensor(metrics["loss"])) and 0 <= metrics["accuracy"] <= 1
    for name, p in learner.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"


# ---------------------------------------------------------------- evaluation


@pytest.mark.parametrize("bn_mode", ["transductive", "running"])
def test_evaluation_is_deterministic_and_leaves_no_trace(glyphs, bn_mode):
    torch.manual_seed(0)
    learner = train_a_little(small_relation_net(bn_mode=bn_mode), glyphs)
    assert_evaluation_leaves_no_trace(learner, episode(glyphs, seed=4, split="test"))


# ---------------------------------------------------------------- construction


@pytest.mark.parametrize("hidden", [0, -3, 2.5])
def test_invalid_settings_are_refused(hidden):
    with pytest.raises(ValueError, match="algo.hidden"):
        small_relation_net(hidden=hidden)


def test_the_config_builds_the_learner():
    register()
    with hydra.initialize_config_dir(config_dir=str(metacli.cli.config_dir()), version_base="1.3"):
        cfg = hydra.compose(config_name="train", overrides=["algo=relation_net", "algo.hidden=16", "backbone.hidden=8",
                                                             "dataset=synthetic", "task.n_way=4"])
    learner = build_learner(cfg, build_dataset(cfg))
    assert isinstance(learner, RelationNet) and learner.n_way == 4
    first, last = learner.relation[0], learner.relation[2]
    assert (first.in_features, first.out_features) == (2 * learner.backbone.out_dim, 16) and last.in_features == 16


# ---------------------------------------------------------------- learning


def test_relation_net_learns_synthetic_glyphs(glyphs):
    # Measured on CPU (1 thread, seed 0): 0.195 before, 0.680 after 200 steps of 4 tasks (hidden 64).
    torch.manual_seed(0)
    before, after = meta_train(RelationNet(Conv4(hidden=32), 5), glyphs, steps=200, meta_batch=4, lr=1e-3)
    assert_learned("Relation Net", before, after, at_least=0.45, gain=0.2)
