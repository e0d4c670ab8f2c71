"""Matching Networks: the logits are the log attention mass per class, the attention's behaviour, full-context
embeddings (skip connections, support order, independent queries), evaluation without trace, any way at test time,
constructor checks, its config, and learning on synthetic glyphs with and without full-context embeddings."""
from __future__ import annotations

import math

import hydra
import pytest
import torch
import torch.nn.functional as F

import metacli.cli
from metacli.algorithms.matching_net import MatchingNet, class_log_mass
from metacli.algorithms.similarity import cosine_similarity
from metacli.build import build_dataset, build_learner
from metacli.config_schema import register
from metacli.data.episodes import Episode
from metacli.models.conv4 import Conv4
from metacli.execution.meta_batch import meta_train_step

from learning import (assert_evaluation_leaves_no_trace, assert_learned, batch, episode, meta_train,
                      train_a_little)

pytestmark = pytest.mark.usefixtures("one_thread")


def small_net(**kwargs) -> MatchingNet:
    return MatchingNet(Conv4(hidden=8), 5, **kwargs)


def evaluation_logits(learner: MatchingNet, ep: Episode, training: bool = False) -> torch.Tensor:
    with torch.no_grad(), learner.evaluation_mode():
        return learner.predict(ep, training=training)


def permuted(ep: Episode, order: torch.Tensor) -> Episode:
    return Episode(ep.support_x[order], ep.support_y[order], ep.query_x, ep.query_y, ep.n_way)


# ---------------------------------------------------------------- attention


def test_class_log_mass_is_the_log_of_the_summed_attention():
    torch.manual_seed(0)
    attention = torch.randn(4, 6).softmax(dim=1)
    labels = torch.tensor([2, 0, 1, 2, 0, 2])
    expected = (attention @ F.one_hot(labels, 3).float()).log()
    assert torch.allclose(class_log_mass(attention.log(), labels, 3), expected, atol=1e-6)
    # A class without support examples gets a finite, lowest logit rather than -inf.
    empty = class_log_mass(attention.log(), labels, 4)
    assert torch.isfinite(empty).all() and (empty[:, 3] < -1e30).all()


def test_class_log_mass_stays_exact_where_the_mass_underflows():
    """Logits far apart: the direct log(mass) is -inf, the log-space sum is exact and keeps its gradient."""
    scores = torch.tensor([[0.0, -200.0, -300.0]], requires_grad=True)
    labels = torch.tensor([0, 1, 1])
    log_attention = scores.log_softmax(dim=1)
    assert torch.isinf((log_attention.exp() @ F.one_hot(labels, 2).float()).log()).any()
    log_mass = class_log_mass(log_attention, labels, 2)
    assert log_mass[0, 1].item() == pytest.approx(-200.0, rel=1e-6)
    log_mass[0, 1].backward()
    assert torch.isfinite(scores.grad).all() and scores.grad[0, 1] > 0.99


@pytest.mark.parametrize("fce", [False, True])
def test_logits_are_the_log_attention_mass_per_class(glyphs, fce):
    torch.manual_seed(0)
    learner = small_net(fce=fce)
    ep = episode(glyphs, seed=1, k_shot=2, n_query=3, split="test")
    logits = evaluation_logits(learner, ep)
    assert logits.shape == (15, 5) and torch.isfinite(logits).all()
    assert torch.allclose(logits.exp().sum(dim=1), torch.ones(15), atol=1e-5), "the class masses must sum to 1"
    if not fce:
        with torch.no_grad(), learner.evaluation_mode():
            embeddings = learner.backbone(torch.cat([ep.support_x, ep.query_x]))
        attention = (10.0 * cosine_similarity(embeddings[10:], embeddings[:10])).softmax(dim=1)
        assert torch.allclose(attention.sum(dim=1), torch.ones(15), atol=1e-5)
        expected = attention @ F.one_hot(ep.support_y, 5).float()
        assert torch.allclose(logits.exp(), expected, atol=1e-5)


