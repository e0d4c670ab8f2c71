"""Which process of a run this is (torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), read without importing
torch, so that the command line can ask before it loads anything."""
from __future__ import annotations

import os
from dataclasses import dataclass

from metacli.errors import ConfigError


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes of one run (torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def leader(self) -> bool:
        """Whether this process claims the run dir, logs and checkpoints."""
        return self.rank == 0

    @property
    def many(self) -> bool:
        return self.size > 1

    def check_meta_batch(self, meta_batch: int) -> None:
        if meta_batch < self.size:
            raise ConfigError(f"trainer.meta_batch={meta_batch} is smaller than the {self.size} processes that share "
                              f"it: set trainer.meta_batch to at least {self.size}, or start fewer processes")


ONE = Processes()


def from_environment() -> Processes:
    """The layout torchrun (or ``srun`` with torchrun's variables) gave this process; one process without it."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return ONE
    return Processes(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
