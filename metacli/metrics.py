"""The metrics task families are judged by, as reports and comparisons need them without loading torch: which
way is better, and how a value is shown."""
from __future__ import annotations

#: Each metric's direction: accuracy (classification) and return (reinforcement learning) up, mean squared error
#: (regression) and regret down.
HIGHER_IS_BETTER = {"accuracy": True, "mse": False, "return": True, "regret": False, "success": True}


def is_number(value: object) -> bool:
    """A JSON number: an int or float, not a bool (which Python counts as an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def show(metric: str, value: float, ci95: float | None = None, signed: bool = False) -> str:
    """A metric's value as people read it: accuracy in percent, others as numbers; with its ± CI if given, and
    its sign if ``signed`` (a difference)."""
    sign = "+" if signed else ""
    if metric in ("accuracy", "success"):  # rates, shown in percent
        return f"{100 * value:{sign}.2f}" + ("" if ci95 is None else f" ± {100 * ci95:.2f}") + " %"
    return f"{value:{sign}.4g}" + ("" if ci95 is None else f" ± {ci95:.2g}")


def task_label(results: dict) -> str:
    """A results.json's task shape in short: ``5w1s`` for N-way K-shot classification, ``streams of 600 classes``
    for continual learning, ``10-shot`` otherwise."""
    task = results.get("task", {})
    if task.get("protocol") == "generative":
        return f"{task.get('shots', '?')} images to generate from"
    if task.get("protocol") == "continual":
        return f"streams of {max(task.get('lengths') or [0])} classes"
    if results.get("metric", "accuracy") == "accuracy":
        return f"{task.get('n_way', '?')}w{task.get('k_shot', '?')}s"
    if results.get("metric") == "return":
        return f"{task.get('trajectories', '?')} traj. × {task.get('horizon', '?')} steps"
    return f"{task.get('k_shot', '?')}-shot"