def test_a_copy_of_a_support_example_takes_its_class(glyphs):
    torch.manual_seed(0)
    ep = episode(glyphs, seed=2, k_shot=2, split="test")
    as_queries = Episode(ep.support_x, ep.support_y, ep.support_x, ep.support_y, ep.n_way)
    sharp = evaluation_logits(small_net(temperature=100.0), as_queries).exp()
    assert (sharp.argmax(dim=1) == ep.support_y).all()
    assert sharp.gather(1, ep.support_y[:, None]).min() > 0.75  # observed 0.91; about 0.2 at temperature 1
    # The paper's plain cosine (temperature 1) cannot be that sure: no weight exceeds e^2 times another.
    torch.manual_seed(0)
    plain = evaluation_logits(small_net(temperature=1.0), as_queries).exp()
    assert plain.max() < 2 * math.e ** 2 / (2 * math.e ** 2 + 8)  # the class's 2 supports weigh e^2 each, 8 others 1


def test_support_order_does_not_matter_without_fce(glyphs):
    torch.manual_seed(0)
    learner = small_net()
    ep = episode(glyphs, seed=3, k_shot=3, split="test")
    order = torch.randperm(len(ep.support_y), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(evaluation_logits(learner, permuted(ep, order)), evaluation_logits(learner, ep), atol=1e-5)
    # Nor is anything shuffled in meta-training: the same logits twice.
    assert torch.allclose(evaluation_logits(learner, ep, training=True), evaluation_logits(learner, ep), atol=1e-6)


# ---------------------------------------------------------------- full-context embeddings


def test_fce_adds_lstms_and_gradients_reach_everything(glyphs):
    torch.manual_seed(0)
    plain, full = small_net(), small_net(fce=True)
    assert plain.support_lstm is None and plain.query_lstm is None
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in plain.backbone.parameters())
    dim = full.backbone.out_dim
    assert full.support_lstm.bidirectional and full.support_lstm.hidden_size == dim
    assert full.query_lstm.input_size == 2 * dim and full.query_lstm.hidden_size == dim
    assert sum(p.numel() for p in full.parameters()) > sum(p.numel() for p in plain.parameters())
    for learner in (plain, full):
        meta_train_step(learner, batch(glyphs))
        for name, p in learner.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"


def test_fce_with_silent_lstms_is_the_plain_network(glyphs):
    """Zero LSTM weights output h = 0, so the skip connections leave g = g' and f = f'."""
    torch.manual_seed(0)
    full = small_net(fce=True)
    plain = small_net()
    plain.backbone.load_state_dict(full.backbone.state_dict())
    ep = episode(glyphs, seed=4, split="test")
    assert not torch.allclose(evaluation_logits(full, ep), evaluation_logits(plain, ep), atol=1e-3)
    with torch.no_grad():
        for p in [*full.support_lstm.parameters(), *full.query_lstm.parameters()]:
            p.zero_()
    assert torch.allclose(evaluation_logits(full, ep), evaluation_logits(plain, ep), atol=1e-5)


def test_fce_reads_the_support_in_order_and_shuffles_it_in_meta_training(glyphs):
    torch.manual_seed(0)
    learner = small_net(fce=True)
    ep = episode(glyphs, seed=5, k_shot=2, split="test")
    order = torch.randperm(len(ep.support_y), generator=torch.Generator().manual_seed(0))
    fixed = evaluation_logits(learner, ep)
    assert torch.equal(evaluation_logits(learner, ep), fixed), "evaluation must use the fixed order"
    assert not torch.allclose(evaluation_logits(learner, permuted(ep, order)), fixed, atol=1e-4)
    # Meta-training draws the order from torch's generator, labels following their images: the same logits as the
    # episode given in that order.
    torch.manual_seed(7)
    shuffled = evaluation_logits(learner, ep, training=True)
    torch.manual_seed(7)
    drawn = torch.randperm(len(ep.support_y))
    assert not torch.equal(drawn, torch.arange(len(drawn)))
    assert torch.allclose(shuffled, evaluation_logits(learner, permuted(ep, drawn)), atol=1e-5)


