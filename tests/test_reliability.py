"""Reliability: exact resume after SIGKILL, preemption checkpoints, verified checkpoints with fallback, failed
writes, NaN handling, the run-dir lock, saved configs that cannot run code, and no secrets in the outputs.

Every run here is a real ``metacli train`` subprocess on synthetic glyphs; kills are real signals.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import metacli_command, run_cli
from metacli.logging.jsonl import JsonlLogger
from metacli.reliability.atomic import replace_file
from metacli.reliability.checkpoint import (LAST, CheckpointError, load_checkpoint, load_latest_good, previous,
                                           save_checkpoint)
from metacli.reliability.preemption import INTERRUPT_EXIT_CODE, REQUEUE_EXIT_CODE
from metacli.reliability.rng import capture_rng

# 60 short steps: long enough to be killed at a chosen moment, checkpoints every 7 steps between validations.
RUN = ["experiment=smoke", "trainer.steps=60", "trainer.val_every=20", "trainer.checkpoint_every=7",
       "trainer.log_every=1", "eval.episodes=200", "logger=jsonl"]


def start(run_dir: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([metacli_command(), "train", *RUN, *extra, f"hydra.run.dir={run_dir}"], cwd=run_dir.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def rows(run_dir: Path) -> list[dict]:
    """The complete rows of a run's metrics so far: the run may be writing its last line while we read."""
    path = run_dir / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()]


