"""``metacli report``: runs and sweeps in one table, seeds aggregated with a t-interval, md/csv/json out, the
same table written at the end of every multirun, and the reproduced-results page (``--format results``)."""
from __future__ import annotations

import csv
import json
import math
import re
import shlex
import shutil
from itertools import takewhile
from pathlib import Path

import pytest
import yaml
from scipy import stats

from conftest import assert_one_line_error, run_cli
from metacli import results_page
from metacli.errors import ConfigError
from metacli.report import find_results

SMOKE = ["experiment=smoke", "trainer.steps=4", "trainer.val_every=2", "eval.episodes=20"]


@pytest.fixture(scope="module")
def seeds_and_algorithms(tmp_path_factory) -> Path:
    sweep = tmp_path_factory.mktemp("report") / "sweep"
    done = run_cli("train", "-m", "algo=protonet,matching_net", "seed=0,1,2", *SMOKE, f"hydra.sweep.dir={sweep}",
                   "expected={accuracy:0.5,ci95:0.01,source:a test}", cwd=sweep.parent)
    assert done.returncode == 0, done.stderr
    # The sweep ends by saying where its report went (smoke runs draw no pictures).
    assert done.stdout.rstrip().endswith(f"sweep report in {sweep}: summary.md, summary.csv"), done.stdout
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


def test_a_rerun_of_a_seed_is_a_row_of_its_own_not_another_seed(seeds_and_algorithms, tmp_path):
    original = next(file.parent for file in seeds_and_algorithms.rglob("results.json")
                    if json.loads(file.read_text())["algorithm"] == "ProtoNet")
    rerun = tmp_path / "rerun"
    shutil.copytree(original, rerun)
    done = run_cli("report", str(seeds_and_algorithms), str(rerun), "--format", "json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    protonet = sorted((row for row in json.loads(done.stdout) if row["algorithm"] == "ProtoNet"),
                      key=lambda row: len(row["runs"]))
    assert [len(row["runs"]) for row in protonet] == [1, 3]
    alone = json.loads((rerun / "results.json").read_text())
    assert (protonet[0]["test"], protonet[0]["ci95"]) == (alone["accuracy"], alone["ci95"])


def test_the_report_writes_markdown_and_csv(seeds_and_algorithms, tmp_path):
    for form in ("md", "csv"):
        done = run_cli("report", str(seeds_and_algorithms), "--format", form, "--out", str(tmp_path / f"r.{form}"),
                       cwd=tmp_path)
        assert done.returncode == 0 and done.stdout == f"report written to {tmp_path / f'r.{form}'}\n", done
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


RESULTS_COLUMNS = ["experiment", "task", "ours", "paper", "difference", "verdict", "budget", "wall time", "command"]


def page_tables(page: str) -> dict[str, list[dict]]:
    """Each markdown table of a page as rows of {column: cell}, by its header's columns joined with spaces."""
    tables, lines = {}, page.splitlines()
    for at, (line, below) in enumerate(zip(lines, lines[1:])):
        if line.startswith("| ") and below.startswith("|---"):
            header = line.strip("| ").split(" | ")
            body = [row.strip("| ").split(" | ") for row in takewhile(lambda row: row.startswith("| "), lines[at + 2:])]
            assert all(len(cells) == len(header) for cells in body), page
            tables[" ".join(header)] = [dict(zip(header, cells)) for cells in body]
    return tables


def command_overrides(run: Path) -> list[str]:
    """What a run was started with, less where and how it was written and the default seed."""
    given = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    return [o for o in given if not o.startswith(("hydra.", "trainer.resume", "trainer.progress")) and o != "seed=0"]


def paper_verdict(ours: float, paper: float, ci: float) -> str:
    if abs(ours - paper) <= ci:
        return "within the paper's CI"
    return "above" if ours > paper else f"short by {100 * (paper - ours):.2f} points"


