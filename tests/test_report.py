"""``metacli report``: runs and sweeps in one table, seeds aggregated with a t-interval, md/csv/json out, and the
same table written at the end of every multirun."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from scipy import stats

from conftest import assert_one_line_error, run_cli

SMOKE = ["experiment=smoke", "trainer.steps=4", "trainer.val_every=2", "eval.episodes=20"]


@pytest.fixture(scope="module")
def seeds_and_algorithms(tmp_path_factory) -> Path:
    sweep = tmp_path_factory.mktemp("report") / "sweep"
    done = run_cli("train", "-m", "algo=protonet,matching_net", "seed=0,1,2", *SMOKE, f"hydra.sweep.dir={sweep}",
                   "expected={accuracy:0.5,ci95:0.01,source:a test}", cwd=sweep.parent)
    assert done.returncode == 0, done.stderr
    return sweep


def scores_by_algorithm(sweep: Path) -> dict:
    found = {}
    for file in sweep.rglob("results.json"):
        results = json.loads(file.read_text())
        found.setdefault(results["algorithm"], {})[results["seed"]] = results["accuracy"]
    return found


def test_the_report_aggregates_seeds_with_a_t_interval(seeds_and_algorithms, tmp_path):
    done = run_cli("report", str(seeds_and_algorithms), "--format", "json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    table = json.loads(done.stdout)
    assert sorted(row["algorithm"] for row in table) == ["MatchingNet", "ProtoNet"]
    expected = scores_by_algorithm(seeds_and_algorithms)
    for row in table:
        per_seed = [expected[row["algorithm"]][seed] for seed in (0, 1, 2)]
        assert sorted(row["per seed"]) == sorted(per_seed) and row["metric"] == "accuracy"
        mean = sum(per_seed) / 3
        sd = math.sqrt(sum((s - mean) ** 2 for s in per_seed) / 2)
        assert row["test"] == pytest.approx(mean) and row["ci95"] == pytest.approx(stats.t.ppf(0.975, 2) * sd / math.sqrt(3))
        assert row["task"] == "5w1s" and row["steps"] == 4 and len(row["runs"]) == 3
        assert row["expected"] == {"accuracy": 0.5, "ci95": 0.01, "source": "a test"}
        assert len(row["wall time"]) == 3 and all(0 < seconds < 600 for seconds in row["wall time"])


def test_the_report_writes_markdown_and_csv(seeds_and_algorithms, tmp_path):
    for form in ("md", "csv"):
        done = run_cli("report", str(seeds_and_algorithms), "--format", form, "--out", str(tmp_path / f"r.{form}"),
                       cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    markdown = (tmp_path / "r.md").read_text().splitlines()
    assert markdown[0].startswith("| algorithm | dataset |") and len(markdown) == 4
    assert "t-interval over seeds" in markdown[2] and "50.00 ± 1.00 % (a test)" in markdown[2]
    test = float(markdown[2].split(" | ")[10].split(" ±")[0])
    assert f"| {test - 50:+.2f} % |" in markdown[2]
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert len(rows) == 2 and {"algorithm", "test", "ci95", "seeds"} <= set(rows[0])
    shown = run_cli("report", str(seeds_and_algorithms), cwd=tmp_path)
    # Not a terminal: the table comes as markdown, readable in a log.
    assert shown.returncode == 0 and shown.stdout == (tmp_path / "r.md").read_text()


def test_every_multirun_ends_with_its_summary(seeds_and_algorithms):
    summary = (seeds_and_algorithms / "summary.md").read_text().splitlines()
    assert len(summary) == 4 and {"ProtoNet", "MatchingNet"} <= {line.split(" | ")[0].strip("| ") for line in summary}
    assert len(list(csv.DictReader((seeds_and_algorithms / "summary.csv").open()))) == 2


def test_a_path_without_runs_is_one_line(tmp_path):
    assert_one_line_error(run_cli("report", str(tmp_path), cwd=tmp_path), "no results.json under")
    assert_one_line_error(run_cli("report", str(tmp_path / "missing"), cwd=tmp_path), "does not exist")


def test_a_bad_argument_is_one_line(tmp_path):
    assert_one_line_error(run_cli("report", "--format", "xls", str(tmp_path), cwd=tmp_path),
                          "argument --format: invalid choice: 'xls'")
    assert_one_line_error(run_cli("compare", str(tmp_path), cwd=tmp_path), "the following arguments are required: run_b")


def test_every_paper_protocol_carries_the_papers_number():
    import yaml

    from metacli.cli import config_dir

    for path in sorted((config_dir() / "experiment").glob("*.yaml")):
        expected = yaml.safe_load(path.read_text()).get("expected")
        if path.stem == "smoke":
            assert expected is None
            continue
        # A paper that shows curves only (the sinusoid baseline) gives no number, and the source says so.
        metric = "mse" if "sinusoid" in path.stem else "accuracy"
        value = expected[metric]
        assert (value is None or 0 < value < (1 if metric == "accuracy" else 10)) and "et al." in expected["source"], \
            path.name
