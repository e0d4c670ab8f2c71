"""Shared helpers for the algorithm tests: synthetic-glyph episodes, and held-out accuracy before and after
meta-training (how every "it learns" test is measured). The ``glyphs`` fixture lives in conftest.py."""
from __future__ import annotations

import torch

from metacli.algorithms.base import FewShotLearner
from metacli.data.batches import ImageBatchSampler
from metacli.data.episodes import Episode, EpisodeSampler
from metacli.data.synthetic import SyntheticGlyphs
from metacli.evaluation import score
from metacli.execution.precision import training_precision
from metacli.execution.meta_batch import meta_train_step


def sampler(glyphs: SyntheticGlyphs, split: str = "train", n_way: int = 5, k_shot: int = 1, n_query: int = 5) -> EpisodeSampler:
    return EpisodeSampler(glyphs.split(split), n_way, k_shot, n_query, glyphs.normalize)


def batch(glyphs, size: int = 2, seed: int = 0, **shape):
    return sampler(glyphs, **shape).sample(size, torch.Generator().manual_seed(seed))


def episode(glyphs, seed: int = 0, **shape) -> Episode:
    return next(iter(batch(glyphs, 1, seed, **shape)))


def meta_train(learner: FewShotLearner, glyphs, steps: int, meta_batch: int, lr: float,
               optimizer=torch.optim.Adam, precision: str = "fp32") -> tuple[float, float]:
    """Held-out (test split) accuracy on 50 fixed 5-way 1-shot episodes, before and after meta-training.

    A non-episodic learner trains on mini-batches of ``meta_batch`` images from all training classes instead.
    ``precision`` is the training steps' (``trainer.precision``); scoring stays in float32, as in the runner.
    """
    test = sampler(glyphs, "test")
    before = score(learner, test, episodes=50, seed=0, batch_size=25)["accuracy"]
    optimizer = optimizer(learner.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    episodic = learner.training_data == "episodes"
    train = sampler(glyphs, "train") if episodic else ImageBatchSampler(glyphs.split("train"), glyphs.normalize)
    for _ in range(steps):
        learner.train()
        optimizer.zero_grad(set_to_none=True)
        with training_precision(precision, torch.device("cpu")):
            metrics = meta_train_step(learner, train.sample(meta_batch, generator))
        assert torch.isfinite(torch.tensor(metrics["loss"]))
        optimizer.step()
    after = score(learner, test, episodes=50, seed=0, batch_size=25)["accuracy"]
    return before, after


def assert_learned(name: str, before: float, after: float, at_least: float, gain: float) -> None:
    """The "it learns" criterion: held-out accuracy of at least ``at_least`` and a gain of ``gain`` over the
    initialisation's own adaptation (chance is 0.2 in 5-way)."""
    print(f"{name} 5-way 1-shot test accuracy: {before:.3f} -> {after:.3f}")
    assert after >= at_least, f"{name} reached only {after:.3f} (chance is 0.2)"
    assert after - before >= gain, f"{name} improved only from {before:.3f} to {after:.3f}"


def train_a_little(learner: FewShotLearner, glyphs, steps: int = 2, lr: float = 1e-3) -> FewShotLearner:
    """A few meta-steps, so that the weights and BatchNorm's running statistics leave their initial values."""
    optimizer = torch.optim.Adam(learner.parameters(), lr=lr)
    for seed in range(steps):
        optimizer.zero_grad()
        meta_train_step(learner, batch(glyphs, seed=seed))
        optimizer.step()
    learner.zero_grad(set_to_none=True)
    return learner


def assert_evaluation_leaves_no_trace(learner: FewShotLearner, ep: Episode) -> torch.Tensor:
    """Evaluation is deterministic, agrees with ``evaluate_episode``, and changes no state, gradient or training
    flag. Returns the evaluation logits."""
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    with torch.no_grad(), learner.evaluation_mode():
        first, second = learner.predict(ep, training=False), learner.predict(ep, training=False)
    assert torch.equal(first, second) and torch.isfinite(first).all()
    accuracy = learner.evaluate_episode(ep)
    assert accuracy == (first.argmax(dim=1) == ep.query_y).float().mean().item()
    after = learner.state_dict()
    assert not [k for k in before if not torch.equal(before[k], after[k])], "evaluation changed the state"
    assert all(p.grad is None for p in learner.parameters()), "evaluation must not accumulate gradients"
    assert learner.training
    return first
