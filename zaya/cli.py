"""The `zaya` command line.

Each subcommand lives next to the code it drives and exposes ``register(subparsers)``,
which adds its parser and sets ``func`` (called with the parsed args, returns an exit code).
"""

from __future__ import annotations

import argparse
import sys

from zaya import bench, commands, evaluate, models_store, repl, solve
from zaya.errors import ZayaError
from zaya.server import cli as server_cli
from zaya.train import cli as train_cli

# Modules that contribute subcommands, in the order they appear in --help.
COMMAND_MODULES = [repl, commands, solve, bench, train_cli, server_cli, models_store, evaluate]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zaya",
        description="Run, serve, test-time-scale and train ZAYA1 models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ZayaError, FileNotFoundError) as exc:
        # errors raised on purpose carry a message meant for people: no traceback
        print(f"zaya: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
