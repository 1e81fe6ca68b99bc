"""``python -m zaya.train CONFIG`` and ``torchrun --nproc-per-node N -m zaya.train CONFIG``."""

from __future__ import annotations

import argparse
import os
import sys

from zaya.errors import ZayaError
from zaya.train.cli import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zaya.train", description="Train or fine-tune a ZAYA model.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ZayaError, FileNotFoundError) as exc:
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"{prefix}zaya train: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