def test_the_results_page_sets_each_protocol_beside_the_paper(seeds_and_algorithms, tmp_path):
    out = tmp_path / "results.md"
    done = run_cli("report", str(seeds_and_algorithms), "--format", "results", "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    page = out.read_text()
    assert page.startswith("# Reproduced results\n")
    assert f"`metacli report {seeds_and_algorithms} --format results --out {out}`" in page
    table = page_tables(page)[" ".join(RESULTS_COLUMNS)]
    assert len(table) == 2 and {row["experiment"] for row in table} == {"smoke"}
    scores = scores_by_algorithm(seeds_and_algorithms)
    for row in table:
        command = shlex.split(row["command"].strip("`"))
        algo = next(o.split("=")[1] for o in command if o.startswith("algo="))
        runs = [r.parent for r in seeds_and_algorithms.rglob("results.json")
                if f"algo={algo}" in yaml.safe_load((r.parent / ".hydra" / "overrides.yaml").read_text())]
        overrides = [o for o in command_overrides(runs[0]) if not o.startswith("seed=")]
        assert command[:3] == ["metacli", "train", "-m"] and sorted(command[3:-1]) == sorted(overrides)
        assert sorted(command[-1].removeprefix("seed=").split(",")) == ["0", "1", "2"]
        mean = sum(scores[{"protonet": "ProtoNet", "matching_net": "MatchingNet"}[algo]].values()) / 3
        assert row["ours"].startswith(f"{100 * mean:.2f} ± ") and row["ours"].endswith("% over 3 seeds")
        assert row["paper"] == "50.00 ± 1.00 %" and row["difference"] == f"{100 * (mean - 0.5):+.2f} points"
        assert row["verdict"] == paper_verdict(mean, 0.5, 0.01)
        assert row["task"].endswith(" 5w1s") and row["budget"] == "4 steps × 2 tasks"
    assert "## Sources\n\n- smoke: a test\n" in page and "Still training" not in page


def test_the_results_page_lists_the_runs_still_training(seeds_and_algorithms, tmp_path):
    papers = tmp_path / "papers"
    first = next(r.parent for r in sorted(seeds_and_algorithms.rglob("results.json")))
    shutil.copytree(first, papers / "finished")
    results = json.loads((papers / "finished" / "results.json").read_text())
    results["expected"]["anchors"] = [{"accuracy": 0.955, "source": "people, Lake et al. 2015"}]
    (papers / "finished" / "results.json").write_text(json.dumps(results))
    shutil.copytree(first, papers / "training")
    (papers / "training" / "results.json").unlink()
    # As scripts/reproduce.sh starts it; an early validation that stays the best, and a last line cut by a kill.
    with (papers / "training" / ".hydra" / "overrides.yaml").open("a") as overrides:
        overrides.write("- trainer.resume=true\n")
    early = {"step": 1, "val/accuracy": 0.99, "val/ci95": 0.01}
    metrics = papers / "training" / "metrics.jsonl"
    metrics.write_text(json.dumps(early) + "\n" + metrics.read_text() + '{"step": 5, "val/acc')
    done = run_cli("report", str(papers), "--format", "results", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    tables = page_tables(done.stdout)
    [row] = tables[" ".join(RESULTS_COLUMNS)]
    # One run: its seed 0 is the default and the command names no seed, no multirun.
    assert shlex.split(row["command"].strip("`")) == ["metacli", "train", *command_overrides(first)]
    assert row["ours"].endswith("% over 20 episodes")
    assert row["verdict"] == paper_verdict(results["accuracy"], 0.5, 0.01)
    assert "## Other anchors\n\n- smoke: people, Lake et al. 2015 95.50 %\n" in done.stdout

    logged = [json.loads(line) for line in (first / "metrics.jsonl").read_text().splitlines()]
    best = max((r for r in [early, *logged] if "val/accuracy" in r), key=lambda r: r["val/accuracy"])
    [training] = tables["experiment steps done best validation so far resume with"]
    assert training["experiment"] == "smoke" and training["steps done"] == f"{logged[-1]['step']} of 4"
    assert training["best validation so far"] == f"{100 * best['val/accuracy']:.2f} % (step {best['step']:,})"
    assert shlex.split(training["resume with"].strip("`")) == [
        "metacli", "train", *command_overrides(first), "trainer.resume=true", f"hydra.run.dir={papers / 'training'}"]

    alone = run_cli("report", str(papers / "training"), "--format", "results", cwd=tmp_path)
    assert alone.returncode == 0 and "No run has finished yet." in alone.stdout, alone.stderr
    assert len(page_tables(alone.stdout)[" ".join(RESULTS_COLUMNS)]) == 0


def test_the_results_page_keeps_results_whose_runs_are_gone(seeds_and_algorithms, tmp_path):
    out = tmp_path / "results.md"
    write = ["report", "--format", "results", "--out", str(out)]
    assert run_cli(*write, str(seeds_and_algorithms), cwd=tmp_path).returncode == 0
    page = out.read_text()
    assert results_page.reported_experiments(page) == ["smoke", "smoke"]
    again = run_cli(*write, str(seeds_and_algorithms), cwd=tmp_path)
    assert again.returncode == 0 and out.read_text() == page, again.stderr
    # A tree holding only a run still training, as after the finished runs' folders were lost.
    training = tmp_path / "papers" / "training"
    shutil.copytree(next(r.parent for r in sorted(seeds_and_algorithms.rglob("results.json"))), training)
    (training / "results.json").unlink()
    assert_one_line_error(run_cli(*write, str(training.parent), cwd=tmp_path),
                          f"{out} reports smoke, whose runs are not under {training.parent}: writing it would drop")
    assert out.read_text() == page
    out.unlink()
    assert run_cli(*write, str(training.parent), cwd=tmp_path).returncode == 0
    assert "No run has finished yet." in out.read_text()


@pytest.mark.parametrize("metric, ours, paper, ci, verdict", [
    ("accuracy", 0.975, 0.98, None, "within 1 point"),
    ("accuracy", 0.995, 0.98, None, "above"),
    ("accuracy", 0.9, 0.98, None, "short by 8.00 points"),
    ("accuracy", 0.9, 0.98, 0.1, "within the paper's CI"),
    ("accuracy", 0.9, None, None, "-"),
    ("mse", 0.5, 0.67, None, "lower (better)"),
    ("mse", 0.7, 0.67, None, "no CI to judge"),
    ("mse", 0.7, 0.67, 0.05, "within the paper's CI"),
    ("mse", 0.8, 0.67, 0.05, "higher by 0.13"),
])
def test_the_verdict_mirrors_for_a_metric_where_lower_is_better(metric, ours, paper, ci, verdict):
    assert results_page.verdict(metric, ours, paper, ci) == verdict


def test_a_path_without_runs_is_one_line(tmp_path):
    assert_one_line_error(run_cli("report", str(tmp_path), cwd=tmp_path), "no results.json under")
    assert_one_line_error(run_cli("report", str(tmp_path / "missing"), cwd=tmp_path), "does not exist")


def test_a_bad_argument_is_one_line(tmp_path):
    assert_one_line_error(run_cli("report", "--format", "xls", str(tmp_path), cwd=tmp_path),
                          "argument --format: invalid choice: 'xls'")
    assert_one_line_error(run_cli("compare", str(tmp_path), cwd=tmp_path), "the following arguments are required: run_b")


def test_every_paper_protocol_carries_the_papers_number():
    from test_configs import compose, options

    for name in options("experiment"):
        # Composed, since an experiment may build on another (the transductive Lake recipe on the inductive one).
        expected = compose(f"experiment={name}").get("expected")
        if name.startswith("smoke"):
            assert expected is None
            continue
        # A paper that shows curves only (the sinusoid baseline, meta-RL) gives no number, and the source says so.
        metric = "mse" if "sinusoid" in name else "return" if "rl_" in name or "rl2" in name else "accuracy"
        value = expected[metric]
        assert (value is None or 0 < value < (1 if metric == "accuracy" else 10)) and "et al." in expected["source"], \
            name


def test_published_numbers_name_real_algorithms_datasets_and_sources():
    from metacli.config_schema import algo_targets
    from metacli.published import _table

    datasets = {"omniglot", "mini-imagenet"}
    for dataset, shapes in _table().items():
        assert dataset in datasets
        for shape, entries in shapes.items():
            assert shape in {"5w1s", "5w5s", "20w1s", "20w5s"}
            for algo, entry in entries.items():
                assert algo in {*algo_targets(), "maml_first_order"}, algo
                assert 0 < entry["accuracy"] < 1 and ("et al." in entry["source"] or "&" in entry["source"])


def test_a_default_run_gets_the_published_number(seeds_and_algorithms, tmp_path):
    """A run whose config names no ``expected:`` (an algorithm's default run) is set beside the paper that reports
    its dataset, shape and algorithm; first-order MAML by its override; nothing for another protocol."""
    from metacli.published import published

    maml = {"algo": "metacli.algorithms.maml.MAML", "dataset": {"name": "omniglot"}, "task": {"n_way": 5, "k_shot": 1}}
    assert published(maml, [])["accuracy"] == 0.987
    assert published(maml, ["algo.first_order=true"])["accuracy"] == 0.983
    assert published({**maml, "test_fingerprint": {"protocol": "within_alphabet"}}, []) is None
    assert published({**maml, "algo": "metacli.algorithms.leo.LEO"}, []) is None

    run = next(r.parent for r in sorted(seeds_and_algorithms.rglob("results.json"))
               if json.loads(r.read_text())["algorithm"] == "ProtoNet")
    copy = tmp_path / "papers" / "default" / "protonet"
    shutil.copytree(run, copy)
    results = json.loads((copy / "results.json").read_text())
    results.update(expected=None, dataset={**results["dataset"], "name": "omniglot"})
    (copy / "results.json").write_text(json.dumps(results))
    done = run_cli("report", str(tmp_path / "papers"), "--format", "results", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    row = page_tables(done.stdout)[" ".join(RESULTS_COLUMNS)][0]
    assert row["paper"] == "98.80 %" and "Snell et al. 2017" in done.stdout


RESULTS_DAMAGE = {
    "that is an array": ("[1, 2]", "an array, not an object"),
    "without its score": ('{"algorithm": "protonet"}', "no accuracy score"),
    "of an unknown metric": ('{"metric": "speed", "speed": 1}', "its metric 'speed' is none of accuracy"),
    "with a score that is not a number": ('{"accuracy": "high", "ci95": 0.1}', "its accuracy is 'high', not a number"),
    "with a CI that is not a number": ('{"accuracy": 0.9, "ci95": "wide"}', "its ci95 is 'wide', not a number"),
    "with a section that is not an object": ('{"accuracy": 0.9, "dataset": "omniglot"}',
                                              "its dataset is not an object"),
    "with stream lengths that are not a list": ('{"accuracy": 0.9, "continual": {}}', "its continual is not a list"),
}


@pytest.mark.parametrize("damage", list(RESULTS_DAMAGE))
def test_a_damaged_results_file_is_named_with_its_problem(tmp_path, damage):
    content, problem = RESULTS_DAMAGE[damage]
    (tmp_path / "results.json").write_text(content)
    named = f"{tmp_path / 'results.json'} is not a readable results.json ({problem}"
    with pytest.raises(ConfigError, match=re.escape(named)):
        find_results([tmp_path])


def test_a_damaged_results_file_or_a_bad_out_path_is_one_line(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text("null")
    assert_one_line_error(run_cli("report", str(tmp_path / "run"), cwd=tmp_path), "(null, not an object)")
    assert_one_line_error(run_cli("report", str(tmp_path), "--out", str(tmp_path / "no" / "x.md"), cwd=tmp_path),
                          f"the folder {tmp_path / 'no'} does not exist")
    assert_one_line_error(run_cli("report", str(tmp_path), "--out", str(tmp_path), cwd=tmp_path), "is a folder")
