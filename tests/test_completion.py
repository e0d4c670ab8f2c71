"""Shell completion (``metacli -sc``): the installed bash function, run in a real bash, completes commands, list
names and Hydra overrides; paths after ``key=`` are completed without the shell expanding them."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import assert_one_line_error, metacli_command, run_cli
from metacli.completion import main
from metacli.config_schema import config_dir

# Each line is completed as on <TAB> at its end; the Hydra queries spawn one metacli each (~2 s).
LINES = ["metacli tr", "metacli list da", "metacli train algo=ma", "metacli train dataset=",
         "metacli eval checkpoint=ru"]
SESSION = r"""eval "$(metacli -sc install=bash)"
complete -p metacli
for line in "$@"; do
    COMP_LINE=$line; COMP_POINT=${#COMP_LINE}; COMP_WORDS=($line); COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
    _metacli_completion
    printf '%s\n' "== $line" "${COMPREPLY[@]}"
done"""


@pytest.fixture(scope="module")
def bash_session(tmp_path_factory) -> tuple[Path, str, dict[str, list[str]]]:
    """Run the installed function in bash over LINES, in a dir holding a run dir and a file named to run code."""
    cwd = tmp_path_factory.mktemp("completion")
    (cwd / "runs").mkdir()
    (cwd / "run$(touch PWNED)").touch()
    env = {**os.environ, "PATH": f"{Path(metacli_command()).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "--norc", "--noprofile", "-c", SESSION, "bash", *LINES], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    head, *blocks = done.stdout.split("== ")
    replies = {}
    for block in blocks:
        line, *candidates = block.splitlines()
        replies[line] = candidates
    assert list(replies) == LINES, done.stdout
    return cwd, head, replies


def test_bash_registers_the_function_for_metacli(bash_session):
    _, registered, _ = bash_session
    assert registered.strip() == "complete -o default -o nospace -F _metacli_completion metacli"


def test_commands_and_list_names(bash_session):
    _, _, replies = bash_session
    assert replies["metacli tr"] == ["train"]
    assert replies["metacli list da"] == ["datasets"]


def test_train_overrides_come_from_hydra(bash_session):
    _, _, replies = bash_session
    assert replies["metacli train algo=ma"] == ["algo=maml", "algo=maml_rl", "algo=mann", "algo=matching_net"]
    assert replies["metacli train dataset="] == [f"dataset={p.stem}" for p in sorted((config_dir() / "dataset").glob("*.yaml"))]


def test_paths_after_equals_complete_verbatim(bash_session):
    """Hydra cannot complete checkpoint=ru (no ./), nor bash ('=' is no word break): the query lists the files,
    escaped, so a name holding $(...) is offered as it is and never run."""
    cwd, _, replies = bash_session
    assert replies["metacli eval checkpoint=ru"] == ["checkpoint=run$(touch PWNED)", "checkpoint=runs/"]
    assert not (cwd / "PWNED").exists()


def test_query_prints_only_candidates(tmp_path):
    """A line Hydra's parser rejects (an unknown flag) gives no candidates and no usage text."""
    done = run_cli("-sc", "query=bash", cwd=tmp_path, env={"COMP_LINE": "metacli train --c"})
    assert (done.returncode, done.stdout, done.stderr) == (0, "\n", "")


def test_zsh_script_loads_bashcompinit_first(capsys):
    main(["install=bash"])
    bash = capsys.readouterr().out
    main(["install=zsh"])
    zsh = capsys.readouterr().out
    assert zsh == "autoload -U +X bashcompinit && bashcompinit\n" + bash
    assert "COMP_WORDBREAKS=${COMP_WORDBREAKS//=}" in bash and "metacli -sc query=bash" in bash
    main(["uninstall=zsh"])
    assert "complete -r metacli" in capsys.readouterr().out.splitlines()


def test_unknown_shell_is_one_line_error(tmp_path):
    assert_one_line_error(run_cli("-sc", "install=fish", cwd=tmp_path), "use metacli -sc install=bash or install=zsh")


@pytest.mark.parametrize("args", [[], ["foo=bar"], ["query=bash"]])
def test_other_requests_fail_with_the_fix(args, capsys, monkeypatch):
    monkeypatch.delenv("COMP_LINE", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("metacli: error: ")
    assert 'eval "$(metacli -sc install=bash)"' in err[0]
