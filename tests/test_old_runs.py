"""Run dirs written by an earlier metacli keep working: ``tests/fixtures/run-407cb57`` is a smoke run written by
commit 407cb57 (before task families, the reliability package and ``timing.json``; its results keep
``episode_accuracies``). It must re-test to the same numbers, compare with a new result, resume, and load."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from conftest import run_cli
from metacli import load_learner
from metacli.data.synthetic import SyntheticGlyphs

FIXTURE = Path(__file__).parent / "fixtures" / "run-407cb57"
OVERRIDES = ["experiment=smoke", "backbone.hidden=8", "trainer.val_every=2", "trainer.checkpoint_every=2",
             "eval.episodes=10"]


def old_run(tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURE, tmp_path / "old"))  # runs write into their dir: never into the repo


def test_an_old_run_retests_to_its_numbers_and_compares_with_a_new_result(tmp_path):
    run = old_run(tmp_path)
    done = run_cli("eval", f"checkpoint={run}", f"hydra.run.dir={tmp_path / 'again'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    old, new = (json.loads((d / "results.json").read_text()) for d in (run, tmp_path / "again"))
    assert new["accuracy"] == old["accuracy"] and new["episode_scores"] == old["episode_accuracies"]
    assert new["test_fingerprint"] == old["test_fingerprint"]
    compared = run_cli("compare", str(run), str(tmp_path / "again"), "--format", "json", cwd=tmp_path)
    assert compared.returncode == 0, compared.stderr
    assert json.loads(compared.stdout)["difference"] == 0


def test_an_old_run_resumes_and_loads(tmp_path):
    run = old_run(tmp_path)
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
