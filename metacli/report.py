"""``metacli report PATH...``: every run under the paths in one table, runs that differ only in seed aggregated.

A row is one protocol (algorithm, dataset, task, backbone, BatchNorm mode, steps, and the other overrides the run
was started with, seed aside). Its score is the run's declared metric (``results["metric"]``: accuracy, or MSE for
regression) ± the run's 95 % CI over test episodes; over several seeds, the mean of the seeds' scores ± a 95 %
t-interval over seeds, with each seed's score listed. The same table ends every
multirun in the sweep dir (``summary.md``, ``summary.csv``, and with ``trainer.plots`` the sweep's pictures),
written by :class:`SweepSummary`.

``--format results`` writes the reproduced-results page (docs/results.md): each protocol's score beside the paper's
with a verdict, its budget, wall time and the command that reruns it, the paper's sources and other anchors, and
the runs still training (a checkpoint or metrics but no results.json yet) with the command that resumes them.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from collections import defaultdict
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from rich.table import Table
from scipy import stats

from metacli.arguments import ArgumentParser
from metacli.errors import ConfigError
from metacli.logging.console import console
from metacli.metrics import task_label
from metacli.published import published
from metacli.reliability.atomic import replace_file
from metacli.reliability.run_dir import RESULTS, TIMING
from metacli.results_file import read_results_file

COLUMNS = ("algorithm", "dataset", "task", "backbone", "bn mode", "steps", "overrides", "best val step", "seeds",
           "metric", "test", "paper", "difference", "per seed", "wall time", "runs")


def find_results(paths: list[str | Path], required: bool = True) -> list[tuple[Path, dict]]:
    """``(run dir, results)`` for every ``results.json`` at or under ``paths``, in path order; finding none is an
    error only if ``required``."""
    found = []
    for path in map(Path, paths):
        if not path.exists():
            raise ConfigError(f"{path} does not exist: pass run dirs, sweep dirs or folders holding them")
        files = [path] if path.is_file() else sorted(path.rglob(RESULTS))
        found += [(file.parent, read_results_file(file)) for file in files]
    if required and not found:
        raise ConfigError(f"no results.json under {', '.join(map(str, paths))}: pass finished run or sweep dirs")
    return found


# Overrides that do not make a run another protocol: its seed, and where and how it was written.
_NOT_PROTOCOL = ("seed", "hydra.", "trainer.resume", "trainer.progress", "logger", "trainer.plots")


def read_saved(file: Path) -> object:
    """A file the run saved, read as plain data (a saved file is never code); None if missing or unreadable."""
    try:
        return yaml.safe_load(file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


def saved_overrides(file: Path) -> list[str]:
    given = read_saved(file)
    return [str(o) for o in given] if isinstance(given, list) else []


def override_key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def protocol_overrides(run: Path) -> list[str]:
    """The overrides a run was started with (``.hydra/overrides.yaml``, read as plain data), seed aside: runs that
    share them share a protocol, so a search's trials stay apart while a seed sweep's runs are pooled."""
    given = saved_overrides(run / ".hydra" / "overrides.yaml")
    return sorted(o for o in given if not override_key(o).startswith(_NOT_PROTOCOL))


def _protocol(run: Path, results: dict) -> tuple:
    data, meta_rl = results.get("dataset", {}), "stages" in results  # environments have no split or BatchNorm mode
    where = data.get("name", "?") if meta_rl else f"{data.get('name', '?')}/{data.get('split', '-')}"
    return (results.get("algorithm", "?"), where,
            task_label(results), str(results.get("backbone", "?") or "-").rsplit(".", 1)[-1],
            results.get("bn_mode", "-" if meta_rl else "?"), results.get("steps", "?"),
            " ".join(protocol_overrides(run)))


def _wall_seconds(run: Path) -> float | None:
    """The run's wall time (a resumed run's sessions added up); None for a run older than that record."""
    try:
        return float(json.loads((run / TIMING).read_text())["wall_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _start_order(run: Path) -> list:
    """Job 10 after job 2: the path's numbers compared as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", str(run))]


def _seed_repeats(runs: list[tuple[Path, dict]]) -> list[list[tuple[Path, dict]]]:
    """A protocol's runs split so that no row pools a seed with itself: the n-th run of each seed goes to the n-th
    row, in start order (Hydra's dated dirs and numbered jobs, numbers read as numbers). A rerun of a seed is not
    another sample."""
    repeats: list[list[tuple[Path, dict]]] = []
    taken: dict[object, int] = defaultdict(int)
    for run, results in sorted(runs, key=lambda pair: _start_order(pair[0])):
        seed = results.get("seed")
        if taken[seed] == len(repeats):
            repeats.append([])
        repeats[taken[seed]].append((run, results))
        taken[seed] += 1
    return repeats


