"""Preemption: SIGTERM (what schedulers send before killing) and SIGUSR1 (SLURM's ``--signal`` warning) ask the
run to stop at the next step boundary, after a checkpoint, with :data:`REQUEUE_EXIT_CODE`.

The handler only records the signal: checkpointing inside a handler could interrupt a half-written step.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType

#: EX_TEMPFAIL from sysexits.h, "try again later": a requeue wrapper reruns the job with trainer.resume=true.
REQUEUE_EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionWatch:
    """Context manager; ``received`` is the name of the first preemption signal that arrived, else None."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = self.received or signal.Signals(signum).name

    def __enter__(self) -> "PreemptionWatch":
        # Handlers can only be installed from the main thread (a thread-pool launcher runs jobs elsewhere).
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
