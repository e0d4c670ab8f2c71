"""The vmap path over a meta-batch gives the serial loop's meta-gradient, and `algo.vectorize` picks between them."""
from __future__ import annotations

import pytest
import torch

from metacli.algorithms.inner_loop import use_vectorized
from metacli.algorithms.maml import MAML
from metacli.data.episodes import EpisodeBatch
from metacli.models.conv4 import Conv4

pytestmark = pytest.mark.usefixtures("one_thread")


def meta_gradient(learner: MAML, batch: EpisodeBatch, vectorize: bool) -> tuple[dict, dict]:
    learner.vectorize = vectorize
    learner.zero_grad()
    metrics = learner.meta_train_step(batch)
    return {name: p.grad.clone() for name, p in learner.named_parameters()}, metrics


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("pool", ["max", "stride"])
def test_vmap_and_serial_meta_gradients_agree(first_order, steps, pool):
    torch.manual_seed(0)
    learner = MAML(Conv4(hidden=8, pool=pool), n_way=5, inner_lr=0.4, inner_steps=steps,
                   first_order=first_order).double()
    batch = EpisodeBatch(torch.rand(6, 5, 1, 28, 28, dtype=torch.float64), torch.arange(5).expand(6, -1),
                         torch.rand(6, 15, 1, 28, 28, dtype=torch.float64), torch.arange(5).repeat(3).expand(6, -1), 5)
    serial, serial_metrics = meta_gradient(learner, batch, vectorize=False)
    vectorized, vector_metrics = meta_gradient(learner, batch, vectorize=True)
    assert max(g.abs().max().item() for g in serial.values()) > 1e-4  # a real, non-zero meta-gradient
    for name in serial:
        torch.testing.assert_close(vectorized[name], serial[name], rtol=1e-9, atol=1e-12, msg=name)
    assert serial_metrics == pytest.approx(vector_metrics, rel=1e-9)


def test_vmap_path_differs_between_first_and_second_order():
    torch.manual_seed(0)
    learner = MAML(Conv4(hidden=8), n_way=5, vectorize=True)
    batch = EpisodeBatch(torch.rand(3, 5, 1, 28, 28), torch.arange(5).expand(3, -1), torch.rand(3, 10, 1, 28, 28),
                         torch.arange(5).repeat(2).expand(3, -1), 5)
    second, _ = meta_gradient(learner, batch, vectorize=True)
    learner.first_order = True
    first, _ = meta_gradient(learner, batch, vectorize=True)
    assert not torch.allclose(first["backbone.features.0.weight"], second["backbone.features.0.weight"])


def test_vectorize_switch():
    assert use_vectorized("auto", torch.device("cuda")) and not use_vectorized("auto", torch.device("cpu"))
    assert use_vectorized(True, torch.device("cpu")) and not use_vectorized(False, torch.device("cuda"))
    with pytest.raises(ValueError, match="vectorize must be"):
        MAML(Conv4(hidden=8), n_way=5, vectorize="sometimes")
    with pytest.raises(ValueError, match="bn_mode=running"):
        MAML(Conv4(hidden=8), n_way=5, vectorize=True, bn_mode="running")
