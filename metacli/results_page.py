"""The reproduced-results page (``metacli report PATHS --format results``, docs/results.md): each protocol's score
beside the paper's with a verdict, its budget, wall time and the command that reruns it, the papers' sources and
other anchors, and the runs still training (a checkpoint or metrics but no results.json yet) with the command that
resumes them."""
from __future__ import annotations

import shlex
from itertools import takewhile
from pathlib import Path

from metacli.errors import ConfigError
from metacli.logging.jsonl import read_rows
from metacli.metrics import HIGHER_IS_BETTER, show
from metacli.reliability.run_dir import LAST, METRICS, RESULTS
from metacli.report import cell_text, override_key, saved_overrides, read_saved, find_results, rows

RESULTS_COLUMNS = ("experiment", "task", "ours", "paper", "difference", "verdict", "budget", "wall time", "command")
TRAINING_COLUMNS = ("experiment", "steps done", "best validation so far", "resume with")

_INTRO = (
    "This page is generated from the runs' results.json files; regenerate it with `{command}`. *ours* is our test "
    "score ± its 95 % CI (over the test episodes of one run, or a t-interval over seeds), *paper* the paper's number "
    "± the CI it gives, *difference* ours − paper (in percentage points for accuracy). *verdict*: `within the "
    "paper's CI` when the difference is no larger than that CI, `within 1 point` when the paper gives no CI; "
    "`above` when ours is better beyond that, `short by X points` when worse. For MSE, lower is better: `lower "
    "(better)`, `higher by X`, or `no CI to judge` when the paper gives no CI and ours is not lower. The papers' "
    "sources are listed below the table.")

#: Overrides that say where and how a run was written, not what it trains.
_NOT_IN_COMMAND = ("hydra.", "trainer.resume", "trainer.progress")
#: Float subtraction must not flip a verdict on numbers the papers give to four decimals.
_TOLERANCE = 1e-9


def unfinished_runs(paths: list[str | Path]) -> list[Path]:
    """Run dirs at or under ``paths`` holding a checkpoint or metrics but no results.json: still training, or
    stopped before their test."""
    found = set()
    for path in (Path(p) for p in paths if Path(p).is_dir()):
        for name in (LAST, METRICS):
            found.update(file.parent for file in path.rglob(name) if not (file.parent / RESULTS).exists())
    return sorted(found)


def _latest(run: Path, name: str) -> Path:
    """A saved Hydra file of the run's latest session: a resume (which may raise trainer.steps) keeps its own."""
    resumed = run / ".hydra" / "resumed" / name
    return resumed if resumed.exists() else run / ".hydra" / name


def _trainer_int(run: Path, key: str) -> int | None:
    config = read_saved(_latest(run, "config.yaml"))
    value = (config.get("trainer") or {}).get(key) if isinstance(config, dict) else None
    return value if isinstance(value, int) else None


def _experiment(run: Path) -> str:
    overrides = saved_overrides(_latest(run, "overrides.yaml"))
    given = [o.split("=", 1)[1] for o in overrides if override_key(o) == "experiment"]
    return given[-1] if given else run.name


def _command_overrides(run: Path) -> list[str]:
    """The overrides of the run's latest session that shape what it trains; seed 0 is the default and goes too."""
    def default_seed(override: str) -> bool:
        return override_key(override) == "seed" and override.split("=", 1)[1] == "0"

    return [o for o in saved_overrides(_latest(run, "overrides.yaml"))
            if not override_key(o).startswith(_NOT_IN_COMMAND) and not default_seed(o)]


def train_command(runs: list[Path], seeds: list) -> str:
    """The command that reruns a protocol: the first run's overrides, its seeds as a multirun when they are several."""
    overrides = [o for o in _command_overrides(runs[0]) if override_key(o) != "seed"]
    seeds = list(dict.fromkeys(seeds))
    if len(seeds) > 1:
        return shlex.join(["metacli", "train", "-m", *overrides, "seed=" + ",".join(map(str, seeds))])
    return shlex.join(["metacli", "train", *overrides, *([f"seed={seeds[0]}"] if seeds[0] != 0 else [])])


def resume_command(run: Path) -> str:
    return shlex.join(["metacli", "train", *_command_overrides(run), "trainer.resume=true", f"hydra.run.dir={run}"])


def verdict(metric: str, ours: float, paper: float | None, ci: float | None) -> str:
    """Ours against the paper's number: within its CI (1 point of accuracy when it gives none), better beyond it, or
    worse by how much."""
    if paper is None:
        return "-"
    diff = ours - paper
    gain = diff if HIGHER_IS_BETTER.get(metric, True) else -diff
    margin = ci if ci is not None else (0.01 if metric == "accuracy" else None)
    if margin is not None and abs(diff) <= margin + _TOLERANCE:
        return "within the paper's CI" if ci is not None else "within 1 point"
    if gain > 0:
        return "above" if metric == "accuracy" else "lower (better)"
    if margin is None:
        return "no CI to judge"
    return f"short by {-100 * gain:.2f} points" if metric == "accuracy" else f"higher by {show(metric, -gain)}"


def _paper(row: dict) -> tuple[float | None, float | None]:
    expected = row["expected"] or {}
    return expected.get(row["metric"]), expected.get("ci95")


def _difference(row: dict) -> str:
    paper = _paper(row)[0]
    if paper is None:
        return "-"
    if row["metric"] == "accuracy":
        return f"{100 * (row['test'] - paper):+.2f} points"
    return show(row["metric"], row["test"] - paper, signed=True)


