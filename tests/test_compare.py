"""Selection on validation and paired comparison: a sweeper gets the best validation value, never a test score;
results keep per-episode scores and a fingerprint of the test episodes; ``metacli compare`` pairs two runs over
those episodes and refuses runs tested on different ones."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from conftest import assert_one_line_error, run_cli
from metacli.cli import _train_job
from metacli.compare import paired_difference, read_results
from metacli.errors import ConfigError
from test_configs import compose

SMOKE = ["experiment=smoke", "trainer.steps=4", "trainer.val_every=2", "eval.episodes=30"]


@pytest.fixture(scope="module")
def two_algorithms(tmp_path_factory) -> Path:
    sweep = tmp_path_factory.mktemp("compare") / "sweep"
    done = run_cli("train", "-m", "algo=protonet,matching_net", *SMOKE, f"hydra.sweep.dir={sweep}", cwd=sweep.parent)
    assert done.returncode == 0, done.stderr
    return sweep


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def test_a_sweeper_gets_the_best_validation_accuracy_not_the_test_one(tmp_path):
    returned = _train_job(compose(*SMOKE, "trainer.progress=false"), tmp_path / "run")
    recorded = results(tmp_path / "run")
    assert returned == recorded["best_val_accuracy"] != recorded["accuracy"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert returned == max(row["val/accuracy"] for row in rows if "val/accuracy" in row)


def test_results_keep_per_episode_scores_and_a_fingerprint(two_algorithms):
    a, b = results(two_algorithms / "0"), results(two_algorithms / "1")
    for run in (a, b):
        assert len(run["episode_scores"]) == 30
        assert run["accuracy"] == pytest.approx(np.mean(run["episode_scores"]))
    assert a["test_fingerprint"] == b["test_fingerprint"] and a["algorithm"] != b["algorithm"]
    assert len(a["test_fingerprint"]["content_sha256"]) == 64 and a["test_fingerprint"]["eval_seed"] == 0


def test_compare_pairs_the_runs_episode_by_episode(two_algorithms, tmp_path):
    done = run_cli("compare", str(two_algorithms / "0"), str(two_algorithms / "1"), "--format", "json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    paired = json.loads(done.stdout)
    x = np.array(results(two_algorithms / "0")["episode_scores"])
    y = np.array(results(two_algorithms / "1")["episode_scores"])
    assert paired["difference"] == pytest.approx((x - y).mean()) and paired["episodes"] == 30
    # The t statistic written out: mean difference over its standard error, on n - 1 degrees of freedom.
    t = (x - y).mean() / ((x - y).std(ddof=1) / math.sqrt(30))
    assert paired["p_value"] == pytest.approx(2 * stats.t.sf(abs(t), 29))
    shown = run_cli("compare", str(two_algorithms / "0"), str(two_algorithms / "1"), cwd=tmp_path)
    assert shown.returncode == 0 and "paired comparison over the same 30 test episodes" in shown.stdout
    assert "A - B" in shown.stdout and "paired t-test" in shown.stdout


def test_compare_refuses_runs_tested_on_other_episodes_and_says_the_retest_that_fixes_it(two_algorithms, tmp_path):
    done = run_cli("eval", f"checkpoint={two_algorithms / '1'}", "eval.seed=7", "eval.episodes=20",
                   f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    refused = run_cli("compare", str(two_algorithms / "0"), str(tmp_path / "eval"), cwd=tmp_path)
    assert_one_line_error(refused, "the two runs were tested on different episodes (episodes 30 vs 20, eval_seed 0 "
                                   "vs 7): re-test the second on the first's with metacli eval checkpoint=<the "
                                   "second's training run> eval.episodes=30 eval.seed=0")
    retest = re.search(r"training run> ([^,]+), then", refused.stderr).group(1).split()
    done = run_cli("eval", f"checkpoint={two_algorithms / '1'}", *retest, f"hydra.run.dir={tmp_path / 'retest'}",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert run_cli("compare", str(two_algorithms / "0"), str(tmp_path / "retest"), cwd=tmp_path).returncode == 0


def test_a_refusal_names_the_data_setting_before_the_data_digest(two_algorithms):
    plain = results(two_algorithms / "0")
    cropped = json.loads(json.dumps(plain))
    cropped["test_fingerprint"]["dataset"]["crop_to_ink"] = True
    cropped["test_fingerprint"]["content_sha256"] = "0" * 64
    with pytest.raises(ConfigError,
                       match=r"different data \(dataset.crop_to_ink None vs True\): .* metacli report RUN_A RUN_B"):
        paired_difference(plain, cropped)
    del cropped["test_fingerprint"]["dataset"]["crop_to_ink"]
    with pytest.raises(ConfigError, match=r"different data \(content_sha256 "):
        paired_difference(plain, cropped)


def test_compare_refuses_results_without_per_episode_scores(two_algorithms, tmp_path):
    old = results(two_algorithms / "0")
    del old["episode_scores"]
    (tmp_path / "results.json").write_text(json.dumps(old))
    refused = run_cli("compare", str(tmp_path / "results.json"), str(two_algorithms / "1"), cwd=tmp_path)
    assert_one_line_error(refused, "has no per-episode scores (written by an older metacli): re-test the run")
    assert_one_line_error(run_cli("compare", str(tmp_path / "nowhere"), str(tmp_path), cwd=tmp_path), "has no results.json")


def with_scores(scores, seed: int = 0) -> dict:
    return {"episode_scores": list(scores), "test_fingerprint": {"eval_seed": seed, "episodes": len(scores)}}


def test_pairing_finds_a_difference_that_overlapping_intervals_hide():
    rng = np.random.default_rng(0)
    difficulty = rng.uniform(0.3, 1.0, 600)  # shared by both methods: most of each method's spread
    better, worse = difficulty, np.clip(difficulty - 0.01 - rng.normal(0, 0.01, 600), 0, 1)
    paired = paired_difference(with_scores(better), with_scores(worse))
    unpaired_half_widths = [1.96 * s.std(ddof=1) / math.sqrt(600) for s in (better, worse)]
    assert paired["difference"] < sum(unpaired_half_widths), "the two ±CIs overlap"
    assert paired["difference"] - paired["ci95"] > 0 and paired["p_value"] < 1e-6
    same = paired_difference(with_scores(better), with_scores(better))
    assert same["difference"] == 0 and same["p_value"] == 1.0


def test_compare_refuses_damaged_scores(two_algorithms, tmp_path):
    good = results(two_algorithms / "0")
    cut = {**good, "episode_scores": good["episode_scores"][:5]}
    episodes = len(good["episode_scores"])
    with pytest.raises(ConfigError, match=f"hold {episodes} and 5 episode scores for the same test episodes"):
        paired_difference(good, cut)
    for damage, problem in [({"episode_scores": None}, "has no per-episode scores"),
                            ({"episode_scores": ["a"] * episodes}, "its episode_scores are not a list of numbers"),
                            ({"test_fingerprint": [1]}, "its test_fingerprint is not an object")]:
        (tmp_path / "results.json").write_text(json.dumps({**good, **damage}))
        with pytest.raises(ConfigError, match=problem):
            read_results(tmp_path / "results.json")
