"""``zaya train CONFIG``: train or fine-tune a ZAYA model from a TOML/YAML config.

    zaya train recipes/train-tiny.toml
    zaya train recipes/train-tiny.toml --resume                 # continue from the latest checkpoint
    zaya train recipes/train-tiny.toml --set balance.enabled=false --set train.out_dir=runs/nobal
    zaya train recipes/train-tiny.toml --plot-only --plot loss.png
    zaya train recipes/finetune-zaya1-8b-fsdp.toml --dry-run --ranks 8     # memory per rank, nothing trained
    torchrun --nproc-per-node 2 -m zaya.train recipes/train-tiny.toml
"""

from __future__ import annotations

import argparse

from zaya.train.config import load_config
from zaya.train.loop import train
from zaya.train.plot import plot_metrics


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="training config (.toml, or .yaml with PyYAML)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest complete checkpoint in train.out_dir (starts fresh if none)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (TOML syntax), e.g. --set train.steps=50; repeatable")
    p.add_argument("--plot", metavar="PNG", help="write a PNG of loss and load entropy from the metrics log")
    p.add_argument("--plot-only", action="store_true", help="with --plot: plot an existing run, do not train")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--dry-run", action="store_true",
                   help="print the memory one rank needs (parameters, gradients, optimizer, activations) and whether "
                        "it fits the device; train nothing")
    p.add_argument("--ranks", type=int, default=None, metavar="N",
                   help="with --dry-run: the number of ranks to plan for (default: WORLD_SIZE, else 1)")
    p.add_argument("--device-memory", type=float, default=None, metavar="GB",
                   help="with --dry-run: plan for a device with this much memory instead of this machine's")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train or fine-tune a ZAYA model (single process or torchrun)",
        description="Train a ZAYA model from scratch or fine-tune a checkpoint. Checkpoints are written in the "
                    "inference format under train.out_dir/checkpoints/; metrics go to train.out_dir/metrics.jsonl.")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.no_progress:
        cfg.train.progress = False
    if args.plot_only:
        if not args.plot:
            raise SystemExit("zaya train: --plot-only needs --plot PNG")
        print(plot_metrics(cfg.out_dir / "metrics.jsonl", args.plot))
        return 0
    if args.dry_run:
        import os

        # start-up time: the memory model is needed by --dry-run only
        from zaya.train.memory import dry_run

        text, fits = dry_run(cfg, args.ranks or int(os.environ.get("WORLD_SIZE", "1")), args.device_memory)
        print(text)
        return 0 if fits else 1
    if args.plot:
        cfg.train.plot = args.plot
    train(cfg, resume=args.resume)
    return 0
