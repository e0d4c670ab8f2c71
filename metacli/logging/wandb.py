"""Weights & Biases: one run per Hydra job, offline unless an API key is configured."""
from __future__ import annotations

import netrc
import os
import re
from pathlib import Path

from metacli.errors import ConfigError

_RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def has_wandb_credentials() -> bool:
    """True when an API key is in the environment or in ``~/.netrc`` (where ``wandb login`` stores it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(mode: str | None) -> str:
    """``mode`` if set, else ``$WANDB_MODE``, else online with credentials and offline without."""
    if mode:
        return mode
    return os.environ.get("WANDB_MODE") or ("online" if has_wandb_credentials() else "offline")


class WandbLogger:
    """Logs the resolved config, metrics by step, and final results into the run's summary.

    Args:
        run_dir, run_config, run_name, resume_step: injected by the runner.
        project, entity, group, tags: as in ``wandb.init``.
        mode: ``online``, ``offline`` or ``disabled``; ``null`` picks offline when no API key is configured.
    """

    def __init__(self, run_dir: str, run_config: dict, run_name: str, project: str = "metacli", entity: str | None = None,
                 group: str | None = None, tags: list | None = None, mode: str | None = None,
                 resume_step: int | None = None) -> None:
        import wandb  # imported here: it is slow to import and only this logger needs it

        self._wandb = wandb
        self.mode = resolve_mode(mode)
        run_id_file = Path(run_dir) / "wandb_run_id.txt"
        run_id = run_id_file.read_text().strip() if resume_step is not None and run_id_file.exists() else None
        if run_id is not None and not _RUN_ID.fullmatch(run_id):
            # W&B names folders after the id: a saved one must not lead out of the run dir.
            raise ConfigError(f"{run_id_file} holds {run_id[:40]!r}, not a W&B run id (letters, digits, - and _): "
                              "delete the file to resume under a new W&B run")
        self.run = wandb.init(project=project, entity=entity, group=group, tags=list(tags or []), mode=self.mode,
                              config=run_config, dir=run_dir, name=run_name, id=run_id,
                              resume="allow" if run_id else None)
        run_id_file.write_text(self.run.id)

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def log_results(self, results: dict) -> None:
        for key in ("accuracy", "ci95", "episodes", "bn_mode"):
            self.run.summary[f"test/{key}"] = results[key]

    def close(self) -> None:
        self.run.finish()
