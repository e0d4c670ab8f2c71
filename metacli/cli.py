"""``metacli <command> [overrides]``: each command is a Hydra app over the configs in ``conf/``.

Wrong input ends with one line on stderr (``metacli: error: ...``) and exit code 2; ``HYDRA_FULL_ERROR=1``
shows the full traceback instead.
"""
from __future__ import annotations

import difflib
import os
import re
import shutil
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from metacli.config_schema import config_dir, register
from metacli.errors import MetacliError, Preempted, ProcessesLost
from metacli.execution.ranks import from_environment
from metacli.reliability.preemption import INTERRUPT_EXIT_CODE, exit_code
from metacli.reliability.run_dir import SWEEP_START, discard_if_empty, requeued
from metacli.saved_config import MOVED_TO_EXECUTION
from metacli import search  # noqa: F401  (registers the resolver that numbers a continued search's job dirs)

COMMANDS = {
    "train": "meta-train an algorithm, validate, keep the best checkpoint, test on fixed episodes",
    "eval": "re-test a finished run: metacli eval checkpoint=RUN_DIR [eval.episodes=...]",
    "compare": "pair two runs over their shared test episodes: metacli compare RUN_A RUN_B",
    "report": "one table of runs and sweeps, seeds aggregated: metacli report PATH... [--format md|csv|json|results]",
    "embed-tasks": "map a run's task embeddings of within-alphabet test episodes: metacli embed-tasks RUN_DIR",
    "list": "what a config group offers: metacli list [algos|datasets|envs|backbones|devices|loggers|experiments|searches]",
}
#: What installs a Hydra sweeper or launcher that a command asked for.
PLUGINS = {"optuna": 'pip install -e ".[sweep]" (metacli\'s sweep extra)',
           "joblib": "pip install hydra-joblib-launcher",
           "submitit_local": "pip install hydra-submitit-launcher",
           "submitit_slurm": "pip install hydra-submitit-launcher",
           "slurm": "pip install hydra-submitit-launcher"}
#: ``metacli list`` names (plural) of the config groups.
LISTABLE = {"algos": "algo", "datasets": "dataset", "envs": "env", "backbones": "backbone", "devices": "device", "loggers": "logger",
            "experiments": "experiment", "searches": "hparams_search"}
USAGE = """usage: metacli <command> [overrides] [hydra flags]
       metacli --version

commands:
{commands}

train and eval are Hydra apps: `metacli train --help` lists the config groups, `--cfg job` prints the composed
config, `--multirun` (-m) sweeps comma-separated values. Example:
  metacli train algo=maml dataset=omniglot
  metacli eval checkpoint=outputs/train/2026-01-01/12-00-00-maml-omniglot
  metacli report outputs/multirun/2026-01-01/12-00-00
"""


def full_errors() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def speaks() -> bool:
    """Whether this process prints metacli's own messages: every process but the others of a torchrun job."""
    return from_environment().leader


#: How long the other processes of a torchrun job wait before exiting on an error or a stop they share with the
#: first: torchrun stops every process once one has exited, and the first must not be stopped before its line.
QUIET_EXIT_DELAY_S = 3.0


def say(line: str) -> None:
    if speaks():
        print(line, file=sys.stderr)
    else:
        time.sleep(QUIET_EXIT_DELAY_S)


def fail(message: str, everyone: bool = False) -> None:
    """Print the one line of wrong input and exit with 2; ``everyone``: in every process of a torchrun job (a lost
    process: any of them may be the one left to say it)."""
    if everyone:
        print(f"metacli: error: {message}", file=sys.stderr)
    else:
        say(f"metacli: error: {message}")
    raise SystemExit(2)


def _run_reporting_errors(job, cfg: DictConfig):
    try:
        return job(cfg, Path(HydraConfig.get().runtime.output_dir))
    except MetacliError as exc:
        if full_errors():
            raise
        fail(str(exc), everyone=isinstance(exc, ProcessesLost))
    except Preempted as exc:
        word = "interrupted" if exc.signal_name == "SIGINT" else "preempted"
        say(f"metacli: {word}: {exc}")
        raise SystemExit(exit_code(exc.signal_name)) from None


def _train_job(cfg: DictConfig, run_dir: Path) -> float:
    """The run's best value of ``trainer.objective``, for Hydra sweepers (Optuna) to optimise: selection happens on
    validation, and the test score is only reported. NaN when nothing was validated (``trainer.steps=0``)."""
    from metacli.runner import train

    results = train(cfg, run_dir)
    best = results[f"best_val_{results['metric']}"]
    return float("nan") if best is None else best


