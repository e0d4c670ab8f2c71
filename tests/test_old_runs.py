"""Run dirs written by an earlier metacli keep working. The fixture is a smoke run put back into the format of
commit 407cb57 (before task families, ``timing.json``, the checkpoint's wall time and ``execution.*``): its
results keep ``episode_accuracies``, it has no ``timing.json``, its checkpoints hold no ``wall_seconds``, its config
spells the objective ``val/accuracy`` and keeps the meta-batch settings under ``algo`` (``algo.task_threads``). It
must re-test to the same numbers, compare with a new result, resume, and load."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import run_cli
from metacli import load_learner
from metacli.data.synthetic import SyntheticGlyphs
from metacli.reliability.checkpoint import load_checkpoint, save_checkpoint
from metacli.saved_config import load_run_config

OVERRIDES = ["experiment=smoke", "backbone.hidden=8", "trainer.val_every=2", "trainer.checkpoint_every=2",
             "eval.episodes=10"]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("old") / "run"
    done = run_cli("train", *OVERRIDES, "trainer.steps=4", f"hydra.run.dir={run}", cwd=run.parent)
    assert done.returncode == 0, done.stderr
    results = json.loads((run / "results.json").read_text())
    results["episode_accuracies"] = results.pop("episode_scores")
    (run / "results.json").write_text(json.dumps(results))
    (run / "timing.json").unlink()
    for name in ("best.pt", "last.pt"):
        state = load_checkpoint(run / name)
        del state["wall_seconds"]
        save_checkpoint(state, run / name)
    config = OmegaConf.load(run / ".hydra" / "config.yaml")
    config.trainer.objective = "val/accuracy"
    del config.execution
    config.algo.task_threads = 2
    OmegaConf.save(config, run / ".hydra" / "config.yaml")
    return run


def old_run(template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(template, tmp_path / "old"))


def test_an_old_run_retests_to_its_numbers_and_compares_with_a_new_result(template, tmp_path):
    run = old_run(template, tmp_path)
    done = run_cli("eval", f"checkpoint={run}", f"hydra.run.dir={tmp_path / 'again'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    old, new = (json.loads((d / "results.json").read_text()) for d in (run, tmp_path / "again"))
    assert new["accuracy"] == old["accuracy"] and new["episode_scores"] == old["episode_accuracies"]
    assert new["test_fingerprint"] == old["test_fingerprint"]
    compared = run_cli("compare", str(run), str(tmp_path / "again"), "--format", "json", cwd=tmp_path)
    assert compared.returncode == 0, compared.stderr
    assert json.loads(compared.stdout)["difference"] == 0
    config = load_run_config(run)  # the earlier algo.task_threads, moved where the runner reads it
    assert config.execution.task_threads == 2 and "task_threads" not in config.algo


def test_an_old_run_resumes_and_loads(template, tmp_path):
    run = old_run(template, tmp_path)
    done = run_cli("train", *OVERRIDES, "trainer.steps=6", "trainer.resume=true", f"hydra.run.dir={run}",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stdout + done.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val/accuracy" in r] == [2, 4, 6]
    assert json.loads((run / "results.json").read_text())["checkpoint_step"] in (2, 4, 6)
    learner = load_learner(run)
    test = SyntheticGlyphs().split("test")
    support = [test.images[c, 0] for c in range(5)]
    labels = learner.predict(support, list(range(5)), [test.images[c, 1] for c in range(5)])
    assert torch.as_tensor(labels).shape == (5,)
