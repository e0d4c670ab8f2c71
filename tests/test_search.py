"""Ready Optuna searches that select on validation and resume: 3 trials, the search killed during the second,
rerun with the same command, end with 3 complete trials in fresh job dirs, the killed one marked failed."""
from __future__ import annotations

import pytest

import json
import signal
import subprocess
from pathlib import Path

import optuna

from conftest import assert_one_line_error, metacli_command, run_cli, snapshot
from test_reliability import wait_for


def search_command(where: Path) -> list[str]:
    return [metacli_command(), "train", "-m", "hparams_search=protonet", "experiment=smoke", "trainer.steps=30",
            "trainer.val_every=15", "trainer.val_episodes=4", "trainer.log_every=1", "eval.episodes=2",
            "hydra.sweeper.n_trials=3", "hydra.sweeper.study_name=resume-test",
            f"hydra.sweeper.storage=sqlite:///{where / 'study.db'}", f"hydra.sweep.dir={where / 'search'}"]


def states(where: Path) -> list[str]:
    study = optuna.load_study(study_name="resume-test", storage=f"sqlite:///{where / 'study.db'}")
    return [trial.state.name for trial in study.trials]


def test_a_killed_search_resumes_to_the_configured_number_of_trials(tmp_path):
    search = tmp_path / "search"
    process = subprocess.Popen(search_command(tmp_path), cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    # The first trial finished, the second one is training.
    wait_for(lambda: (search / "0" / "results.json").exists() and (search / "1" / "metrics.jsonl").exists()
             and (search / "1" / "metrics.jsonl").read_text().count("\n") >= 3, process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert states(tmp_path) == ["COMPLETE", "RUNNING"]
    killed = snapshot(search / "1")

    done = subprocess.run(search_command(tmp_path), cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert states(tmp_path) == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert snapshot(search / "1") == killed, "the killed trial's dir is left as it was"
    study = optuna.load_study(study_name="resume-test", storage=f"sqlite:///{tmp_path / 'study.db'}")
    for trial, job in zip((t for t in study.trials if t.state.name == "COMPLETE"), ("0", "2", "3")):
        results = json.loads((search / job / "results.json").read_text())
        assert trial.value == results["best_val_accuracy"], "the search selects on validation, not on test"
        assert results["task"]["n_way"] == 5 and "train_way" in str(trial.params)

    # The report keeps trials apart (other hyperparameters, not other seeds): one row, one run each.
    report = run_cli("report", str(search), "--format", "json", cwd=tmp_path)
    assert report.returncode == 0 and [len(row["runs"]) for row in json.loads(report.stdout)] == [1, 1, 1]

    again = subprocess.run(search_command(tmp_path), cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 0 and states(tmp_path) == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert not (search / "4").exists()


def test_a_launcher_that_is_not_installed_is_one_line(tmp_path):
    done = run_cli("train", "-m", "hydra/launcher=ray", "seed=0,1", cwd=tmp_path)
    assert_one_line_error(done, "hydra/launcher=ray is not installed: pip install hydra-ray-launcher")


@pytest.mark.parametrize("launcher", ["slurm", "submitit_slurm"])
def test_slurm_without_slurm_is_one_line(launcher, tmp_path):
    done = run_cli("train", "-m", f"hydra/launcher={launcher}", "seed=0,1", cwd=tmp_path)
    assert_one_line_error(done, f"hydra/launcher={launcher} submits to SLURM, but sbatch is not on this machine")
    assert not (tmp_path / "outputs").exists()