def _eval_job(cfg: DictConfig, run_dir: Path) -> float:
    from metacli.runner import evaluate_run

    results = evaluate_run(Path(cfg.checkpoint), cfg, run_dir)
    return results[results["metric"]]


def train_command(cfg: DictConfig) -> float:
    return _run_reporting_errors(_train_job, cfg)


def eval_command(cfg: DictConfig) -> float:
    return _run_reporting_errors(_eval_job, cfg)


def _check_option(group: str, value: str, choose: str) -> None:
    """Refuse an option ``group`` does not have, naming them all and ``did you mean`` the nearest (else an
    example)."""
    options = _group_options(group)
    if value in options:
        return
    near = difflib.get_close_matches(value, options, n=1)
    fail(f"unknown {group} '{value}'{choose} {', '.join(options)} "
         f"({f'did you mean {group}={near[0]}?' if near else f'e.g. {group}={options[0]}'})")


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def flags_first(command: str, args: list[str]) -> list[str]:
    """``args`` with Hydra's flags before the overrides. Hydra's argument parser takes overrides only up to the
    first flag, so ``metacli train seed=0,1 -m`` would fail with a usage screen; flags may go anywhere here, and a
    wrong flag is one line."""
    parser = get_args_parser()
    parser.error = lambda message: fail(f"{message} (see metacli {command} --help)")
    overrides = parser.parse_intermixed_args(args).overrides
    flags, pending = [], list(overrides)
    for arg in args:
        if pending and arg == pending[0]:
            pending.pop(0)
        else:
            flags.append(arg)
    return flags + overrides


def preflight(command: str, args: list[str]) -> Path | None:
    """Compose the config once before Hydra does, to turn composition errors into one line with a fix, and check
    the run (or sweep) dir before Hydra writes into it. Returns the sweep dir of a multirun.

    Only plain overrides and each value of a comma-separated sweep are checked: ranges and intervals of a
    sweeper are left to the sweeper.
    """
    parsed_args = get_args_parser().parse_args(args)
    overrides, multirun = parsed_args.overrides, parsed_args.multirun
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        fail(f"cannot parse the overrides ({str(exc).splitlines()[0]}); write them as key=value, e.g. task.n_way=5")
    groups = {p.name for p in config_dir().iterdir() if p.is_dir() and p.name != "hydra"}
    plain, choices = [], []
    for override in parsed:
        key = override.key_or_group
        if override.is_sweep_override():
            if override.value_type is not None and override.value_type.name in ("CHOICE_SWEEP", "SIMPLE_CHOICE_SWEEP"):
                choices += [f"{override.get_key_element()}={v}" for v in override.sweep_string_iterator()]
            continue
        if key in groups and override.value() is not None:
            _check_option(key, str(override.value()), ": choose one of")
        plain.append(override.input_line)
    for choice in choices:
        key, value = choice.split("=", 1)
        if key in groups:
            _check_option(key, value, " in the sweep: choose among")
    register()
    with hydra.initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name=command):
        for extra in [[]] + [[c] for c in choices]:
            try:
                cfg = hydra.compose(config_name=command, overrides=plain + extra, return_hydra_config=True)
            except (HydraException, OmegaConfBaseException) as exc:
                if full_errors():
                    raise
                missing = re.search(r"Could not find 'hydra/(sweeper|launcher)/(\w+)'", str(exc))
                if missing:
                    kind, name = missing.groups()
                    hint = PLUGINS.get(name, f"pip install hydra-{name}-{kind}")
                    fail(f"hydra/{kind}={name} is not installed: {hint}")
                unknown = re.search(r"Could not override '([\w.]+)'", str(exc))
                fail((unknown and _key_suggestion(unknown.group(1), plain + extra, command)) or _one_line(exc, command))
    if command == "eval":
        if OmegaConf.is_missing(cfg, "checkpoint"):
            fail("metacli eval needs the run to re-test: metacli eval checkpoint=RUN_DIR (a dir written by "
                 "metacli train)")
        claim_eval_dir(Path(cfg.hydra.sweep.dir if multirun else cfg.hydra.run.dir), multirun)
        return None
    launcher = cfg.hydra.launcher.get("_target_", "")
    if multirun and launcher.endswith("SlurmLauncher") and shutil.which("sbatch") is None:
        fail(f"hydra/launcher={cfg.hydra.runtime.choices['hydra/launcher']} submits to SLURM, but sbatch is not on this "
             "machine: run it where SLURM is (a login node), or try it here with hydra/launcher=submitit_local")
    run_dir, explicit = Path(cfg.hydra.run.dir), any(o.startswith("hydra.run.dir=") for o in plain)
    resume = cfg.trainer.resume or requeued(run_dir)
    group = from_environment()
    if group.many:
        if multirun:
            fail(f"torchrun starts {group.size} processes of one run: drop --multirun (a sweep of multi-process "
                 "runs is one torchrun each)")
        if not explicit:
            fail(f"the {group.size} processes of a torchrun job must share one run dir: add hydra.run.dir=PATH")
        try:
            group.check_meta_batch(cfg.trainer.meta_batch)
        except MetacliError as exc:
            fail(str(exc))
        if not group.leader:  # the first process claims the dir for all
            return None
    if multirun:
        # A search that continues its study numbers its new jobs after the old ones (metacli/search.py).
        continues = "resume_search" in (cfg.hydra.get("callbacks") or {})
        claim_sweep_dir(Path(cfg.hydra.sweep.dir), resume or continues)
        return Path(cfg.hydra.sweep.dir)
    claim_run_dir(run_dir, explicit=explicit, resume=resume)
    return None


