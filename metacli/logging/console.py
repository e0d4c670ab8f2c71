"""The console every command prints to, its tables, and the table of a run's test results."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from metacli.metrics import show

console = Console()


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """A drawn table on a terminal; elsewhere (a log, a pipe) markdown, which stays readable where a box drawing
    squeezed to 80 columns does not."""
    if console.is_terminal:
        table = Table(title=title)
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*row)
        console.print(table)
        return
    lines = [title, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    print("\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]))


def print_results(results: dict) -> None:
    task, metric = results["task"], results["metric"]
    if "stages" in results:  # meta-RL: one row an adaptation stage, then the family's reference policies
        names = sorted(name for name in results["stages"][0] if name != "stage")
        rows = [[results["algorithm"], stage["stage"], *(show(name, stage[name][name], stage[name]["ci95"]) for name in names)]
                for stage in results["stages"]]
        rows += [[name, "reference", *("-" if n != "regret" else show(n, r["regret"], r["ci95"]) for n in names)]
                 for name, r in results.get("references", {}).items()]
        print_table(f"metacli test results: {results['dataset']['name']}, {results['episodes']} test tasks, "
                    f"{task['trajectories']} trajectories a task", ["algorithm", "stage", *names], rows)
        return
    if "generative" in results:  # the generated images beside the judge's ceiling and floor, and the copy check
        scored = results["generative"]
        rows = [["generated (recognisability)", show(metric, results[metric], results["ci95"])],
                ["real held-out (ceiling)", show(metric, scored["ceiling"]["accuracy"], scored["ceiling"]["ci95"])],
                ["unadapted generator (floor)", show(metric, scored["floor"]["accuracy"], scored["floor"]["ci95"])],
                ["distance to nearest conditioning image: generated / real",
                 f"{scored['copy_distance']['generated']['distance']:.3f} / {scored['copy_distance']['real']['distance']:.3f}"],
                ["Fréchet distance to real (judge features): generated / unadapted",
                 f"{scored['frechet']['generated']:.2f} / {scored['frechet']['unadapted']:.2f}"]]
        print_table(f"metacli generative results: {results['dataset']['name']}, {results['episodes']} episodes of "
                    f"{task['n_way']} unseen characters, {task['shots']} images each to adapt to",
                    ["", "judge accuracy (95% CI)"], rows)
        return
    if "continual" in results:  # one row a stream length
        rows = [[results["algorithm"], str(entry["classes"]), f"{entry['lr']:g}",
                 *(show("accuracy", entry[name][name], entry[name]["ci95"]) for name in ("accuracy", "forgetting",
                                                                                    "train_accuracy"))]
                for entry in results["continual"]]
        print_table(f"metacli continual results: {results['dataset']['name']}, {task['streams']} streams a length, "
                    f"{task['train_shots']} images a class learned online",
                    ["algorithm", "classes", "online lr", "retention (95% CI)", "forgetting", "learned images"], rows)
        return
    shape = (f"{task['n_way']}-way {task['k_shot']}-shot" if metric == "accuracy"
             else f"{task['k_shot']}-shot, {task['n_query']} queries")
    print_table("metacli test results", ["algorithm", "dataset", "split", "episodes", "bn mode", f"{metric} (95% CI)"],
                [[results["algorithm"], results["dataset"]["name"], str(results["dataset"].get("split", "-")),
                  f"{results['episodes']} x {shape}", results["bn_mode"],
                  show(metric, results[metric], results["ci95"])]])