def _budget(run: Path, results: dict) -> str:
    steps, meta_batch = _trainer_int(run, "steps") or results.get("steps"), _trainer_int(run, "meta_batch")
    if not isinstance(steps, int):
        return "-"
    tasks = "" if meta_batch is None else f" × {meta_batch:,} task{'' if meta_batch == 1 else 's'}"
    return f"{steps:,} steps{tasks}"


def _results_cells(row: dict, by_run: dict[str, dict]) -> list[str]:
    runs, results = [Path(run) for run in row["runs"]], [by_run[run] for run in row["runs"]]
    over = f"over {len(runs)} seeds" if len(runs) > 1 else f"over {results[0].get('episodes', '?')} episodes"
    paper, ci = _paper(row)
    return [_experiment(runs[0]), f"{row['dataset']} {row['task']}",
            f"{show(row['metric'], row['test'], row['ci95'])} {over}",
            "-" if paper is None else show(row["metric"], paper, ci), _difference(row),
            verdict(row["metric"], row["test"], paper, ci), _budget(runs[0], results[0]), cell_text(row, "wall time"),
            f"`{train_command(runs, [r.get('seed', 0) for r in results])}`"]


def _best_validation(logged: list[dict]) -> str:
    for metric, higher in HIGHER_IS_BETTER.items():
        key = f"val/{metric}"
        scored = [(r[key], r["step"]) for r in logged
                  if isinstance(r.get(key), (int, float)) and isinstance(r.get("step"), int)]
        if scored:
            value, step = (max if higher else min)(scored, key=lambda pair: pair[0])
            return f"{show(metric, value)} (step {step:,})"
    return "-"


def _training_cells(run: Path) -> list[str]:
    logged = read_rows(run / METRICS)
    done = next((r["step"] for r in reversed(logged) if isinstance(r.get("step"), int)), None)
    total = _trainer_int(run, "steps")
    progress = " of ".join("?" if n is None else f"{n:,}" for n in (done, total))
    return [_experiment(run), progress, _best_validation(logged), f"`{resume_command(run)}`"]


def _md_table(columns: tuple[str, ...], cells: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in cells]


def _anchors(row: dict) -> str:
    metric = row["metric"]
    given = (row["expected"] or {}).get("anchors") or []
    anchors = [a for a in given if isinstance(a, dict) and a.get(metric) is not None]
    return ", ".join(f"{a.get('source', 'no source given')} {show(metric, a[metric], a.get('ci95'))}" for a in anchors)


def _notes(title: str, notes: list[tuple[str, str]]) -> list[str]:
    """A section of one line per experiment with something to say; pooled protocols of one experiment say it once."""
    lines = list(dict.fromkeys(f"- {experiment}: {text}" for experiment, text in notes if text))
    return ["", f"## {title}", "", *lines] if lines else []


def reported_experiments(page: str) -> list[str]:
    """The experiments of a results page's table of results (its first column), in page order."""
    header, lines = _md_table(RESULTS_COLUMNS, [])[0], page.splitlines()  # the header as the page writes it
    if header not in lines:
        return []
    body = takewhile(lambda line: line.startswith("| "), lines[lines.index(header) + 2:])  # below its |---|
    return [line.split(" | ")[0].removeprefix("| ").strip() for line in body]


def _refuse_to_drop_results(out: str | None, experiments: set[str], paths: list[str]) -> None:
    """Refuse to overwrite a page at ``out`` that reports experiments the new page would lack: their runs are not
    under ``paths`` (another folder, or gone), and the page may be all that is left of their results."""
    if out is None or not Path(out).is_file():
        return
    dropped = list(dict.fromkeys(name for name in reported_experiments(Path(out).read_text())
                                 if name not in experiments))
    if dropped:
        named = ", ".join(dropped[:4]) + (f" and {len(dropped) - 4} more" if len(dropped) > 4 else "")
        raise ConfigError(f"{out} reports {named}, whose runs are not under "
                          f"{' '.join(paths)}: writing it would drop those results; add their run dirs to the "
                          f"paths, or delete {out} to start the page over")


def results_page(paths: list[str], out: str | None) -> str:
    """The reproduced-results page of the runs under ``paths``, naming the command that regenerates it. A page
    already at ``out`` is not overwritten by one that would drop some of its results."""
    training = unfinished_runs(paths)
    found = find_results(paths, required=not training)  # a tree of unfinished runs still makes a page
    by_run = {str(run): results for run, results in found}
    table = rows(found)
    cells = [_results_cells(row, by_run) for row in table]
    _refuse_to_drop_results(out, {c[0] for c in cells}, paths)
    command = shlex.join(["metacli", "report", *paths, "--format", "results", *(["--out", out] if out else [])])
    lines = ["# Reproduced results", "", _INTRO.format(command=command), "", *_md_table(RESULTS_COLUMNS, cells)]
    if not table:
        lines += ["", "No run has finished yet."]
    lines += _notes("Other anchors", [(c[0], _anchors(row)) for c, row in zip(cells, table)])
    lines += _notes("Sources", [(c[0], (row["expected"] or {}).get("source")) for c, row in zip(cells, table)])
    if training:
        lines += ["", "## Still training", "", "Runs with a checkpoint or metrics but no results.json yet; one that "
                  "stopped continues with its resume command.", "",
                  *_md_table(TRAINING_COLUMNS, [_training_cells(run) for run in training])]
    return "\n".join(lines) + "\n"
