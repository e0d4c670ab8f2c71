"""``metacli compare RUN_A RUN_B``: two runs tested on the same fixed episodes, compared episode by episode.

Every run scores its test set on episodes fixed by the dataset's content, the task shape and ``eval.seed``, and
``results.json`` keeps each episode's accuracy with a fingerprint of those episodes. Two runs with the same
fingerprint can then be compared pairwise: the mean of the per-episode differences with its 95 % t-interval, and
the paired t-test's p-value. Pairing removes the variance the episodes share (some tasks are hard for every
method), so it detects differences that two overlapping ±CIs hide.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from scipy import stats

from metacli.arguments import ArgumentParser
from metacli.errors import ConfigError
from metacli.logging.console import print_table
from metacli.metrics import HIGHER_IS_BETTER, show, task_label
from metacli.reliability.run_dir import RESULTS
from metacli.results_file import FINGERPRINT_DEFAULTS, read_results_file


def read_results(path: str | Path) -> dict:
    """The results of a run dir, an eval dir, or a ``results.json`` itself, with its per-episode scores."""
    path = Path(path)
    file = path / RESULTS if path.is_dir() else path
    if not file.exists():
        raise ConfigError(f"{path} has no {RESULTS}: pass a finished run dir (metacli train) or an eval dir "
                          "(metacli eval)")
    results = read_results_file(file)
    if results.get("episode_scores") is None or results.get("test_fingerprint") is None:
        raise ConfigError(f"{file} has no per-episode scores (written by an older metacli): re-test the run with "
                          f"metacli eval checkpoint=<its run dir> and compare the eval dirs")
    return results


def _differences(a: dict, b: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """Every ``(key, a's value, b's value)`` where the two (nested) fingerprints differ, keys dotted."""
    found = []
    for key in sorted(set(a) | set(b)):
        left, right = a.get(key), b.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            found += _differences(left, right, f"{prefix}{key}.")
        elif left != right:
            found.append((f"{prefix}{key}", left, right))
    return found


#: The overrides of ``metacli eval`` that set each episode setting of a fingerprint.
EVAL_OVERRIDES = {"n_way": "task.n_way", "k_shot": "task.k_shot", "n_query": "task.n_query", "eval_seed": "eval.seed",
                  "episodes": "eval.episodes", "batch_size": "eval.batch_size", "protocol": "eval.protocol"}


def _retest(differences: list[tuple[str, object, object]]) -> str:
    """How to bring the second run onto the first's episodes, or the general advice where eval cannot."""
    overrides = [f"{EVAL_OVERRIDES[key]}={FINGERPRINT_DEFAULTS.get(key) if left is None else left}"
                 for key, left, _ in differences if key in EVAL_OVERRIDES]
    if len(overrides) < len(differences):
        return "re-test one with metacli eval checkpoint=RUN_DIR and the other's task.* and eval.*, then compare"
    return (f"re-test the second on the first's with metacli eval checkpoint=<the second's training run> "
            f"{' '.join(overrides)}, then compare the first with the re-test's dir")


def _p_text(p: float) -> str:
    """A p-value as read: one below what a float holds (every episode the same way) is not zero."""
    return "p < 1e-300" if p == 0 else f"p = {p:.3g}"


def paired_difference(a: dict, b: dict) -> dict:
    """Mean per-episode difference ``a - b`` of the runs' metric, its 95 % t-interval, the paired t-test's p-value,
    and how many episodes each run did better on; ConfigError when the two were not tested on the same episodes."""
    first, second = a["test_fingerprint"], b["test_fingerprint"]
    # The data's digest follows from its settings: name the setting that differs (dataset.crop_to_ink, say), and
    # the digest only when no setting does.
    settings = [{key: value for key, value in f.items() if key != "content_sha256"} for f in (first, second)]
    differences = _differences(*settings) or _differences(first, second)
    said = ", ".join(f"{key} {left} vs {right}" for key, left, right in differences)
    if any(key.split(".")[0] in ("dataset", "env", "content_sha256") for key, _, _ in differences):
        # metacli eval keeps a run's data settings, so no re-test can bring the two onto the same data.
        raise ConfigError(f"the two runs were tested on different data ({said}): episode by episode, only runs "
                          "on the same data compare; metacli report RUN_A RUN_B shows them side by side")
    if differences:
        raise ConfigError(f"the two runs were tested on different episodes ({said}): {_retest(differences)}")
    x, y = np.asarray(a["episode_scores"], float), np.asarray(b["episode_scores"], float)
    if len(x) != len(y):  # the same fingerprint fixes the number of episodes: one file was edited or cut short
        raise ConfigError(f"the two runs hold {len(x)} and {len(y)} episode scores for the same test episodes: one "
                          "results.json is damaged; re-test that run with metacli eval checkpoint=RUN_DIR")
    better = 1 if HIGHER_IS_BETTER[a.get("metric", "accuracy")] else -1
    d, n = x - y, len(x)
    sd = float(d.std(ddof=1)) if n > 1 else 0.0
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n) if n > 1 else math.inf
    # With identical scores on every episode there is no evidence of a difference (the t statistic is 0/0).
    p_value = float(stats.ttest_rel(x, y).pvalue) if sd > 0 else (1.0 if d.mean() == 0 else 0.0)
    return {"a": float(x.mean()), "b": float(y.mean()), "difference": float(d.mean()), "ci95": half,
            "p_value": p_value, "episodes": n, "a_wins": int((better * d > 0).sum()),
            "b_wins": int((better * d < 0).sum())}


def _label(results: dict, path: str) -> str:
    where = Path(path).resolve()
    short = where.parent if where.name == RESULTS else where
    return f"{results.get('algorithm', '?')} {task_label(results)} ({short.parent.name}/{short.name})"


def arguments() -> ArgumentParser:
    parser = ArgumentParser("metacli compare", __doc__)
    parser.add_argument("run_a", help="a run dir, eval dir or results.json")
    parser.add_argument("run_b", help="another one, tested on the same episodes")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    return parser


def main(argv: list[str]) -> None:
    args = arguments().parse_args(argv)
    a, b = read_results(args.run_a), read_results(args.run_b)
    paired = paired_difference(a, b)
    if args.format == "json":
        print(json.dumps({"run_a": args.run_a, "run_b": args.run_b, **paired}, indent=2))
        return
    metric = a.get("metric", "accuracy")
    unit = "streams" if "continual" in a else "episodes"  # a continual run is scored stream by stream
    print_table(f"paired comparison over the same {paired['episodes']} test {unit}", ["", metric, f"{unit} won"],
                [[f"A: {_label(a, args.run_a)}", show(metric, paired["a"]), str(paired["a_wins"])],
                 [f"B: {_label(b, args.run_b)}", show(metric, paired["b"]), str(paired["b_wins"])],
                 ["A - B", show(metric, paired["difference"], paired["ci95"], signed=True),
                  f"{_p_text(paired['p_value'])} (paired t-test)"]])
