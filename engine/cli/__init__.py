"""Command-line dispatcher for ``python -m engine``.

Each subcommand lives in its own module exposing ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``. Modules keep heavy imports (torch, diffusers) inside ``run`` so that
``--help`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Any

# subcommand -> module
COMMANDS: dict[str, str] = {
    "generate": "engine.cli.generate",
    "adapters": "engine.cli.adapters",
    "make-tiny-model": "engine.cli.make_tiny_model",
    "serve": "engine.cli.serve",
    "worker": "engine.cli.worker",
    "bench": "engine.cli.bench",
}


class CliError(Exception):
    """Bad input on the command line: printed as one line, exit status 2."""


def load_cli_config(path: str | None) -> Any:
    """The config of every command (``--config``, ``$ARCAE_CONFIG``, ./config.toml, else the
    defaults: ``engine.contract.config.load_command_config``); a bad file becomes a ``CliError``."""
    from engine.contract.config import ConfigError, load_command_config

    try:
        return load_command_config(path)
    except ConfigError as exc:
        raise CliError(str(exc).replace("\n", " ")) from None


def build_parser(prog: str, commands: dict[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in commands.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # subcommand not built in this checkout
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def dispatch(prog: str, commands: dict[str, str], argv: list[str] | None = None) -> int:
    parser = build_parser(prog, commands)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args._run(args) or 0)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def main(argv: list[str] | None = None) -> int:
    return dispatch("python -m engine", COMMANDS, argv)
