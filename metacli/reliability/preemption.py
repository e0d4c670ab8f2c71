"""Stopping cleanly: SIGTERM (what schedulers send before killing), SIGUSR1 (SLURM's ``--signal`` warning) and
SIGINT (Ctrl-C) ask the run to stop at the next step boundary, after a checkpoint, or between test batches.

The handler only records the signal: checkpointing inside a handler could interrupt a half-written step. A second
Ctrl-C stops at once (``KeyboardInterrupt``), for a user who will not wait for the step to end.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType

from metacli.errors import Preempted

#: EX_TEMPFAIL from sysexits.h, "try again later": a requeue wrapper reruns the job with trainer.resume=true.
REQUEUE_EXIT_CODE = 75
#: What shells report for a program ended by Ctrl-C (128 + SIGINT).
INTERRUPT_EXIT_CODE = 130
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def exit_code(signal_name: str) -> int:
    return INTERRUPT_EXIT_CODE if signal_name == "SIGINT" else REQUEUE_EXIT_CODE


class PreemptionWatch:
    """Context manager; ``received`` is the name of the first stop signal that arrived, else None."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.received == "SIGINT":
            raise KeyboardInterrupt
        self.received = self.received or signal.Signals(signum).name

    def stop_if_asked(self, what: str) -> None:
        """Raise :class:`Preempted` saying ``what`` (how to continue) if a stop signal arrived."""
        if self.received:
            raise Preempted(f"{self.received} received: {what}", self.received)

    def __enter__(self) -> "PreemptionWatch":
        # Handlers can only be installed from the main thread (a thread-pool launcher runs jobs elsewhere).
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
