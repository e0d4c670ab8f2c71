"""Sinusoid regression, the first task family beyond classification: the tasks are the paper's, fixed where they
must be; every learner that declares regression runs on them through the same runner; classifiers and image
backbones are refused in one line; and MAML beats the pretrained baseline on the same fixed tasks."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import get_class

from conftest import assert_one_line_error, run_cli
from metacli.config_schema import algo_targets
from metacli.data.sinusoid import Sinusoid
from metacli.plots import regression_figure

REGRESSORS = sorted(name for name, target in algo_targets().items() if "regression" in get_class(target).families)


def test_tasks_follow_the_paper_and_fixed_ones_stay_fixed():
    data = Sinusoid()
    tasks = data.episodes("train", 5, k_shot=10, n_query=15)
    batch = tasks.sample(200, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (200, 10, 1) and batch.query_y.shape == (200, 15, 1)
    x = torch.cat([batch.support_x, batch.query_x], dim=1)
    y = torch.cat([batch.support_y, batch.query_y], dim=1)
    assert x.min() >= -5 and x.max() <= 5 and y.abs().max() <= 5.0
    # |y| of a task never exceeds its amplitude, drawn from [0.1, 5]: over 200 tasks both ends show up.
    peak = y.abs().amax(dim=1)
    assert peak.min() < 0.5 and peak.max() > 4.0
    test = data.episodes("test", 5, 10, 15)
    first = torch.cat([b.query_y for b in test.fixed(30, seed=0, batch_size=7)])
    again = torch.cat([b.query_y for b in test.fixed(30, seed=0, batch_size=30)])
    val = torch.cat([b.query_y for b in data.episodes("val", 5, 10, 15).fixed(30, seed=0, batch_size=30)])
    assert torch.equal(first, again) and not torch.equal(first, val)
    assert data.content_sha256("test") != data.content_sha256("val")


def test_the_curve_is_the_first_fixed_task_on_a_grid():
    tasks = Sinusoid().episodes("test", 5, k_shot=5, n_query=10)
    episode, grid, truth = tasks.curve(seed=3)
    first = next(iter(next(tasks.fixed(1, seed=3, batch_size=1))))
    assert torch.equal(episode.support_x, first.support_x) and torch.equal(episode.support_y, first.support_y)
    assert grid.shape == truth.shape == (200,) and torch.equal(episode.query_y.view(-1), truth)


@pytest.mark.parametrize("algo", REGRESSORS)
def test_every_regression_learner_trains_and_tests_on_sinusoids(algo, tmp_path):
    done = run_cli("train", f"algo={algo}", "dataset=sinusoid", "trainer.steps=4", "trainer.val_every=2",
                   "trainer.val_episodes=10", "trainer.plots=false", "eval.episodes=20",
                   f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["metric"] == "mse" and math.isfinite(results["mse"]) and results["mse"] > 0
    assert results["best_val_mse"] is not None and len(results["episode_scores"]) == 20


def test_maml_on_sinusoids_learns_with_nothing_but_the_dataset_chosen(tmp_path):
    """``dataset=sinusoid algo=maml`` takes the regression settings (conf/algo_on_dataset/), not Omniglot's inner
    step of 0.4, which made the test MSE grow without bound: held out, it beats predicting zero by half."""
    done = run_cli("train", "algo=maml", "dataset=sinusoid", "trainer.steps=1000", "trainer.val_every=500",
                   "trainer.val_episodes=50", "trainer.plots=false", "eval.episodes=200",
                   f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["task"]["k_shot"] == 10
    tasks = next(Sinusoid().episodes("test", 5, k_shot=10, n_query=10).fixed(200, seed=0, batch_size=200))
    zero = tasks.query_y.pow(2).mean().item()
    assert results["mse"] + results["ci95"] < 0.5 * zero


def test_classifiers_and_image_backbones_are_refused(tmp_path):
    assert set(REGRESSORS) >= {"maml", "anil", "meta_sgd", "reptile", "pretrained"}
    done = run_cli("train", "algo=protonet", "dataset=sinusoid", f"hydra.run.dir={tmp_path / 'a'}", cwd=tmp_path)
    assert_one_line_error(done, "ProtoNet cannot learn regression tasks (dataset=sinusoid): use one of algo=anil")
    done = run_cli("train", "algo=maml", "dataset=sinusoid", "backbone=conv4", f"hydra.run.dir={tmp_path / 'b'}",
                   cwd=tmp_path)
    assert_one_line_error(done, "Conv4 takes images, and this dataset's inputs are vectors: use backbone=mlp")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def maml_and_pretrained(tmp_path_factory) -> Path:
    """Both paper protocols, shortened, in one sweep: the same fixed test tasks for both."""
    sweep = tmp_path_factory.mktemp("sinusoid") / "sweep"
    done = run_cli("train", "-m", "experiment=maml_sinusoid,pretrained_sinusoid", "trainer.steps=400",
                   "trainer.val_every=200", "trainer.val_episodes=50", "eval.episodes=200", "trainer.plots=true",
                   f"hydra.sweep.dir={sweep}", cwd=sweep.parent)
    assert done.returncode == 0, done.stderr
    return sweep


def test_maml_beats_the_pretrained_baseline_on_the_same_tasks(maml_and_pretrained):
    runs = {json.loads((run / "results.json").read_text())["algorithm"]: run for run in maml_and_pretrained.iterdir()
            if (run / "results.json").exists()}
    done = run_cli("compare", str(runs["MAML"]), str(runs["Pretrained"]), "--format", "json",
                   cwd=maml_and_pretrained)
    paired = json.loads(done.stdout)
    # Lower is better: MAML's MSE is below the baseline's on most tasks, and the difference is far from noise.
    assert paired["difference"] < 0 and paired["difference"] + paired["ci95"] < 0 and paired["p_value"] < 1e-3
    assert paired["a_wins"] > paired["b_wins"]
    report = run_cli("report", str(maml_and_pretrained), "--format", "json", cwd=maml_and_pretrained)
    rows = {row["algorithm"]: row for row in json.loads(report.stdout)}
    assert rows["MAML"]["metric"] == "mse" and rows["MAML"]["expected"]["mse"] == 0.670


def test_evaluation_changes_the_adaptation_steps_on_the_same_tasks(maml_and_pretrained, tmp_path):
    run = next(r for r in maml_and_pretrained.iterdir()
               if (r / "results.json").exists() and "MAML" in (r / "results.json").read_text())
    for steps in (1, 10):
        done = run_cli("eval", f"checkpoint={run}", f"adapt_steps={steps}", f"hydra.run.dir={tmp_path / str(steps)}",
                       cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    compared = run_cli("compare", str(tmp_path / "10"), str(tmp_path / "1"), "--format", "json", cwd=tmp_path)
    assert compared.returncode == 0, compared.stderr  # same fingerprint: the same tasks, only the steps differ
    refused = run_cli("eval", f"checkpoint={run}", "adapt_steps=1", "task.k_shot=5", f"hydra.run.dir={tmp_path / 'k5'}",
                      cwd=tmp_path)
    assert refused.returncode == 0 and json.loads((tmp_path / "k5" / "results.json").read_text())["task"]["k_shot"] == 5


def test_the_picture_shows_the_support_the_truth_and_the_adapted_curve(maml_and_pretrained):
    from metacli import load_learner

    run = next(r for r in maml_and_pretrained.iterdir()
               if (r / "results.json").exists() and "MAML" in (r / "results.json").read_text())
    assert (run / "episode.png").stat().st_size > 10_000 and (run / "curves.png").is_file()
    learner = load_learner(run).learner
    figure = regression_figure(learner, Sinusoid().episodes("test", 5, k_shot=10, n_query=10), seed=0)
    axes = figure.axes[0]
    assert [line.get_label() for line in axes.lines] == ["truth", "after adapting"]
    assert len(axes.collections[0].get_offsets()) == 10 and axes.get_title().startswith("one test task: MSE")
