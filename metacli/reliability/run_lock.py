"""One process per run dir: an advisory ``flock`` on ``<run dir>/.metacli.lock``, held until the process exits.

Two processes resuming the same run would interleave checkpoints and metric rows; the second one is stopped with
a one-line error instead. The kernel drops the lock when its holder dies, even by SIGKILL, so a killed run never
leaves a stale lock behind.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from metacli.errors import ConfigError

LOCK_NAME = ".metacli.lock"
_held: dict[Path, int] = {}


def lock_run_dir(run_dir: Path) -> None:
    """Take the run dir's lock for this process (a no-op if it already holds it)."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(f"{run_dir} is in use by another metacli process (pid {holder}): wait for it to end, or "
                          "give this run its own hydra.run.dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _held[run_dir] = fd


def unlock_run_dir(run_dir: Path) -> None:
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)
