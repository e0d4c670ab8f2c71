"""Weights & Biases: one run per Hydra job, offline unless an API key is configured."""
from __future__ import annotations

import logging
import netrc
import os
import re
from pathlib import Path

from metacli.errors import ConfigError
from metacli.metrics import HIGHER_IS_BETTER

_RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
log = logging.getLogger(__name__)


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
    """Logs the resolved config, metrics by step, and final results into the run's summary (with the best
    validation accuracy, not the last); optionally ``best.pt`` as a model artifact.

    Args:
        run_dir, run_config, run_name, run_group, run_tags, resume_step: injected by the runner (the name says what
            the run is, ``maml-omniglot-5w1s-seed0``; the group is the sweep of a multirun job).
        project, entity: as in ``wandb.init``; group and tags, when set, replace and extend the injected ones.
        job_type: ``train`` for ``metacli train``.
        mode: ``online``, ``offline`` or ``disabled``; ``null`` picks offline when no API key is configured.
        log_checkpoints: upload ``best.pt`` as an artifact of type ``model`` at the end of the run.
    """

    def __init__(self, run_dir: str, run_config: dict, run_name: str, project: str = "metacli", entity: str | None = None,
                 group: str | None = None, tags: list | None = None, mode: str | None = None,
                 resume_step: int | None = None, run_group: str | None = None, run_tags: list | None = None,
                 job_type: str = "train", log_checkpoints: bool = False) -> None:
        import wandb  # imported here: it is slow to import and only this logger needs it

        self._wandb = wandb
        self.mode = resolve_mode(mode)
        run_id_file = Path(run_dir) / "wandb_run_id.txt"
        run_id = run_id_file.read_text().strip() if resume_step is not None and run_id_file.exists() else None
        if run_id is not None and not _RUN_ID.fullmatch(run_id):
            # W&B names folders after the id: a saved one must not lead out of the run dir.
            raise ConfigError(f"{run_id_file} holds {run_id[:40]!r}, not a W&B run id (letters, digits, - and _): "
                              "delete the file to resume under a new W&B run")
        self.run = wandb.init(project=project, entity=entity, group=group or run_group, job_type=job_type,
                              tags=[*(run_tags or []), *(tags or [])], mode=self.mode, config=run_config, dir=run_dir,
                              name=run_name, id=run_id, resume="allow" if run_id else None)
        # The summary shows the best validation, not the last: the highest accuracy, the lowest MSE.
        for metric, higher_is_better in HIGHER_IS_BETTER.items():
            self.run.define_metric(f"val/{metric}", summary="max" if higher_is_better else "min")
        run_id_file.write_text(self.run.id)
        self.run_dir, self.log_checkpoints = Path(run_dir), log_checkpoints
        self.files = Path(self.run.dir).parent  # the offline run's folder, for `wandb sync`

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def log_results(self, results: dict) -> None:
        metric = results["metric"]
        for key in (metric, "ci95", "episodes", "bn_mode"):
            if key in results:  # a meta-RL run has no BatchNorm mode
                self.run.summary[f"test/{key}"] = results[key]
        # A meta-RL run: each adaptation stage's test numbers, and the family's reference policies (bandits).
        for stage in results.get("stages", []):
            for name in (key for key in stage if key != "stage"):
                self.run.summary[f"test/{stage['stage']}/{name}"] = stage[name][name]
                self.run.summary[f"test/{stage['stage']}/{name}_ci95"] = stage[name]["ci95"]
        # A continual run: each stream length's retention, forgetting and rate, and retention against the length.
        for entry in results.get("continual", []):
            for name in ("accuracy", "forgetting", "train_accuracy"):
                self.run.summary[f"test/continual/{entry['classes']}/{name}"] = entry[name][name]
                self.run.summary[f"test/continual/{entry['classes']}/{name}_ci95"] = entry[name]["ci95"]
            self.run.summary[f"test/continual/{entry['classes']}/lr"] = entry["lr"]
        # A generative run: the judge's ceiling and floor, the copy check and the Fréchet distances.
        if "generative" in results:
            scored = results["generative"]
            for name in ("ceiling", "floor"):
                self.run.summary[f"test/{name}/accuracy"] = scored[name]["accuracy"]
            for name in ("generated", "real"):
                self.run.summary[f"test/copy_distance/{name}"] = scored["copy_distance"][name]["distance"]
            for name, value in scored["frechet"].items():
                self.run.summary[f"test/frechet/{name}"] = value
        if "continual" in results:
            table = self._wandb.Table(columns=["classes", "retention", "ci95", "forgetting"],
                                      data=[[e["classes"], e["accuracy"]["accuracy"], e["accuracy"]["ci95"],
                                             e["forgetting"]["forgetting"]] for e in results["continual"]])
            self.run.log({"test/retention": self._wandb.plot.line(table, "classes", "retention",
                                                                  title="retention against stream length")})
        for reference, scored in results.get("references", {}).items():
            self.run.summary[f"test/reference/{reference}/regret"] = scored["regret"]
        self.run.summary[f"val/best_{metric}"] = results[f"best_val_{metric}"]
        self.run.summary["val/best_step"] = results["best_val_step"]
        best = self.run_dir / "best.pt"
        if self.log_checkpoints and best.is_file():
            artifact = self._wandb.Artifact(f"model-{self.run.id}", type="model",
                                            metadata={"step": results["checkpoint_step"]})
            artifact.add_file(str(best))
            self.run.log_artifact(artifact)

    def log_images(self, images: dict) -> None:
        self.run.log({key: self._wandb.Image(str(path)) for key, path in images.items()})

    def close(self) -> None:
        self.run.finish()
        if self.mode == "offline":
            log.info("the W&B run is saved offline; upload it with: wandb sync %s", self.files)
