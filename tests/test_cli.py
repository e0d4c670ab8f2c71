"""End-to-end tests of the `metacli` console script, run as a subprocess on the synthetic dataset."""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import metacli_command, run_cli
from metacli.cli import config_dir
from metacli import load_learner
from metacli.reliability.checkpoint import load_checkpoint
from metacli.data.synthetic import SyntheticGlyphs

SMOKE = ["experiment=smoke", "trainer.steps=60", "trainer.val_every=20", "eval.episodes=50"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "protonet"
    done = run_cli("train", *SMOKE, "trainer.progress=true", f"hydra.run.dir={run_dir}", cwd=run_dir.parent)
    assert done.returncode == 0, done.stderr
    return run_dir


def test_help_lists_commands_and_groups(tmp_path):
    top = run_cli("--help", cwd=tmp_path)
    assert top.returncode == 0 and "train" in top.stdout and "eval" in top.stdout
    train_help = run_cli("train", "--help", cwd=tmp_path)
    assert train_help.returncode == 0
    for group in ("algo", "dataset", "device"):
        assert f"{group}: {', '.join(options(group))}" in train_help.stdout
    job = run_cli("train", "--cfg", "job", "algo=maml", "task.n_way=7", cwd=tmp_path)
    assert job.returncode == 0 and "metacli.algorithms.maml.MAML" in job.stdout and "n_way: 7" in job.stdout


def test_a_run_logs_its_progress_as_lines(trained_run):
    log = (trained_run / "train.log").read_text()
    assert re.search(r"meta-train: 60/60 steps \(100%\) loss \d\.\d{3}  accuracy \d\.\d{3}  val 0\.\d{3}, ", log), log
    assert re.search(r"test: 50/50 episodes \(100%\) accuracy 0\.\d{3}, ", log), log
    assert "━" not in log  # no bar drawn into a log


def test_train_writes_run_record(trained_run):
    results = json.loads((trained_run / "results.json").read_text())
    assert results["episodes"] == 50 and results["bn_mode"] == "transductive"
    assert results["algorithm"] == "ProtoNet" and results["task"] == {"n_way": 5, "k_shot": 1, "n_query": 5}
    assert 0 < results["ci95"] < 0.2
    assert results["accuracy"] > 0.45, "60 ProtoNet steps on synthetic glyphs should be far above 5-way chance"
    # execution.task_threads=auto: one worker per intra-op thread, whatever this machine has.
    threads = results["trained_on_threads"]
    assert threads["task_threads"] == threads["intra_op_threads"] >= 1
    rows = read_rows(trained_run / "metrics.jsonl")
    assert [r["step"] for r in rows if "val/accuracy" in r] == [20, 40, 60]
    for name in ("best.pt", "last.pt", ".hydra/config.yaml"):
        assert (trained_run / name).is_file()


def test_eval_reproduces_results_exactly(trained_run, tmp_path):
    done = run_cli("eval", f"checkpoint={trained_run}", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "eval" / "results.json").read_text()) == \
        json.loads((trained_run / "results.json").read_text())
    other = run_cli("eval", f"checkpoint={trained_run}", "eval.bn_mode=running", "eval.episodes=10",
                    f"hydra.run.dir={tmp_path / 'eval2'}", cwd=tmp_path)
    assert other.returncode == 0, other.stderr
    changed = json.loads((tmp_path / "eval2" / "results.json").read_text())
    assert changed["bn_mode"] == "running" and changed["episodes"] == 10


def test_load_learner_predicts_raw_images(trained_run):
    learner = load_learner(trained_run)
    test = SyntheticGlyphs().split("test")
    correct = total = 0
    for first in range(0, 40, 5):  # 8 disjoint 5-way tasks on classes never trained on
        classes = list(range(first, first + 5))
        support = [Image.fromarray(test.images[c, 0, 0].numpy(), mode="L") for c in classes]
        labels = [100 + c for c in classes]  # arbitrary label values come back as given
        queries = [test.images[c, i] for c in classes for i in range(1, 6)]  # uint8 tensors
        predicted = learner.predict(support, labels, queries)
        truth = torch.tensor([100 + c for c in classes for _ in range(1, 6)])
        assert set(predicted.tolist()) <= set(labels)
        correct += (predicted == truth).sum().item()
        total += len(truth)
    assert correct / total > 0.45


