"""Published accuracies at each paper's own protocol (``metacli/published.yaml``), for the runs whose config gives
no ``expected:`` of its own: ``metacli report`` sets the paper's number beside an algorithm's default run too."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml

from metacli.config_schema import algo_targets

PUBLISHED = Path(__file__).with_name("published.yaml")


@lru_cache(maxsize=None)
def _table() -> dict:
    return yaml.safe_load(PUBLISHED.read_text())


@lru_cache(maxsize=None)
def _algo_names() -> dict[str, str]:
    """Each shipped learner class path's ``algo=`` option (read once: a report asks for every row)."""
    return {target: name for name, target in algo_targets().items()}


def published(results: dict, overrides: list[str]) -> dict | None:
    """The published ``{accuracy, ci95, source}`` for a run's dataset, task shape and algorithm (``overrides``, the
    run's own, tell first-order MAML apart); None where no paper reports that case, or for another protocol than
    plain N-way K-shot episodes."""
    if (results.get("test_fingerprint") or {}).get("protocol", "episodes") != "episodes":
        return None
    name = _algo_names().get(results.get("algo"))
    if name == "maml" and "algo.first_order=true" in overrides:
        name = "maml_first_order"
    task = results.get("task") or {}
    shape = f"{task.get('n_way')}w{task.get('k_shot')}s"
    return _table().get((results.get("dataset") or {}).get("name"), {}).get(shape, {}).get(name)
