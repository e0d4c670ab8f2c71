"""Stopping cleanly: SIGTERM (what schedulers send before killing), SIGUSR1 and SIGUSR2 (SLURM's ``--signal``
warning; submitit's preemption signal) and SIGINT (Ctrl-C) ask the run to stop at the next step boundary, after a
checkpoint, or between test batches.

The handler only records the signal: checkpointing inside a handler could interrupt a half-written step. A second
Ctrl-C stops at once (``KeyboardInterrupt``), for a user who will not wait for the step to end. Where the signal
had a Python handler before the run started (submitit's, which requeues the job), that handler runs after the
checkpoint, instead of the run's own exit.

In a run of several processes every process must stop at the same step, so whether to stop is decided together
(``agree``): one process's signal stops them all.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Callable

from metacli.errors import Preempted

#: EX_TEMPFAIL from sysexits.h, "try again later": a requeue wrapper reruns the job with trainer.resume=true.
REQUEUE_EXIT_CODE = 75
#: What shells report for a program ended by Ctrl-C (128 + SIGINT).
INTERRUPT_EXIT_CODE = 130
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)


def exit_code(signal_name: str) -> int:
    return INTERRUPT_EXIT_CODE if signal_name == "SIGINT" else REQUEUE_EXIT_CODE


class PreemptionWatch:
    """Context manager; ``received`` is the name of the first stop signal that arrived here, else None.

    Args:
        agree: turns this process's "a signal arrived" into the decision of all the run's processes
            (:func:`metacli.execution.processes.any_process`); every process must then ask at the same points.
    """

    def __init__(self, agree: Callable[[bool], bool] = bool) -> None:
        self.received: str | None = None
        self._agree = agree
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.received == "SIGINT":
            raise KeyboardInterrupt
        self.received = self.received or signal.Signals(signum).name

    def asked(self) -> bool:
        """Whether a stop signal arrived (in any of the run's processes)."""
        return self._agree(self.received is not None)

    def stop_if_asked(self, what: str) -> None:
        """Raise :class:`Preempted` saying ``what`` (how to continue) if a stop signal arrived; first hand the
        signal to the handler it had before the run, if that was a Python one (submitit requeues there)."""
        if not self.asked():
            return
        if self.received:
            earlier = self._previous.get(signal.Signals[self.received])
            if callable(earlier) and earlier is not signal.default_int_handler:
                earlier(signal.Signals[self.received], None)
        name = self.received or "SIGTERM"  # another process's signal
        raise Preempted(f"{self.received or 'a stop signal'} received: {what}", name)

    def __enter__(self) -> "PreemptionWatch":
        # Handlers can only be installed from the main thread (a thread-pool launcher runs jobs elsewhere).
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
