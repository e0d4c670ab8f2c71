"""Runs and sweeps never overwrite each other: a new run or sweep job refuses any dir that holds a run's records,
a resume keeps the run's own config, and ``trainer.steps=0`` says that it tests the initialisation."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import assert_one_line_error, run_cli, snapshot

FAST = ["experiment=smoke", "trainer.steps=2", "trainer.val_every=1", "trainer.val_episodes=2", "eval.episodes=2"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("sweep")
    done = run_cli("train", "-m", *FAST, "seed=0,1", f"hydra.sweep.dir={where / 'sweep'}", cwd=where)
    assert done.returncode == 0, done.stderr
    return where / "sweep"


@pytest.fixture
def finished(sweep, tmp_path) -> Path:
    """A finished run of this test's own (a sweep job's dir)."""
    return Path(shutil.copytree(sweep / "0", tmp_path / "run"))


def test_a_new_run_refuses_a_finished_run_without_last_pt(finished, tmp_path):
    for name in ("last.pt", "last.pt.prev"):
        (finished / name).unlink(missing_ok=True)
    before = snapshot(finished)
    done = run_cli("train", *FAST, f"hydra.run.dir={finished}", cwd=tmp_path)
    assert_one_line_error(done, "already holds a run (best.pt")
    done = run_cli("train", *FAST, "trainer.resume=true", f"hydra.run.dir={finished}", cwd=tmp_path)
    assert_one_line_error(done, "but no last.pt to continue from")
    assert snapshot(finished) == before


def test_a_new_sweep_refuses_a_sweep_dir_with_runs(sweep, tmp_path):
    copy = Path(shutil.copytree(sweep, tmp_path / "sweep"))
    before = snapshot(copy)
    done = run_cli("train", "-m", *FAST, "seed=0,1", f"hydra.sweep.dir={copy}", cwd=tmp_path)
    assert_one_line_error(done, "already holds the runs of a sweep (0, 1): continue them with trainer.resume=true")
    assert snapshot(copy) == before


def test_a_sweep_job_refuses_a_dir_another_job_wrote(tmp_path):
    # Both jobs map to one subdir: the second one must stop, leaving the first one's run whole.
    sweep = tmp_path / "sweep"
    done = run_cli("train", "-m", *FAST, "seed=0,1", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=same",
                   cwd=tmp_path)
    assert_one_line_error(done, f"{sweep / 'same'} already holds a run")
    assert "seed=0" in (sweep / "same" / ".hydra" / "overrides.yaml").read_text()
    assert json.loads((sweep / "same" / "results.json").read_text())["episodes"] == 2


def test_a_resumed_sweep_keeps_each_job_config(sweep, tmp_path):
    copy = Path(shutil.copytree(sweep, tmp_path / "sweep"))
    configs = {job: (copy / job / ".hydra" / "config.yaml").read_bytes() for job in ("0", "1")}
    done = run_cli("train", "-m", *FAST, "trainer.steps=3", "trainer.resume=true", "seed=0,1",
                   f"hydra.sweep.dir={copy}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for job, config in configs.items():
        assert (copy / job / ".hydra" / "config.yaml").read_bytes() == config
        assert "steps: 3" in (copy / job / ".hydra" / "resumed" / "config.yaml").read_text()


def test_a_read_only_sweep_dir_is_one_line(tmp_path):
    done = run_cli("train", "-m", *FAST, "seed=0,1", "hydra.sweep.dir=/proc/metacli-sweep", cwd=tmp_path)
    assert_one_line_error(done, "cannot write into /proc")


def test_zero_steps_test_the_initialisation_and_say_so(tmp_path):
    done = run_cli("train", *FAST, "trainer.steps=0", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "trainer.steps=0: no meta-training; testing the initialisation" in done.stdout + done.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["weights"] == "initialisation" and results["checkpoint_step"] is None


def test_a_failed_start_leaves_no_run_or_sweep_dir_behind(finished, tmp_path):
    missing = ["dataset=omniglot", f"dataset.root={tmp_path / 'nowhere'}"]
    run, sweep = tmp_path / "runs" / "new", tmp_path / "sweeps" / "new"
    assert_one_line_error(run_cli("train", *missing, f"hydra.run.dir={run}", cwd=tmp_path), "Omniglot not found")
    assert not run.exists() and (tmp_path / "runs").is_dir()
    # The flag after the overrides, as users write it.
    assert_one_line_error(run_cli("train", *missing, "seed=0,1", f"hydra.sweep.dir={sweep}", "-m", cwd=tmp_path),
                          "Omniglot not found")
    assert not sweep.exists()
    # A resume that fails keeps the run it would have continued (and the config it was tried with).
    before = snapshot(finished)
    done = run_cli("train", *FAST, *missing, "trainer.resume=true", f"hydra.run.dir={finished}", cwd=tmp_path)
    assert_one_line_error(done, "Omniglot not found")
    after = snapshot(finished)
    assert {name: data for name, data in after.items() if name.parts[:2] != (".hydra", "resumed")} == before
