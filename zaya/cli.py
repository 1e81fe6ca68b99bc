"""The `zaya` command line.

Each subcommand lives next to the code it drives and exposes ``register(subparsers)``,
which adds its parser and sets ``func`` (called with the parsed args, returns an exit code).
"""

from __future__ import annotations

import argparse
import sys

# Modules that contribute subcommands, in the order they appear in --help.
COMMAND_MODULES = [
    "zaya.commands",
    "zaya.solve",
    "zaya.quant",
    "zaya.bench",
    "zaya.train.cli",
    "zaya.server.cli",
    "zaya.models_store",
    "zaya.evaluate",
]


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="zaya",
        description="Run, serve, test-time-scale and train ZAYA1 models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
                continue  # that part is not in this install

            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from zaya.errors import ZayaError

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
