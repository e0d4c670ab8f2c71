"""Generative meta-learning (FIGR) and the generative protocol: the measures say what they claim (a copier fails the
copy check, equal distributions have no Fréchet distance), FIGR's meta-update is Reptile's and its adaptation is
seeded, a run scores against the judge's ceiling and floor, writes its grid and resumes exactly, and bad settings are
one line."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_one_line_error, run_cli, straight_and_resumed
from metacli.algorithms.figr import FIGR
from metacli.data.trajectories import TrajectoryBatch
from metacli.generative import frechet_distance, nearest_distance
from test_wandb import run_file


def test_the_measures_say_what_they_claim():
    generator = torch.Generator().manual_seed(0)
    conditioning = torch.rand(4, 1, 28, 28, generator=generator)
    # A generator that returns its inputs is at distance 0 from them; other images are not.
    assert (nearest_distance(conditioning[[0, 2, 3]], conditioning) == 0).all()
    assert (nearest_distance(torch.rand(5, 1, 28, 28, generator=generator), conditioning) > 0.3).all()
    a, b = torch.randn(2, 4000, 8, generator=generator)
    assert frechet_distance(a, b) < 0.05
    assert 1.8 < frechet_distance(a, b + 0.5) < 2.2  # the means 0.5 apart in 8 dimensions: 8 * 0.25
    assert 7.5 < frechet_distance(a, 2 * b) < 8.5  # covariances I and 4I: 8 * (1 + 4 - 2 * 2)


def test_the_meta_update_is_reptiles_and_adaptation_is_seeded():
    torch.manual_seed(0)
    figr = FIGR(None, 5, z_dim=8, hidden=4, inner_steps=2, test_inner_steps=3)
    images = torch.rand(1, 4, 1, 28, 28)
    batch = TrajectoryBatch(images, torch.zeros(1, 4, dtype=torch.long), images[:, :0], torch.zeros(1, 0),
                            torch.zeros(1, 1, dtype=torch.long))
    state = torch.get_rng_state()
    losses, _ = figr.batch_loss(batch)
    losses.sum().backward()
    torch.set_rng_state(state)  # the same task noise: the same adaptation
    seed = int(torch.randint(2 ** 62, (1,)))
    gen, critic, _ = figr.adapt(images[0], 2, torch.Generator().manual_seed(seed))
    adapted = {**{f"generator.{n}": p for n, p in gen.named_parameters()},
               **{f"critic.{n}": p for n, p in critic.named_parameters()}}
    for name, parameter in figr.named_parameters():
        assert torch.allclose(parameter.grad, parameter.detach() - adapted[name].detach(), atol=1e-7), name
    assert any(parameter.grad.abs().max() > 0 for parameter in figr.parameters())
    first, floor = figr.draw(images[0], 6, seed=3)
    again, _ = figr.draw(images[0], 6, seed=3)
    assert first.shape == (6, 1, 28, 28) and torch.equal(first, again) and 0 <= first.min() and first.max() <= 1
    assert not torch.equal(first, floor)


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    """A ProtoNet judge trained briefly on the synthetic glyphs."""
    folder = tmp_path_factory.mktemp("judge")
    done = run_cli("train", "experiment=smoke", "trainer.steps=40", f"hydra.run.dir={folder / 'run'}", cwd=folder)
    assert done.returncode == 0, done.stderr
    return folder / "run"


def test_a_figr_run_is_judged_draws_its_grid_and_resumes_exactly(judge, tmp_path):
    # smoke_figr has no schedule: FIGR's anneals eps over trainer.steps, which the 4-step first part would shorten.
    common = ["experiment=smoke_figr", f"eval.generative.judge={judge}", "trainer.checkpoint_every=2"]
    first, second, done = straight_and_resumed(common, tmp_path, ("trainer.plots=true", "logger=wandb"),
                                               env={"WANDB_MODE": "offline"})
    straight = tmp_path / "straight"
    assert first["generative"] == second["generative"] and first["episode_scores"] == second["episode_scores"]
    scored = first["generative"]
    # The judge recognises real held-out images of its own kind of data far above chance (1/5).
    assert scored["ceiling"]["accuracy"] > 0.6 and len(first["episode_scores"]) == 3
    assert scored["copy_distance"]["real"]["distance"] > 0 and scored["frechet"]["generated"] >= 0
    assert (straight / "generation.png").stat().st_size > 10_000
    summary = run_file(straight)["summary"]
    assert summary["test/accuracy"] == first["accuracy"] and summary["test/floor/accuracy"] == scored["floor"]["accuracy"]
    assert summary["test/copy_distance/generated"] == scored["copy_distance"]["generated"]["distance"]
    assert list((straight / "wandb").rglob("media/images/plots/generation_*.png"))  # the grid, as a W&B image
    assert "recognisability" in done.stdout and "ceiling" in done.stdout


def test_figr_draws_recognisable_new_characters_on_real_omniglot(omniglot_root, tmp_path):
    """Meta-trained briefly on the background characters, adapted to 4 images of each unseen evaluation character:
    the judge recognises its samples above the unadapted generator's, and they are no copies."""
    data = ["dataset=omniglot", f"dataset.root={omniglot_root}", "dataset.split=background_evaluation",
            "dataset.rotations=1", "device=cpu", "trainer.progress=false", "trainer.plots=false"]
    # One thread: the networks are small, and more threads only contend (several times slower on a busy machine).
    one = {"OMP_NUM_THREADS": "1"}
    done = run_cli("train", "algo=protonet", *data, "trainer.steps=100", "trainer.val_every=100",
                   "trainer.val_episodes=10", "eval.episodes=10",
                   f"hydra.run.dir={tmp_path / 'judge'}", cwd=tmp_path, env=one)
    assert done.returncode == 0, done.stderr
    done = run_cli("train", "algo=figr", *data, "algo.inner_steps=5", "algo.test_inner_steps=20", "trainer.steps=200",
                   "trainer.val_every=200", "trainer.val_episodes=2", "eval.episodes=10",
                   f"eval.generative.judge={tmp_path / 'judge'}", f"hydra.run.dir={tmp_path / 'figr'}", cwd=tmp_path,
                   env=one)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "figr" / "results.json").read_text())
    scored = results["generative"]
    # Measured: 35.2 ± 3.8 % against the floor's 19.0 ± 3.3 % (chance 20 %), real images 96.4 %.
    assert results["accuracy"] - results["ci95"] > scored["floor"]["accuracy"] + scored["floor"]["ci95"], scored
    assert scored["ceiling"]["accuracy"] > 0.9
    # No copies: as far from the images it adapted to as other drawers' images are (a copier is at 0).
    assert scored["copy_distance"]["generated"]["distance"] > 0.8 * scored["copy_distance"]["real"]["distance"]
    assert scored["frechet"]["generated"] < scored["frechet"]["unadapted"]


@pytest.mark.parametrize("overrides, needle", [
    (["algo=figr"], "eval.protocol=generative needs a judge"),
    (["algo=figr", "eval.protocol=episodes"], "FIGR generates images: score it with eval.protocol=generative"),
    (["eval.protocol=generative"], "ProtoNet draws none: use algo=figr"),
    (["algo=figr", "eval.generative.samples=15", "eval.generative.judge=JUDGE"],
     "held-out images a character, but synthetic has 20"),
])
def test_bad_generative_settings_are_one_line(overrides, needle, judge, tmp_path):
    overrides = [o.replace("JUDGE", str(judge)) for o in overrides]
    done = run_cli("train", "experiment=smoke_figr" if "algo=figr" in overrides else "experiment=smoke",
                   *(o for o in overrides if o != "algo=figr"), f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert_one_line_error(done, needle)
