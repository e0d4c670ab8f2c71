"""LEO: latent and fine-tuning inner steps, the regularisers of its loss, frozen versus joint backbone, evaluation
without trace, any way at test time, constructor checks, its config, and learning on synthetic glyphs."""
from __future__ import annotations

import hydra
import pytest
import torch
from torch import nn

import metacli.cli
from metacli.algorithms.leo import LEO, gaussian_sample, kl_to_standard_normal, orthogonality_penalty
from metacli.build import build_dataset, build_learner
from metacli.config_schema import register
from metacli.data.episodes import Episode
from metacli.models.conv4 import Conv4
from metacli.execution.meta_batch import meta_train_step

from learning import assert_evaluation_leaves_no_trace, assert_learned, batch, episode, meta_train

pytestmark = pytest.mark.usefixtures("one_thread")


def small_leo(**kwargs) -> LEO:
    return LEO(Conv4(hidden=8), 5, **{"latent_dim": 8, **kwargs})


def pretrain(learner: LEO, glyphs, steps: int = 3) -> LEO:
    """A few meta-steps, so that the weights and BatchNorm's running statistics are no longer their initial values."""
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    for seed in range(steps):
        optimizer.zero_grad()
        meta_train_step(learner, batch(glyphs, size=2, seed=seed))
        optimizer.step()
    return learner


def support_as_query(ep: Episode) -> Episode:
    """The support set scored as the queries: the query loss is then the loss the inner loop descends."""
    return Episode(ep.support_x, ep.support_y, ep.support_x, ep.support_y, ep.n_way)


def evaluation_loss(learner: LEO, ep: Episode) -> float:
    with torch.no_grad(), learner.evaluation_mode():
        return learner.task_loss(ep, training=False)[0].item()


# ---------------------------------------------------------------- inner loop


@pytest.mark.parametrize("stage", ["latent_steps", "finetune_steps"])
def test_inner_steps_reduce_the_support_loss(glyphs, stage):
    torch.manual_seed(0)
    learner = small_leo(latent_steps=0, finetune_steps=0, latent_lr=1.0, finetune_lr=0.1)
    ep = support_as_query(episode(glyphs, seed=1))
    losses = []
    for steps in (0, 1, 5):
        setattr(learner, stage, steps)
        losses.append(evaluation_loss(learner, ep))
    assert losses[0] > losses[1] > losses[2], f"{stage}: support losses {losses}"


def test_inner_learning_rates_are_meta_learned(glyphs):
    torch.manual_seed(0)
    learner = small_leo(latent_lr=0.5, finetune_lr=0.01)
    assert learner.log_latent_lr.exp().item() == pytest.approx(0.5)
    assert learner.log_finetune_lr.exp().item() == pytest.approx(0.01)
    meta_train_step(learner, batch(glyphs))
    assert learner.log_latent_lr.grad.abs() > 0 and learner.log_finetune_lr.grad.abs() > 0


# ---------------------------------------------------------------- regularisers


def test_kl_is_the_closed_form_and_zero_only_at_the_prior():
    torch.manual_seed(0)
    mean, log_std = torch.randn(5, 8), 0.5 * torch.randn(5, 8)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mean, log_std.exp()),
                                                 torch.distributions.Normal(0.0, 1.0)).mean()
    assert kl_to_standard_normal(mean, log_std).item() == pytest.approx(expected.item(), rel=1e-5)
    assert kl_to_standard_normal(mean, log_std) > 0
    assert kl_to_standard_normal(torch.zeros(5, 8), torch.zeros(5, 8)).item() == 0.0
    assert kl_to_standard_normal(torch.zeros(5, 8), torch.full((5, 8), -1.0)) > 0  # too narrow is penalised too


def test_orthogonality_penalty_is_zero_only_for_orthogonal_columns():
    torch.manual_seed(0)
    weight = torch.empty(32, 8)
    nn.init.orthogonal_(weight)
    assert orthogonality_penalty(3.0 * weight).item() == pytest.approx(0.0, abs=1e-10)  # scale-free: a correlation
    assert orthogonality_penalty(torch.randn(32, 8)) > 0.01
    collinear = torch.randn(32, 1).expand(32, 8)
    assert orthogonality_penalty(collinear).item() == pytest.approx(56 / 64, rel=1e-4)  # all off-diagonals are 1


def test_encoder_penalty_trains_the_encoder_only(glyphs):
    """||stopgrad(z') - z||^2 pulls the encoded code towards the adapted one, never the adaptation backwards."""
    torch.manual_seed(0)
    learner = small_leo()
    penalty = learner.adapt(episode(glyphs, seed=2), training=True).encoder_penalty
    to_lr, to_encoder = torch.autograd.grad(penalty, [learner.log_latent_lr, learner.encoder.weight], allow_unused=True)
    assert to_lr is None and to_encoder.abs().sum() > 0


def test_sampling_only_in_meta_training():
    mean, log_std = torch.randn(3, 4), torch.zeros(3, 4)
    assert torch.equal(gaussian_sample(mean, log_std, training=False), mean)
    assert not torch.equal(gaussian_sample(mean, log_std, training=True), mean)
    log_std.requires_grad_()
    gaussian_sample(mean, log_std, training=True).sum().backward()
    assert log_std.grad.abs().sum() > 0, "the draw must be reparameterised"


