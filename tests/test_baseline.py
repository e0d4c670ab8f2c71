"""Baseline / Baseline++ and the non-episodic training mode: image mini-batches, the class count filled in by the
builder, per-episode head fitting that is deterministic and leaves no trace, and learning on synthetic glyphs."""
from __future__ import annotations

import json

import hydra
import pytest
import torch

import metacli.cli
from metacli.algorithms.baseline import Baseline, CosineClassifier
from metacli.build import build_dataset, build_learner, training_batches
from metacli.config_schema import register
from metacli.data.batches import ImageBatchSampler, LabelledBatch
from metacli.data.episodes import EpisodeBatch
from metacli.errors import ConfigError, DataError
from metacli.models.conv4 import Conv4
from metacli.execution.meta_batch import meta_train_step

from conftest import run_cli
from learning import assert_learned, episode, meta_train

pytestmark = pytest.mark.usefixtures("one_thread")


def compose(*overrides: str):
    register()
    with hydra.initialize_config_dir(config_dir=str(metacli.cli.config_dir()), version_base="1.3"):
        return hydra.compose("train", overrides=list(overrides))


def small_baseline(n_classes: int = 200, **kwargs) -> Baseline:
    return Baseline(Conv4(hidden=8), 5, n_classes=n_classes, **kwargs)


# ---------------------------------------------------------------- non-episodic data


def test_image_batches_are_labelled_with_their_class(glyphs):
    data = glyphs.split("train")
    sampler = ImageBatchSampler(data, glyphs.normalize)
    batch = sampler.sample(64, torch.Generator().manual_seed(0))
    assert isinstance(batch, LabelledBatch) and len(batch) == 64 and batch.n_classes == data.n_classes
    assert batch.x.shape == (64, 1, 28, 28) and batch.x.is_contiguous(memory_format=torch.channels_last)
    for image, label in zip(batch.x[:8], batch.y[:8]):
        # Each image is one of its class's images, normalised as the dataset does.
        candidates = glyphs.normalize(data.images[label])
        assert any(torch.equal(image, candidate) for candidate in candidates)
    assert len(set(batch.y.tolist())) > 30, "a batch should span many classes"


def test_image_batches_follow_the_generator(glyphs):
    sampler = ImageBatchSampler(glyphs.split("train"), glyphs.normalize)
    first = sampler.sample(16, torch.Generator().manual_seed(3))
    again = sampler.sample(16, torch.Generator().manual_seed(3))
    other = sampler.sample(16, torch.Generator().manual_seed(4))
    assert torch.equal(first.x, again.x) and torch.equal(first.y, again.y)
    assert not torch.equal(first.y, other.y)


def test_one_class_is_a_data_error(glyphs):
    data = glyphs.split("train")
    one = type(data)(data.images[:1], data.class_names[:1])
    with pytest.raises(DataError, match="at least 2 classes"):
        ImageBatchSampler(one, glyphs.normalize)


def test_the_learner_decides_what_a_training_step_consumes():
    cfg = compose("algo=baseline", "dataset=synthetic", "backbone.hidden=8", "trainer.batch_size=12")
    dataset = build_dataset(cfg)
    learner = build_learner(cfg, dataset)
    assert learner.classifier.out_features == dataset.split("train").n_classes == 200
    batch = training_batches(cfg, learner, dataset, "cpu")(torch.Generator())
    assert isinstance(batch, LabelledBatch) and len(batch) == 12
    cfg = compose("algo=protonet", "dataset=synthetic", "backbone.hidden=8", "trainer.meta_batch=3")
    protonet = build_learner(cfg, dataset)
    batch = training_batches(cfg, protonet, dataset, "cpu")(torch.Generator())
    assert isinstance(batch, EpisodeBatch) and len(batch) == 3


def test_a_fixed_way_learner_refuses_a_higher_training_way():
    cfg = compose("algo=maml", "dataset=synthetic", "backbone.hidden=8", "task.train_way=10")
    dataset = build_dataset(cfg)
    with pytest.raises(ConfigError, match="task.train_way=10 must equal task.n_way=5"):
        training_batches(cfg, build_learner(cfg, dataset), dataset, "cpu")


