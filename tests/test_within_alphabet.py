"""Lake et al.'s within-alphabet one-shot episodes, on the real Omniglot evaluation alphabets."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli
from test_configs import compose

from metacli.build import build_dataset, build_learner
from metacli.data.base import ClassImages
from metacli.data.episodes import Episode
from metacli.data.omniglot import Omniglot
from metacli.data.within_alphabet import WithinAlphabetSampler, alphabets
from metacli.errors import DataError


@pytest.fixture(scope="module")
def evaluation(omniglot_root) -> tuple[Omniglot, ClassImages]:
    data = Omniglot(root=str(omniglot_root), split="background_evaluation", rotations=4)
    return data, data.split("test")


def test_an_episode_is_one_alphabet_one_drawer_each_side(evaluation):
    data, test = evaluation
    sampler = WithinAlphabetSampler(test, 20, data.normalize)
    classes, picks = sampler.draw(200, torch.Generator().manual_seed(0))
    names = test.class_names
    for episode, drawers in zip(classes.tolist(), picks):
        assert len({names[c].split("/")[0] for c in episode}) == 1  # one alphabet
        assert len(set(episode)) == 20 and all("/rot" not in names[c] for c in episode)  # drawn characters only
        support, query = drawers[:, 0], drawers[:, 1]
        assert len(set(support.tolist())) == 1 and len(set(query.tolist())) == 1 and support[0] != query[0]
    batch = sampler.gather(classes[:2], picks[:2])
    assert batch.support_x.shape == (2, 20, 1, 28, 28) and batch.query_x.shape == (2, 20, 1, 28, 28)
    assert torch.equal(batch.query_y[0], torch.arange(20))
    # Every evaluation alphabet with 20 characters takes part, and the draw is fixed by the seed.
    assert {names[c].split("/")[0] for c in classes[:, 0].tolist()} <= set(alphabets(names))
    again, _ = sampler.draw(200, torch.Generator().manual_seed(0))
    assert torch.equal(again, classes)


def test_training_episodes_keep_one_alphabet_rotation_and_separate_drawers(evaluation):
    """``task.train_protocol=within_alphabet``: more shots and queries, each rotation of an alphabet its own group."""
    data, test = evaluation
    sampler = WithinAlphabetSampler(test, 20, data.normalize, k_shot=2, n_query=3, rotated=True)
    classes, picks = sampler.draw(300, torch.Generator().manual_seed(1))
    names = test.class_names
    groups = set()
    for episode, drawers in zip(classes.tolist(), picks):
        parts = [names[c].split("/") for c in episode]
        group = {"/".join(p[:1] + p[2:]) for p in parts}  # <alphabet> or <alphabet>/rotNNN
        assert len(group) == 1 and len(set(episode)) == 20
        groups |= group
        assert (drawers == drawers[0]).all() and len(set(drawers[0].tolist())) == 5  # 2 support + 3 query drawers
    assert any("/rot" in g for g in groups) and any("/rot" not in g for g in groups)
    batch = sampler.gather(classes[:2], picks[:2])
    assert batch.support_x.shape == (2, 40, 1, 28, 28) and batch.query_x.shape == (2, 60, 1, 28, 28)


def test_a_way_no_alphabet_holds_is_one_line(evaluation):
    data, test = evaluation
    with pytest.raises(DataError, match="no alphabet has 60 characters"):
        WithinAlphabetSampler(test, 60, data.normalize, where="test split")


def test_a_run_validates_and_tests_within_alphabets(omniglot_root, tmp_path):
    """``eval.protocol=within_alphabet`` draws validation episodes from the validation alphabets and test episodes
    from the evaluation alphabets, and the results record the protocol with the episodes' fingerprint; training
    episodes may be drawn the same way."""
    run = tmp_path / "run"
    done = run_cli("train", "dataset=omniglot", f"dataset.root={omniglot_root}", "dataset.split=background_evaluation",
                   "backbone.hidden=8", "eval.protocol=within_alphabet", "task.n_way=20", "task.n_query=1",
                   "task.train_protocol=within_alphabet", "task.train_query=2",
                   "trainer.steps=2", "trainer.val_every=2", "trainer.val_episodes=4", "eval.episodes=8",
                   "trainer.plots=false", f"hydra.run.dir={run}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads((run / "results.json").read_text())
    assert results["test_fingerprint"]["protocol"] == "within_alphabet" and len(results["episode_scores"]) == 8
    assert all(abs(score * 20 - round(score * 20)) < 1e-4 for score in results["episode_scores"])  # 20 queries


@pytest.mark.parametrize("experiment,alone", [("protonet_omniglot_lake", True),
                                              ("protonet_omniglot_lake_transductive", False)])
def test_lakes_inductive_recipe_judges_each_query_alone(experiment, alone):
    """The anchors (people, BPL, Koch's Siamese net) judge each query alone: so must the recipe set beside them, and
    BatchNorm on an episode's own statistics would let the other queries move a prediction."""
    # Synthetic glyphs have no alphabets: the recipe's BatchNorm setting is kept, its episodes are not.
    cfg = compose(f"experiment={experiment}", "backbone.hidden=8", "eval.protocol=episodes",
                  "task.train_protocol=episodes")
    learner = build_learner(cfg, build_dataset(compose("dataset=synthetic")))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        learner.backbone(torch.rand(64, 1, 28, 28, generator=generator))  # running averages away from their start
    support, queries = torch.rand(20, 1, 28, 28, generator=generator), torch.rand(2, 20, 1, 28, 28, generator=generator)
    queries[1, 0] = queries[0, 0]  # the same first query among two different sets of others
    with learner.evaluation_mode(), torch.no_grad():
        first = [learner.predict(Episode(support, torch.arange(20), q, torch.arange(20), 20), training=False)[0]
                 for q in queries]
    assert torch.allclose(first[0], first[1]) == alone