def rows(found: list[tuple[Path, dict]]) -> list[dict]:
    """One row per protocol (and per rerun of its seeds): the seeds' runs aggregated."""
    groups: dict[tuple, list[tuple[Path, dict]]] = defaultdict(list)
    for run, results in found:
        groups[_protocol(run, results)].append((run, results))
    table = []
    for protocol, runs in ((p, repeat) for p, runs in groups.items() for repeat in _seed_repeats(runs)):
        metric = runs[0][1].get("metric", "accuracy")
        scores = [results[metric] for _, results in runs]
        if len(runs) == 1:
            mean, half = scores[0], runs[0][1].get("ci95", float("nan"))
        else:
            mean = sum(scores) / len(scores)
            sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / (len(scores) - 1))
            half = float(stats.t.ppf(0.975, len(scores) - 1)) * sd / math.sqrt(len(scores))
        table.append({"algorithm": protocol[0], "dataset": protocol[1], "task": protocol[2], "backbone": protocol[3],
                      "bn mode": protocol[4], "steps": protocol[5], "overrides": protocol[6] or "-",
                      "best val step": ", ".join(str(r.get("best_val_step", "-")) for _, r in runs),
                      "seeds": ", ".join(str(r.get("seed", "?")) for _, r in runs), "metric": metric,
                      "test": mean, "ci95": half, "per seed": scores, "runs": [str(run) for run, _ in runs],
                      # A run without a paper protocol of its own (a default run) gets the published number.
                      "expected": (runs[0][1].get("expected")
                                   or published(runs[0][1], protocol_overrides(runs[0][0]))),
                      "wall time": [_wall_seconds(run) for run, _ in runs],
                      # What the CI is over: a continual run's test streams, a meta-RL run's tasks, else episodes.
                      "over": ("test streams" if "continual" in runs[0][1] else
                               "test tasks" if metric == "return" else "episodes")})
    return table


def cell_text(row: dict, column: str) -> str:
    scale = 100 if row["metric"] == "accuracy" else 1
    unit = " %" if scale == 100 else ""
    if column == "test":
        over = row.get("over", "episodes")
        spread = "t-interval over seeds" if len(row["per seed"]) > 1 else f"CI over {over}"
        return f"{scale * row['test']:.2f} ± {scale * row['ci95']:.2f}{unit} ({spread})"
    if column in ("paper", "difference"):
        expected = row["expected"] or {}
        if expected.get(row["metric"]) is None:
            return "-"
        if column == "difference":
            return f"{scale * (row['test'] - expected[row['metric']]):+.2f}{unit}"
        ci = f" ± {scale * expected['ci95']:.2f}" if expected.get("ci95") is not None else ""
        return f"{scale * expected[row['metric']]:.2f}{ci}{unit} ({expected.get('source', 'no source given')})"
    if column == "per seed":
        return ", ".join(f"{100 * s:.2f}" if row["metric"] == "accuracy" else f"{s:.4g}" for s in row["per seed"])
    if column == "wall time":
        return ", ".join("-" if seconds is None else _duration(seconds) for seconds in row["wall time"])
    if column == "runs":
        return str(len(row["runs"]))
    return str(row[column])


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def continual_markdown(found: list[tuple[Path, dict]]) -> str:
    """The continual runs among ``found``, one row each: retention at every stream length ± its 95 % CI over
    streams, with the forgetting per class and the online rate chosen on validation; empty if there are none."""
    runs = [(run, results) for run, results in found if "continual" in results]
    if not runs:
        return ""
    lengths = sorted({entry["classes"] for _, results in runs for entry in results["continual"]})
    columns = ["run", "algorithm", "steps", *(f"{length} classes" for length in lengths)]
    lines = ["", "Retention: test accuracy at a stream's end (± 95 % CI over streams); forgetting per class and the "
             "online rate (chosen on validation streams) in brackets", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for run, results in runs:
        by_length = {entry["classes"]: entry for entry in results["continual"]}
        cells = [f"{100 * e['accuracy']['accuracy']:.2f} ± {100 * e['accuracy']['ci95']:.2f} % (forgets "
                 f"{100 * e['forgetting']['forgetting']:.1f}, lr {e['lr']:g})" if (e := by_length.get(length)) else "-"
                 for length in lengths]
        lines.append("| " + " | ".join([str(run), results["algorithm"], str(results.get("steps", "?")), *cells]) + " |")
    return "\n".join(lines) + "\n"


def markdown(table: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell_text(row, c) for c in COLUMNS) + " |" for row in table]
    return "\n".join(lines) + "\n"


