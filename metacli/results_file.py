"""A run's ``results.json`` read as data: first its JSON, then the shape that ``metacli report`` and ``metacli
compare`` rely on, so that a damaged or hand-edited file is one line naming it, not a traceback deep in a table."""
from __future__ import annotations

import json
from pathlib import Path

from metacli.errors import ConfigError
from metacli.metrics import HIGHER_IS_BETTER, is_number

#: The parts of a results.json that are objects, and those that are lists (a continual run's stream lengths, a
#: meta-RL run's adaptation stages), whenever they are there.
OBJECTS = ("task", "dataset", "test_fingerprint", "expected")
LISTS = ("continual", "stages")
#: Settings a test fingerprint leaves out where they have these values, so that results written before the setting
#: existed keep their fingerprints (and stay comparable).
FINGERPRINT_DEFAULTS = {"protocol": "episodes"}


def shape_problem(results: object) -> str | None:
    """What makes ``results`` unusable as a results.json, in a few words; None when nothing does."""
    if not isinstance(results, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(results), "a number")
        return f"{kind}, not an object"
    metric = results.get("metric", "accuracy")
    if metric not in HIGHER_IS_BETTER:
        return f"its metric {metric!r} is none of {', '.join(HIGHER_IS_BETTER)}"
    if metric not in results:
        return f"no {metric} score"
    if not is_number(results[metric]):
        return f"its {metric} is {results[metric]!r}, not a number"
    if results.get("ci95") is not None and not is_number(results["ci95"]):
        return f"its ci95 is {results['ci95']!r}, not a number"
    for sections, kind, name in ((OBJECTS, dict, "an object"), (LISTS, list, "a list")):
        odd = [s for s in sections if results.get(s) is not None and not isinstance(results[s], kind)]
        if odd:
            return f"its {odd[0]} is not {name}"
    scores = results.get("episode_scores")
    if scores is not None and not (isinstance(scores, list) and scores and all(map(is_number, scores))):
        return "its episode_scores are not a list of numbers"
    return None


def read_results_file(file: Path) -> dict:
    """The results in ``file``; a ConfigError naming the file and its problem when it cannot be used."""
    try:
        results = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problem = str(exc)
    else:
        if isinstance(results, dict) and "episode_accuracies" in results:  # the name before other task families
            results["episode_scores"] = results.pop("episode_accuracies")
        problem = shape_problem(results)
        if problem is None:
            return results
    raise ConfigError(f"{file} is not a readable results.json ({problem}): re-test that run with metacli eval "
                      "checkpoint=RUN_DIR, or leave it out")