def test_training_loss_adds_the_weighted_regularisers(glyphs):
    ep = episode(glyphs, seed=2)
    losses = {}
    for name, weights in [("none", (0.0, 0.0, 0.0)), ("all", (0.5, 2.0, 3.0))]:
        torch.manual_seed(0)
        learner = small_leo(kl_weight=weights[0], encoder_penalty_weight=weights[1], orthogonality_weight=weights[2])
        torch.manual_seed(1)  # the same noise draws for both
        losses[name] = learner.task_loss(ep, training=True)[0].item()
        torch.manual_seed(1)
        adapted = learner.adapt(ep, training=True)
    regularisers = (0.5 * adapted.kl + 2.0 * adapted.encoder_penalty
                    + 3.0 * orthogonality_penalty(learner.decoder.weight)).item()
    assert adapted.kl > 0 and adapted.encoder_penalty > 0
    assert losses["all"] - losses["none"] == pytest.approx(regularisers, rel=1e-4)


# ---------------------------------------------------------------- backbone


@pytest.mark.parametrize("freeze", [True, False])
def test_frozen_backbone_gets_no_gradient(glyphs, freeze):
    torch.manual_seed(0)
    learner = small_leo(freeze_backbone=freeze)
    meta_train_step(learner, batch(glyphs))
    for name, p in learner.named_parameters():
        if freeze and name.startswith("backbone."):
            assert p.grad is None, f"frozen {name} got a gradient"
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"


# ---------------------------------------------------------------- evaluation


@pytest.mark.parametrize("bn_mode", ["transductive", "running"])
def test_evaluation_is_deterministic_and_leaves_no_trace(glyphs, bn_mode):
    torch.manual_seed(0)
    learner = pretrain(small_leo(bn_mode=bn_mode, dropout=0.3), glyphs)
    learner.zero_grad(set_to_none=True)
    ep = episode(glyphs, seed=3, split="test")
    assert_evaluation_leaves_no_trace(learner, ep)
    # Meta-training samples codes and weights, so its logits vary from call to call.
    assert not torch.equal(learner.predict(ep, training=True), learner.predict(ep, training=True))


def test_codes_average_the_relation_over_all_pairs(glyphs):
    """The paper's per-class code: (1 / (N K^2)) sum over the class's K examples and all N K support examples."""
    torch.manual_seed(0)
    learner = small_leo()
    support = torch.randn(6, learner.backbone.out_dim)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    codes = learner.encoder(support)
    expected = torch.stack([
        torch.stack([learner.relation(torch.cat([codes[i], codes[j]])) for i in range(6) if labels[i] == c
                     for j in range(6)]).mean(0) for c in range(3)])
    mean, log_std = learner.encode(support, labels, 3)
    assert torch.allclose(torch.cat([mean, log_std], dim=1), expected, atol=1e-6)


def test_support_order_does_not_matter(glyphs):
    """Codes are per-class averages over all support pairs, so shuffling the support set changes nothing."""
    torch.manual_seed(0)
    learner = small_leo()
    ep = episode(glyphs, seed=4, k_shot=3, split="test")
    order = torch.randperm(len(ep.support_y), generator=torch.Generator().manual_seed(0))
    shuffled = Episode(ep.support_x[order], ep.support_y[order], ep.query_x, ep.query_y, ep.n_way)
    with torch.no_grad(), learner.evaluation_mode():
        expected = learner.predict(ep, training=False)
        assert torch.allclose(learner.predict(shuffled, training=False), expected, atol=1e-5)


@pytest.mark.parametrize("n_way", [3, 7])
def test_any_way_at_test_and_training_time(glyphs, n_way):
    torch.manual_seed(0)
    learner = small_leo()  # built for 5 ways
    ep = episode(glyphs, seed=5, n_way=n_way, n_query=2, split="test")
    with torch.no_grad(), learner.evaluation_mode():
        assert learner.predict(ep, training=False).shape == (2 * n_way, n_way)
    metrics = meta_train_step(learner, batch(glyphs, n_way=n_way, n_query=2))
    assert torch.isfinite(torch.tensor(metrics["loss"]))


# ---------------------------------------------------------------- construction


@pytest.mark.parametrize("key,value", [("latent_dim", 0), ("latent_steps", -1), ("finetune_steps", -1),
                                       ("latent_lr", 0.0), ("finetune_lr", -0.1), ("kl_weight", -1e-3),
                                       ("encoder_penalty_weight", -1.0), ("orthogonality_weight", -1.0),
                                       ("dropout", 1.0), ("dropout", -0.1)])
def test_invalid_settings_are_refused(key, value):
    with pytest.raises(ValueError, match=f"algo.{key}"):
        small_leo(**{key: value})


def test_the_config_builds_the_learner():
    register()
    with hydra.initialize_config_dir(config_dir=str(metacli.cli.config_dir()), version_base="1.3"):
        cfg = hydra.compose(config_name="train", overrides=["algo=leo", "algo.latent_steps=2", "backbone.hidden=8",
                                                             "dataset=synthetic", "task.n_way=4"])
    learner = build_learner(cfg, build_dataset(cfg))
    assert isinstance(learner, LEO) and learner.latent_steps == 2 and not learner.freeze_backbone
    assert learner.decoder.in_features == cfg.algo.latent_dim and learner.decoder.out_features == 2 * 8
    assert learner.log_finetune_lr.exp().item() == pytest.approx(cfg.algo.finetune_lr)


# ---------------------------------------------------------------- learning


def test_leo_learns_synthetic_glyphs(glyphs):
    # Measured on CPU (1 thread, seed 0): 0.359 before, 0.676 after 80 steps of 4 tasks, backbone trained jointly.
    torch.manual_seed(0)
    before, after = meta_train(LEO(Conv4(hidden=16), 5), glyphs, steps=80, meta_batch=4, lr=1e-3)
    assert_learned("LEO", before, after, at_least=0.55, gain=0.2)
