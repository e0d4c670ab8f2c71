"""Metrics as one JSON object per line: the run's own durable record."""
from __future__ import annotations

import json
from pathlib import Path


class JsonlLogger:
    """Appends ``{"step": ..., **metrics}`` rows to ``run_dir/filename``.

    On resume, rows past the checkpoint's step are dropped first, so a resumed run has no duplicated rows.
    """

    def __init__(self, run_dir: str, filename: str = "metrics.jsonl", resume_step: int | None = None, **_: object) -> None:
        self.path = Path(run_dir) / filename
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
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