def wait_for(condition, process: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended before the moment to interrupt it: {process.communicate()}"
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("timed out waiting for the moment to interrupt the run")
        time.sleep(0.002)


def resume(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    done = run_cli("train", *RUN, *extra, "trainer.resume=true", f"hydra.run.dir={run_dir}", cwd=run_dir.parent)
    assert done.returncode == 0, done.stderr
    return done


def outputs(run_dir: Path) -> tuple[bytes, bytes]:
    """What must match an uninterrupted run byte for byte."""
    return (run_dir / "metrics.jsonl").read_bytes(), (run_dir / "results.json").read_bytes()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[bytes, bytes]:
    """The uninterrupted run every interrupted one must reproduce exactly."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    done = run_cli("train", *RUN, f"hydra.run.dir={run_dir}", cwd=run_dir.parent)
    assert done.returncode == 0, done.stderr
    return outputs(run_dir)


# ---------------------------------------------------------------- SIGKILL, then resume


def killed_mid_training(run_dir: Path, process: subprocess.Popen) -> None:
    # Past the checkpoint of step 21 and before the next one: the resume replays steps.
    wait_for(lambda: any(r["step"] >= 24 for r in rows(run_dir)), process)


def killed_while_checkpointing(run_dir: Path, process: subprocess.Popen) -> None:
    # The moment a checkpoint's temp file exists: the rename has not happened yet. (The run checkpoints every
    # step, to widen that moment; checkpointing changes no number.)
    wait_for(lambda: any(run_dir.glob(f".{LAST}.*.tmp")) and any(r["step"] > 7 for r in rows(run_dir)), process)


def killed_while_testing(run_dir: Path, process: subprocess.Popen) -> None:
    # The final validation row is logged just before the final checkpoint; testing follows.
    wait_for(lambda: any(r["step"] == 60 and "val/accuracy" in r for r in rows(run_dir)), process)
    time.sleep(0.3)


@pytest.mark.parametrize("moment", [killed_mid_training, killed_while_checkpointing, killed_while_testing])
def test_a_killed_run_resumes_to_the_same_rows_and_results(reference, tmp_path, moment):
    run_dir = tmp_path / "run"
    process = start(run_dir, *(["trainer.checkpoint_every=1"] if moment is killed_while_checkpointing else []))
    moment(run_dir, process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert not (run_dir / "results.json").exists()
    resume(run_dir)
    assert outputs(run_dir) == reference
    steps = [r["step"] for r in rows(run_dir) if "train/loss" in r]
    assert steps == sorted(set(steps)), "a resumed run must not duplicate rows"


# ---------------------------------------------------------------- preemption


@pytest.mark.parametrize("signum,code,word", [(signal.SIGTERM, REQUEUE_EXIT_CODE, "preempted"),
                                               (signal.SIGUSR1, REQUEUE_EXIT_CODE, "preempted"),
                                               (signal.SIGINT, INTERRUPT_EXIT_CODE, "interrupted")])
def test_a_stop_signal_checkpoints_exits_and_resumes_exactly(reference, tmp_path, signum, code, word):
    run_dir = tmp_path / "run"
    process = start(run_dir)
    wait_for(lambda: any(r["step"] >= 25 for r in rows(run_dir)), process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"metacli: {word}: {signum.name} received: stopped at step")
    assert "rerun with trainer.resume=true" in lines[0]
    stopped_at = int(lines[0].split("stopped at step ")[1].split()[0])
    assert load_checkpoint(run_dir / LAST)["step"] == stopped_at == rows(run_dir)[-1]["step"]
    resume(run_dir)
    assert outputs(run_dir) == reference


def test_a_stop_while_testing_is_said_and_the_resume_writes_the_results(reference, tmp_path):
    run_dir = tmp_path / "run"
    process = start(run_dir)
    wait_for(lambda: any(r["step"] == 60 and "val/accuracy" in r for r in rows(run_dir)), process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == REQUEUE_EXIT_CODE, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "SIGTERM received: stopped while testing; the checkpoint of step 60 is kept" in lines[0]
    assert "rerun with trainer.resume=true to test it and write results.json" in lines[0]
    assert not (run_dir / "results.json").exists()
    resume(run_dir)
    assert outputs(run_dir) == reference


def test_wandb_run_is_resumed_with_the_same_id(tmp_path):
    run_dir = tmp_path / "run"
    process = start(run_dir, "logger=wandb", env={"WANDB_MODE": "offline"})
    wait_for(lambda: any(r["step"] >= 20 for r in rows(run_dir)), process)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=120)
    assert process.returncode == REQUEUE_EXIT_CODE
    run_id = (run_dir / "wandb_run_id.txt").read_text()
    resume(run_dir, "logger=wandb")
    assert (run_dir / "wandb_run_id.txt").read_text() == run_id
    offline_runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(name.endswith(run_id) for name in offline_runs)


# ---------------------------------------------------------------- verified checkpoints


def state(step: int) -> dict:
    """A complete checkpoint payload of a tiny learner (load_checkpoint refuses an incomplete one)."""
    return {"learner": {"w": torch.full((3,), float(step))}, "optimizer": {"state": {}, "param_groups": []},
            "scheduler": None, "step": step, "best_val": 0.5, "best_step": step, "skipped": 0,
            "rng": capture_rng(torch.Generator()),
            "origin": {"algo": "metacli.algorithms.protonet.ProtoNet", "backbone": "metacli.models.conv4.Conv4",
                       "dataset": {"name": "synthetic"}, "task": {"n_way": 5}}}


def test_checkpoints_rotate_and_verify(tmp_path):
    path = tmp_path / LAST
    save_checkpoint(state(1), path)
    save_checkpoint(state(2), path)
    assert load_checkpoint(path)["step"] == 2 and load_checkpoint(previous(path))["step"] == 1
    assert not list(tmp_path.glob("*.tmp")), "no temp file is left behind"
    # A checkpoint is plain tensors and types: it loads with weights_only=True, like any torch file.
    assert torch.load(path, weights_only=True)["format"].startswith("metacli-checkpoint")


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, caplog, damage):
    path = tmp_path / LAST
    save_checkpoint(state(1), path)
    save_checkpoint(state(2), path)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF  # inside the stored payload, which is most of the file
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    with caplog.at_level("WARNING"):
        assert load_latest_good(path)["step"] == 1
    assert "previous good checkpoint" in caplog.text


def test_resume_after_a_corrupted_last_checkpoint_reproduces_the_run(reference, tmp_path):
    run_dir = tmp_path / "run"
    process = start(run_dir)
    wait_for(lambda: any(r["step"] >= 45 for r in rows(run_dir)), process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    data = bytearray((run_dir / LAST).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (run_dir / LAST).write_bytes(bytes(data))
    done = resume(run_dir)
    assert "previous good checkpoint" in done.stdout + done.stderr + (run_dir / "train.log").read_text()
    assert outputs(run_dir) == reference


FILL_DISK = """
import resource, signal, sys, torch
from metacli.reliability.checkpoint import save_checkpoint
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, like a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
try:
    save_checkpoint({"learner": {"w": torch.zeros(1_000_000)}, "step": 2}, sys.argv[1])
except Exception as exc:
    print(type(exc).__name__, exc)
"""


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / LAST
    save_checkpoint(state(1), path)
    before = path.read_bytes()
    done = subprocess.run([sys.executable, "-c", FILL_DISK, str(path)], capture_output=True, text=True)
    assert done.stdout.startswith("CheckpointError could not write the checkpoint"), done.stdout + done.stderr
    assert "the previous checkpoint is intact" in done.stdout
    assert path.read_bytes() == before and load_checkpoint(path)["step"] == 1
    assert not list(tmp_path.glob("*.tmp")) and not previous(path).exists()


def test_a_replaced_file_takes_the_umask_keeps_its_previous_version_and_leaves_no_temp_file(tmp_path):
    path, kept = tmp_path / "results.json", tmp_path / "results.json.prev"
    mask = os.umask(0o027)
    try:
        replace_file(path, b"first")
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o640
    replace_file(path, b"second", keep_previous=kept)
    assert (path.read_bytes(), kept.read_bytes()) == (b"second", b"first")
    with pytest.raises(FileNotFoundError):  # the rename that keeps the previous version fails: nothing changes
        replace_file(path, b"third", keep_previous=tmp_path / "gone" / "results.json.prev")
    assert path.read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.json.prev"]


def test_a_run_that_cannot_write_its_checkpoint_stops_cleanly(tmp_path):
    run_dir = tmp_path / "run"
    done = run_cli("train", *RUN, "trainer.steps=7", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    before = (run_dir / LAST).read_bytes()

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limit = len(before) // 2
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    command = [metacli_command(), "train", *RUN, "trainer.steps=14", "trainer.resume=true", f"hydra.run.dir={run_dir}"]
    failed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, preexec_fn=small_files)
    assert failed.returncode == 2, failed.stderr
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not write the checkpoint" in lines[0] and "Traceback" not in failed.stderr
    assert (run_dir / LAST).read_bytes() == before


# ---------------------------------------------------------------- numerical faults


def test_a_nan_stops_the_run_naming_the_step_and_keeps_the_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    # A learning rate of 1e30 makes the weights, then the loss, non-finite after the first update.
    done = run_cli("train", *RUN, "trainer.checkpoint_every=1", "trainer.optimizer.lr=1e30",
                   f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert "at step 2" in lines[0] and "trainer.on_nonfinite=skip" in lines[0] and "lr" in lines[0]
    assert f"the checkpoint of step 1 is kept in {run_dir / LAST}" in lines[0]
    assert load_checkpoint(run_dir / LAST)["step"] == 1
    assert not (run_dir / "results.json").exists()


def test_a_nan_before_the_first_checkpoint_says_none_is_kept(tmp_path):
    run_dir = tmp_path / "run"
    done = run_cli("train", *RUN, "trainer.optimizer.lr=1e30", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 2 and "at step 2" in done.stderr
    assert "no checkpoint was written before it" in done.stderr and not (run_dir / LAST).exists()


def test_nan_meta_batches_can_be_skipped_and_are_counted(tmp_path):
    run_dir = tmp_path / "run"
    done = run_cli("train", *RUN, "trainer.steps=10", "trainer.optimizer.lr=1e30", "trainer.on_nonfinite=skip",
                   f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    train_rows = [r for r in rows(run_dir) if "train/loss" in r]
    assert [r["train/skipped_batches"] for r in train_rows] == list(range(10))
    assert load_checkpoint(run_dir / LAST)["skipped"] == 9
    assert (run_dir / "results.json").is_file()


# ---------------------------------------------------------------- concurrency


def test_a_second_process_on_the_same_run_dir_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    first = start(run_dir, "trainer.steps=5000")  # still running when the second one starts
    wait_for(lambda: any(r["step"] >= 5 for r in rows(run_dir)), first)
    config = (run_dir / ".hydra" / "config.yaml").read_bytes()
    second = run_cli("train", *RUN, "trainer.steps=5000", "trainer.resume=true", f"hydra.run.dir={run_dir}",
                     cwd=tmp_path)
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and f"is in use by another metacli process (pid {first.pid})" in lines[0]
    assert first.poll() is None, "the first run must have been running all along"
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=300)
    assert first.returncode == REQUEUE_EXIT_CODE
    # The refused process touched nothing: the first run's record is whole and in order.
    assert (run_dir / ".hydra" / "config.yaml").read_bytes() == config
    steps = [r["step"] for r in rows(run_dir) if "train/loss" in r]
    assert steps == list(range(1, steps[-1] + 1)) and load_checkpoint(run_dir / LAST)["step"] == steps[-1]


# ---------------------------------------------------------------- secrets


def test_no_secret_reaches_the_run_dir(tmp_path):
    secret = "metacli-test-secret-7f3a9c"
    run_dir = tmp_path / "run"
    done = run_cli("train", *RUN, "trainer.steps=4", "eval.episodes=4", "logger=wandb", f"hydra.run.dir={run_dir}",
                   cwd=tmp_path, env={"WANDB_API_KEY": secret, "WANDB_MODE": "offline"})
    assert done.returncode == 0, done.stderr
    assert secret not in done.stdout + done.stderr
    leaks = [p for p in run_dir.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaks, f"the API key was written to {leaks}"


def test_a_resume_drops_a_metrics_line_cut_short_by_a_kill(tmp_path):
    rows_written = [{"step": 1, "train/loss": 0.5}, {"step": 2, "train/loss": 0.25}, {"step": 3, "train/loss": 0.125}]
    path = tmp_path / "metrics.jsonl"
    complete = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows_written)
    path.write_text(complete + '[1]\n{"step": 4, "train_lo')  # a row that is no object, then one a kill cut short
    logger = JsonlLogger(str(tmp_path), resume_step=2)
    logger.log({"train/loss": 0.2}, step=3)
    logger.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == \
        rows_written[:2] + [{"step": 3, "train/loss": 0.2}]