def _check_writable(run_dir: Path, key: str) -> None:
    existing = next(p for p in [run_dir, *run_dir.parents] if p.exists())
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as exc:
        fail(f"cannot write into {existing} ({exc.strerror}): set {key} to a writable directory")


def claim_run_dir(run_dir: Path, explicit: bool, resume: bool) -> None:
    """Before Hydra writes into the run dir: check it can be written, refuse to start a new run over a finished
    or interrupted one (:func:`metacli.reliability.run_dir.check_claim`; the job checks again, as every job of a
    multirun does), and lock a dir the user named (the only kind two processes can share: ``trainer.resume=true``
    on the same ``hydra.run.dir``)."""
    from metacli.reliability.run_dir import check_claim
    from metacli.reliability.run_lock import lock_run_dir

    _check_writable(run_dir, "hydra.run.dir")
    try:
        check_claim(run_dir, resume)
        if explicit:
            lock_run_dir(run_dir)
    except MetacliError as exc:
        fail(str(exc))


def claim_eval_dir(out_dir: Path, sweep: bool) -> None:
    """Before Hydra writes eval's ``.hydra/`` into its dir: the dir can be written and holds no run's records, so
    that a re-test never overwrites a run's config or results (not even the run it re-tests). A sweep's jobs write
    into subdirs of its dir, so none of those may hold a run either."""
    from metacli.reliability.run_dir import records

    key = "hydra.sweep.dir" if sweep else "hydra.run.dir"
    _check_writable(out_dir, key)
    dirs = [out_dir, *(p for p in out_dir.iterdir() if p.is_dir())] if sweep and out_dir.is_dir() else [out_dir]
    for where in dirs:
        held = records(where)
        if held:
            fail(f"{where} already holds a run's records ({', '.join(held)}), which metacli eval would overwrite: "
                 f"give the re-test its own {key}, or leave it out for a new one under outputs/eval")


def claim_sweep_dir(sweep_dir: Path, resume: bool) -> None:
    """Before a multirun starts: the sweep dir can be written, and a new sweep does not land on an old one's
    runs (each job checks its own dir again, whatever ``hydra.sweep.subdir`` makes of it)."""
    from metacli.reliability.run_dir import records

    _check_writable(sweep_dir, "hydra.sweep.dir")
    if not resume and sweep_dir.is_dir():
        taken = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and records(p))
        if taken:
            some = ", ".join(taken[:3]) + (", ..." if len(taken) > 3 else "")
            fail(f"{sweep_dir} already holds the runs of a sweep ({some}): continue them with "
                 "trainer.resume=true, or give the new sweep its own hydra.sweep.dir")


