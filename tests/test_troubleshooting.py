"""The troubleshooting table (docs/troubleshooting.md) is made from the tests' bad-input tables, and checked against
them: every case the tests throw at metacli has its row, with what its one-line error says, and no row is left
without a test.

After changing a table, rewrite the page's with:

    METACLI_WRITE_DOCS=1 python -m pytest -q tests/test_troubleshooting.py
"""
from __future__ import annotations

import os
from pathlib import Path

import test_bad_input
import test_report
import test_security

PAGE = Path(__file__).resolve().parents[1] / "docs" / "troubleshooting.md"
START, END = "<!-- troubleshooting: made by tests/test_troubleshooting.py -->", "<!-- troubleshooting: end -->"


def rows() -> list[str]:
    train = [(f"`metacli train {' '.join(args)}` ({name})", needle)
             for name, (args, needle) in test_bad_input.CASES.items()]
    configs = [(f"a run's `.hydra/config.yaml` that is {name} (`metacli eval`, `load_learner`)", needle)
               for name, (_, needle) in test_security.CONFIG_DAMAGE.items()]
    payloads = [(f"a code-running payload in a saved config: {name}", needle)
                for name, (_, _, needle) in test_security.PAYLOADS.items()]
    checkpoints = [(f"a damaged `best.pt` or `last.pt`: {name} (`metacli eval`; a resume falls back to `.prev`)", needle)
                   for name, (_, needle) in test_security.CHECKPOINT_DAMAGE.items()]
    results = [(f"a `results.json` {name} (`metacli report`, `metacli compare`)", problem)
               for name, (_, problem) in test_report.RESULTS_DAMAGE.items()]
    return [f"| {case} | `{needle.replace('|', '¦')}` |"
            for case, needle in train + configs + payloads + checkpoints + results]


def table() -> str:
    return "\n".join([START, "| input | the one-line error contains |", "|---|---|", *rows(), END])


def test_the_troubleshooting_table_is_the_tests_table():
    text = PAGE.read_text()
    assert START in text and END in text, f"{PAGE} needs the {START} ... {END} block"
    before, rest = text.split(START)
    _, after = rest.split(END)
    if os.environ.get("METACLI_WRITE_DOCS") == "1":
        PAGE.write_text(before + table() + after)
    assert before + table() + after == PAGE.read_text(), \
        "the troubleshooting table differs from the tests' cases: rewrite it (see this module's docstring)"
