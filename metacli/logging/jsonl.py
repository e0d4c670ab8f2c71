"""Metrics as one JSON object per line: the run's own durable record."""
from __future__ import annotations

import json
from pathlib import Path


def read_rows(path: Path) -> list[dict]:
    """The rows of a metrics file; a line cut short by a kill, or otherwise not a JSON object, is skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _step(row: dict) -> float:
    step = row.get("step", 0)
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else float("inf")


class JsonlLogger:
    """Appends ``{"step": ..., **metrics}`` rows to ``run_dir/filename``.

    On resume, rows past the checkpoint's step are dropped first, so a resumed run has no duplicated rows, and so is
    a row that a kill cut short or that names no step: the file stays one JSON object a line.
    """

    def __init__(self, run_dir: str, filename: str = "metrics.jsonl", resume_step: int | None = None, **_: object) -> None:
        self.path = Path(run_dir) / filename
        if resume_step is not None and self.path.exists():
            kept = [row for row in read_rows(self.path) if _step(row) <= resume_step]
            self.path.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in kept))
        self._handle = self.path.open("a")

    def log(self, metrics: dict, step: int) -> None:
        self._handle.write(json.dumps({"step": step, **metrics}, sort_keys=True) + "\n")
        self._handle.flush()

    def log_results(self, results: dict) -> None:
        pass  # results.json is written by the runner

    def log_images(self, images: dict) -> None:
        pass  # the pictures are written next to the results

    def close(self) -> None:
        self._handle.close()