def test_multirun_sweeps_two_algorithms_with_wandb_offline(tmp_path):
    sweep = tmp_path / "sweep"
    done = run_cli("train", "-m", "algo=protonet,maml", "experiment=smoke", "trainer.steps=4", "trainer.val_every=2",
                   "eval.episodes=5", "logger=wandb", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    algorithms = sorted(json.loads((sweep / str(i) / "results.json").read_text())["algorithm"] for i in (0, 1))
    assert algorithms == ["MAML", "ProtoNet"]
    for i in (0, 1):  # one finished offline W&B run per job
        runs = list((sweep / str(i) / "wandb").glob("offline-run-*"))
        assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_joblib_launcher_runs_jobs_in_parallel_processes(tmp_path):
    sweep = tmp_path / "sweep"
    done = run_cli("train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=1,2", "experiment=smoke",
                   "trainer.steps=2", "trainer.val_every=2", "eval.episodes=5", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    seeds = [json.loads((sweep / str(i) / ".hydra" / "config.yaml").read_text().split("seed: ")[1].split()[0])
             for i in (0, 1)]
    assert sorted(seeds) == [1, 2] and all((sweep / str(i) / "results.json").is_file() for i in (0, 1))


def test_resume_continues_to_the_same_numbers(tmp_path):
    base = ["experiment=smoke", "trainer.val_every=5", "eval.episodes=20"]
    straight = run_cli("train", *base, "trainer.steps=20", f"hydra.run.dir={tmp_path / 'straight'}", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    resumed_dir = tmp_path / "resumed"
    first = run_cli("train", *base, "trainer.steps=10", f"hydra.run.dir={resumed_dir}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    first_wall = json.loads((resumed_dir / "timing.json").read_text())["wall_seconds"]
    second = run_cli("train", *base, "trainer.steps=20", "trainer.resume=true", f"hydra.run.dir={resumed_dir}",
                     cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert load_checkpoint(resumed_dir / "last.pt")["step"] == 20
    # The wall time counts both sessions; results.json stays free of it, so it equals the straight run's.
    assert json.loads((resumed_dir / "timing.json").read_text())["wall_seconds"] > first_wall > 0
    resumed_rows = read_rows(resumed_dir / "metrics.jsonl")
    assert resumed_rows == read_rows(tmp_path / "straight" / "metrics.jsonl")
    assert json.loads((resumed_dir / "results.json").read_text()) == \
        json.loads((tmp_path / "straight" / "results.json").read_text())


def test_resume_on_other_threads_warns_and_records_them(tmp_path):
    run_dir = tmp_path / "run"
    base = ["experiment=smoke", "trainer.val_every=2", "eval.episodes=5", f"hydra.run.dir={run_dir}"]
    first = run_cli("train", *base, "trainer.steps=2", "execution.task_threads=2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert load_checkpoint(run_dir / "last.pt")["threads"]["task_threads"] == 2
    second = run_cli("train", *base, "trainer.steps=4", "trainer.resume=true", "execution.task_threads=1", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    log = second.stdout + second.stderr
    assert "'task_threads': 2" in log and "'task_threads': 1" in log and "rounding level" in log, log
    assert json.loads((run_dir / "results.json").read_text())["trained_on_threads"]["task_threads"] == 1


def test_same_seed_same_numbers(tmp_path):
    runs = []
    for name in ("a", "b"):
        done = run_cli("train", "experiment=smoke", "trainer.steps=6", "trainer.val_every=3", "eval.episodes=10",
                       "algo=maml", f"hydra.run.dir={tmp_path / name}", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        runs.append(((tmp_path / name / "metrics.jsonl").read_text(), (tmp_path / name / "results.json").read_text()))
    assert runs[0] == runs[1]


def test_list_and_version(tmp_path):
    listed = run_cli("list", "algos", "datasets", cwd=tmp_path)
    assert listed.returncode == 0 and listed.stdout.splitlines() == [
        f"algos: {', '.join(options('algo'))}", f"datasets: {', '.join(options('dataset'))}"]
    everything = run_cli("list", cwd=tmp_path)
    assert [line.split(":")[0] for line in everything.stdout.splitlines()] == [
        "algos", "datasets", "envs", "backbones", "devices", "loggers", "experiments", "searches"]
    assert "metacli: error: metacli list knows no 'algoz'" in run_cli("list", "algoz", cwd=tmp_path).stderr
    shown = run_cli("--version", cwd=tmp_path)
    assert shown.returncode == 0 and shown.stdout.startswith("metacli ") and shown.stdout.strip() != "metacli"


def test_max_grad_norm_clips_the_meta_gradient(tmp_path):
    """With SGD at rate 1, one clipped step moves the weights by at most the clip norm; unclipped, far more."""
    sgd = ["experiment=smoke", "trainer.steps=1", "trainer.log_every=1", "trainer.optimizer._target_=torch.optim.SGD"]
    weights = {}
    for name, extra in (("start", ["trainer.optimizer.lr=0"]), ("clipped", ["trainer.max_grad_norm=0.001"]),
                        ("free", [])):
        done = run_cli("train", *sgd, "trainer.optimizer.lr=1", *extra, f"hydra.run.dir={tmp_path / name}",
                       cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        state = load_checkpoint(tmp_path / name / "last.pt")["learner"]
        weights[name] = torch.cat([v.flatten() for k, v in state.items() if "running" not in k and v.is_floating_point()])
    assert (weights["clipped"] - weights["start"]).norm() <= 0.001 * 1.0001
    assert (weights["free"] - weights["start"]).norm() > 0.01
    rows = read_rows(tmp_path / "clipped" / "metrics.jsonl")
    assert rows[0]["train/grad_norm"] > 0.001  # the norm before clipping


def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path):
    """``metacli list | head -1``: the pipe is closed before metacli writes, and it stops without a word."""
    read, write = os.pipe()
    os.close(read)  # closed before the interpreter has even started: the first write meets a broken pipe
    done = subprocess.run([metacli_command(), "list"], cwd=tmp_path, stdout=write, stderr=subprocess.PIPE, text=True,
                          timeout=120)
    os.close(write)
    assert done.returncode == 1 and done.stderr == "", done.stderr