def csv_text(table: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    plain = [c for c in COLUMNS if c not in ("runs", "paper", "difference")]
    writer.writerow(plain + ["ci95", "paper", "difference", "runs"])
    for row in table:
        expected = (row["expected"] or {}).get(row["metric"])
        writer.writerow([row[c] for c in plain] + [row["ci95"], expected,
                                                   None if expected is None else row["test"] - expected,
                                                   " ".join(row["runs"])])
    return out.getvalue()


def rich_table(table: list[dict]) -> Table:
    shown = Table(title="metacli report")
    for column in COLUMNS:
        shown.add_column(column)
    for row in table:
        shown.add_row(*(cell_text(row, c) for c in COLUMNS))
    return shown


def arguments() -> ArgumentParser:
    parser = ArgumentParser("metacli report", __doc__)
    parser.add_argument("paths", nargs="+", help="run dirs, sweep dirs, or folders holding them")
    parser.add_argument("--format", choices=("table", "md", "csv", "json", "results"), default="table",
                        help="results: the reproduced-results page, with the runs still training")
    parser.add_argument("--out", help="write to this file instead of the terminal")
    parser.add_argument("--plots", metavar="DIR", help="also draw the runs into DIR: retention.png, the continual "
                                                       "runs' retention and forgetting against the stream length")
    return parser


def _check_out(out: Path) -> None:
    """``--out`` names a file in a folder that exists: checked before any work, so a long report never fails last."""
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder: name the file to write, e.g. --out {out / 'results.md'}")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: the folder {out.parent} does not exist; create it, or write elsewhere")


def _write(text: str, out: Path) -> None:
    """Write ``out`` whole or not at all: a failed write leaves the previous file as it was."""
    try:
        replace_file(out, text.encode())
    except OSError as exc:
        raise ConfigError(f"cannot write --out {out} ({exc.strerror}): name a file in a folder you can write") from None


def main(argv: list[str]) -> None:
    args = arguments().parse_args(argv)
    if args.out:
        _check_out(Path(args.out))
    if args.format == "results":
        from metacli.results_page import results_page  # it builds on this module's rows

        text = results_page(args.paths, args.out)
    else:
        found = find_results(args.paths)
        table = rows(found)
        if args.plots:
            _draw(found, Path(args.plots))
        if args.format == "table" and not args.out and console.is_terminal:
            console.print(rich_table(table))
            # Elsewhere (a log, a pipe) the table is markdown: a box drawing squeezed to 80 columns is unreadable.
            print(continual_markdown(found), end="")
            return
        text = {"md": markdown, "csv": csv_text, "json": lambda t: json.dumps(t, indent=2) + "\n",
                "table": markdown}[args.format](table)
        if args.format in ("md", "table"):
            text += continual_markdown(found)
    if args.out:
        _write(text, Path(args.out))
        console.print(f"report written to {args.out}", highlight=False, soft_wrap=True)
    else:
        print(text, end="")


def _draw(found: list[tuple[Path, dict]], folder: Path) -> None:
    """``metacli report --plots DIR``: the runs' comparison pictures."""
    from metacli import plots  # matplotlib is imported only by reports that draw

    continual = plots.continual_runs(found)
    if not continual:
        raise ConfigError("--plots draws continual runs (eval.protocol=continual) and none is among the paths: drop "
                          "--plots, or pass continual run dirs")
    folder.mkdir(parents=True, exist_ok=True)
    path = plots.save(plots.retention_figure(continual, "class-incremental streams"), folder / plots.RETENTION)
    console.print(f"retention and forgetting against the stream length: {path}", highlight=False, soft_wrap=True)


class SweepSummary(Callback):
    """At the end of a multirun, the report of its jobs in the sweep dir: ``summary.md`` and ``summary.csv``."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            found = find_results([sweep_dir], required=False)
        except ConfigError as exc:  # a job's damaged results.json: the jobs' own dirs are all there is
            console.print(f"no sweep summary: {exc}", style="yellow", highlight=False, soft_wrap=True)
            return
        if not found:  # no job finished: nothing to summarise
            return
        table = rows(found)
        replace_file(sweep_dir / "summary.md", markdown(table).encode())
        replace_file(sweep_dir / "summary.csv", csv_text(table).encode())
        written = ["summary.md", "summary.csv"]
        if config.trainer.plots:
            from metacli import plots  # matplotlib is imported only by sweeps that draw

            for name, figure in plots.sweep_figures(found, table).items():
                plots.save(figure, sweep_dir / name)
                written.append(name)
        if console.is_terminal:
            console.print(rich_table(table))
        else:
            print(markdown(table), end="")
        console.print(f"sweep report in {sweep_dir}: {', '.join(written)}", highlight=False, soft_wrap=True)
