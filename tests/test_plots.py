"""The pictures of a run: PNG files that open, with the right panels, showing what they claim."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import run_cli
from metacli.algorithms.protonet import ProtoNet
from metacli.data.episodes import EpisodeSampler
from metacli.data.synthetic import SyntheticGlyphs
from metacli.logging.jsonl import read_rows
from metacli.models.conv4 import Conv4
from metacli.plots import curves_figure, episode_figure


@pytest.fixture(scope="module")
def plotted(tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("plots")
    done = run_cli("train", "experiment=smoke", "trainer.plots=true", "trainer.steps=10", "trainer.val_every=5",
                   "trainer.log_every=1", "eval.episodes=5", f"hydra.run.dir={where / 'run'}", cwd=where)
    assert done.returncode == 0, done.stderr
    return where / "run"


def test_a_run_writes_both_pictures(plotted):
    for name, size in (("curves.png", (1000, 380)), ("episode.png", (1200, 780))):
        with Image.open(plotted / name) as image:
            darkest, lightest = image.convert("L").getextrema()
            assert image.size == size and lightest - darkest > 100, name


def test_curves_have_a_loss_and_a_validation_panel_with_every_logged_point(plotted):
    figure = curves_figure(read_rows(plotted / "metrics.jsonl"), "a run")
    loss, val = figure.axes[:2]
    assert len(figure.axes) == 2
    assert list(loss.lines[0].get_xdata()) == list(range(1, 11))
    assert list(val.lines[0].get_xdata()) == [5, 10] and val.get_ylabel() == "accuracy (%)"


def test_the_episode_marks_exactly_the_wrong_predictions():
    torch.manual_seed(0)
    data = SyntheticGlyphs(classes={"train": 5, "val": 5, "test": 5}, per_class=8)
    learner = ProtoNet(Conv4(hidden=8), n_way=5)  # untrained: some predictions are wrong
    sampler = EpisodeSampler(data.split("test"), 5, 2, 2, data.normalize)
    figure = episode_figure(learner, sampler, data, seed=0)
    assert len(figure.axes) == 6 * 10  # five support rows and a query row, ten columns
    queries = figure.axes[-10:]
    red = [axes for axes in queries if axes.title.get_color() == "red"]
    framed = [axes for axes in queries if axes.get_frame_on()]
    episode = next(iter(next(sampler.fixed(1, 0, 1))))
    with learner.evaluation_mode():
        predicted = learner.predict(episode, training=False).argmax(dim=1)
    wrong = int((predicted != episode.query_y).sum())  # 10 queries in all: every one is shown
    assert 0 < wrong and len(red) == len(framed) == wrong
    assert f"{wrong} wrong" in figure._suptitle.get_text()


@pytest.fixture(scope="module")
def shot_sweep(tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("sweep-plots")
    done = run_cli("train", "-m", "experiment=smoke", "task.k_shot=1,3", "seed=0,1", "trainer.plots=true",
                   "trainer.steps=4", "trainer.val_every=2", "eval.episodes=5", f"hydra.sweep.dir={where / 'sweep'}",
                   cwd=where)
    assert done.returncode == 0, done.stderr
    return where / "sweep"


def test_a_sweep_overlays_its_validation_curves_and_plots_scores_against_the_swept_value(shot_sweep):
    from metacli.plots import sweep_figures
    from metacli.report import find_results, rows

    for name in ("sweep_curves.png", "sweep_scores.png"):
        with Image.open(shot_sweep / name) as image:
            darkest, lightest = image.convert("L").getextrema()
            assert lightest - darkest > 100, name
    figures = sweep_figures(find_results([shot_sweep]), table := rows(find_results([shot_sweep])))
    curves, scores = figures["sweep_curves.png"].axes[0], figures["sweep_scores.png"].axes[0]
    # One curve a job; one point a shot count, its seeds pooled.
    assert len(curves.lines) == 4 and {t.get_text() for t in curves.get_legend().texts} == {
        f"seed={s} task.k_shot={k}" for k in (1, 3) for s in (0, 1)}
    test_line = scores.lines[0]
    assert list(test_line.get_xdata()) == [1.0, 3.0] and scores.get_xlabel() == "task.k_shot"
    by_task = {row["task"]: 100 * row["test"] for row in table}
    assert list(test_line.get_ydata()) == pytest.approx([by_task["5w1s"], by_task["5w3s"]])
