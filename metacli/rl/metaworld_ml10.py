"""Meta-World ML10 (Yu et al. 2019; the v3 package): meta-train on the tasks of ten manipulation skills, test on
the tasks of five other skills, goals hidden; success is Meta-World's flag. The last ``val_tasks`` training tasks of
each training skill are held out for validation, so validation never sees a test skill either. Needs the ``rl``
extra: ``pip install -e ".[rl]"``."""
from __future__ import annotations

from metacli.rl.metaworld_ml1 import MetaWorldML1


class MetaWorldML10(MetaWorldML1):
    """Args as :class:`MetaWorldML1`, without a skill to name."""

    name = "metaworld_ml10"

    def __init__(self, horizon: int = 150, trajectories: int = 10, gamma: float = 0.99, benchmark_seed: int = 0,
                 val_tasks: int = 5, reward_version: str = "v2", workers: int = 2) -> None:
        super().__init__("ML10", horizon, trajectories, gamma, benchmark_seed, val_tasks, reward_version, workers)

    def _benchmark(self, metaworld):
        return metaworld.ML10(seed=self.benchmark_seed)
