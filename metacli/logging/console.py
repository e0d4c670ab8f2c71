"""The console every command prints to, and the table of a run's test results."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

console = Console()


def results_table(results: dict) -> Table:
    table = Table(title="metacli test results")
    for column in ("algorithm", "dataset", "split", "episodes", "bn mode", "accuracy (95% CI)"):
        table.add_column(column)
    task = results["task"]
    table.add_row(results["algorithm"], results["dataset"]["name"], str(results["dataset"].get("split", "-")),
                  f"{results['episodes']} x {task['n_way']}-way {task['k_shot']}-shot", results["bn_mode"],
                  f"{100 * results['accuracy']:.2f} ± {100 * results['ci95']:.2f} %")
    return table
