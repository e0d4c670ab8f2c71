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
from metacli.results_file import read_results_file


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


def _first_difference(a: dict, b: dict, prefix: str = "") -> str | None:
    for key in sorted(set(a) | set(b)):
        left, right = a.get(key), b.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            found = _first_difference(left, right, f"{prefix}{key}.")
            if found:
                return found
        elif left != right:
            return f"{prefix}{key} {left} vs {right}"
    return None


def paired_difference(a: dict, b: dict) -> dict:
    """Mean per-episode difference ``a - b`` of the runs' metric, its 95 % t-interval, the paired t-test's p-value,
    and how many episodes each run did better on; ConfigError when the two were not tested on the same episodes."""
    first, second = a["test_fingerprint"], b["test_fingerprint"]
    # The data's digest follows from its settings: name the setting that differs (dataset.crop_to_ink, say), and
    # the digest only when no setting does.
    settings = [{key: value for key, value in f.items() if key != "content_sha256"} for f in (first, second)]
    difference = _first_difference(*settings) or _first_difference(first, second)
    if difference is not None and difference.startswith(("dataset.", "env.", "content_sha256")):
        # metacli eval keeps a run's data settings, so no re-test can bring the two onto the same data.
        raise ConfigError(f"the two runs were tested on different data ({difference}): episode by episode, only runs "
                          "on the same data compare; metacli report RUN_A RUN_B shows them side by side")
    if difference is not None:
        raise ConfigError(f"the two runs were tested on different episodes ({difference}): re-test one with "
                          "metacli eval checkpoint=RUN_DIR and the other's task.* and eval.seed, then compare")
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
                  f"p = {paired['p_value']:.3g} (paired t-test)"]])