def test_fce_query_steps_follow_the_paper_and_each_query_is_alone(glyphs):
    torch.manual_seed(0)
    learner = small_net(fce=True, fce_steps=3)
    support, query = torch.randn(10, learner.backbone.out_dim), torch.randn(6, learner.backbone.out_dim)
    with torch.no_grad():
        context = learner.embed_support(support)
        together = learner.embed_queries(query, context)
        alone = torch.cat([learner.embed_queries(query[i:i + 1], context) for i in range(6)])
        learner.fce_steps = 1
        one_step = learner.embed_queries(query, context)
        # From h_0 = f'(x), c_0 = 0: r_0 read with h_0, then h_1 = LSTM(f'(x), [h_0, r_0], c_0) + f'(x).
        read = (query @ context.T).softmax(dim=1) @ context
        expected = learner.query_lstm(torch.cat([query, read], dim=1), (query, torch.zeros_like(query)))[0] + query
    assert torch.allclose(one_step, expected, atol=1e-6)
    assert not torch.allclose(one_step, together, atol=1e-4), "more steps must change the embedding"
    assert torch.allclose(together, alone, atol=1e-5)


# ---------------------------------------------------------------- evaluation


@pytest.mark.parametrize("bn_mode", ["transductive", "running"])
@pytest.mark.parametrize("fce", [False, True])
def test_evaluation_is_deterministic_and_leaves_no_trace(glyphs, bn_mode, fce):
    torch.manual_seed(0)
    learner = train_a_little(small_net(bn_mode=bn_mode, fce=fce), glyphs, steps=3)
    assert_evaluation_leaves_no_trace(learner, episode(glyphs, seed=6, split="test"))


@pytest.mark.parametrize("n_way", [3, 7])
@pytest.mark.parametrize("fce", [False, True])
def test_any_way_at_test_and_training_time(glyphs, n_way, fce):
    torch.manual_seed(0)
    learner = small_net(fce=fce)  # built for 5 ways
    ep = episode(glyphs, seed=7, n_way=n_way, n_query=2, split="test")
    assert evaluation_logits(learner, ep).shape == (2 * n_way, n_way)
    metrics = meta_train_step(learner, batch(glyphs, n_way=n_way, n_query=2))
    assert torch.isfinite(torch.tensor(metrics["loss"])) and 0 <= metrics["accuracy"] <= 1


# ---------------------------------------------------------------- construction


@pytest.mark.parametrize("key,value", [("temperature", 0.0), ("temperature", -1.0), ("temperature", float("nan")),
                                       ("fce", "yes"), ("fce_steps", 0)])
def test_invalid_settings_are_refused(key, value):
    with pytest.raises(ValueError, match=f"algo.{key}"):
        small_net(**{key: value})


@pytest.mark.parametrize("fce", [False, True])
def test_the_config_builds_the_learner(fce):
    register()
    with hydra.initialize_config_dir(config_dir=str(metacli.cli.config_dir()), version_base="1.3"):
        cfg = hydra.compose(config_name="train", overrides=["algo=matching_net", f"algo.fce={str(fce).lower()}",
                                                             "backbone.hidden=8", "dataset=synthetic", "task.n_way=4"])
    learner = build_learner(cfg, build_dataset(cfg))
    assert isinstance(learner, MatchingNet) and learner.n_way == 4 and learner.fce is fce
    assert learner.temperature == cfg.algo.temperature and learner.fce_steps == cfg.algo.fce_steps
    assert (learner.support_lstm is not None) is fce


# ---------------------------------------------------------------- learning


def test_matching_net_learns_synthetic_glyphs(glyphs):
    # Measured on CPU (1 thread, seeds 0/1/2): 0.367 -> 0.736, 0.359 -> 0.758, 0.355 -> 0.739 after 100 steps of
    # 4 tasks (the paper's temperature 1.0 reached 0.59 and 0.57 on seeds 0 and 1).
    torch.manual_seed(0)
    before, after = meta_train(MatchingNet(Conv4(hidden=16), 5), glyphs, steps=100, meta_batch=4, lr=1e-3)
    assert_learned("Matching Networks", before, after, at_least=0.55, gain=0.2)


def test_matching_net_with_fce_learns_synthetic_glyphs(glyphs):
    # Measured on CPU (1 thread, seed 0): 0.337 -> 0.713 after 60 steps of 4 tasks (0.746 after 100; seeds 1 and 2:
    # 0.762 and 0.723 after 100).
    torch.manual_seed(0)
    learner = MatchingNet(Conv4(hidden=16), 5, fce=True)
    before, after = meta_train(learner, glyphs, steps=60, meta_batch=4, lr=1e-3)
    assert_learned("Matching Networks (FCE)", before, after, at_least=0.55, gain=0.2)
