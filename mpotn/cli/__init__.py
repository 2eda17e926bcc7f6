"""Command line: ``mpotn inspect``, ``compress``, ``finetune``, ``squeeze``, ``heal``, ``compare``.

Run ``mpotn --help`` or ``mpotn COMMAND --help`` for every option and its default.
Each subcommand is a module of this package with ``add_parser(subparsers)`` and
``run(args)``; building the parser imports only [mpotn.types][] and the
argument helpers of [mpotn.cli.common][], and ``run`` imports the library.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mpotn.cli import compare, compress, finetune, heal, inspect, squeeze

#: The subcommands, in the order ``mpotn --help`` lists them.
COMMANDS = {
    "inspect": inspect,
    "compress": compress,
    "finetune": finetune,
    "squeeze": squeeze,
    "heal": heal,
    "compare": compare,
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``mpotn`` command."""
    parser = argparse.ArgumentParser(
        prog="mpotn",
        description="Matrix product operators for compressing pre-trained language models.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mpotn`` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command].run(args)
    except ValueError as error:
        print(f"mpotn {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0
