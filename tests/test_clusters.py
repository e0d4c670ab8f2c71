"""Runs on schedulers: a submitit job preempted and requeued resumes its own run by itself; another job is still
refused the dir; the SLURM launcher config asks for requeueing."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import yaml

from conftest import assert_one_line_error, metacli_command, run_cli

RUN = ["experiment=smoke", "trainer.meta_batch=4", "trainer.steps=120", "trainer.val_every=60",
       "trainer.checkpoint_every=20", "eval.episodes=40"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def scores(run_dir) -> list[float]:
    return json.loads((run_dir / "results.json").read_text())["episode_scores"]


def test_a_preempted_submitit_job_is_requeued_and_resumes(tmp_path):
    sweep = tmp_path / "sweep"
    launcher = subprocess.Popen([metacli_command(), "train", "-m", "hydra/launcher=submitit_local", *RUN,
                                 f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env={**os.environ, **ONE_THREAD},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (sweep / "0" / "last.pt").exists():
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
        time.sleep(0.05)
    job = subprocess.run(["pgrep", "-f", f"submitit.core._submit {sweep}"], capture_output=True, text=True)
    os.kill(int(job.stdout.split()[0]), signal.SIGUSR2)  # what SLURM sends before preempting, as submitit asks
    _, stderr = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, stderr
    log = (sweep / "0" / "train.log").read_text()
    assert "started again by its scheduler: resuming it" in log and "resumed from" in log
    job_logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
    assert "this job is preempted" in job_logs and "Requeued job" in log + job_logs  # by submitit, not by hand
    alone = run_cli("train", *RUN, f"hydra.run.dir={tmp_path / 'alone'}", cwd=tmp_path, env=ONE_THREAD)
    assert alone.returncode == 0, alone.stderr
    assert scores(sweep / "0") == scores(tmp_path / "alone")  # exactly the uninterrupted run


def test_only_the_same_job_takes_its_run_dir_back(tmp_path):
    run = ["train", "experiment=smoke", "trainer.steps=10", f"hydra.run.dir={tmp_path / 'run'}"]
    first = run_cli(*run, cwd=tmp_path, env={**ONE_THREAD, "SLURM_JOB_ID": "1001"})
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "run" / ".metacli-job").read_text().strip() == "slurm:1001"
    assert_one_line_error(run_cli(*run, cwd=tmp_path, env={**ONE_THREAD, "SLURM_JOB_ID": "1002"}),
                          "already holds a run")
    assert_one_line_error(run_cli(*run, cwd=tmp_path, env=ONE_THREAD), "already holds a run")
    requeued = run_cli(*run, cwd=tmp_path, env={**ONE_THREAD, "SLURM_JOB_ID": "1001"})
    assert requeued.returncode == 0, requeued.stderr
    assert "resuming it" in (tmp_path / "run" / "train.log").read_text()


def test_the_slurm_launcher_requeues_with_a_warning_signal(tmp_path):
    done = run_cli("train", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    launcher = yaml.safe_load(done.stdout)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("SlurmLauncher") and launcher["partition"] == "gpu"
    assert launcher["additional_parameters"] == {"requeue": True} and launcher["signal_delay_s"] >= 60
    assert launcher["gpus_per_node"] == 1 and launcher["timeout_min"] > 0 and launcher["max_num_timeout"] > 0