# ---------------------------------------------------------------- the learner


def test_training_is_cross_entropy_over_all_training_classes(glyphs):
    torch.manual_seed(0)
    learner = small_baseline()
    batch = ImageBatchSampler(glyphs.split("train"), glyphs.normalize).sample(16, torch.Generator().manual_seed(0))
    metrics = meta_train_step(learner, batch)
    expected = torch.nn.functional.cross_entropy(learner.classifier(learner.backbone(batch.x)), batch.y)
    assert metrics["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.parameters())


def test_cosine_head_is_scaled_cosine_similarity():
    head = CosineClassifier(3, 2, scale=4.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]))
    logits = head(torch.tensor([[3.0, 0.0, 0.0], [1.0, 1.0, 0.0]]))
    assert torch.allclose(logits, torch.tensor([[4.0, 0.0], [4 / 2 ** 0.5, 4 / 2 ** 0.5]]))
    assert isinstance(small_baseline(head="cosine").classifier, CosineClassifier)


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_test_time_head_is_deterministic_and_leaves_no_trace(glyphs, head):
    torch.manual_seed(0)
    learner = small_baseline(head=head, finetune_epochs=10)
    ep = episode(glyphs, seed=5, n_way=7)  # any way at test time
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    rng = torch.get_rng_state()
    with torch.no_grad(), learner.evaluation_mode():
        first = learner.predict(ep, training=False)
        second = learner.predict(ep, training=False)
    assert first.shape == (len(ep.query_y), 7) and torch.equal(first, second)
    assert torch.equal(torch.get_rng_state(), rng), "fitting a head must not move the run's RNG"
    after = learner.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_fitted_head_separates_the_support_set(glyphs):
    torch.manual_seed(0)
    learner = Baseline(Conv4(hidden=32), 5, n_classes=10)  # the paper's 100 epochs
    ep = episode(glyphs, seed=1)
    with torch.no_grad(), learner.evaluation_mode():
        support = learner.backbone(ep.support_x)
        head = learner.fit_head(support, ep.support_y, 5)
        assert (head(support).argmax(dim=1) == ep.support_y).all()


@pytest.mark.parametrize("kwargs,key", [({"head": "mlp"}, "algo.head"), ({"n_classes": None}, "algo.n_classes"),
                                        ({"finetune_lr": 0.0}, "algo.finetune_lr")])
def test_constructor_checks(kwargs, key):
    with pytest.raises(ValueError, match=key):
        small_baseline(**{"n_classes": 10, **kwargs})


# ---------------------------------------------------------------- learning


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_baseline_learns_synthetic_glyphs(glyphs, head):
    torch.manual_seed(0)
    learner = Baseline(Conv4(hidden=16), 5, n_classes=glyphs.split("train").n_classes, head=head,
                       finetune_epochs=50)
    before, after = meta_train(learner, glyphs, steps=300, meta_batch=64, lr=3e-3)
    assert_learned(f"Baseline ({head} head)", before, after, at_least=0.5, gain=0.2)


def test_cli_trains_and_resumes_a_non_episodic_run(tmp_path):
    base = ["experiment=smoke", "algo=baseline", "algo.finetune_epochs=5", "trainer.batch_size=32",
            "trainer.val_every=5", "trainer.log_every=5", "eval.episodes=10"]
    straight = run_cli("train", *base, "trainer.steps=10", f"hydra.run.dir={tmp_path / 'straight'}", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    first = run_cli("train", *base, "trainer.steps=5", f"hydra.run.dir={tmp_path / 'resumed'}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    second = run_cli("train", *base, "trainer.steps=10", "trainer.resume=true", f"hydra.run.dir={tmp_path / 'resumed'}",
                     cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    results = [json.loads((tmp_path / name / "results.json").read_text()) for name in ("straight", "resumed")]
    assert results[0] == results[1] and results[0]["algorithm"] == "Baseline"
    assert (tmp_path / "straight" / "metrics.jsonl").read_text() == (tmp_path / "resumed" / "metrics.jsonl").read_text()
