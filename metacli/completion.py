"""``metacli -sc install=bash|zsh``: tab completion of commands, ``list`` names and the overrides of train/eval.

Hydra's own script (``metacli train -sc install=bash``) cannot serve a program with subcommands: it registers
``metacli train`` as the command, and its query strips only the program name, so ``train`` reads as an override.
Here the script completes ``metacli``, and the query hands the words after ``train``/``eval`` to Hydra's completion
of that app's config.
"""
from __future__ import annotations

import contextlib
import glob
import io
import os
import re
import sys

SCRIPT = r"""_metacli_completion()
{
    local line=${COMP_LINE:0:$COMP_POINT} w
    COMPREPLY=()
    # The query escapes every character the shell would expand, so a file name cannot run code through compgen.
    while IFS= read -r w; do
        [[ -n $w ]] && COMPREPLY+=("$w")
    done < <(compgen -W "$(COMP_LINE=$COMP_LINE COMP_POINT=$COMP_POINT metacli -sc query=bash 2>/dev/null)" \
             -- "${line##* }")
}
COMP_WORDBREAKS=${COMP_WORDBREAKS//=}
complete -o nospace -o default -F _metacli_completion metacli"""
SHELLS = ("bash", "zsh")


def _hydra_candidates(command: str, rest: str) -> list[str]:
    import hydra

    from metacli.cli import config_dir
    from metacli.config_schema import register

    os.environ["COMP_LINE"] = f"metacli {rest}"  # Hydra strips the first word, which must not be the command
    register()
    sys.argv = [f"metacli {command}", "-sc", "query=bash"]
    printed = io.StringIO()
    # On a line it cannot parse Hydra prints a usage or an error: only candidates may come out.
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
        try:
            hydra.main(config_path=str(config_dir()), config_name=command, version_base="1.3")(lambda cfg: None)()
        except (Exception, SystemExit):
            return []
    return printed.getvalue().split()


def query(line: str) -> list[str]:
    from metacli.cli import COMMANDS, LISTABLE

    words = line.split() + ([""] if not line or line[-1].isspace() else [])
    if len(words) < 2:
        return []
    word = words[-1]
    if len(words) == 2:
        return [name for name in [*COMMANDS, "--help", "--version"] if name.startswith(word)]
    if words[1] == "list":
        return [name for name in LISTABLE if name.startswith(word)]
    if words[1] not in ("train", "eval"):  # compare/report take paths: the shell completes file names
        return []
    key, eq, value = word.partition("=")
    # Paths are completed here, not by Hydra: it prints them space-separated (a name with a space splits) and
    # only from ./ or /, while the shell cannot complete after '=' (kept inside the word): checkpoint=outputs/tr.
    found = [] if value.startswith((".", "/")) else _hydra_candidates(words[1], (line.split(None, 2) + [""])[2])
    if eq and set(found) <= {word}:
        found = [f"{key}={p}{'/' if os.path.isdir(p) else ''}" for p in sorted(glob.glob(glob.escape(value) + "*"))]
    return found


def main(args: list[str]) -> None:
    from metacli.cli import fail

    action, _, shell = args[0].partition("=") if len(args) == 1 else ("", "", "")
    line, point = os.environ.get("COMP_LINE"), os.environ.get("COMP_POINT", "")
    if action == "query" and shell == "bash":
        if line is None:
            fail("metacli -sc query=bash reads COMP_LINE, which the shell sets on <TAB>: install the completion "
                 'with eval "$(metacli -sc install=bash)"')
        line = line[:int(point)] if point.isdigit() else line
        print(" ".join(re.sub(r"([^\w@%+=:,./-])", r"\\\1", word) for word in query(line)))
    elif action == "install" and shell in SHELLS:
        # zsh runs bash completion functions through its bashcompinit emulation.
        print(("autoload -U +X bashcompinit && bashcompinit\n" if shell == "zsh" else "") + SCRIPT)
    elif action == "uninstall" and shell in SHELLS:
        print("complete -r metacli\nunset -f _metacli_completion")
    else:
        fail(f"cannot do `{' '.join(['metacli -sc', *args])}`: use metacli -sc install=bash or install=zsh "
             '(e.g. eval "$(metacli -sc install=bash)"), or uninstall=bash|zsh')
