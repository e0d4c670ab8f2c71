"""Progress of a long phase (download, decode, meta-training, testing): a live bar on a terminal; elsewhere (a log
file, a batch job's output) a plain line at every tenth of the way, so the log reads as a record instead of a
stream of carriage returns."""
from __future__ import annotations

import logging
import time
from datetime import timedelta

from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress as Bar, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from metacli.logging.console import console

log = logging.getLogger("metacli.progress")

#: In a log, lines come at each tenth of the way, but no closer together than this many seconds (the last one
#: aside), and every this many seconds times six when the total is unknown.
QUIET_SECONDS = 5.0


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


class Progress:
    """``with Progress("decode images_background.zip", total=964, unit="characters") as progress:
    progress.advance()``. ``unit="bytes"`` shows sizes in MiB. ``status`` is free text shown after the count
    (the training loss, say), set by :meth:`advance` or :meth:`show`. Disabled, it shows nothing."""

    def __init__(self, description: str, total: int | None = None, unit: str = "", enabled: bool = True,
                 completed: int = 0, status: str = "") -> None:
        self.description, self.total, self.unit, self.enabled = description, total, unit, enabled
        self.done, self.status = completed, status
        self._started_at = completed  # a resumed phase's rate counts only what this process did
        self._bar: Bar | None = None
        self._task = None
        self._start = self._last_line = 0.0
        self._next_tenth = 1
        self._lined: int | None = None  # the count of the last line written

    def __enter__(self) -> Progress:
        self._start = self._last_line = time.monotonic()
        if self.total:
            self._next_tenth = 10 * self.done // self.total + 1
        if self.enabled and console.is_terminal:
            count = DownloadColumn(binary_units=True) if self.unit == "bytes" else MofNCompleteColumn()
            self._bar = Bar(TextColumn("[bold]{task.description}"), BarColumn(), count,
                            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("ETA"),
                            TimeRemainingColumn(), console=console)
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total, completed=self.done,
                                            status=self.status)
        return self

    def advance(self, amount: int = 1, status: str | None = None) -> None:
        self.done += amount
        self.show(status)

    def show(self, status: str | None = None) -> None:
        if status is not None:
            self.status = status
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, status=self.status)
        elif self.enabled:
            self._maybe_line()

    def _maybe_line(self) -> None:
        now = time.monotonic()
        if now - self._last_line < QUIET_SECONDS:
            return
        if self.total:
            if 10 * self.done < self._next_tenth * self.total:
                return
            self._next_tenth = 10 * self.done // self.total + 1
        elif now - self._last_line < 6 * QUIET_SECONDS:
            return
        self._line(now)

    def _line(self, now: float) -> None:
        self._last_line, self._lined = now, self.done
        elapsed = now - self._start
        if self.unit == "bytes":
            count = f"{self.done / 2 ** 20:.1f}" + (f"/{self.total / 2 ** 20:.1f} MiB" if self.total else " MiB")
        else:
            count = f"{self.done}" + (f"/{self.total}" if self.total else "") + (f" {self.unit}" if self.unit else "")
        share = f" ({100 * self.done // self.total}%)" if self.total else ""
        left = ""
        if self.total and elapsed > 0 and self._started_at < self.done < self.total:
            rate = (self.done - self._started_at) / elapsed
            left = f", about {_clock((self.total - self.done) / rate)} left"
        status = f" {self.status}" if self.status else ""
        log.info("%s: %s%s%s, %s elapsed%s", self.description, count, share, status, _clock(elapsed), left)

    def __exit__(self, kind, error, trace) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif self.enabled and kind is None and self._lined != self.done:
            self._line(time.monotonic())  # the phase's last line: its total and its time
