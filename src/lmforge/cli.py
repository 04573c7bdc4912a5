"""The `lmforge` command: a table of subcommands, each parsed by jsonargparse and
handed to a library function. Parsing only; the work happens in the library."""

from __future__ import annotations

import sys

from jsonargparse import ArgumentParser

import lmforge


class UserError(Exception):
    """A mistake in what the user passed: printed as one line, exit status 2."""


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="lmforge", description=lmforge.__doc__)
    parser.add_argument("--version", action="version", version=f"lmforge {lmforge.__version__}")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    parser.parse_args(sys.argv[1:] if argv is None else argv)