def _key_suggestion(key: str, overrides: list[str], command: str) -> str | None:
    """For a key the composed config lacks: the options of its group that have it (``algo.first_order`` with
    ProtoNet), else the nearest key of its section. Hydra's own advice, a ``+`` override, is rarely the fix."""
    section, _, name = key.rpartition(".")
    if not section or section.startswith("hydra"):
        return None
    others = [o for o in overrides if o.split("=", 1)[0] != key]
    cfg = _composed(command, others)
    node = _section(cfg, section)
    if node is None or name in node:  # the key is there: what failed lies inside its value
        return None
    chosen = cfg.hydra.runtime.choices.get(section)
    if chosen is not None:
        # Composed, not read from the files: an option's keys may come from its own defaults or a global package.
        rest = [o for o in others if o.split("=", 1)[0] != section]
        having = [option for option in _group_options(section) if option != chosen
                  and name in (_section(_composed(command, [*rest, f"{section}={option}"]), section) or {})]
        if having:
            return (f"{section}={chosen} has no {name}: choose one that has it "
                    f"({', '.join(f'{section}={option}' for option in having)})")
    near = difflib.get_close_matches(name, [str(k) for k in node], n=1)
    if near:
        return f"{key} is not a key: did you mean {section}.{near[0]}? (see `metacli {command} --cfg job`)"
    return None


def _composed(command: str, overrides: list[str]) -> DictConfig | None:
    try:
        return hydra.compose(config_name=command, overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException):
        return None


def _section(cfg: DictConfig | None, section: str) -> DictConfig | None:
    """``section`` of a composed config; None where it did not compose or the section is not a mapping."""
    node = None if cfg is None else OmegaConf.select(cfg, section)
    return node if isinstance(node, DictConfig) else None


def _one_line(exc: Exception, command: str) -> str:
    moved = [key for key in MOVED_TO_EXECUTION if f"'algo.{key}'" in str(exc)]
    if moved:  # an earlier metacli's override
        return f"algo.{moved[0]} is now execution.{moved[0]}: override execution.{moved[0]} instead"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        lines.append(str(cause).strip().splitlines()[0])
    text = " ".join(dict.fromkeys(line for line in lines if not line.startswith(("full_key", "object_type",
                                                                                  "reference_type"))))
    return f"{text} (see `metacli {command} --cfg job` for the valid keys and types)"


def list_command(args: list[str]) -> None:
    """Print the options of the named groups (all of them without a name), one group a line."""
    unknown = [name for name in args if name not in LISTABLE]
    if unknown:
        fail(f"metacli list knows no '{unknown[0]}': use one of {', '.join(LISTABLE)}")
    for name in args or LISTABLE:
        print(f"{name}: {', '.join(_group_options(LISTABLE[name]))}")


def main(argv: list[str] | None = None) -> None:
    try:
        _dispatch(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:
        # The reader left early (metacli list | head): stop quietly, as other command-line tools do; stdout goes to
        # the null device so that the interpreter's last flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


def _dispatch(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(commands="\n".join(f"  {name:<13}{text}" for name, text in COMMANDS.items())))
        return
    if argv[0] in ("-V", "--version"):
        print(f"metacli {version('metacli')}")
        return
    if argv[0] in ("-sc", "--shell-completion"):
        from metacli.completion import main as completion

        completion(argv[1:])
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        fail(f"unknown command '{command}': use one of {', '.join(COMMANDS)} (see metacli --help)")
    if command == "list":
        list_command(rest)
        return
    if command in ("compare", "report", "embed-tasks"):  # they read run dirs and compose no config: not Hydra apps
        from metacli import compare, report, task_map

        try:
            {"compare": compare, "report": report, "embed-tasks": task_map}[command].main(rest)
        except MetacliError as exc:
            if full_errors():
                raise
            fail(str(exc))
        return
    rest = flags_first(command, rest)
    modes = get_args_parser().parse_args(rest)
    if sum(map(bool, (modes.run, modes.multirun, modes.cfg, modes.info, modes.shell_completion))) > 1:
        fail("only one of --run, --multirun (-m), --cfg, --info and --shell-completion may be given: drop -m to "
             f"print the composed config (metacli {command} --cfg job ...)")
    sweep_dir = None
    try:
        if not {"--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc"} & set(rest):
            sweep_dir = preflight(command, rest)
        register()
        sys.argv = [f"metacli {command}", *rest]
        task = train_command if command == "train" else eval_command
        try:
            hydra.main(config_path=str(config_dir()), config_name=command, version_base="1.3")(task)()
        except BaseException as exc:
            if sweep_dir is not None and not (isinstance(exc, SystemExit) and exc.code in (0, None)):
                discard_if_empty(sweep_dir, SWEEP_START)
            raise
    except KeyboardInterrupt:
        if full_errors():
            raise
        say("metacli: interrupted: stopped before a step boundary; the last complete checkpoint, if any, is kept: "
            "rerun with trainer.resume=true to continue from it")
        raise SystemExit(INTERRUPT_EXIT_CODE) from None


if __name__ == "__main__":
    main()
