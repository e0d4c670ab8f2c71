"""Argument parsing for the commands that are not Hydra apps (``compare``, ``report``): a bad argument is a
one-line ConfigError like any other bad input, not argparse's usage block."""
from __future__ import annotations

import argparse

from metacli.errors import ConfigError


class ArgumentParser(argparse.ArgumentParser):
    def __init__(self, prog: str, description: str) -> None:
        super().__init__(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message: str):
        raise ConfigError(f"{message}: see {self.prog} --help")
