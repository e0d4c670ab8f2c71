"""Progress outside a terminal: a log line at each tenth of a phase (none closer than a few seconds apart), and one
closing line with the total and the time, for training, testing and downloads."""
from __future__ import annotations

import logging
import re

import pytest

from metacli.logging import progress as progress_module
from metacli.logging.progress import Progress


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "metacli.progress"]


def test_a_line_at_each_tenth_and_none_repeated(caplog, monkeypatch):
    monkeypatch.setattr(progress_module, "QUIET_SECONDS", 0.0)
    caplog.set_level(logging.INFO, logger="metacli.progress")
    with Progress("decode x", total=50, unit="characters") as progress:
        for _ in range(50):
            progress.advance()
    shown = lines(caplog)
    assert [re.match(r"decode x: (\d+)/50 characters \((\d+)%\)", line).groups() for line in shown] == [
        (str(5 * k), str(10 * k)) for k in range(1, 11)]
    assert "left" in shown[0] and "left" not in shown[-1]


def test_a_fast_phase_logs_only_its_closing_line(caplog):
    caplog.set_level(logging.INFO, logger="metacli.progress")
    with Progress("test", total=600, unit="episodes") as progress:
        for _ in range(60):
            progress.advance(10, status="accuracy 0.500")
    assert len(shown := lines(caplog)) == 1
    assert re.fullmatch(r"test: 600/600 episodes \(100%\) accuracy 0\.500, 0:00:0\d elapsed", shown[0])


def test_bytes_without_a_total_and_a_disabled_bar(caplog):
    caplog.set_level(logging.INFO, logger="metacli.progress")
    with Progress("download a.zip", unit="bytes") as progress:
        progress.advance(3 * 2 ** 20)
    with Progress("meta-train", total=10, enabled=False) as quiet:
        quiet.advance(10)
    assert lines(caplog) == ["download a.zip: 3.0 MiB, 0:00:00 elapsed"]


def test_a_failed_phase_writes_no_closing_line(caplog):
    caplog.set_level(logging.INFO, logger="metacli.progress")
    with pytest.raises(RuntimeError):
        with Progress("decode y", total=10) as progress:
            progress.advance()
            raise RuntimeError("a broken file")
    assert lines(caplog) == []


def test_a_resumed_phase_estimates_from_its_own_pace(caplog, monkeypatch):
    """Resumed at 80 of 100 steps, 10 steps in 1 s leave about 1 s, not a quarter of a second."""
    clock = iter([0.0, 1.0])
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(progress_module, "QUIET_SECONDS", 0.0)
    caplog.set_level(logging.INFO, logger="metacli.progress")
    with Progress("meta-train", total=100, unit="steps", completed=80) as progress:
        progress.advance(10)
    assert lines(caplog) == ["meta-train: 90/100 steps (90%), 0:00:01 elapsed, about 0:00:01 left"]
