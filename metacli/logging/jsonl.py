"""Metrics as one JSON object per line: the run's own durable record."""
from __future__ import annotations

import json
from pathlib import Path

from metacli.metrics import is_number


def parse_rows(text: str) -> list[dict]:
    """The rows of a metrics file's text; a line cut short by a kill, or otherwise not a JSON object, is skipped."""
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_rows(path: Path) -> list[dict]:
    """:func:`parse_rows` of a metrics file, for reading only: none when it cannot be read."""
    try:
        return parse_rows(Path(path).read_text())
    except (OSError, UnicodeDecodeError):
        return []


class JsonlLogger:
    """Appends ``{"step": ..., **metrics}`` rows to ``run_dir/filename``.

    On resume, rows past the checkpoint's step are dropped first, so a resumed run has no duplicated rows; so are a
    line that a kill cut short and a row whose step is not a number, so the file stays one JSON object a line.
    """

    def __init__(self, run_dir: str, filename: str = "metrics.jsonl", resume_step: int | None = None, **_: object) -> None:
        self.path = Path(run_dir) / filename
        if resume_step is not None and self.path.exists():
            # An undecodable byte spoils at most its own row, never the rest of the history.
            rows = parse_rows(self.path.read_text(errors="replace"))
            kept = [row for row in rows if is_number(row.get("step", 0)) and row.get("step", 0) <= resume_step]
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
