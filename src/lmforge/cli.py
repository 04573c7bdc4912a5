"""The `lmforge` command: a table of subcommands, each parsed by jsonargparse and
handed to a library function. Parsing only; the work happens in the library.

A mistake in what the user passed (a missing file, a bad field, a malformed record)
prints one line naming it and exits with status 2; set LMFORGE_DEBUG=1 for the
traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from jsonargparse import ArgumentParser, Namespace

import lmforge

log = logging.getLogger("lmforge")


class UserError(Exception):
    """A mistake in what the user passed: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------- commands


def _convert_args(p: ArgumentParser) -> None:
    p.add_argument("src", help="model directory (lmforge or Hugging Face)")
    p.add_argument("dst", help="output directory")
    p.add_argument("--to", choices=["hf", "lmforge"], required=True, help="output format")


def _convert(a: Namespace) -> None:
    from lmforge.api import convert

    out = convert(a.src, a.dst, a.to)
    print(f"wrote {out} ({a.to} format)")


# name -> (help, add arguments, run); a tuple of such tables makes a command group.
Command = tuple[str, Callable[[ArgumentParser], None], Callable[[Namespace], None]]
COMMANDS: dict[str, Command | dict[str, Command]] = {
    "convert": ("convert a model directory between lmforge and Hugging Face formats", _convert_args, _convert),
}


# ----------------------------------------------------------------------------- plumbing


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="lmforge", description=lmforge.__doc__, env_prefix="LMFORGE", default_env=False)
    parser.add_argument("--version", action="version", version=f"lmforge {lmforge.__version__}")
    _add_commands(parser, COMMANDS)
    return parser


def _add_commands(parser: ArgumentParser, table: dict) -> None:
    sub = parser.add_subcommands(dest="command", required=True)
    for name, entry in table.items():
        p = ArgumentParser(prog=f"{parser.prog} {name}")
        if isinstance(entry, dict):
            _add_commands(p, entry)
            sub.add_subcommand(name, p, help=f"{name} commands: {', '.join(entry)}")
        else:
            entry[1](p)
            sub.add_subcommand(name, p, help=entry[0])


def _resolve(table: dict, args: Namespace) -> tuple[Callable[[Namespace], None], Namespace]:
    name = args["command"]
    entry, args = table[name], args[name]
    if isinstance(entry, dict):
        return _resolve(entry, args)
    return entry[2], args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    run, command_args = _resolve(COMMANDS, args)
    try:
        run(command_args)
    except (UserError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, ValueError) as e:
        if os.environ.get("LMFORGE_DEBUG"):
            raise
        print(f"lmforge: error: {e}", file=sys.stderr)
        sys.exit(2)
