"""W&B runs say what they are: names from the job's overrides, the sweep as group, job type, tags, the best
validation and the test score in the summary, ``best.pt`` as an artifact behind a switch, and the `wandb sync`
command for offline runs. Checked by parsing the offline run files, as W&B's servers would read them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from wandb.proto import wandb_internal_pb2

from conftest import run_cli

BLOCK, HEADER = 32768, 7  # the run file: a 7-byte header, then LevelDB-style log blocks of records


def records(path: Path):
    """Every protobuf record of an offline ``.wandb`` file, joining records split over blocks."""
    data, pos, pending = path.read_bytes(), HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a record header is padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def run_file(job: Path) -> dict:
    path = next((job / "wandb").glob("offline-run-*/*.wandb"))
    found = {"summary": {}, "artifacts": []}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            found["run"] = record.run
        elif kind == "summary":
            found["summary"].update({u.key or "/".join(u.nested_key): json.loads(u.value_json)
                                     for u in record.summary.update})
        elif kind == "artifact":
            found["artifacts"].append(record.artifact.type)
    return found


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, str]:
    sweep = tmp_path_factory.mktemp("wandb") / "sweep"
    done = run_cli("train", "-m", "seed=0,1", "experiment=smoke", "trainer.steps=4", "trainer.val_every=2",
                   "eval.episodes=5", "logger=wandb", "logger.wandb.log_checkpoints=true", f"hydra.sweep.dir={sweep}",
                   cwd=sweep.parent, env={"WANDB_MODE": "offline"})
    assert done.returncode == 0, done.stderr
    return sweep, done.stdout + done.stderr


def test_sweep_runs_are_named_grouped_and_tagged(sweep):
    folder, _ = sweep
    runs = [run_file(folder / job)["run"] for job in ("0", "1")]
    # Logger settings say nothing about what was trained: they stay out of the name.
    assert [r.display_name for r in runs] == [f"protonet-synthetic-5w1s-seed{s}-experiment=smoke-steps=4-val_every=2-"
                                              "episodes=5" for s in (0, 1)]
    assert runs[0].run_group == runs[1].run_group == f"{folder.parent.name}/{folder.name}"
    assert all(r.job_type == "train" and list(r.tags) == ["protonet", "synthetic", "5w1s", "Conv4"] for r in runs)


def test_the_summary_holds_the_best_validation_and_the_test(sweep):
    folder, output = sweep
    for job in ("0", "1"):
        results = json.loads((folder / job / "results.json").read_text())
        rows = [json.loads(line) for line in (folder / job / "metrics.jsonl").read_text().splitlines()]
        logged = run_file(folder / job)
        summary = logged["summary"]
        assert summary["val/best_accuracy"] == results["best_val_accuracy"]
        assert summary["val/accuracy"] == {"max": max(r["val/accuracy"] for r in rows if "val/accuracy" in r)}
        assert summary["test/accuracy"] == results["accuracy"] and summary["val/best_step"] == results["best_val_step"]
        assert logged["artifacts"] == ["model"]
        offline = next((folder / job / "wandb").glob("offline-run-*"))
        assert f"upload it with: wandb sync {offline}" in output


def test_a_meta_rl_run_logs_its_stages_and_references(tmp_path):
    run = tmp_path / "run"
    done = run_cli("train", "experiment=rl2_bandit_k5_n100", "env.horizon=10", "trainer.steps=2", "trainer.meta_batch=8",
                   "trainer.val_every=2", "trainer.val_episodes=8", "eval.episodes=16", "eval.batch_size=8",
                   "logger=wandb", f"hydra.run.dir={run}", cwd=tmp_path, env={"WANDB_MODE": "offline"})
    assert done.returncode == 0, done.stderr
    results, logged = json.loads((run / "results.json").read_text()), run_file(run)
    assert logged["run"].display_name == "rl2-bandit-1traj-seed0" and list(logged["run"].tags) == ["rl2", "bandit", "1traj"]
    summary = logged["summary"]
    assert summary["test/return"] == results["return"] and summary["val/best_return"] == results["best_val_return"]
    assert summary["test/episode 1/regret"] == results["stages"][0]["regret"]["regret"]
    assert summary["test/reference/thompson_sampling/regret"] == results["references"]["thompson_sampling"]["regret"]
