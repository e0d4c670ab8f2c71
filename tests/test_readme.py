"""Every command the README shows is one metacli accepts: each ``metacli train``/``eval`` line composes (every key,
group option and type, each value of a sweep) and passes the checks a run makes before it starts; ``report`` and
``compare`` and ``embed-tasks`` lines parse; ``list``, ``--help`` and ``--version`` run; the error shown is the error metacli gives.
Lines with a placeholder in capitals (RUN_DIR, PATH...) are syntax, not commands. Long runs are not run here:
the tests of each feature run them small."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from conftest import run_cli
from metacli import cli, compare, report, task_map

README = Path(__file__).resolve().parents[1] / "README.md"


def shown_commands() -> list[list[str]]:
    blocks = re.findall(r"```\n(.*?)```", README.read_text(), flags=re.S)
    commands = []
    for line in (line.strip() for block in blocks for line in block.splitlines()):
        if line.startswith("metacli ") and not re.search(r"\b[A-Z][A-Z_]+\b|\[", line.split("#")[0]):
            commands.append(shlex.split(line, comments=True)[1:])
    return commands


COMMANDS = shown_commands()


def test_the_readme_shows_commands_of_every_kind():
    assert {args[0] for args in COMMANDS} >= {"train", "compare", "report", "embed-tasks", "list", "--help", "--version"}
    assert len(COMMANDS) > 20


@pytest.mark.parametrize("args", [a for a in COMMANDS if a[0] in ("train", "eval") and "--help" not in a],
                         ids=" ".join)
def test_a_shown_run_composes_and_passes_the_preflight(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs that name their dir (hydra.run.dir=outputs/my-run) claim it there
    try:
        cli.preflight(args[0], cli.flags_first(args[0], args[1:]))
    except SystemExit as exc:
        pytest.fail(f"metacli {' '.join(args)} is refused: exit {exc.code}")


@pytest.mark.parametrize("args", [a for a in COMMANDS if a[0] in ("compare", "report", "embed-tasks")], ids=" ".join)
def test_a_shown_report_or_comparison_parses(args):
    {"compare": compare, "report": report, "embed-tasks": task_map}[args[0]].arguments().parse_args(args[1:])


def test_the_shown_one_liners_run(tmp_path):
    for args in [a for a in COMMANDS if a[0] in ("list", "--help", "--version") or "--help" in a]:
        done = run_cli(*args, cwd=tmp_path)
        assert done.returncode == 0 and done.stdout and not done.stderr, (args, done.stderr)


def test_the_shown_error_is_the_error_metacli_gives(tmp_path):
    shown = re.search(r"\$ metacli (.*)\n(metacli: error: .*)\n", README.read_text())
    done = run_cli(*shlex.split(shown.group(1)), cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip() == shown.group(2)
