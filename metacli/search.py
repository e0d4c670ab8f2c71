"""Resumable Optuna searches (``metacli train -m hparams_search=...``, the ``sweep`` extra).

Hydra's Optuna sweeper runs ``n_trials`` more trials each time it is started, numbers their jobs from 0 again, and
leaves a trial whose process was killed marked running forever. :class:`ResumeSearch`, a Hydra callback that runs
before the sweeper is built, makes rerunning the same search command continue it instead:

- a trial the study still marks running was killed with its process: it is marked failed, and not counted;
- the sweeper is asked only for the trials still missing from ``n_trials`` complete ones;
- job dirs are numbered after every trial the study holds, so new jobs never land in an earlier job's dir (each job
  still refuses a dir that holds a run, as every metacli job does);
- a seeded sampler is reseeded past the trials already drawn, so it does not propose the first trials again.
"""
from __future__ import annotations

import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

# Job dirs of a continued search: ``${metacli_after:${hydra.job.num},N}`` is the job's number plus N.
OmegaConf.register_new_resolver("metacli_after", lambda number, offset: int(number) + int(offset), replace=True)


class ResumeSearch(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        sweeper = config.hydra.sweeper
        storage, name = sweeper.get("storage"), sweeper.get("study_name")
        if not storage or not name:
            return  # an in-memory study: nothing to continue
        if str(storage).startswith("sqlite:///"):
            # SQLite creates the database file, but not the folders above it.
            Path(str(storage)[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        import optuna

        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            return  # a new study
        states = optuna.trial.TrialState
        for trial in study.get_trials(deepcopy=False, states=(states.RUNNING,)):
            study._storage.set_trial_state(trial._trial_id, states.FAIL)
            log.warning("trial %d was left running by a stopped search: marked failed, not counted", trial.number)
        complete = len(study.get_trials(deepcopy=False, states=(states.COMPLETE,)))
        with open_dict(config):
            sweeper.n_trials = max(0, sweeper.n_trials - complete)
            if sweeper.get("sampler") is not None and sweeper.sampler.get("seed") is not None:
                # The same seed would draw the first trials' parameters again: continue the stream elsewhere.
                sweeper.sampler.seed = int(sweeper.sampler.seed) + len(study.trials)
            # Each job's config is composed again from these overrides, so the numbering goes there.
            config.hydra.overrides.hydra.append(
                f"hydra.sweep.subdir='${{metacli_after:${{hydra.job.num}},{len(study.trials)}}}'")
        log.info("study %s holds %d complete trials: running the %d still missing", name, complete, sweeper.n_trials)
